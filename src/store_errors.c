/*-------------------------------------------------------------------------
 *
 * store_errors.c
 *	  The SQL of Stripe's asynchronous error reports: which accounts to
 *	  read and from when, storing a page of reports in
 *	  stripe_meter.error_reports while marking the delivered events their
 *	  samples name, and recording how the read went (sync_state).
 *	  Reading the pages from Stripe is async_errors.c's.
 *
 * Every function here runs inside one of the worker's short transactions
 * (DeliveryStoreBegin ... DeliveryStoreCommit), SPI connected.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/store_errors.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "nodes/pg_list.h"
#include "utils/builtins.h"

#include "stripe_meter.h"

/*
 * StoreErrorsAccounts
 *		The accounts to read reports for: the key's own (account NULL), and
 *		up to max_accounts connected ones billed in the last three days,
 *		each with the time to read from (RFC 3339, overlap_secs before its
 *		newest report; NULL: from the start).  A List of ErrorReportAccount
 *		in cxt.
 */
List *
StoreErrorsAccounts(int overlap_secs, int max_accounts, MemoryContext cxt)
{
	static SPIPlanPtr plan = NULL;
	Datum		args[2];
	List	   *accounts = NIL;
	int			rc;
	uint64		i;

	if (plan == NULL)
		plan = SpiPrepareSaved("WITH a AS ("
							   "  SELECT NULL::text AS account"
							   "  UNION ALL"
							   "  (SELECT DISTINCT stripe_account FROM stripe_meter.meter_events"
							   "    WHERE stripe_account IS NOT NULL"
							   "      AND delivered_at > pg_catalog.now() - interval '3 days'"
							   "    ORDER BY 1 LIMIT $2))"
							   " SELECT a.account,"
							   "        pg_catalog.to_char(((SELECT max(r.created) FROM stripe_meter.error_reports r"
							   "                              WHERE r.stripe_account IS NOT DISTINCT FROM a.account)"
							   "          - $1 * interval '1 second') AT TIME ZONE 'UTC',"
							   "          'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
							   "   FROM a",
							   2, (Oid[]) {INT4OID, INT4OID});
	args[0] = Int32GetDatum(overlap_secs);
	args[1] = Int32GetDatum(max_accounts);
	rc = SPI_execute_plan(plan, args, NULL, true, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "could not list accounts: %s", SPI_result_code_string(rc));
	for (i = 0; i < SPI_processed; i++)
	{
		ErrorReportAccount *a = MemoryContextAllocZero(cxt, sizeof(ErrorReportAccount));
		MemoryContext old;

		a->account = StoreResultText(i, 1, cxt);
		a->cursor = StoreResultText(i, 2, cxt);
		old = MemoryContextSwitchTo(cxt);	/* outlives SPI's memory */
		accounts = lappend(accounts, a);
		MemoryContextSwitchTo(old);
	}
	return accounts;
}

/*
 * StoreErrorsApplyPage
 *		Store one page's reports (account NULL: the key's own) and mark the
 *		delivered events their sample errors name; status.not_billed counts
 *		those marked for the first time.
 */
