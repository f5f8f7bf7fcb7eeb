/*-------------------------------------------------------------------------
 *
 * store_reconcile.c
 *	  The SQL of stripe_meter_reconcile(): picking an event name's meter
 *	  out of a page of Stripe's meter list, and comparing, window by
 *	  window, the delivered events with Stripe's event summaries.  Which
 *	  meter and which windows, and reading Stripe, are reconcile.c's.
 *
 * Every function here makes its own SPI connection inside the caller's
 * transaction.  A reconciliation runs once per call, so its statements
 * are planned for the values at hand rather than kept.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/store_reconcile.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "nodes/pg_list.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/tuplestore.h"

#include "stripe_meter.h"

/*
 * StoreReconcilePickMeter
 *		The meter for event_name in one page of Stripe's meter list (JSON
 *		text), an active one first: its id and aggregation formula (NULL
 *		when it has none), in the caller's memory context.  False when the
 *		page has none.
 */
bool
StoreReconcilePickMeter(const char *page, const char *event_name,
						char **meter_id, char **aggregation)
{
	MemoryContext caller = CurrentMemoryContext;
	Datum		args[2];
	bool		found;
	int			rc;

	args[0] = CStringGetTextDatum(page);
	args[1] = CStringGetTextDatum(event_name);
	SPI_connect();
	rc = SPI_execute_with_args("SELECT x->>'id', x->'default_aggregation'->>'formula'"
							   "  FROM pg_catalog.jsonb_array_elements($1::jsonb->'data') x"
							   " WHERE x->>'event_name' = $2"
							   " ORDER BY (x->>'status' = 'active') DESC LIMIT 1",
							   2, (Oid[]) {TEXTOID, TEXTOID}, args, NULL, true, 1);
	found = (rc == SPI_OK_SELECT && SPI_processed == 1);
	if (found)
	{
		*meter_id = StoreResultText(0, 1, caller);
		*aggregation = StoreResultText(0, 2, caller);
	}
	SPI_finish();
	return found;
}

/*
 * StoreReconcileCompare
 *		Put into tupstore one row per window of step seconds from from_secs
 *		to to_secs (Unix time): window_start, window_end, local_events,
 *		local_value, stripe_value, difference.
 *
 * The local side is the delivered events of the customer and meter (in
 * that account; NULL: the key's own) less those cancelled or being
 * cancelled, aggregated with the meter's formula over the value under
 * value_key; Stripe's side sums the summaries in pages (JSON text).
 */
void
StoreReconcileCompare(List *pages, int64 from_secs, int64 to_secs, int64 step,
					  const char *event_name, const char *customer,
					  const char *account, const char *aggregation,
					  const char *value_key,
					  Tuplestorestate *tupstore, TupleDesc tupdesc)
{
	Datum	   *page_datums;
	ListCell   *lc;
	Datum		args[9];
	Oid			types[9] = {TEXTARRAYOID, INT8OID, INT8OID, INT8OID, TEXTOID, TEXTOID,
	TEXTOID, TEXTOID, TEXTOID};
	char		nulls[9] = {' ', ' ', ' ', ' ', ' ', ' ', ' ', ' ', ' '};
	int			i;
	int			rc;
	uint64		r;

	page_datums = palloc(sizeof(Datum) * Max(list_length(pages), 1));
	i = 0;
	foreach(lc, pages)
		page_datums[i++] = CStringGetTextDatum((char *) lfirst(lc));
	args[0] = PointerGetDatum(construct_array(page_datums, list_length(pages), TEXTOID, -1, false, TYPALIGN_INT));
	args[1] = Int64GetDatum(from_secs);
	args[2] = Int64GetDatum(to_secs);
	args[3] = Int64GetDatum(step);
	args[4] = CStringGetTextDatum(event_name);
	args[5] = CStringGetTextDatum(customer);
	args[6] = account ? CStringGetTextDatum(account) : (Datum) 0;
	nulls[6] = account ? ' ' : 'n';
	args[7] = CStringGetTextDatum(aggregation);
	args[8] = value_key ? CStringGetTextDatum(value_key) : (Datum) 0;
	nulls[8] = value_key ? ' ' : 'n';

	SPI_connect();
	rc = SPI_execute_with_args("WITH w AS ("
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
							   "  SELECT e.ts, (e.payload->>$9)::numeric AS v"
							   "    FROM stripe_meter.meter_events e"
							   "   WHERE e.event_name = $5 AND e.customer = $6"
							   "     AND e.stripe_account IS NOT DISTINCT FROM $7"
							   "     AND e.outcome <> 'rolled_up'"
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
							   9, types, args, nulls, true, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "could not compare with Stripe: %s", SPI_result_code_string(rc));

	for (r = 0; r < SPI_processed; r++)
	{
		Datum		values[6];
		bool		isnull[6];
		int			c;

		for (c = 0; c < 6; c++)
			values[c] = StoreResultDatum(r, c + 1, &isnull[c]);
		tuplestore_putvalues(tupstore, tupdesc, values, isnull);
	}
	SPI_finish();
}
