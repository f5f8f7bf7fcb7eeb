/*-------------------------------------------------------------------------
 *
 * store_outbox.c
 *	  The enqueue side's SQL: queue an event, and move failed events back
 *	  into the outbox.
 *
 * Every function here makes its own SPI connection inside the caller's
 * transaction, and uses saved plans so that a busy enqueue path parses
 * each statement once per backend.  The validation of what is queued is
 * the outbox's BEFORE INSERT trigger (enqueue.c); what to retry and how
 * to report it is enqueue.c's too.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/store_outbox.c
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

static SPIPlanPtr insert_plan = NULL;

/* the INSERT of one event, SPI connected; its identifier in SPI's memory */
static Datum
insert_event(const char *event_name, Jsonb *payload, const char *identifier,
			 TimestampTz *ts, const char *stripe_account)
{
	Datum		args[5];
	char		nulls[5];
	int			rc;
	bool		isnull;

	if (insert_plan == NULL)
	{
		Oid			types[5] = {TEXTOID, JSONBOID, TEXTOID, TIMESTAMPTZOID, TEXTOID};

		insert_plan = SpiPrepareSaved(
									"INSERT INTO stripe_meter.outbox"
									" (event_name, payload, identifier, ts, stripe_account)"
									" VALUES ($1, $2, $3, $4, $5) RETURNING identifier",
									5, types);
	}

	memset(nulls, ' ', sizeof(nulls));
	args[0] = event_name ? CStringGetTextDatum(event_name) : (Datum) 0;
	nulls[0] = event_name ? ' ' : 'n';
	args[1] = payload ? JsonbPGetDatum(payload) : (Datum) 0;
	nulls[1] = payload ? ' ' : 'n';
	args[2] = identifier ? CStringGetTextDatum(identifier) : (Datum) 0;
	nulls[2] = identifier ? ' ' : 'n';
	args[3] = ts ? TimestampTzGetDatum(*ts) : (Datum) 0;
	nulls[3] = ts ? ' ' : 'n';
	args[4] = stripe_account ? CStringGetTextDatum(stripe_account) : (Datum) 0;
	nulls[4] = stripe_account ? ' ' : 'n';

	rc = SPI_execute_plan(insert_plan, args, nulls, false, 1);
	if (rc != SPI_OK_INSERT_RETURNING || SPI_processed != 1)
		elog(ERROR, "could not queue meter event: %s", SPI_result_code_string(rc));

	return StoreResultDatum(0, 1, &isnull);
}

/*
 * StoreOutboxInsertEvent
 *		Queue one event; the outbox's BEFORE INSERT trigger validates it.
 *
 * identifier and ts may be NULL (the trigger fills them in).  Returns the
 * event's identifier as text in the caller's memory context.
 */
text *
StoreOutboxInsertEvent(const char *event_name, Jsonb *payload,
					   const char *identifier, TimestampTz *ts,
					   const char *stripe_account)
{
	Datum		result;

	SPI_connect();
	result = insert_event(event_name, payload, identifier, ts, stripe_account);
	/* copied into the context that was current at SPI_connect */
	result = SPI_datumTransfer(result, false, -1);
	SPI_finish();
	return DatumGetTextPP(result);
}

/*
 * StoreOutboxRequeueFailed
 *		Move one failed event back into the outbox, through the outbox's
 *		validation; false when no failed event has the identifier.  Errors
 *		propagate.
 *
 * It enters as a new event, but keeps when it was first attempted and when
 * an attempt's outcome first became unknown: Stripe may have the event
 * since then, so the resend window still counts from that time.  Without
 * history (tables older than 0.2.0, which do not keep the latter) it
 * enters as it always did.
 */
