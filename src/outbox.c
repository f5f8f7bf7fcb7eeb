/*-------------------------------------------------------------------------
 *
 * outbox.c
 *	  The SQL the enqueue side runs against the extension's tables.
 *
 * Every function here expects to run inside a transaction with SPI already
 * connected by its caller, and uses saved plans so that a busy enqueue path
 * parses each statement once per backend.  Table names are schema-qualified
 * and the plans are revalidated by the plan cache if the extension is
 * dropped and created again.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/outbox.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

static SPIPlanPtr insert_plan = NULL;

/*
 * SpiPrepareSaved
 *		Prepare a statement and keep its plan for the life of the backend.
 *		SPI must be connected.
 */
SPIPlanPtr
SpiPrepareSaved(const char *sql, int nargs, Oid *argtypes)
{
	SPIPlanPtr	plan = SPI_prepare(sql, nargs, argtypes);

	if (plan == NULL)
		elog(ERROR, "SPI_prepare failed for \"%s\": %s",
			 sql, SPI_result_code_string(SPI_result));
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "SPI_keepplan failed");
	return plan;
}

/*
 * OutboxLookupMeterKeys
 *		The payload keys that carry the customer and the value for an event
 *		name: its row in stripe_meter.meters, or Stripe's defaults.
 *
 * Results are palloc'd in the current memory context.
 */
void
OutboxLookupMeterKeys(const char *event_name, char **customer_key, char **value_key)
{
	EnqueueMeter meter;

	EnqueueProbeMeter(event_name, &meter);
	OutboxMeterKeys(&meter, customer_key, value_key);
}

/*
 * OutboxMeterKeys
 *		The payload keys of a probed meter row, or Stripe's defaults when the
 *		event name has none.
 */
void
OutboxMeterKeys(const EnqueueMeter *meter, char **customer_key, char **value_key)
{
	if (meter->found)
	{
		*customer_key = meter->customer_key;
		*value_key = meter->value_key;
	}
	else
	{
		*customer_key = pstrdup(DEFAULT_CUSTOMER_KEY);
		*value_key = pstrdup(DEFAULT_VALUE_KEY);
	}
}

/*
 * OutboxCheckIdentifierUnused
 *		Refuse an identifier that is queued, delivered or failed already.
 *
 * Stripe would answer a repeat within its window with "An event already
 * exists"; past that window it would bill the event a second time.  Either
 * way the user's intent is ambiguous, so the enqueue fails instead.  The
 * unique index on the outbox still guards concurrent inserts.
 */
void
OutboxCheckIdentifierUnused(const char *identifier)
{
	switch (EnqueueProbeIdentifier(identifier))
	{
		case ENQUEUE_ID_UNUSED:
			return;
		case ENQUEUE_ID_QUEUED:
			ereport(ERROR,
					(errcode(ERRCODE_UNIQUE_VIOLATION),
					 errmsg("meter event identifier \"%s\" is already queued", identifier),
					 errdetail("Stripe bills each identifier once; a second event needs its own identifier.")));
			break;
		case ENQUEUE_ID_DELIVERED:
			ereport(ERROR,
					(errcode(ERRCODE_UNIQUE_VIOLATION),
					 errmsg("meter event identifier \"%s\" was already delivered", identifier),
					 errdetail("Stripe bills each identifier once; a second event needs its own identifier.")));
			break;
		case ENQUEUE_ID_FAILED:
			ereport(ERROR,
					(errcode(ERRCODE_UNIQUE_VIOLATION),
					 errmsg("meter event identifier \"%s\" belongs to a failed event", identifier),
					 errhint("Queue it again with stripe_meter_retry_failed('%s'), or delete it from stripe_meter.failed_events first.",
							 identifier)));
			break;
	}
}

/*
 * OutboxInsertEvent
 *		Queue one event; the outbox's BEFORE INSERT trigger validates it.
 *
 * identifier and ts may be NULL (the trigger fills them in).  Returns the
 * event's identifier as text, copied out of SPI's memory into the context
 * that was current at SPI_connect, so it outlives SPI_finish.
 */
