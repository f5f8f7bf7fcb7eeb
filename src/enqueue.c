/*-------------------------------------------------------------------------
 *
 * enqueue.c
 *	  The SQL-callable enqueue surface: stripe_meter_event_create(), the
 *	  outbox's validation trigger, the trigger helper users attach to their
 *	  own tables, and stripe_meter_retry_failed().
 *
 * Every path into the outbox ends in one INSERT, and every INSERT passes
 * through stripe_meter_outbox_before_insert(), so the function, the trigger
 * helper and an application's direct INSERT are validated by the same code
 * and fail with the same errors.  Nothing here needs the library to be
 * preloaded: enqueueing never depends on the worker being up.
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
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

PG_FUNCTION_INFO_V1(stripe_meter_event_create);
PG_FUNCTION_INFO_V1(stripe_meter_outbox_before_insert);
PG_FUNCTION_INFO_V1(stripe_meter_event_trigger);
PG_FUNCTION_INFO_V1(stripe_meter_retry_failed);

static char *text_arg_or_null(FunctionCallInfo fcinfo, int argno);
static int	column_number(Relation rel, const char *column, const char *role);
static TimestampTz column_as_timestamptz(HeapTuple tuple, TupleDesc desc,
										 int attnum, const char *column);
static void append_json_value(StringInfo buf, HeapTuple tuple, TupleDesc desc,
							  int attnum);

static char *
text_arg_or_null(FunctionCallInfo fcinfo, int argno)
{
	if (PG_ARGISNULL(argno))
		return NULL;
	return text_to_cstring(PG_GETARG_TEXT_PP(argno));
}

/*
 * stripe_meter_event_create(event_name, payload, identifier, ts, stripe_account)
 *
 * Queue one event in the caller's transaction and return its identifier.
 * A NULL identifier becomes a new UUID and a NULL ts the wall-clock time of
 * the call (clock_timestamp()), both fixed now so every later attempt sends
 * the same values.
 */
Datum
stripe_meter_event_create(PG_FUNCTION_ARGS)
{
	char	   *event_name = text_arg_or_null(fcinfo, 0);
	Jsonb	   *payload = PG_ARGISNULL(1) ? NULL : PG_GETARG_JSONB_P(1);
	char	   *identifier = text_arg_or_null(fcinfo, 2);
	TimestampTz ts = PG_ARGISNULL(3) ? 0 : PG_GETARG_TIMESTAMPTZ(3);
	char	   *account = text_arg_or_null(fcinfo, 4);
	text	   *result;

	SPI_connect();
	result = OutboxInsertEvent(event_name, payload, identifier,
							   PG_ARGISNULL(3) ? NULL : &ts, account);
	SPI_finish();

	PG_RETURN_TEXT_P(result);
}

/*
 * stripe_meter_outbox_before_insert()
 *		BEFORE INSERT row trigger on stripe_meter.outbox.
 *
 * Fills in the identifier and timestamp when they are NULL, validates the
 * event against its meter's payload keys, refuses identifiers already used,
 * records the customer for the worker's one-call-per-customer rule, and
 * asks for the worker to be woken when the transaction commits.  Runs as
 * the extension's owner (SECURITY DEFINER), so a role that may only INSERT
 * is checked against tables it cannot read.
 */