bool
StoreOutboxRequeueFailed(const char *identifier, bool history)
{
	static SPIPlanPtr take_plan = NULL;
	static SPIPlanPtr take_plan_0_1 = NULL;
	static SPIPlanPtr keep_plan = NULL;
	Datum		arg = CStringGetTextDatum(identifier);
	Datum		keep[3] = {0};
	char		keep_nulls[3] = {' ', ' ', ' '};
	int			rc;
	bool		isnull;
	TimestampTz ts;

	SPI_connect();
	if (!history && take_plan_0_1 == NULL)
		take_plan_0_1 = SpiPrepareSaved(
										"DELETE FROM stripe_meter.failed_events WHERE identifier = $1"
										" RETURNING identifier, event_name, payload, ts, stripe_account",
										1, (Oid[]) {TEXTOID});
	if (history && take_plan == NULL)
	{
		Oid			types[1] = {TEXTOID};

		take_plan = SpiPrepareSaved(
								  "DELETE FROM stripe_meter.failed_events WHERE identifier = $1"
								  " RETURNING identifier, event_name, payload, ts, stripe_account,"
								  "           first_attempt_at, unknown_outcome_since",
								  1, types);
	}

	rc = SPI_execute_plan(history ? take_plan : take_plan_0_1, &arg, NULL, false, 0);
	if (rc != SPI_OK_DELETE_RETURNING)
		elog(ERROR, "could not take failed meter event: %s", SPI_result_code_string(rc));
	if (SPI_processed == 0)
	{
		SPI_finish();
		return false;
	}

	ts = DatumGetTimestampTz(StoreResultDatum(0, 4, &isnull));
	if (history)
	{
		keep[0] = arg;
		keep[1] = StoreResultDatum(0, 6, &isnull);
		keep_nulls[1] = isnull ? 'n' : ' ';
		keep[2] = StoreResultDatum(0, 7, &isnull);
		keep_nulls[2] = isnull ? 'n' : ' ';
	}
	(void) insert_event(StoreResultText(0, 2, CurrentMemoryContext),
						DatumGetJsonbP(StoreResultDatum(0, 3, &isnull)),
						StoreResultText(0, 1, CurrentMemoryContext),
						&ts, StoreResultText(0, 5, CurrentMemoryContext));
	if (history)
	{
		if (keep_plan == NULL)
			keep_plan = SpiPrepareSaved("UPDATE stripe_meter.outbox"
										"   SET first_attempt_at = $2, unknown_outcome_since = $3"
										" WHERE identifier = $1",
										3, (Oid[]) {TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID});
		rc = SPI_execute_plan(keep_plan, keep, keep_nulls, false, 0);
		if (rc != SPI_OK_UPDATE || SPI_processed != 1)
			elog(ERROR, "could not restore the history of meter event \"%s\": %s",
				 identifier, SPI_result_code_string(rc));
	}
	SPI_finish();
	return true;
}

/*
 * StoreOutboxListFailed
 *		Every failed event, oldest failure first, as a List of
 *		FailedEventRef in the caller's memory context.  history is false
 *		for tables older than 0.2.0, which have no maybe_billed column.
 */
List *
StoreOutboxListFailed(bool history)
{
	MemoryContext caller = CurrentMemoryContext;
	List	   *failed = NIL;
	uint64		i;
	int			rc;

	SPI_connect();
	rc = SPI_execute(history ?
					 "SELECT identifier, maybe_billed FROM stripe_meter.failed_events"
					 " ORDER BY failed_at, identifier" :
					 "SELECT identifier, false FROM stripe_meter.failed_events"
					 " ORDER BY failed_at, identifier",
					 false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "could not list failed meter events: %s", SPI_result_code_string(rc));
	for (i = 0; i < SPI_processed; i++)
	{
		FailedEventRef *f = MemoryContextAlloc(caller, sizeof(FailedEventRef));
		bool		isnull;
		MemoryContext old;

		f->identifier = StoreResultText(i, 1, caller);
		f->maybe_billed = DatumGetBool(StoreResultDatum(i, 2, &isnull));
		old = MemoryContextSwitchTo(caller);
		failed = lappend(failed, f);
		MemoryContextSwitchTo(old);
	}
	SPI_finish();
	return failed;
}
