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
 * by id), and moves on only after every page was read.
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

static void
record_error(const char *error)
{
	Datum		arg = CStringGetTextDatum(error);

	ereport(LOG,
			(errmsg("stripe_meter could not read Stripe's error reports: %s", error)));
	(void) SPI_execute_with_args("UPDATE stripe_meter.sync_state SET error_reports_error = $1",
								 1, (Oid[]) {TEXTOID}, &arg, NULL, false, 0);
}

/*
 * AsyncErrorsPull
 *		Read new error reports and mark the events they name.  Called by the
 *		worker with no transaction open.
 */
void
AsyncErrorsPull(void)
{
	MemoryContext mine = CurrentMemoryContext;
	List	   *pages = NIL;
	char	   *path;
	char	   *error = NULL;
	char	   *cursor = NULL;
	int			i;
	int			rc;
	ListCell   *lc;

	if (!DeliveryStoreBegin())
		return;
	rc = SPI_execute_with_args("SELECT pg_catalog.to_char((error_reports_cursor - $1 * interval '1 second')"
							   "         AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
							   "  FROM stripe_meter.sync_state",
							   1, (Oid[]) {INT4OID}, (Datum[]) {Int32GetDatum(CURSOR_OVERLAP_SECS)},
							   NULL, true, 1);
	if (rc == SPI_OK_SELECT && SPI_processed == 1)
	{
		char	   *c = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);

		if (c)
			cursor = MemoryContextStrdup(mine, c);
	}
	DeliveryStoreCommit();
	MemoryContextSwitchTo(mine);

	/* read every page first, with no transaction open */
	path = cursor ?
		psprintf("%s?%s&limit=100&created%%5Bgt%%5D=%s", EVENTS_PATH, EVENT_TYPES, cursor) :
		psprintf("%s?%s&limit=100", EVENTS_PATH, EVENT_TYPES);
	for (i = 0; path != NULL && i < MAX_PAGES; i++)
	{
		HttpResult	http;

		if (!StripeSyncRequest("GET", path, NULL, NULL, NULL, &http) ||
			http.curl_code != 0 || http.status != 200)
		{
			error = StripeSyncErrorText(&http);
			break;
		}
		if (!DeliveryJsonIsStorable(http.body, http.body_len))
		{
			error = "Stripe's list of events could not be read";
			break;
		}
		pages = lappend(pages, pnstrdup(http.body, http.body_len));
		path = next_page(http.body, http.body_len);
	}

	if (!DeliveryStoreBegin())
		return;
	if (error != NULL)
	{
		record_error(error);
		DeliveryStoreCommit();
		MemoryContextSwitchTo(mine);
		return;
	}
	foreach(lc, pages)
	{
		Datum		arg = CStringGetTextDatum((char *) lfirst(lc));

		rc = SPI_execute_with_args(
								   "WITH e AS ("
								   "  SELECT x FROM pg_catalog.jsonb_array_elements($1::jsonb->'data') x"
								   "   WHERE pg_catalog.jsonb_typeof(x) = 'object'"
								   "     AND x->>'type' IN ('v1.billing.meter.error_report_triggered',"
								   "                        'v1.billing.meter.no_meter_found')"
								   "     AND x->>'id' IS NOT NULL AND x->>'created' IS NOT NULL),"
								   " ins AS ("
								   "  INSERT INTO stripe_meter.error_reports"
								   "   (id, type, created, meter_id, summary, error_count, event)"
								   "  SELECT x->>'id', x->>'type', (x->>'created')::timestamptz,"
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
								   "   FROM samples s WHERE m.identifier = s.identifier",
								   1, (Oid[]) {TEXTOID}, &arg, NULL, false, 0);
		if (rc != SPI_OK_UPDATE)
			elog(ERROR, "could not record error reports: %s", SPI_result_code_string(rc));
		rc = SPI_execute_with_args("UPDATE stripe_meter.sync_state SET error_reports_cursor ="
								   "  GREATEST(error_reports_cursor,"
								   "    (SELECT max((x->>'created')::timestamptz)"
								   "       FROM pg_catalog.jsonb_array_elements($1::jsonb->'data') x"
								   "      WHERE pg_catalog.jsonb_typeof(x) = 'object'"
								   "        AND x->>'type' IN ('v1.billing.meter.error_report_triggered',"
								   "                           'v1.billing.meter.no_meter_found')))",
								   1, (Oid[]) {TEXTOID}, &arg, NULL, false, 0);
		if (rc != SPI_OK_UPDATE)
			elog(ERROR, "could not move the error report cursor: %s", SPI_result_code_string(rc));
	}
	rc = SPI_execute("UPDATE stripe_meter.sync_state"
					 "   SET error_reports_pulled_at = pg_catalog.now(), error_reports_error = NULL",
					 false, 0);
	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "could not record the error report pull: %s", SPI_result_code_string(rc));
	DeliveryStoreCommit();
	MemoryContextSwitchTo(mine);
}
