/*-------------------------------------------------------------------------
 *
 * async_errors.c
 *	  Errors Stripe reports only after accepting an event: the worker pulls
 *	  v1.billing.meter.error_report_triggered and
 *	  v1.billing.meter.no_meter_found from the v2 Events API
 *	  (GET /v2/core/events), keeps each in stripe_meter.error_reports, and
 *	  marks the delivered events its sample errors name with the code and
 *	  message, so that a query on meter_events (and status.not_billed)
 *	  shows what Stripe will not bill.
 *
 * Stripe's reports carry sample errors, not every failed identifier: the
 * report's error_count says how many events it covers.  Reading resumes
 * from the newest report seen, with an overlap (reports are deduplicated
 * by id), and moves on only after every page was read.  Connected
 * accounts' reports are read with Stripe-Context, for each account that
 * was billed in the last three days.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/async_errors.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "nodes/pg_list.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

#define EVENTS_PATH		"/v2/core/events"
#define EVENT_TYPES		"types=v1.billing.meter.error_report_triggered&types=v1.billing.meter.no_meter_found"
#define MAX_PAGES		100
#define CURSOR_OVERLAP_SECS 600
#define MAX_ACCOUNTS	100		/* connected accounts read per turn */

/* next_page_url of a v2 list page, if it stays on the events endpoint */
static char *
next_page(const char *body, size_t len)
{
	Jsonb	   *jb;
	JsonbValue	k;
	JsonbValue *v;

	jb = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(pnstrdup(body, len))));
	if (!JB_ROOT_IS_OBJECT(jb))
		return NULL;
	k.type = jbvString;
	k.val.string.val = "next_page_url";
	k.val.string.len = strlen("next_page_url");
	v = findJsonbValueFromContainer(&jb->root, JB_FOBJECT, &k);
	if (v == NULL || v->type != jbvString)
		return NULL;
	/* a path on the same host only: never follow a URL elsewhere */
	if (v->val.string.len < (int) strlen(EVENTS_PATH "?") ||
		strncmp(v->val.string.val, EVENTS_PATH "?", strlen(EVENTS_PATH "?")) != 0)
		return NULL;
	return pnstrdup(v->val.string.val, v->val.string.len);
}

typedef struct AccountRead
{
	char	   *account;		/* NULL: the key's own account */
	char	   *cursor;			/* RFC 3339, or NULL: from the start */
	List	   *pages;
} AccountRead;

/* the accounts to read: the key's own, and connected ones billed lately */
static List *
accounts_to_read(MemoryContext mine)
{
	List	   *reads = NIL;
	int			rc;
	uint64		i;

	rc = SPI_execute_with_args("WITH a AS ("
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
							   2, (Oid[]) {INT4OID, INT4OID},
							   (Datum[]) {Int32GetDatum(CURSOR_OVERLAP_SECS), Int32GetDatum(MAX_ACCOUNTS)},
							   NULL, true, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "could not list accounts: %s", SPI_result_code_string(rc));
	for (i = 0; i < SPI_processed; i++)
	{
		AccountRead *r = MemoryContextAllocZero(mine, sizeof(AccountRead));
		char	   *a = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
		char	   *c = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2);

		MemoryContext old;

		r->account = a ? MemoryContextStrdup(mine, a) : NULL;
		r->cursor = c ? MemoryContextStrdup(mine, c) : NULL;
		old = MemoryContextSwitchTo(mine);	/* outlives SPI's memory */
		reads = lappend(reads, r);
		MemoryContextSwitchTo(old);
	}
	return reads;
}

/* read every page of one account's reports; NULL, or why not */
static char *
read_account(AccountRead *r)
{
	char	   *path;
	int			i;

	path = r->cursor ?
		psprintf("%s?%s&limit=100&created%%5Bgt%%5D=%s", EVENTS_PATH, EVENT_TYPES, r->cursor) :
		psprintf("%s?%s&limit=100", EVENTS_PATH, EVENT_TYPES);
	for (i = 0; path != NULL && i < MAX_PAGES; i++)
	{
		HttpResult	http;

		if (!StripeSyncRequest("GET", path, NULL, NULL, r->account, &http) ||
			http.curl_code != 0 || http.status != 200)
			return StripeSyncErrorText(&http);
		if (!DeliveryJsonIsStorable(http.body, http.body_len))
			return "Stripe's list of events could not be read";
		r->pages = lappend(r->pages, pnstrdup(http.body, http.body_len));
		path = next_page(http.body, http.body_len);
	}
	return NULL;
}

/* store one page's reports and mark the events their samples name */
static void
apply_page(const char *page, const char *account)
{
	Datum		args[2];
	char		nulls[2] = {' ', account ? ' ' : 'n'};
	int			rc;

	args[0] = CStringGetTextDatum(page);
	args[1] = account ? CStringGetTextDatum(account) : (Datum) 0;
	rc = SPI_execute_with_args(
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
							   "   FROM samples s WHERE m.identifier = s.identifier"
							   "    AND m.stripe_account IS NOT DISTINCT FROM $2",
							   2, (Oid[]) {TEXTOID, TEXTOID}, args, nulls, false, 0);
	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "could not record error reports: %s", SPI_result_code_string(rc));
}

/*
 * AsyncErrorsPull
 *		Read new error reports and mark the events they name: for the key's
 *		own account, and for each connected account billed in the last three
 *		days (with Stripe-Context).  Called by the worker with no
 *		transaction open; every page is read before anything is stored.
 */
void
AsyncErrorsPull(void)
{
	MemoryContext mine = CurrentMemoryContext;
	List	   *reads;
	char	   *error = NULL;
	ListCell   *lc;
	int			rc;

	if (!DeliveryStoreBegin())
		return;
	reads = accounts_to_read(mine);
	DeliveryStoreCommit();
	MemoryContextSwitchTo(mine);

	foreach(lc, reads)
	{
		AccountRead *r = lfirst(lc);
		char	   *e = read_account(r);

		if (e != NULL)
		{
			/* the others are still read; this one is tried again next time */
			error = r->account ? psprintf("%s (account %s)", e, r->account) : e;
			list_free(r->pages);
			r->pages = NIL;
		}
	}

	if (!DeliveryStoreBegin())
		return;
	foreach(lc, reads)
	{
		AccountRead *r = lfirst(lc);
		ListCell   *pc;

		foreach(pc, r->pages)
			apply_page((char *) lfirst(pc), r->account);
	}
	if (error != NULL)
	{
		Datum		arg = CStringGetTextDatum(error);

		ereport(LOG,
				(errmsg("stripe_meter could not read Stripe's error reports: %s", error)));
		rc = SPI_execute_with_args("UPDATE stripe_meter.sync_state SET error_reports_error = $1",
								   1, (Oid[]) {TEXTOID}, &arg, NULL, false, 0);
	}
	else
		rc = SPI_execute("UPDATE stripe_meter.sync_state"
						 "   SET error_reports_pulled_at = pg_catalog.now(), error_reports_error = NULL",
						 false, 0);
	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "could not record the error report read: %s", SPI_result_code_string(rc));
	DeliveryStoreCommit();
	MemoryContextSwitchTo(mine);
}
