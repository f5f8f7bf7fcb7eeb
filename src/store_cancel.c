/*-------------------------------------------------------------------------
 *
 * store_cancel.c
 *	  The SQL of cancellations (stripe_meter.adjustments): where the event
 *	  to cancel is, queueing its cancellation, and the worker's claim and
 *	  record of cancel adjustments.  What a cancellation does, and what
 *	  Stripe's answers mean, is cancel.c's.
 *
 * The lookups and the queueing run in the caller's transaction with their
 * own SPI connection; a lookup locks the row it finds until that
 * transaction ends, so the worker cannot claim or record it meanwhile.
 * The worker's functions (StoreCancelRepair onwards) run inside its short
 * transactions (DeliveryStoreBegin ... DeliveryStoreCommit).
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/store_cancel.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

/* run a saved lookup of one identifier; whether it found a row */
static bool
find_one(SPIPlanPtr plan, const char *identifier, bool read_only, const char *what)
{
	Datum		arg = CStringGetTextDatum(identifier);
	int			rc = SPI_execute_plan(plan, &arg, NULL, read_only, 1);

	if (rc != SPI_OK_SELECT)
		elog(ERROR, "could not look up %s: %s", what, SPI_result_code_string(rc));
	return SPI_processed == 1;
}

/*
 * StoreCancelFindQueued
 *		The event if it is still queued, its row locked: event name,
 *		account, and whether Stripe may have seen it (in flight, or an
 *		earlier attempt's outcome unknown).
 */
bool
StoreCancelFindQueued(const char *identifier, CancelTarget *found)
{
	static SPIPlanPtr plan = NULL;
	MemoryContext caller = CurrentMemoryContext;
	bool		isnull;

	memset(found, 0, sizeof(*found));
	SPI_connect();
	if (plan == NULL)
		plan = SpiPrepareSaved("SELECT event_name, stripe_account,"
							   "       in_flight_since IS NOT NULL OR unknown_outcome_since IS NOT NULL"
							   "  FROM stripe_meter.outbox WHERE identifier = $1 FOR UPDATE",
							   1, (Oid[]) {TEXTOID});
	if (!find_one(plan, identifier, false, "the outbox"))
	{
		SPI_finish();
		return false;
	}
	found->event_name = StoreResultText(0, 1, caller);
	found->stripe_account = StoreResultText(0, 2, caller);
	found->maybe_sent = DatumGetBool(StoreResultDatum(0, 3, &isnull));
	SPI_finish();
	return true;
}

/*
 * StoreCancelRemoveQueued
 *		Delete a queued event that Stripe never saw.
 */
void
StoreCancelRemoveQueued(const char *identifier)
{
	static SPIPlanPtr plan = NULL;
	Datum		arg = CStringGetTextDatum(identifier);
	int			rc;

	SPI_connect();
	if (plan == NULL)
		plan = SpiPrepareSaved("DELETE FROM stripe_meter.outbox WHERE identifier = $1",
							   1, (Oid[]) {TEXTOID});
	rc = SPI_execute_plan(plan, &arg, NULL, false, 0);
	if (rc != SPI_OK_DELETE)
		elog(ERROR, "could not remove the event: %s", SPI_result_code_string(rc));
	SPI_finish();
}

/*
 * StoreCancelFindDelivered
 *		The event if it was delivered, its row locked: event name, account,
 *		and when Stripe received it (its object's created time, else the
 *		first attempt, else the delivery).
 */
bool
StoreCancelFindDelivered(const char *identifier, CancelTarget *found)
{
	static SPIPlanPtr plan = NULL;
	MemoryContext caller = CurrentMemoryContext;

	memset(found, 0, sizeof(*found));
	SPI_connect();
	if (plan == NULL)
		plan = SpiPrepareSaved("SELECT event_name, stripe_account,"
							   "       COALESCE(created, first_attempt_at, delivered_at), rollup_identifier"
							   "  FROM stripe_meter.meter_events WHERE identifier = $1 FOR UPDATE",
							   1, (Oid[]) {TEXTOID});
	if (!find_one(plan, identifier, false, "delivered events"))
	{
		SPI_finish();
		return false;
	}
	found->event_name = StoreResultText(0, 1, caller);
	found->stripe_account = StoreResultText(0, 2, caller);
	found->received_at = StoreResultTimestamp(0, 3);
	found->rollup_identifier = StoreResultText(0, 4, caller);
	SPI_finish();
	return true;
}