void
StoreErrorsApplyPage(const char *page, const char *account)
{
	static SPIPlanPtr plan = NULL;
	Datum		args[2];
	char		nulls[2] = {' ', account ? ' ' : 'n'};
	int			rc;
	uint64		i;
	int64		first = 0;

	if (plan == NULL)
		plan = SpiPrepareSaved(
							   "WITH e AS ("
							   "  SELECT x FROM pg_catalog.jsonb_array_elements($1::jsonb->'data') x"
							   "   WHERE pg_catalog.jsonb_typeof(x) = 'object'"
							   "     AND x->>'type' IN ('v1.billing.meter.error_report_triggered',"
							   "                        'v1.billing.meter.no_meter_found')"
							   "     AND x->>'id' IS NOT NULL AND x->>'created' IS NOT NULL),"
							   " ins AS ("
							   "  INSERT INTO stripe_meter.error_reports"
							   "   (id, type, stripe_account, created, meter_id, summary, error_count, event)"
							   "  SELECT x->>'id', x->>'type', $2, (x->>'created')::timestamptz,"
							   "         x->'related_object'->>'id', x->'data'->>'developer_message_summary',"
							   "         CASE WHEN pg_catalog.jsonb_typeof(x->'data'->'reason'->'error_count') = 'number'"
							   "              THEN (x->'data'->'reason'->>'error_count')::numeric::bigint END,"
							   "         x FROM e"
							   "  ON CONFLICT (id) DO NOTHING"
							   "  RETURNING id, event),"
							   " types AS ("
							   "  SELECT i.id, t FROM ins i,"
							   "    pg_catalog.jsonb_array_elements(CASE WHEN pg_catalog.jsonb_typeof(i.event->'data'->'reason'->'error_types') = 'array'"
							   "      THEN i.event->'data'->'reason'->'error_types' ELSE '[]' END) t),"
							   " samples AS ("
							   "  SELECT ty.id, ty.t->>'code' AS code, s->>'error_message' AS message,"
							   "         s->'request'->>'identifier' AS identifier"
							   "    FROM types ty,"
							   "    pg_catalog.jsonb_array_elements(CASE WHEN pg_catalog.jsonb_typeof(ty.t->'sample_errors') = 'array'"
							   "      THEN ty.t->'sample_errors' ELSE '[]' END) s"
							   "   WHERE pg_catalog.jsonb_typeof(s) = 'object')"
							   " UPDATE stripe_meter.meter_events m"
							   "    SET async_error_code = COALESCE(s.code, 'unknown'),"
							   "        async_error_message = s.message,"
							   "        async_error_report = s.id"
							   "   FROM samples s, stripe_meter.meter_events prev"
							   "  WHERE m.identifier = s.identifier"
							   "    AND m.stripe_account IS NOT DISTINCT FROM $2"
							   "    AND prev.identifier = m.identifier"
							   " RETURNING prev.async_error_code IS NULL",
							   2, (Oid[]) {TEXTOID, TEXTOID});
	args[0] = CStringGetTextDatum(page);
	args[1] = account ? CStringGetTextDatum(account) : (Datum) 0;
	rc = SPI_execute_plan(plan, args, nulls, false, 0);
	if (rc != SPI_OK_UPDATE_RETURNING)
		elog(ERROR, "could not record error reports: %s", SPI_result_code_string(rc));

	/*
	 * status.not_billed counts events, so only those marked for the first
	 * time count; "prev" is the row as this statement found it.
	 */
	for (i = 0; i < SPI_processed; i++)
	{
		bool		isnull;

		if (DatumGetBool(StoreResultDatum(i, 1, &isnull)))
			first++;
	}
	CountersNotBilled(first);
}

/*
 * StoreErrorsRecordRead
 *		Record how reading the reports went: error NULL when every account
 *		was read (the time of this read), else why not.
 */
void
StoreErrorsRecordRead(const char *error)
{
	static SPIPlanPtr failed_plan = NULL;
	static SPIPlanPtr read_plan = NULL;
	int			rc;

	if (error != NULL)
	{
		Datum		arg = CStringGetTextDatum(error);

		if (failed_plan == NULL)
			failed_plan = SpiPrepareSaved("UPDATE stripe_meter.sync_state SET error_reports_error = $1",
										  1, (Oid[]) {TEXTOID});
		rc = SPI_execute_plan(failed_plan, &arg, NULL, false, 0);
	}
	else
	{
		if (read_plan == NULL)
			read_plan = SpiPrepareSaved("UPDATE stripe_meter.sync_state"
										"   SET error_reports_pulled_at = pg_catalog.now(), error_reports_error = NULL",
										0, NULL);
		rc = SPI_execute_plan(read_plan, NULL, NULL, false, 0);
	}
	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "could not record the error report read: %s", SPI_result_code_string(rc));
}
