/*-------------------------------------------------------------------------
 *
 * enqueue.c
 *	  The enqueue side's rules: what the outbox's validation trigger does
 *	  to each row, how the trigger helper turns a user's row into an
 *	  event, and which failed events stripe_meter_retry_failed() queues
 *	  again.  Their SQL-callable entry points are in sql_functions.c, their
 *	  SQL in store_outbox.c and store_probe.c.
 *
 * Every path into the outbox ends in one INSERT, and every INSERT passes
 * through the validation trigger (EnqueueOutboxRow), so the function, the
 * trigger helper and an application's direct INSERT are validated by the
 * same code and fail with the same errors.  Nothing here needs the library
 * to be preloaded: enqueueing never depends on the worker being up.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/enqueue.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "nodes/pg_list.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/resowner.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

static int	attnum_of(TupleDesc desc, const char *column);
static char *column_text(HeapTuple tuple, TupleDesc desc, int attnum);
static int	column_number(Relation rel, const char *column, const char *role);
static TimestampTz column_as_timestamptz(HeapTuple tuple, TupleDesc desc,
										 int attnum, const char *column);
static void append_json_value(StringInfo buf, HeapTuple tuple, TupleDesc desc,
							  int attnum);

/*
 * The payload keys of a probed meter row, or Stripe's defaults when the
 * event name has none.
 */
static void
meter_keys(const EnqueueMeter *meter, char **customer_key, char **value_key)
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
 * True while stripe_meter_retry_failed() moves a failed event back: its
 * identifier was in failed_events, so it may have the rollups' form.
 */
static bool requeueing_failed = false;

/*
 * Refuse an identifier that is queued, delivered or failed already.
 *
 * Stripe would answer a repeat within its window with "An event already
 * exists"; past that window it would bill the event a second time.  Either
 * way the user's intent is ambiguous, so the enqueue fails instead.  The
 * unique index on the outbox still guards concurrent inserts.
 */