/*
 * StoreCancelFindFailed
 *		The event if it failed, its row locked: event name, account, why it
 *		failed and whether Stripe may have billed it.
 */
bool
StoreCancelFindFailed(const char *identifier, CancelTarget *found)
{
	static SPIPlanPtr plan = NULL;
	MemoryContext caller = CurrentMemoryContext;
	bool		isnull;

	memset(found, 0, sizeof(*found));
	SPI_connect();
	if (plan == NULL)
		plan = SpiPrepareSaved("SELECT reason, event_name, stripe_account, maybe_billed"
							   "  FROM stripe_meter.failed_events WHERE identifier = $1 FOR UPDATE",
							   1, (Oid[]) {TEXTOID});
	if (!find_one(plan, identifier, false, "failed events"))
	{
		SPI_finish();
		return false;
	}
	found->reason = StoreResultText(0, 1, caller);
	found->event_name = StoreResultText(0, 2, caller);
	found->stripe_account = StoreResultText(0, 3, caller);
	found->maybe_billed = DatumGetBool(StoreResultDatum(0, 4, &isnull));
	SPI_finish();
	return true;
}

/*
 * StoreCancelFindAdjustment
 *		An event's cancellation, if there is one: its status and last error
 *		(in the caller's memory context).
 */
bool
StoreCancelFindAdjustment(const char *identifier, char **status, char **last_error)
{
	static SPIPlanPtr plan = NULL;
	MemoryContext caller = CurrentMemoryContext;

	*status = NULL;
	*last_error = NULL;
	SPI_connect();
	if (plan == NULL)
		plan = SpiPrepareSaved("SELECT status, last_error FROM stripe_meter.adjustments"
							   " WHERE identifier = $1",
							   1, (Oid[]) {TEXTOID});
	if (!find_one(plan, identifier, true, "cancellations"))
	{
		SPI_finish();
		return false;
	}
	*status = StoreResultText(0, 1, caller);
	*last_error = StoreResultText(0, 2, caller);
	SPI_finish();
	return true;
}

/*
 * StoreCancelQueue
 *		Insert an event's cancellation with the given status; received_at
 *		NULL when unknown.
 */
void
StoreCancelQueue(const char *identifier, const char *event_name,
				 const char *stripe_account, const char *status,
				 const TimestampTz *received_at)
{
	static SPIPlanPtr plan = NULL;
	Datum		values[5];
	char		nulls[5] = {' ', ' ', ' ', ' ', ' '};
	int			rc;

	values[0] = CStringGetTextDatum(identifier);
	values[1] = CStringGetTextDatum(event_name);
	if (stripe_account)
		values[2] = CStringGetTextDatum(stripe_account);
	else
		nulls[2] = 'n';
	values[3] = CStringGetTextDatum(status);
	if (received_at)
		values[4] = TimestampTzGetDatum(*received_at);
	else
		nulls[4] = 'n';

	SPI_connect();
	if (plan == NULL)
		plan = SpiPrepareSaved("INSERT INTO stripe_meter.adjustments"
							   " (identifier, event_name, stripe_account, status, received_at)"
							   " VALUES ($1, $2, $3, $4, $5)",
							   5, (Oid[]) {TEXTOID, TEXTOID, TEXTOID, TEXTOID, TIMESTAMPTZOID});
	rc = SPI_execute_plan(plan, values, nulls, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "could not queue a cancellation: %s", SPI_result_code_string(rc));
	SPI_finish();
}

