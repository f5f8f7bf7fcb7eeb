/*-------------------------------------------------------------------------
 *
 * reconcile.c
 *	  stripe_meter_reconcile(event_name, customer, from, to
 *							 [, value_grouping_window [, stripe_account]]):
 *	  what this database delivered for one customer and meter, against
 *	  Stripe's event summaries (GET /v1/billing/meters/{id}/event_summaries)
 *	  for the same windows, with the difference per window.
 *
 * The local side counts delivered events (stripe_meter.meter_events) by
 * their timestamp, less those cancelled or being cancelled, aggregated with
 * the meter's formula.  Events Stripe reported as not billable stay in it,
 * so they show up as a difference.  Stripe's summaries lag behind by a few
 * minutes (they are eventually consistent), and delivered rows are purged
 * after stripe_meter.delivered_retention.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/reconcile.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "nodes/pg_list.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

#include "stripe_meter.h"

#define MAX_PAGES	100

PG_FUNCTION_INFO_V1(stripe_meter_reconcile);

typedef struct MeterInfo
{
	char	   *meter_id;
	char	   *aggregation;
	char	   *value_key;
} MeterInfo;

static char *
text_arg(FunctionCallInfo fcinfo, int n, const char *what, bool required)
{
	char	   *s;

	if (PG_ARGISNULL(n))
	{
		if (required)
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("%s must not be null", what)));
		return NULL;
	}
	s = text_to_cstring(PG_GETARG_TEXT_PP(n));
	if (s[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be empty", what)));
	if (pg_mbstrlen(s) > 255)
		ereport(ERROR,
				(errcode(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
				 errmsg("%s is too long", what)));
	return s;
}

static int64
unix_seconds(TimestampTz t)
{
	return (int64) ((t - SetEpochTimestamp()) / USECS_PER_SEC);
}

static void
check_aligned(const char *what, TimestampTz t, int64 step, const char *unit)
{
	if (TIMESTAMP_NOT_FINITE(t))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be finite", what)));
	if ((t - SetEpochTimestamp()) % (step * USECS_PER_SEC) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be aligned to %s", what, unit),
				 errdetail("Stripe's event summaries take times aligned to the minute, to the hour for hourly windows, and to midnight UTC for daily ones.")));
}

/* the meter's id from stripe_meter.meters, else from Stripe's list */
static void
find_meter(const char *event_name, const char *account, MeterInfo *m)
{
	Datum		arg = CStringGetTextDatum(event_name);
	int			rc;
	char	   *after = NULL;
	int			i;

	m->meter_id = NULL;
	m->aggregation = "sum";
	m->value_key = DEFAULT_VALUE_KEY;
	rc = SPI_execute_with_args("SELECT meter_id, aggregation, value_payload_key"
							   "  FROM stripe_meter.meters WHERE event_name = $1",
							   1, (Oid[]) {TEXTOID}, &arg, NULL, true, 1);
	if (rc == SPI_OK_SELECT && SPI_processed == 1)
	{
		char	   *agg = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);

		if (account == NULL)
			m->meter_id = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
		if (agg)
			m->aggregation = agg;
		m->value_key = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3);
	}
	if (m->meter_id != NULL)
		return;

	/* a connected account has meters of its own: look it up there */
	for (i = 0; i < MAX_PAGES; i++)
	{
		StringInfoData path;
		char	   *body;
		bool		has_more;
		Datum		args[2];

		initStringInfo(&path);
		appendStringInfoString(&path, "/v1/billing/meters?limit=100");
		if (after)
		{
			appendStringInfoString(&path, "&starting_after=");
			StripeClientAppendEscaped(&path, after, strlen(after));
		}
		body = StripeSyncGetJson(path.data, account);
		args[0] = CStringGetTextDatum(body);
		args[1] = arg;
		rc = SPI_execute_with_args("SELECT x->>'id', x->'default_aggregation'->>'formula'"
								   "  FROM pg_catalog.jsonb_array_elements($1::jsonb->'data') x"
								   " WHERE x->>'event_name' = $2"
								   " ORDER BY (x->>'status' = 'active') DESC LIMIT 1",
								   2, (Oid[]) {TEXTOID, TEXTOID}, args, NULL, true, 1);
		if (rc == SPI_OK_SELECT && SPI_processed == 1)
		{
			char	   *agg = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);

			m->meter_id = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
			if (agg)
				m->aggregation = agg;
			return;
		}
		if (!ListPageNext(body, strlen(body), &has_more, &after) || !has_more)
			break;
	}
	ereport(ERROR,
			(errcode(ERRCODE_UNDEFINED_OBJECT),
			 errmsg("no meter for event name \"%s\"", event_name),
			 account ? errdetail("Connected account %s has no meter with this event name.", account) :
			 errdetail("The Stripe account has no meter with this event name."),
			 errhint("Run stripe_meter_sync_meters() after creating the meter in Stripe.")));
}

