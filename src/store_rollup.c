/*-------------------------------------------------------------------------
 *
 * store_rollup.c
 *	  The SQL of rollups: the events whose window has closed, the next
 *	  generation of a group's window, a formed rollup queued in the outbox
 *	  with its stripe_meter.rollups row, and the rolled-up events moved to
 *	  meter_events.  Grouping and summing are rollup.c's.
 *
 * Every function here runs inside one of the worker's short transactions
 * (DeliveryStoreBegin ... DeliveryStoreCommit), SPI connected.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/store_rollup.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "nodes/pg_list.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

/*
 * StoreRollupDueSources
 *		Up to limit events waiting in windows that closed at or before
 *		closed_by, locked (rows a session holds are skipped), ordered by
 *		window, group, timestamp and id.  A List of RollupSource in cxt.
 *
 * The group hash covers everything a rollup must not mix: the account, the
 * event name, the value key and formula frozen at enqueue, and the payload
 * without its value (the customer and every dimension value).  jsonb's text
 * lists keys in one order, so equal payloads hash alike.
 */
List *
StoreRollupDueSources(TimestampTz closed_by, int limit, MemoryContext cxt)
{
	static SPIPlanPtr plan = NULL;
	Datum		args[2];
	List	   *sources = NIL;
	int			rc;
	uint64		i;

	if (plan == NULL)
		plan = SpiPrepareSaved("SELECT o.id,"
							   "       pg_catalog.md5(pg_catalog.jsonb_build_array("
							   "         COALESCE(o.stripe_account, ''), o.event_name, o.value_payload_key,"
							   "         o.rollup_formula, o.payload OPERATOR(pg_catalog.-) o.value_payload_key)::text) AS g,"
							   "       o.rollup_window_end, o.rollup_formula, o.event_name, o.stripe_account,"
							   "       o.customer, (o.payload OPERATOR(pg_catalog.-) o.value_payload_key)::text,"
							   "       o.value_payload_key, o.canonical_value, o.ts, o.enqueued_at"
							   "  FROM stripe_meter.outbox o"
							   " WHERE o.rollup_window_end IS NOT NULL AND o.rollup_window_end <= $1"
							   " ORDER BY o.rollup_window_end, g, o.ts, o.id"
							   " LIMIT $2"
							   "   FOR UPDATE SKIP LOCKED",
							   2, (Oid[]) {TIMESTAMPTZOID, INT4OID});
	args[0] = TimestampTzGetDatum(closed_by);
	args[1] = Int32GetDatum(limit);
	rc = SPI_execute_plan(plan, args, NULL, false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "could not read events to roll up: %s", SPI_result_code_string(rc));
	for (i = 0; i < SPI_processed; i++)
	{
		RollupSource *s = MemoryContextAllocZero(cxt, sizeof(RollupSource));
		MemoryContext old;
		bool		isnull;

		s->id = DatumGetInt64(StoreResultDatum(i, 1, &isnull));
		s->group_hash = StoreResultText(i, 2, cxt);
		s->window_end = StoreResultTimestamp(i, 3);
		s->formula = StoreResultText(i, 4, cxt);
		s->event_name = StoreResultText(i, 5, cxt);
		s->stripe_account = StoreResultText(i, 6, cxt);
		s->customer = StoreResultText(i, 7, cxt);
		s->dimensions = StoreResultText(i, 8, cxt);
		s->value_key = StoreResultText(i, 9, cxt);
		s->value = StoreResultText(i, 10, cxt);
		s->ts = StoreResultTimestamp(i, 11);
		s->enqueued_at = StoreResultTimestamp(i, 12);
		old = MemoryContextSwitchTo(cxt);
		sources = lappend(sources, s);
		MemoryContextSwitchTo(old);
	}
	return sources;
}

/*
 * StoreRollupNextGeneration
 *		The generation the next rollup of a group's window gets: 1, or one
 *		more than the last one formed.
 */
int
StoreRollupNextGeneration(const char *group_hash, TimestampTz window_end)
{
	static SPIPlanPtr plan = NULL;
	Datum		args[2];
	bool		isnull;
	int			rc;

	if (plan == NULL)
		plan = SpiPrepareSaved("SELECT COALESCE(pg_catalog.max(generation), 0) + 1"
							   "  FROM stripe_meter.rollups"
							   " WHERE group_hash = $1 AND window_end = $2",
							   2, (Oid[]) {TEXTOID, TIMESTAMPTZOID});
	args[0] = CStringGetTextDatum(group_hash);
	args[1] = TimestampTzGetDatum(window_end);
	rc = SPI_execute_plan(plan, args, NULL, true, 1);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not read rollup generations: %s", SPI_result_code_string(rc));
	return DatumGetInt32(StoreResultDatum(0, 1, &isnull));
}

/*
 * StoreRollupQueue
 *		Queue a formed rollup in the outbox, as an ordinary event with its
 *		request frozen (value key, canonical value), and keep its
 *		stripe_meter.rollups row.  The outbox trigger leaves a row the worker
 *		inserts while forming as it is (see RollupForming()).
 */
