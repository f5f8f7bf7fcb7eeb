/*-------------------------------------------------------------------------
 *
 * store_counters.c
 *	  The SQL that keeps the figures stripe_meter.status shows (delivered,
 *	  not_billed, delivered_last_minute) as rows move, so that reading the
 *	  view never counts meter_events.  A store file (store.c).
 *
 * Every function here runs inside the caller's transaction, the one that
 * moves the rows being counted, so a figure commits or rolls back with its
 * rows and a crash cannot make the two disagree.  Only the delivery worker
 * calls them, so the rows they update are never contended by users'
 * transactions.
 *
 * stripe_meter.counters has no key.  Each write deletes every row it sees
 * and inserts their sum plus its change: the table stays at one row, a
 * row a restore adds is folded in at the next write, and two writes that
 * ever overlapped would still add up (the second skips the row the first
 * deleted, and the first's new row is not visible to it, so it sums
 * nothing but its own change).
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/store_counters.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

static SPIPlanPtr totals_plan = NULL;
static SPIPlanPtr second_plan = NULL;

static void
add_totals(int64 delivered, int64 not_billed)
{
	Datum		args[2];
	int			rc;

	if (totals_plan == NULL)
		totals_plan = SpiPrepareSaved("WITH old AS (DELETE FROM stripe_meter.counters"
									  "             RETURNING delivered, not_billed)"
									  " INSERT INTO stripe_meter.counters (delivered, not_billed)"
									  " SELECT COALESCE(pg_catalog.sum(delivered), 0) + $1,"
									  "        COALESCE(pg_catalog.sum(not_billed), 0) + $2"
									  "   FROM old",
									  2, (Oid[]) {INT8OID, INT8OID});
	args[0] = Int64GetDatum(delivered);
	args[1] = Int64GetDatum(not_billed);
	rc = SPI_execute_plan(totals_plan, args, NULL, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "could not update stripe_meter.counters: %s", SPI_result_code_string(rc));
}

/*
 * CountersDelivered
 *		n events were just recorded as delivered: add them to the total and
 *		to the current second of the last minute.
 *
 * The second is that of the transaction's start, which is also what
 * meter_events.delivered_at gets.
 */
void
CountersDelivered(int64 n)
{
	Datum		arg;
	int			rc;

	if (n <= 0)
		return;
	add_totals(n, 0);

	if (second_plan == NULL)
		second_plan = SpiPrepareSaved("WITH t AS (SELECT pg_catalog.date_trunc('second', pg_catalog.now()) AS second)"
									  " UPDATE stripe_meter.delivered_seconds s"
									  "    SET delivered = CASE WHEN s.second = t.second"
									  "                         THEN s.delivered + $1 ELSE $1 END,"
									  "        second = t.second"
									  "   FROM t"
									  "  WHERE s.slot = (pg_catalog.date_part('epoch', t.second)::bigint % 60)::integer",
									  1, (Oid[]) {INT8OID});
	arg = Int64GetDatum(n);
	rc = SPI_execute_plan(second_plan, &arg, NULL, false, 0);
	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "could not update stripe_meter.delivered_seconds: %s", SPI_result_code_string(rc));
}

/*
 * CountersNotBilled
 *		n delivered events were just marked, for the first time, as not
 *		billed by Stripe.
 */
void
CountersNotBilled(int64 n)
{
	if (n > 0)
		add_totals(0, n);
}