/*
 * stripe_meter_reconcile(...) RETURNS TABLE (window_start, window_end,
 *		local_events, local_value, stripe_value, difference)
 */
Datum
stripe_meter_reconcile(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	char	   *event_name = text_arg(fcinfo, 0, "event_name", true);
	char	   *customer = text_arg(fcinfo, 1, "customer", true);
	char	   *grouping = text_arg(fcinfo, 4, "value_grouping_window", false);
	char	   *account = text_arg(fcinfo, 5, "stripe_account", false);
	TimestampTz from;
	TimestampTz to;
	int64		step;
	MeterInfo	meter;
	List	   *pages = NIL;
	char	   *after = NULL;
	int			i;
	int			rc;
	uint64		r;
	Datum	   *page_datums;
	ListCell   *lc;
	Datum		args[8];
	Oid			types[8] = {TEXTARRAYOID, INT8OID, INT8OID, INT8OID, TEXTOID, TEXTOID,
	TEXTOID, TEXTOID};
	char		nulls[8] = {' ', ' ', ' ', ' ', ' ', ' ', ' ', ' '};

	if (PG_ARGISNULL(2) || PG_ARGISNULL(3))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("from and to must not be null")));
	from = PG_GETARG_TIMESTAMPTZ(2);
	to = PG_GETARG_TIMESTAMPTZ(3);
	if (grouping != NULL && strcmp(grouping, "day") != 0 && strcmp(grouping, "hour") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("value_grouping_window must be \"day\", \"hour\" or NULL")));
	if (account != NULL && (strncmp(account, "acct_", 5) != 0 ||
							strspn(account + 5, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789") != strlen(account + 5) ||
							account[5] == '\0'))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("stripe_account must look like acct_ followed by letters and digits")));
	step = grouping == NULL ? 60 : strcmp(grouping, "hour") == 0 ? SECS_PER_HOUR : SECS_PER_DAY;
	check_aligned("from", from, step,
				  step == 60 ? "the minute" : step == SECS_PER_HOUR ? "the hour" : "midnight UTC");
	check_aligned("to", to, step,
				  step == 60 ? "the minute" : step == SECS_PER_HOUR ? "the hour" : "midnight UTC");
	if (from >= to)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("from must be earlier than to")));
	if (grouping == NULL)
		step = unix_seconds(to) - unix_seconds(from);

	InitMaterializedSRF(fcinfo, 0);
	SPI_connect();
	find_meter(event_name, account, &meter);

	for (i = 0; i < MAX_PAGES; i++)
	{
		StringInfoData path;
		char	   *body;
		bool		has_more;

		initStringInfo(&path);
		appendStringInfoString(&path, "/v1/billing/meters/");
		StripeClientAppendEscaped(&path, meter.meter_id, strlen(meter.meter_id));
		appendStringInfoString(&path, "/event_summaries?limit=100&customer=");
		StripeClientAppendEscaped(&path, customer, strlen(customer));
		appendStringInfo(&path, "&start_time=" INT64_FORMAT "&end_time=" INT64_FORMAT,
						 unix_seconds(from), unix_seconds(to));
		if (grouping)
			appendStringInfo(&path, "&value_grouping_window=%s", grouping);
		if (after)
		{
			appendStringInfoString(&path, "&starting_after=");
			StripeClientAppendEscaped(&path, after, strlen(after));
		}
		body = StripeSyncGetJson(path.data, account);
		pages = lappend(pages, body);
		if (!ListPageNext(body, strlen(body), &has_more, &after))
			ereport(ERROR,
					(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
					 errmsg("Stripe's event summaries could not be read")));
		if (!has_more)
			break;
	}

	page_datums = palloc(sizeof(Datum) * Max(list_length(pages), 1));
	i = 0;
	foreach(lc, pages)
		page_datums[i++] = CStringGetTextDatum((char *) lfirst(lc));
	args[0] = PointerGetDatum(construct_array(page_datums, list_length(pages), TEXTOID, -1, false, TYPALIGN_INT));
	args[1] = Int64GetDatum(unix_seconds(from));
	args[2] = Int64GetDatum(unix_seconds(to));
	args[3] = Int64GetDatum(step);
	args[4] = CStringGetTextDatum(event_name);
	args[5] = CStringGetTextDatum(customer);
	args[6] = account ? CStringGetTextDatum(account) : (Datum) 0;
	nulls[6] = account ? ' ' : 'n';
	args[7] = CStringGetTextDatum(meter.aggregation);

	rc = SPI_execute_with_args(psprintf(
										"WITH w AS ("
										"  SELECT pg_catalog.to_timestamp(g::float8) AS ws,"
										"         pg_catalog.to_timestamp(LEAST(g + $4, $3)::float8) AS we"
										"    FROM pg_catalog.generate_series($2, $3 - 1, $4) g),"
										" s AS ("
										"  SELECT pg_catalog.to_timestamp((x->>'start_time')::float8) AS ws,"
										"         (x->>'aggregated_value')::numeric AS v"
										"    FROM pg_catalog.unnest($1) p,"
										"         pg_catalog.jsonb_array_elements(p::jsonb->'data') x"
										"   WHERE pg_catalog.jsonb_typeof(x->'aggregated_value') = 'number'),"
										" e AS ("
										"  SELECT e.ts, (e.payload->>%s)::numeric AS v"
										"    FROM stripe_meter.meter_events e"
										"   WHERE e.event_name = $5 AND e.customer = $6"
										"     AND e.stripe_account IS NOT DISTINCT FROM $7"
										"     AND e.ts >= pg_catalog.to_timestamp($2::float8)"
										"     AND e.ts < pg_catalog.to_timestamp($3::float8)"
										"     AND NOT EXISTS (SELECT 1 FROM stripe_meter.adjustments a"
										"                      WHERE a.identifier = e.identifier AND a.status <> 'failed')),"
										" l AS ("
										"  SELECT w.ws, pg_catalog.count(e.ts) AS n,"
										"         CASE $8 WHEN 'count' THEN pg_catalog.count(e.ts)::numeric"
										"                 WHEN 'last' THEN (pg_catalog.array_agg(e.v ORDER BY e.ts DESC))[1]"
										"                 ELSE pg_catalog.sum(e.v) END AS v"
										"    FROM w LEFT JOIN e ON e.ts >= w.ws AND e.ts < w.we"
										"   GROUP BY w.ws)"
										" SELECT w.ws, w.we, l.n, COALESCE(l.v, 0),"
										"        COALESCE((SELECT pg_catalog.sum(s.v) FROM s WHERE s.ws >= w.ws AND s.ws < w.we), 0) AS sv,"
										"        COALESCE(l.v, 0) - COALESCE((SELECT pg_catalog.sum(s.v) FROM s WHERE s.ws >= w.ws AND s.ws < w.we), 0)"
										"   FROM w JOIN l ON l.ws = w.ws ORDER BY w.ws",
										quote_literal_cstr(meter.value_key)),
							   8, types, args, nulls, true, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "could not compare with Stripe: %s", SPI_result_code_string(rc));

	for (r = 0; r < SPI_processed; r++)
	{
		Datum		values[6];
		bool		isnull[6];
		int			c;

		for (c = 0; c < 6; c++)
			values[c] = SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, c + 1, &isnull[c]);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, isnull);
	}
	SPI_finish();
	return (Datum) 0;
}