void
StoreRollupQueue(const RollupPart *r)
{
	static SPIPlanPtr plan = NULL;
	Datum		args[15];
	char		nulls[15];
	int			rc;

	if (plan == NULL)
		plan = SpiPrepareSaved("WITH r AS ("
							   " INSERT INTO stripe_meter.rollups (identifier, group_hash, window_end,"
							   "   generation, part, event_name, stripe_account, customer, formula, events)"
							   " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10))"
							   " INSERT INTO stripe_meter.outbox (identifier, event_name, payload, ts,"
							   "   stripe_account, customer, enqueued_at, value_payload_key, canonical_value,"
							   "   legacy_idempotency_key)"
							   " VALUES ($1, $6, $11::jsonb OPERATOR(pg_catalog.||)"
							   "           pg_catalog.jsonb_build_object($12, $13),"
							   "         $14, $7, $8, $15, $12, $13, false)",
							   15, (Oid[]) {TEXTOID, TEXTOID, TIMESTAMPTZOID, INT4OID, INT4OID,
								   TEXTOID, TEXTOID, TEXTOID, TEXTOID, INT4OID,
								   TEXTOID, TEXTOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID});
	memset(nulls, ' ', sizeof(nulls));
	args[0] = CStringGetTextDatum(r->identifier);
	args[1] = CStringGetTextDatum(r->group_hash);
	args[2] = TimestampTzGetDatum(r->window_end);
	args[3] = Int32GetDatum(r->generation);
	args[4] = Int32GetDatum(r->part);
	args[5] = CStringGetTextDatum(r->event_name);
	if (r->stripe_account != NULL)
		args[6] = CStringGetTextDatum(r->stripe_account);
	else
		nulls[6] = 'n';
	args[7] = CStringGetTextDatum(r->customer);
	args[8] = CStringGetTextDatum(r->formula);
	args[9] = Int32GetDatum(r->events);
	args[10] = CStringGetTextDatum(r->dimensions);
	args[11] = CStringGetTextDatum(r->value_key);
	args[12] = CStringGetTextDatum(r->value);
	args[13] = TimestampTzGetDatum(r->ts);
	args[14] = TimestampTzGetDatum(r->enqueued_at);
	rc = SPI_execute_plan(plan, args, nulls, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "could not queue a rollup: %s", SPI_result_code_string(rc));
}

/*
 * StoreRollupRetire
 *		Move the rolled-up events (ids[i] went into rollup_ids[i]) from the
 *		outbox to meter_events, outcome rolled_up.
 */
void
StoreRollupRetire(int64 *ids, char **rollup_ids, int n)
{
	static SPIPlanPtr plan = NULL;
	Datum	   *d;
	Datum		args[2];
	int			rc;
	int			i;

	if (n == 0)
		return;
	if (plan == NULL)
		plan = SpiPrepareSaved("WITH s AS ("
							   "  SELECT * FROM ROWS FROM (pg_catalog.unnest($1::bigint[]),"
							   "                          pg_catalog.unnest($2::text[])) AS s(id, rollup)),"
							   " d AS ("
							   "  DELETE FROM stripe_meter.outbox o USING s WHERE o.id = s.id"
							   "  RETURNING o.identifier, o.event_name, o.payload, o.ts, o.stripe_account,"
							   "            o.customer, o.enqueued_at, s.rollup)"
							   " INSERT INTO stripe_meter.meter_events (identifier, event_name, payload,"
							   "   ts, stripe_account, customer, outcome, enqueued_at, attempts,"
							   "   rollup_identifier)"
							   " SELECT identifier, event_name, payload, ts, stripe_account, customer,"
							   "        'rolled_up', enqueued_at, 0, rollup FROM d",
							   2, (Oid[]) {INT8ARRAYOID, TEXTARRAYOID});
	d = palloc(sizeof(Datum) * n);
	for (i = 0; i < n; i++)
		d[i] = Int64GetDatum(ids[i]);
	args[0] = PointerGetDatum(construct_array(d, n, INT8OID, 8, FLOAT8PASSBYVAL,
											  TYPALIGN_DOUBLE));
	for (i = 0; i < n; i++)
		d[i] = CStringGetTextDatum(rollup_ids[i]);
	args[1] = PointerGetDatum(construct_array(d, n, TEXTOID, -1, false, TYPALIGN_INT));
	rc = SPI_execute_plan(plan, args, NULL, false, 0);
	if (rc != SPI_OK_INSERT || SPI_processed != (uint64) n)
		elog(ERROR, "could not move %d rolled-up events: %s", n,
			 SPI_result_code_string(rc));
}

/*
 * StoreRollupOldestWindow
 *		The end of the oldest window with events waiting, or 0 when none.
 */
TimestampTz
StoreRollupOldestWindow(void)
{
	static SPIPlanPtr plan = NULL;
	bool		isnull;
	Datum		d;
	int			rc;

	if (plan == NULL)
		plan = SpiPrepareSaved("SELECT pg_catalog.min(rollup_window_end) FROM stripe_meter.outbox"
							   " WHERE rollup_window_end IS NOT NULL",
							   0, NULL);
	rc = SPI_execute_plan(plan, NULL, NULL, true, 1);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not read rollup windows: %s", SPI_result_code_string(rc));
	d = StoreResultDatum(0, 1, &isnull);
	return isnull ? 0 : DatumGetTimestampTz(d);
}