text *
OutboxInsertEvent(const char *event_name, Jsonb *payload,
				  const char *identifier, TimestampTz *ts,
				  const char *stripe_account)
{
	Datum		args[5];
	char		nulls[5];
	int			rc;
	bool		isnull;
	Datum		result;

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

	result = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return DatumGetTextPP(SPI_datumTransfer(result, false, -1));
}

/* move one failed event back into the outbox; errors propagate */
static void
retry_one(const char *identifier)
{
	static SPIPlanPtr take_plan = NULL;
	Datum		arg = CStringGetTextDatum(identifier);
	int			rc;
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;
	TimestampTz ts;

	if (take_plan == NULL)
	{
		Oid			types[1] = {TEXTOID};

		take_plan = SpiPrepareSaved(
								  "DELETE FROM stripe_meter.failed_events WHERE identifier = $1"
								  " RETURNING identifier, event_name, payload, ts, stripe_account",
								  1, types);
	}

	rc = SPI_execute_plan(take_plan, &arg, NULL, false, 0);
	if (rc != SPI_OK_DELETE_RETURNING)
		elog(ERROR, "could not take failed meter event: %s", SPI_result_code_string(rc));
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("no failed meter event has identifier \"%s\"", identifier)));

	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	ts = DatumGetTimestampTz(SPI_getbinval(tup, desc, 4, &isnull));
	(void) OutboxInsertEvent(SPI_getvalue(tup, desc, 2),
							 DatumGetJsonbP(SPI_getbinval(tup, desc, 3, &isnull)),
							 SPI_getvalue(tup, desc, 1),
							 &ts, SPI_getvalue(tup, desc, 5));
}

/*
 * Retry one event in a subtransaction; returns NULL on success, else the
 * error's message (in cxt), with the subtransaction rolled back.
 */
static char *
try_retry_one(const char *identifier, MemoryContext cxt, ResourceOwner owner)
{
	char	   *volatile error = NULL;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		retry_one(identifier);
		ReleaseCurrentSubTransaction();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		error = edata->message;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	CurrentResourceOwner = owner;
	return error;
}

/*
 * OutboxRetryFailed
 *		Move failed events back into the outbox: the one named, or all.
 *
 * They re-enter through the same validation as any new event.  Retrying
 * one event raises that validation's error.  Retrying all moves every
 * event that can be queued again, each in its own subtransaction, and
 * leaves the others failed, with a NOTICE saying how many and why (an
 * event whose timestamp has meanwhile left Stripe's 35-day window, say).
 * Returns how many events were queued.
 */
int64
OutboxRetryFailed(const char *identifier)
{
	List	   *identifiers = NIL;
	ListCell   *lc;
	int64		moved = 0;
	int64		skipped = 0;
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	uint64		i;
	int			rc;

	if (identifier != NULL)
	{
		retry_one(identifier);
		return 1;
	}

	rc = SPI_execute("SELECT identifier FROM stripe_meter.failed_events ORDER BY failed_at, identifier",
					 false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "could not list failed meter events: %s", SPI_result_code_string(rc));
	for (i = 0; i < SPI_processed; i++)
		identifiers = lappend(identifiers,
							  MemoryContextStrdup(cxt, SPI_getvalue(SPI_tuptable->vals[i],
																	SPI_tuptable->tupdesc, 1)));

	foreach(lc, identifiers)
	{
		char	   *error = try_retry_one((char *) lfirst(lc), cxt, owner);

		if (error == NULL)
			moved++;
		else
			skipped++;
	}

	if (skipped > 0)
		ereport(NOTICE,
				(errmsg_plural("%lld failed meter event was not queued again",
							   "%lld failed meter events were not queued again",
							   skipped, (long long) skipped),
				 errdetail("They no longer pass validation, for example because their timestamps are more than 35 days old."),
				 errhint("Retry one by its identifier to see why it is refused.")));
	return moved;
}