Datum
stripe_meter_outbox_before_insert(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	Relation	rel;
	TupleDesc	desc;
	HeapTuple	tuple;
	MeterEventInput event;
	EnqueueMeter meter;
	bool		identifier_generated;
	int			att_identifier,
				att_event_name,
				att_payload,
				att_ts,
				att_account,
				att_customer,
				att_enqueued_at;
	bool		isnull;
	Datum		d;
	char	   *customer_key;
	char	   *value_key;
	char	   *customer;
	int			cols[3];
	Datum		vals[3];
	bool		nulls[3] = {false, false, false};

	if (!CALLED_AS_TRIGGER(fcinfo) ||
		!TRIGGER_FIRED_BEFORE(trigdata->tg_event) ||
		!TRIGGER_FIRED_FOR_ROW(trigdata->tg_event) ||
		!TRIGGER_FIRED_BY_INSERT(trigdata->tg_event))
		elog(ERROR, "stripe_meter_outbox_before_insert must be a BEFORE INSERT row trigger");

	rel = trigdata->tg_relation;
	desc = RelationGetDescr(rel);
	tuple = trigdata->tg_trigtuple;

	att_identifier = column_number(rel, "identifier", NULL);
	att_event_name = column_number(rel, "event_name", NULL);
	att_payload = column_number(rel, "payload", NULL);
	att_ts = column_number(rel, "ts", NULL);
	att_account = column_number(rel, "stripe_account", NULL);
	att_customer = column_number(rel, "customer", NULL);
	att_enqueued_at = column_number(rel, "enqueued_at", NULL);

	memset(&event, 0, sizeof(event));
	d = SPI_getbinval(tuple, desc, att_event_name, &isnull);
	event.event_name = isnull ? NULL : TextDatumGetCString(d);
	d = SPI_getbinval(tuple, desc, att_payload, &isnull);
	event.payload = isnull ? NULL : DatumGetJsonbP(d);
	d = SPI_getbinval(tuple, desc, att_identifier, &isnull);
	identifier_generated = isnull;
	event.identifier = isnull ? MeterEventNewIdentifier() : TextDatumGetCString(d);
	d = SPI_getbinval(tuple, desc, att_enqueued_at, &isnull);
	event.reference_time = isnull ? GetCurrentTimestamp() : DatumGetTimestampTz(d);
	d = SPI_getbinval(tuple, desc, att_ts, &isnull);
	event.ts = isnull ? GetCurrentTimestamp() : DatumGetTimestampTz(d);
	d = SPI_getbinval(tuple, desc, att_account, &isnull);
	event.stripe_account = isnull ? NULL : TextDatumGetCString(d);

	if (event.event_name == NULL)
		(void) MeterEventValidate(&event);	/* reports the NULL */

	EnqueueProbeMeter(event.event_name, &meter);	/* enqueue_probe.c */
	OutboxMeterKeys(&meter, &customer_key, &value_key);
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
		OutboxCheckIdentifierUnused(event.identifier);

	cols[0] = att_identifier;
	vals[0] = CStringGetTextDatum(event.identifier);
	cols[1] = att_ts;
	vals[1] = TimestampTzGetDatum(event.ts);
	cols[2] = att_customer;
	vals[2] = CStringGetTextDatum(customer);
	tuple = heap_modify_tuple_by_cols(tuple, desc, 3, cols, vals, nulls);

	StripeMeterWakeAtCommit();

	return PointerGetDatum(tuple);
}

/*
 * The attribute number of a column by name, or an error naming the trigger
 * argument that referred to it (role) when users supplied the name.
 */
