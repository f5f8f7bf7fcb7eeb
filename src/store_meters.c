/*-------------------------------------------------------------------------
 *
 * store_meters.c
 *	  The SQL of stripe_meter.meters: replace it with the meters of
 *	  Stripe's list pages, record a failed sync, and read one meter.
 *	  Fetching the pages and when to sync are meter_sync.c's; the
 *	  enqueue-time lookups of meters are index probes (store_probe.c).
 *
 * Every function here makes its own SPI connection inside the caller's
 * transaction, whether a session's or one of the worker's short ones.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/store_meters.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "nodes/pg_list.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

/*
 * StoreMetersReplace
 *		Replace stripe_meter.meters with the meters in pages (Stripe's list
 *		pages, as JSON text) and record the sync in sync_state.  The caller
 *		holds the sync lock.  Returns how many meters the table holds.
 */
int
StoreMetersReplace(List *pages)
{
	static SPIPlanPtr upsert_plan = NULL;
	static SPIPlanPtr remove_plan = NULL;
	static SPIPlanPtr synced_plan = NULL;
	static SPIPlanPtr count_plan = NULL;
	ListCell   *lc;
	Datum		stamp = TimestampTzGetDatum(GetCurrentTimestamp());
	bool		isnull;
	int			n;
	int			rc;

	SPI_connect();

	/*
	 * Stripe may hold an inactive meter and an active one with the same
	 * event name: the active one wins.  Meters whose keys could not be
	 * form-encoded are left out.
	 */
	if (upsert_plan == NULL)
		upsert_plan = SpiPrepareSaved(
									  "WITH m AS ("
									  " SELECT DISTINCT ON (x->>'event_name')"
									  "   x->>'event_name' AS event_name,"
									  "   COALESCE(x->'customer_mapping'->>'event_payload_key', 'stripe_customer_id') AS ck,"
									  "   COALESCE(x->'value_settings'->>'event_payload_key', 'value') AS vk,"
									  "   x->>'id' AS id,"
									  "   x->'default_aggregation'->>'formula' AS agg,"
									  "   x->>'status' AS st"
									  "   FROM pg_catalog.jsonb_array_elements($1::jsonb->'data') x"
									  "  WHERE pg_catalog.jsonb_typeof(x) = 'object'"
									  "    AND COALESCE(x->>'event_name', '') <> ''"
									  "    AND pg_catalog.char_length(x->>'event_name') <= 100"
									  "  ORDER BY x->>'event_name', (x->>'status' = 'active') DESC,"
									  "           x->>'created' DESC NULLS LAST)"
									  " INSERT INTO stripe_meter.meters AS t"
									  "   (event_name, customer_payload_key, value_payload_key, meter_id,"
									  "    aggregation, status, synced_at)"
									  " SELECT event_name, ck, vk, id,"
									  "        CASE WHEN agg IN ('count', 'last', 'sum') THEN agg END,"
									  "        CASE WHEN st IN ('active', 'inactive') THEN st ELSE 'inactive' END, $2"
									  "   FROM m"
									  "  WHERE ck <> '' AND vk <> '' AND ck <> vk"
									  "    AND pg_catalog.strpos(ck, '[') = 0 AND pg_catalog.strpos(ck, ']') = 0"
									  "    AND pg_catalog.strpos(vk, '[') = 0 AND pg_catalog.strpos(vk, ']') = 0"
									  " ON CONFLICT (event_name) DO UPDATE SET"
									  "   customer_payload_key = EXCLUDED.customer_payload_key,"
									  "   value_payload_key = EXCLUDED.value_payload_key,"
									  "   meter_id = EXCLUDED.meter_id, aggregation = EXCLUDED.aggregation,"
									  "   status = EXCLUDED.status, synced_at = EXCLUDED.synced_at,"
									  "   rollup_window = CASE WHEN EXCLUDED.aggregation IN ('sum', 'last')"
									  "                        THEN t.rollup_window END"
									  " WHERE t.synced_at IS DISTINCT FROM EXCLUDED.synced_at"
									  "    OR (EXCLUDED.status = 'active' AND t.status <> 'active')",
									  2, (Oid[]) {TEXTOID, TIMESTAMPTZOID});
	foreach(lc, pages)
	{
		Datum		args[2] = {CStringGetTextDatum((char *) lfirst(lc)), stamp};

		rc = SPI_execute_plan(upsert_plan, args, NULL, false, 0);
		if (rc != SPI_OK_INSERT)
			elog(ERROR, "could not store meters: %s", SPI_result_code_string(rc));
	}

	if (remove_plan == NULL)
		remove_plan = SpiPrepareSaved("DELETE FROM stripe_meter.meters WHERE synced_at IS DISTINCT FROM $1",
									  1, (Oid[]) {TIMESTAMPTZOID});
	rc = SPI_execute_plan(remove_plan, &stamp, NULL, false, 0);
	if (rc != SPI_OK_DELETE)
		elog(ERROR, "could not remove old meters: %s", SPI_result_code_string(rc));

	if (synced_plan == NULL)
		synced_plan = SpiPrepareSaved("UPDATE stripe_meter.sync_state"
									  "   SET meters_synced_at = $1, meters_sync_error = NULL",
									  1, (Oid[]) {TIMESTAMPTZOID});
	rc = SPI_execute_plan(synced_plan, &stamp, NULL, false, 0);
	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "could not record the sync: %s", SPI_result_code_string(rc));

	if (count_plan == NULL)
		count_plan = SpiPrepareSaved("SELECT pg_catalog.count(*)::int4 FROM stripe_meter.meters",
									 0, NULL);
	rc = SPI_execute_plan(count_plan, NULL, NULL, false, 0);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not count meters");
	n = DatumGetInt32(StoreResultDatum(0, 1, &isnull));
	SPI_finish();
	return n;
}

/*
 * StoreMetersSyncError
 *		Record why the last scheduled sync failed (sync_state).
 */
void
StoreMetersSyncError(const char *error)
{
	static SPIPlanPtr plan = NULL;
	Datum		arg = CStringGetTextDatum(error);

	SPI_connect();
	if (plan == NULL)
		plan = SpiPrepareSaved("UPDATE stripe_meter.sync_state SET meters_sync_error = $1",
							   1, (Oid[]) {TEXTOID});
	(void) SPI_execute_plan(plan, &arg, NULL, false, 0);
	SPI_finish();
}

/*
 * StoreMetersFind
 *		An event name's row in stripe_meter.meters: its meter id,
 *		aggregation formula and value key (NULL where the row has none, in
 *		the caller's memory context).  False when there is no row.
 */
bool
StoreMetersFind(const char *event_name, char **meter_id, char **aggregation,
				char **value_key)
{
	MemoryContext caller = CurrentMemoryContext;
	Datum		arg = CStringGetTextDatum(event_name);
	bool		found;
	int			rc;

	SPI_connect();
	rc = SPI_execute_with_args("SELECT meter_id, aggregation, value_payload_key"
							   "  FROM stripe_meter.meters WHERE event_name = $1",
							   1, (Oid[]) {TEXTOID}, &arg, NULL, true, 1);
	found = (rc == SPI_OK_SELECT && SPI_processed == 1);
	if (found)
	{
		*meter_id = StoreResultText(0, 1, caller);
		*aggregation = StoreResultText(0, 2, caller);
		*value_key = StoreResultText(0, 3, caller);
	}
	SPI_finish();
	return found;
}