static void
check_identifier_unused(const char *identifier)
{
	switch (StoreProbeIdentifier(identifier))
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
 * EnqueueOutboxRow
 *		What the outbox's BEFORE INSERT row trigger does to a new row:
 *		returns the row to insert.
 *
 * Fills in the identifier and timestamp when they are NULL, validates the
 * event against its meter's payload keys, refuses identifiers already used,
 * records the customer for the worker's one-call-per-customer rule, freezes
 * the meter's value key and the canonical value the request will send, and
 * asks for the worker to be woken when the transaction commits.  The
 * trigger runs as the extension's owner (SECURITY DEFINER), so a role that
 * may only INSERT is checked against tables it cannot read.
 */
HeapTuple
EnqueueOutboxRow(Relation rel, HeapTuple tuple)
{
	TupleDesc	desc = RelationGetDescr(rel);
	MeterEventInput event;
	EnqueueMeter meter;
	bool		identifier_generated;
	int			att_identifier,
				att_event_name,
				att_payload,
				att_ts,
				att_account,
				att_customer,
				att_enqueued_at,
				att_value_key,
				att_canonical,
				att_legacy_key,
				att_first_attempt,
				att_window_end,
				att_formula;
	bool		isnull;
	Datum		d;
	char	   *customer_key;
	char	   *value_key;
	char	   *customer;
	char	   *given_value_key = NULL;
	bool		attempted;
	bool		can_freeze;
	int			cols[8];
	Datum		vals[8];
	bool		nulls[8] = {false, false, false, false, false, false, false, false};
	int			ncols = 3;

	/* a rollup the worker formed: its request is fixed already */
	if (RollupForming())
		return tuple;

	att_identifier = column_number(rel, "identifier", NULL);
	att_event_name = column_number(rel, "event_name", NULL);
	att_payload = column_number(rel, "payload", NULL);
	att_ts = column_number(rel, "ts", NULL);
	att_account = column_number(rel, "stripe_account", NULL);
	att_customer = column_number(rel, "customer", NULL);
	att_enqueued_at = column_number(rel, "enqueued_at", NULL);
	att_first_attempt = column_number(rel, "first_attempt_at", NULL);

	/*
	 * Before ALTER EXTENSION ... UPDATE to 0.2.0 the outbox has no columns
	 * to freeze the request in; events are still queued, and the worker
	 * treats them as any event queued before 0.2.0.
	 */
	att_value_key = attnum_of(desc, "value_payload_key");
	att_canonical = attnum_of(desc, "canonical_value");
	att_legacy_key = attnum_of(desc, "legacy_idempotency_key");
	can_freeze = att_value_key > 0 && att_canonical > 0 && att_legacy_key > 0;
	att_window_end = attnum_of(desc, "rollup_window_end");
	att_formula = attnum_of(desc, "rollup_formula");

	memset(&event, 0, sizeof(event));
	d = heap_getattr(tuple, att_event_name, desc, &isnull);
	event.event_name = isnull ? NULL : TextDatumGetCString(d);
	d = heap_getattr(tuple, att_payload, desc, &isnull);
	event.payload = isnull ? NULL : DatumGetJsonbP(d);
	d = heap_getattr(tuple, att_identifier, desc, &isnull);
	identifier_generated = isnull;
	event.identifier = isnull ? MeterEventNewIdentifier() : TextDatumGetCString(d);
	d = heap_getattr(tuple, att_enqueued_at, desc, &isnull);
	event.reference_time = isnull ? GetCurrentTimestamp() : DatumGetTimestampTz(d);
	d = heap_getattr(tuple, att_ts, desc, &isnull);
	event.ts = isnull ? GetCurrentTimestamp() : DatumGetTimestampTz(d);
	d = heap_getattr(tuple, att_account, desc, &isnull);
	event.stripe_account = isnull ? NULL : TextDatumGetCString(d);

	if (event.event_name == NULL)
		(void) MeterEventValidate(&event);	/* reports the NULL */

	/*
	 * A row that arrives already attempted (a restored dump) was sent with
	 * the value key, value and Idempotency-Key frozen in it: a resend must
	 * repeat them, so they are kept.  Anything else is frozen now.
	 */
	(void) heap_getattr(tuple, att_first_attempt, desc, &attempted);
	attempted = !attempted;
	if (attempted && can_freeze)
	{
		d = heap_getattr(tuple, att_value_key, desc, &isnull);
		if (!isnull)
			given_value_key = TextDatumGetCString(d);
	}

	StoreProbeMeter(event.event_name, &meter);
	meter_keys(&meter, &customer_key, &value_key);
	if (given_value_key != NULL)
		value_key = given_value_key;
	event.customer_key = customer_key;
	event.value_key = value_key;
	customer = MeterEventValidate(&event);
	MeterSyncCheckEnqueue(event.event_name, &meter, event.stripe_account);	/* meter_sync.c */

	/*
	 * An identifier made here is a fresh random UUID (122 random bits): it
	 * cannot be in use, and looking for it in three tables was a third of
	 * the cost of an enqueue.  The outbox's unique index still guards it.
	 */
	if (!identifier_generated)
	{
		check_identifier_unused(event.identifier);
		if (!requeueing_failed)
			RollupCheckIdentifier(event.identifier);
	}

	cols[0] = att_identifier;
	vals[0] = CStringGetTextDatum(event.identifier);
	cols[1] = att_ts;
	vals[1] = TimestampTzGetDatum(event.ts);
	cols[2] = att_customer;
	vals[2] = CStringGetTextDatum(customer);
	if (!attempted && can_freeze)
	{
		/*
		 * Freeze what the request depends on besides the columns above: the
		 * meter's value key and the value's canonical text, so that a meter
		 * sync or an UPDATE of stripe_meter.meters before a resend cannot
		 * change the body sent under the same Idempotency-Key; and the key
		 * scheme, which for a new event is never the pre-0.2.0 one.
		 */
		cols[3] = att_value_key;
		vals[3] = CStringGetTextDatum(value_key);
		cols[4] = att_canonical;
		vals[4] = CStringGetTextDatum(MeterEventCanonicalValue(event.payload,
																value_key));
		cols[5] = att_legacy_key;
		vals[5] = BoolGetDatum(false);
		ncols = 6;
	}
	if (!attempted && att_window_end > 0 && att_formula > 0)
	{
		/*
		 * An event of a meter that rolls up waits for its window to close;
		 * a rollup itself (restored from a dump), or an event of any other
		 * meter, is sent alone.
		 */
		bool		rolls_up = meter.rollup_window_secs > 0 && meter.aggregation != NULL &&
			!RollupIsIdentifier(event.identifier);

		cols[ncols] = att_window_end;
		nulls[ncols] = !rolls_up;
		vals[ncols++] = rolls_up ?
			TimestampTzGetDatum(RollupWindowEnd(event.ts, meter.rollup_window_secs)) : (Datum) 0;
		cols[ncols] = att_formula;
		nulls[ncols] = !rolls_up;
		vals[ncols++] = rolls_up ? CStringGetTextDatum(meter.aggregation) : (Datum) 0;
	}
	tuple = heap_modify_tuple_by_cols(tuple, desc, ncols, cols, vals, nulls);

	StripeMeterWakeAtCommit();

	return tuple;
}

/* the attribute number of a live user column by name, or 0 */
static int
attnum_of(TupleDesc desc, const char *column)
{
	int			i;

	for (i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);

		if (!att->attisdropped && namestrcmp(&att->attname, column) == 0)
			return i + 1;
	}
	return 0;
}