/*
 * StoreCancelRepair
 *		At worker start, inside its transaction: adjustments claimed by a
 *		previous worker go back to the queue, their outcome unknown since
 *		the claim.
 */
void
StoreCancelRepair(void)
{
	int			rc = SPI_execute("UPDATE stripe_meter.adjustments"
								 "   SET in_flight_since = NULL,"
								 "       unknown_outcome_since = COALESCE(unknown_outcome_since, in_flight_since)"
								 " WHERE in_flight_since IS NOT NULL", false, 0);

	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "could not repair claimed cancellations: %s", SPI_result_code_string(rc));
}

/*
 * StoreCancelPromoteAwaiting
 *		Inside the worker's transaction: cancellations waiting for their
 *		event's outcome to be recorded are queued once it is.  A delivered
 *		event's gets when Stripe received it; a failed event's is queued
 *		anyway, since only an event Stripe may have seen waits, and it
 *		failed without a definite answer.
 */
void
StoreCancelPromoteAwaiting(void)
{
	static SPIPlanPtr delivered_plan = NULL;
	static SPIPlanPtr failed_plan = NULL;
	int			rc;

	if (delivered_plan == NULL)
		delivered_plan = SpiPrepareSaved("UPDATE stripe_meter.adjustments a"
										 "   SET status = 'queued',"
										 "       received_at = COALESCE(m.created, m.first_attempt_at, m.delivered_at)"
										 "  FROM stripe_meter.meter_events m"
										 " WHERE a.status = 'awaiting_delivery' AND m.identifier = a.identifier",
										 0, NULL);
	rc = SPI_execute_plan(delivered_plan, NULL, NULL, false, 0);
	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "could not update cancellations: %s", SPI_result_code_string(rc));

	if (failed_plan == NULL)
		failed_plan = SpiPrepareSaved("UPDATE stripe_meter.adjustments a SET status = 'queued'"
									  "  FROM stripe_meter.failed_events f"
									  " WHERE a.status = 'awaiting_delivery' AND f.identifier = a.identifier",
									  0, NULL);
	rc = SPI_execute_plan(failed_plan, NULL, NULL, false, 0);
	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "could not update cancellations: %s", SPI_result_code_string(rc));
}

/*
 * StoreCancelClaim
 *		Inside the worker's transaction: claim up to limit due
 *		cancellations, marking them in flight and counting the attempt.
 *		*claimed gets an array of them allocated in cxt (never NULL).
 *		Returns how many.
 */
int
StoreCancelClaim(int limit, MemoryContext cxt, ClaimedCancel **claimed)
{
	static SPIPlanPtr plan = NULL;
	Datum		arg = Int32GetDatum(limit);
	ClaimedCancel *c;
	int			n;
	int			i;
	int			rc;

	if (plan == NULL)
		plan = SpiPrepareSaved("UPDATE stripe_meter.adjustments a"
							   "   SET in_flight_since = pg_catalog.now(),"
							   "       attempts = a.attempts + 1,"
							   "       first_attempt_at = COALESCE(a.first_attempt_at, pg_catalog.now())"
							   " WHERE a.identifier IN (SELECT identifier FROM stripe_meter.adjustments"
							   "        WHERE status = 'queued' AND in_flight_since IS NULL"
							   "          AND next_attempt_at <= pg_catalog.clock_timestamp()"
							   "        ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
							   " RETURNING a.identifier, a.event_name, a.stripe_account, a.received_at,"
							   "           a.unknown_outcome_since, a.attempts",
							   1, (Oid[]) {INT4OID});
	rc = SPI_execute_plan(plan, &arg, NULL, false, 0);
	if (rc != SPI_OK_UPDATE_RETURNING)
		elog(ERROR, "could not claim cancellations: %s", SPI_result_code_string(rc));
	n = (int) SPI_processed;
	c = MemoryContextAllocZero(cxt, sizeof(ClaimedCancel) * Max(n, 1));
	for (i = 0; i < n; i++)
	{
		bool		isnull;

		c[i].identifier = StoreResultText(i, 1, cxt);
		c[i].event_name = StoreResultText(i, 2, cxt);
		c[i].stripe_account = StoreResultText(i, 3, cxt);
		c[i].received_at = StoreResultTimestamp(i, 4);
		c[i].unknown_outcome_since = StoreResultTimestamp(i, 5);
		c[i].attempts = DatumGetInt32(StoreResultDatum(i, 6, &isnull));
	}
	*claimed = c;
	return n;
}