static int
column_number(Relation rel, const char *column, const char *role)
{
	int			attnum = SPI_fnumber(RelationGetDescr(rel), column);

	if (attnum == SPI_ERROR_NOATTRIBUTE || attnum <= 0)
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
 * stripe_meter_event_trigger(event_name, customer_column, value_column
 *							  [, identifier_column [, timestamp_column]])
 *		Row trigger users attach to their own tables: one event per row.
 *
 * The payload is built under the meter's keys from the customer and value
 * columns; the optional columns give the identifier (a NULL there means a
 * new UUID) and the event's time.  The event is queued in the same
 * transaction as the row, through the outbox's validation.
 */
Datum
stripe_meter_event_trigger(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	Trigger    *trigger;
	Relation	rel;
	TupleDesc	desc;
	HeapTuple	tuple;
	char	  **args;
	int			att_customer,
				att_value,
				att_identifier = 0,
				att_ts = 0;
	char	   *customer_key;
	char	   *value_key;
	char	   *identifier = NULL;
	TimestampTz ts = 0;
	bool		have_ts = false;
	bool		isnull;
	StringInfoData json;
	Jsonb	   *payload;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("stripe_meter_event_trigger can only be called as a trigger")));
	if (!TRIGGER_FIRED_FOR_ROW(trigdata->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("stripe_meter_event_trigger must be fired for each row"),
				 errhint("Create the trigger with FOR EACH ROW.")));
	if (TRIGGER_FIRED_BY_INSERT(trigdata->tg_event))
		tuple = trigdata->tg_trigtuple;
	else if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
		tuple = trigdata->tg_newtuple;
	else
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("stripe_meter_event_trigger must be fired by INSERT or UPDATE"),
				 errdetail("A deleted row carries no new usage to bill.")));

	trigger = trigdata->tg_trigger;
	rel = trigdata->tg_relation;
	desc = RelationGetDescr(rel);
	args = trigger->tgargs;

	if (trigger->tgnargs < 3 || trigger->tgnargs > 5)
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("trigger \"%s\" passes %d arguments to stripe_meter_event_trigger",
						trigger->tgname, trigger->tgnargs),
				 errdetail("The arguments are the event name, the customer column and the value column, then optionally the identifier column and the timestamp column.")));

	att_customer = column_number(rel, args[1], "customer");
	att_value = column_number(rel, args[2], "value");
	if (trigger->tgnargs >= 4)
		att_identifier = column_number(rel, args[3], "identifier");
	if (trigger->tgnargs == 5)
		att_ts = column_number(rel, args[4], "timestamp");

	(void) SPI_getbinval(tuple, desc, att_customer, &isnull);
	if (isnull)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("customer column \"%s\" is null", args[1]),
				 errdetail("Trigger \"%s\" on table \"%s\" bills each row to the customer in that column.",
						   trigger->tgname, RelationGetRelationName(rel))));
	(void) SPI_getbinval(tuple, desc, att_value, &isnull);
	if (isnull)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("value column \"%s\" is null", args[2]),
				 errdetail("Trigger \"%s\" on table \"%s\" bills each row the usage in that column.",
						   trigger->tgname, RelationGetRelationName(rel))));
	if (att_identifier > 0)
		identifier = SPI_getvalue(tuple, desc, att_identifier);
	if (att_ts > 0)
	{
		(void) SPI_getbinval(tuple, desc, att_ts, &isnull);
		if (!isnull)
		{
			ts = column_as_timestamptz(tuple, desc, att_ts, args[4]);
			have_ts = true;
		}
	}

	SPI_connect();
	OutboxLookupMeterKeys(args[0], &customer_key, &value_key);

	initStringInfo(&json);
	appendStringInfoChar(&json, '{');
	escape_json(&json, customer_key);
	appendStringInfoChar(&json, ':');
	escape_json(&json, SPI_getvalue(tuple, desc, att_customer));
	appendStringInfoChar(&json, ',');
	escape_json(&json, value_key);
	appendStringInfoChar(&json, ':');
	append_json_value(&json, tuple, desc, att_value);
	appendStringInfoChar(&json, '}');
	payload = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(json.data)));

	(void) OutboxInsertEvent(args[0], payload, identifier,
							 have_ts ? &ts : NULL, NULL);
	SPI_finish();

	/* BEFORE and INSTEAD OF row triggers pass the row on unchanged */
	if (TRIGGER_FIRED_AFTER(trigdata->tg_event))
		return PointerGetDatum(NULL);
	return PointerGetDatum(tuple);
}

/*
 * A usage column becomes a JSON number when its type is numeric, so that
 * the value check sees the number itself; anything else goes as a string
 * and is checked as one.
 */
static void
append_json_value(StringInfo buf, HeapTuple tuple, TupleDesc desc, int attnum)
{
	Oid			type = getBaseType(SPI_gettypeid(desc, attnum));
	char	   *text = SPI_getvalue(tuple, desc, attnum);

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
	Oid			type = getBaseType(SPI_gettypeid(desc, attnum));
	bool		isnull;
	Datum		d = SPI_getbinval(tuple, desc, attnum, &isnull);

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
							format_type_be(SPI_gettypeid(desc, attnum))),
					 errdetail("The event time must come from a timestamptz, timestamp or date column.")));
	}
	return 0;					/* keep compiler quiet */
}

/*
 * stripe_meter_retry_failed(identifier)
 *		Queue failed events again: the one named, or all when NULL.
 */
Datum
stripe_meter_retry_failed(PG_FUNCTION_ARGS)
{
	char	   *identifier = text_arg_or_null(fcinfo, 0);
	int64		n;

	SPI_connect();
	n = OutboxRetryFailed(identifier);
	SPI_finish();

	PG_RETURN_INT64(n);
}