/* a column's value in its type's text form, or NULL */
static char *
column_text(HeapTuple tuple, TupleDesc desc, int attnum)
{
	bool		isnull;
	Datum		d = heap_getattr(tuple, attnum, desc, &isnull);
	Oid			output;
	bool		varlena;

	if (isnull)
		return NULL;
	getTypeOutputInfo(TupleDescAttr(desc, attnum - 1)->atttypid, &output, &varlena);
	return OidOutputFunctionCall(output, d);
}

/*
 * The attribute number of a column by name, or an error naming the trigger
 * argument that referred to it (role) when users supplied the name.
 */
static int
column_number(Relation rel, const char *column, const char *role)
{
	int			attnum = attnum_of(RelationGetDescr(rel), column);

	if (attnum <= 0)
	{
		if (role == NULL)
			elog(ERROR, "column \"%s\" is missing from \"%s\"",
				 column, RelationGetRelationName(rel));
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("column \"%s\" named as the %s column of stripe_meter_event_trigger does not exist in table \"%s\"",
						column, role, RelationGetRelationName(rel))));
	}
	return attnum;
}

/*
 * EnqueueUserRow
 *		What the trigger helper users attach to their own tables
 *		(stripe_meter_event_trigger(event_name, customer_column,
 *		value_column [, identifier_column [, timestamp_column]])) does with
 *		one row of theirs: queue its event.
 *
 * The payload is built under the meter's keys from the customer and value
 * columns; the optional columns give the identifier (a NULL there means a
 * new UUID) and the event's time.  The event is queued in the same
 * transaction as the row, through the outbox's validation.
 */
void
EnqueueUserRow(Trigger *trigger, Relation rel, HeapTuple tuple)
{
	TupleDesc	desc = RelationGetDescr(rel);
	char	  **args = trigger->tgargs;
	int			att_customer,
				att_value,
				att_identifier = 0,
				att_ts = 0;
	EnqueueMeter meter;
	char	   *customer_key;
	char	   *value_key;
	char	   *identifier = NULL;
	TimestampTz ts = 0;
	bool		have_ts = false;
	bool		isnull;
	StringInfoData json;
	Jsonb	   *payload;

	att_customer = column_number(rel, args[1], "customer");
	att_value = column_number(rel, args[2], "value");
	if (trigger->tgnargs >= 4)
		att_identifier = column_number(rel, args[3], "identifier");
	if (trigger->tgnargs == 5)
		att_ts = column_number(rel, args[4], "timestamp");

	(void) heap_getattr(tuple, att_customer, desc, &isnull);
	if (isnull)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("customer column \"%s\" is null", args[1]),
				 errdetail("Trigger \"%s\" on table \"%s\" bills each row to the customer in that column.",
						   trigger->tgname, RelationGetRelationName(rel))));
	(void) heap_getattr(tuple, att_value, desc, &isnull);
	if (isnull)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("value column \"%s\" is null", args[2]),
				 errdetail("Trigger \"%s\" on table \"%s\" bills each row the usage in that column.",
						   trigger->tgname, RelationGetRelationName(rel))));
	if (att_identifier > 0)
		identifier = column_text(tuple, desc, att_identifier);
	if (att_ts > 0)
	{
		(void) heap_getattr(tuple, att_ts, desc, &isnull);
		if (!isnull)
		{
			ts = column_as_timestamptz(tuple, desc, att_ts, args[4]);
			have_ts = true;
		}
	}

	StoreProbeMeter(args[0], &meter);
	meter_keys(&meter, &customer_key, &value_key);

	initStringInfo(&json);
	appendStringInfoChar(&json, '{');
	escape_json(&json, customer_key);
	appendStringInfoChar(&json, ':');
	escape_json(&json, column_text(tuple, desc, att_customer));
	appendStringInfoChar(&json, ',');
	escape_json(&json, value_key);
	appendStringInfoChar(&json, ':');
	append_json_value(&json, tuple, desc, att_value);
	appendStringInfoChar(&json, '}');
	payload = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(json.data)));

	(void) StoreOutboxInsertEvent(args[0], payload, identifier,
								  have_ts ? &ts : NULL, NULL);
}

/*
 * A usage column becomes a JSON number when its type is numeric, so that
 * the value check sees the number itself; anything else goes as a string
 * and is checked as one.
 */