/*
 * StoreCancelRecord
 *		Inside the worker's transaction: record what became of one claimed
 *		cancellation.
 */
void
StoreCancelRecord(const CancelRecord *r)
{
	static SPIPlanPtr plan = NULL;
	Datum		values[9];
	char		nulls[9] = {' ', ' ', ' ', ' ', ' ', ' ', ' ', ' ', ' '};
	int			rc;

	/* losing this commit in a crash only causes a resend that Stripe replays */
	(void) set_config_option("synchronous_commit", "off", PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
	values[0] = CStringGetTextDatum(r->identifier);
	values[1] = r->status ? CStringGetTextDatum(r->status) : (Datum) 0;
	nulls[1] = r->status ? ' ' : 'n';
	values[2] = r->outcome ? CStringGetTextDatum(r->outcome) : (Datum) 0;
	nulls[2] = r->outcome ? ' ' : 'n';
	values[3] = r->adjustment ? CStringGetTextDatum(r->adjustment) : (Datum) 0;
	nulls[3] = r->adjustment ? ' ' : 'n';
	values[4] = r->request_id ? CStringGetTextDatum(r->request_id) : (Datum) 0;
	nulls[4] = r->request_id ? ' ' : 'n';
	values[5] = Int32GetDatum((int32) r->http_status);
	nulls[5] = r->http_status ? ' ' : 'n';
	values[6] = r->reason ? CStringGetTextDatum(r->reason) : (Datum) 0;
	nulls[6] = r->reason ? ' ' : 'n';
	values[7] = TimestampTzGetDatum(r->next_attempt_at);
	values[8] = BoolGetDatum(r->unknown);

	if (plan == NULL)
		plan = SpiPrepareSaved("UPDATE stripe_meter.adjustments SET"
							   "  in_flight_since = NULL,"
							   "  status = COALESCE($2, status),"
							   "  outcome = $3,"
							   "  adjustment = $4::jsonb,"
							   "  request_id = $5,"
							   "  http_status = $6,"
							   "  last_error = $7,"
							   "  next_attempt_at = $8,"
							   "  completed_at = CASE WHEN $2 IS NOT NULL THEN pg_catalog.now() END,"
							   "  unknown_outcome_since = CASE WHEN $2 IS NULL AND $9"
							   "    THEN COALESCE(unknown_outcome_since, in_flight_since)"
							   "    ELSE unknown_outcome_since END"
							   " WHERE identifier = $1",
							   9, (Oid[]) {TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, INT4OID,
								   TEXTOID, TIMESTAMPTZOID, BOOLOID});
	rc = SPI_execute_plan(plan, values, nulls, false, 0);
	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "could not record a cancellation: %s", SPI_result_code_string(rc));
}

/*
 * StoreCancelNextDue
 *		Inside the worker's transaction: when the next queued cancellation
 *		is due, or 0 when none is queued.
 */
TimestampTz
StoreCancelNextDue(void)
{
	static SPIPlanPtr plan = NULL;

	if (plan == NULL)
		plan = SpiPrepareSaved("SELECT min(next_attempt_at) FROM stripe_meter.adjustments"
							   " WHERE status = 'queued' AND in_flight_since IS NULL",
							   0, NULL);
	if (SPI_execute_plan(plan, NULL, NULL, true, 0) == SPI_OK_SELECT && SPI_processed == 1)
		return StoreResultTimestamp(0, 1);
	return 0;
}