static void
append_json_value(StringInfo buf, HeapTuple tuple, TupleDesc desc, int attnum)
{
	Oid			type = getBaseType(TupleDescAttr(desc, attnum - 1)->atttypid);
	char	   *text = column_text(tuple, desc, attnum);

	switch (type)
	{
		case INT2OID:
		case INT4OID:
		case INT8OID:
			appendStringInfoString(buf, text);
			break;
		case NUMERICOID:
			/* NaN and infinities are not JSON numbers: let validation refuse them */
			if (text[0] == '-' ? (text[1] >= '0' && text[1] <= '9') :
				(text[0] >= '0' && text[0] <= '9'))
				appendStringInfoString(buf, text);
			else
				escape_json(buf, text);
			break;
		default:
			escape_json(buf, text);
			break;
	}
}

static TimestampTz
column_as_timestamptz(HeapTuple tuple, TupleDesc desc, int attnum, const char *column)
{
	Oid			column_type = TupleDescAttr(desc, attnum - 1)->atttypid;
	Oid			type = getBaseType(column_type);
	bool		isnull;
	Datum		d = heap_getattr(tuple, attnum, desc, &isnull);

	switch (type)
	{
		case TIMESTAMPTZOID:
			return DatumGetTimestampTz(d);
		case TIMESTAMPOID:
			return DatumGetTimestampTz(DirectFunctionCall1(timestamp_timestamptz, d));
		case DATEOID:
			return DatumGetTimestampTz(DirectFunctionCall1(date_timestamptz, d));
		default:
			ereport(ERROR,
					(errcode(ERRCODE_DATATYPE_MISMATCH),
					 errmsg("timestamp column \"%s\" has type %s", column,
							format_type_be(column_type)),
					 errdetail("The event time must come from a timestamptz, timestamp or date column.")));
	}
	return 0;					/* keep compiler quiet */
}

/*
 * Move one failed event back into the outbox, or raise why not.
 */
static void
retry_one(const char *identifier, bool history)
{
	bool		found;

	/* a failed rollup comes back under its own identifier, as any event */
	requeueing_failed = true;
	PG_TRY();
	{
		found = StoreOutboxRequeueFailed(identifier, history);
	}
	PG_FINALLY();
	{
		requeueing_failed = false;
	}
	PG_END_TRY();
	if (!found)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("no failed meter event has identifier \"%s\"", identifier)));
}

/*
 * Retry one event in a subtransaction; returns NULL on success, else the
 * error's message (in cxt), with the subtransaction rolled back.
 */
static char *
try_retry_one(const char *identifier, bool history, MemoryContext cxt,
			  ResourceOwner owner)
{
	char	   *volatile error = NULL;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		retry_one(identifier, history);
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
 * EnqueueRetryFailed
 *		Move failed events back into the outbox: the one named, or all.
 *
 * They re-enter through the same validation as any new event.  Retrying
 * one event raises that validation's error.  Retrying all moves every
 * event that can be queued again, each in its own subtransaction, and
 * leaves the others failed, with a NOTICE saying how many and why (an
 * event whose timestamp has meanwhile left Stripe's 35-day window, say).
 *
 * Retrying all leaves out the events Stripe may have billed (maybe_billed)
 * unless force is true, and says how many in a NOTICE: the operator should
 * check each in Stripe first.  One named by its identifier is always
 * retried.  history is false for tables older than 0.2.0, which have no
 * maybe_billed column.  Returns how many events were queued.
 */
int64
EnqueueRetryFailed(const char *identifier, bool force, bool history)
{
	List	   *identifiers = NIL;
	ListCell   *lc;
	int64		moved = 0;
	int64		skipped = 0;
	int64		maybe_billed = 0;
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;

	if (identifier != NULL)
	{
		retry_one(identifier, history);
		return 1;
	}

	foreach(lc, StoreOutboxListFailed(history))
	{
		FailedEventRef *f = lfirst(lc);

		if (!force && f->maybe_billed)
		{
			maybe_billed++;
			continue;
		}
		identifiers = lappend(identifiers, f->identifier);
	}

	foreach(lc, identifiers)
	{
		char	   *error = try_retry_one((char *) lfirst(lc), history, cxt, owner);

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
	if (maybe_billed > 0)
		ereport(NOTICE,
				(errmsg_plural("%lld failed meter event that Stripe may have billed was not queued again",
							   "%lld failed meter events that Stripe may have billed were not queued again",
							   maybe_billed, (long long) maybe_billed),
				 errdetail("They failed without a definite answer from Stripe (maybe_billed in stripe_meter.failed_events), so resending them could bill them twice."),
				 errhint("Check them in Stripe, then retry each by its identifier, or all with force => true.")));
	return moved;
}
