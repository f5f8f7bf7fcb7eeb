/*-------------------------------------------------------------------------
 *
 * sql_functions.c
 *	  Every C function the extension's SQL scripts name (AS
 *	  'MODULE_PATHNAME', 'name'): each unpacks and checks its arguments,
 *	  then calls the feature that does the work.
 *
 * The C names are part of the released install scripts, which never
 * change (released/), so they stay as they are.  The rules are in the
 * feature files (enqueue.c, cancel.c, meter_sync.c, reconcile.c, shmem.c)
 * and the SQL in the store files.  Queueing one event is nothing but the
 * outbox's INSERT, whose trigger holds the rules, so
 * stripe_meter_event_create() calls store_outbox.c directly.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/sql_functions.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "commands/trigger.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

PG_FUNCTION_INFO_V1(stripe_meter_event_create);
PG_FUNCTION_INFO_V1(stripe_meter_outbox_before_insert);
PG_FUNCTION_INFO_V1(stripe_meter_event_trigger);
PG_FUNCTION_INFO_V1(stripe_meter_retry_failed);
PG_FUNCTION_INFO_V1(stripe_meter_event_cancel);
PG_FUNCTION_INFO_V1(stripe_meter_sync_meters);
PG_FUNCTION_INFO_V1(stripe_meter_reconcile);
PG_FUNCTION_INFO_V1(stripe_meter_worker_state);
PG_FUNCTION_INFO_V1(stripe_meter_launcher_notify);

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
 * the same values.  The outbox's trigger validates it.
 */
Datum
stripe_meter_event_create(PG_FUNCTION_ARGS)
{
	char	   *event_name = text_arg_or_null(fcinfo, 0);
	Jsonb	   *payload = PG_ARGISNULL(1) ? NULL : PG_GETARG_JSONB_P(1);
	char	   *identifier = text_arg_or_null(fcinfo, 2);
	TimestampTz ts = PG_ARGISNULL(3) ? 0 : PG_GETARG_TIMESTAMPTZ(3);
	char	   *account = text_arg_or_null(fcinfo, 4);

	PG_RETURN_TEXT_P(StoreOutboxInsertEvent(event_name, payload, identifier,
											PG_ARGISNULL(3) ? NULL : &ts,
											account));
}

/*
 * stripe_meter_outbox_before_insert()
 *		BEFORE INSERT row trigger on stripe_meter.outbox: enqueue.c's
 *		EnqueueOutboxRow.
 */
Datum
stripe_meter_outbox_before_insert(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo) ||
		!TRIGGER_FIRED_BEFORE(trigdata->tg_event) ||
		!TRIGGER_FIRED_FOR_ROW(trigdata->tg_event) ||
		!TRIGGER_FIRED_BY_INSERT(trigdata->tg_event))
		elog(ERROR, "stripe_meter_outbox_before_insert must be a BEFORE INSERT row trigger");

	return PointerGetDatum(EnqueueOutboxRow(trigdata->tg_relation,
											trigdata->tg_trigtuple));
}

/*
 * stripe_meter_event_trigger(event_name, customer_column, value_column
 *							  [, identifier_column [, timestamp_column]])
 *		Row trigger users attach to their own tables: one event per row
 *		(enqueue.c's EnqueueUserRow).
 */
Datum
stripe_meter_event_trigger(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	Trigger    *trigger;
	HeapTuple	tuple;

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
	if (trigger->tgnargs < 3 || trigger->tgnargs > 5)
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("trigger \"%s\" passes %d arguments to stripe_meter_event_trigger",
						trigger->tgname, trigger->tgnargs),
				 errdetail("The arguments are the event name, the customer column and the value column, then optionally the identifier column and the timestamp column.")));

	EnqueueUserRow(trigger, trigdata->tg_relation, tuple);

	/* BEFORE and INSTEAD OF row triggers pass the row on unchanged */
	if (TRIGGER_FIRED_AFTER(trigdata->tg_event))
		return PointerGetDatum(NULL);
	return PointerGetDatum(tuple);
}

/*
 * stripe_meter_retry_failed(identifier, force)
 *		Queue failed events again: the one named, or all when NULL (the
 *		maybe-billed ones only when force is true).  Before 0.2.0 the SQL
 *		function has no force argument.
 */
Datum
stripe_meter_retry_failed(PG_FUNCTION_ARGS)
{
	char	   *identifier = text_arg_or_null(fcinfo, 0);
	bool		force = PG_NARGS() > 1 && !PG_ARGISNULL(1) && PG_GETARG_BOOL(1);

	/* the 0.1.0 function (one argument) means 0.1.0 tables: no history */
	PG_RETURN_INT64(EnqueueRetryFailed(identifier, force, PG_NARGS() > 1));
}

/* an event name or identifier as Stripe takes it: neither NULL nor empty */
static char *
name_arg(FunctionCallInfo fcinfo, int argno, const char *what)
{
	char	   *s;

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", what)));
	s = text_to_cstring(PG_GETARG_TEXT_PP(argno));
	if (s[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be empty", what)));
	if (pg_mbstrlen(s) > STRIPE_MAX_NAME_CHARS)
		ereport(ERROR,
				(errcode(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
				 errmsg("%s must be at most %d characters", what, STRIPE_MAX_NAME_CHARS)));
	return s;
}

/*
 * stripe_meter_event_cancel(event_name text, identifier text) RETURNS text
 *		removed, queued or awaiting_delivery (cancel.c's CancelEvent).
 */
Datum
stripe_meter_event_cancel(PG_FUNCTION_ARGS)
{
	char	   *event_name = name_arg(fcinfo, 0, "event_name");
	char	   *identifier = name_arg(fcinfo, 1, "identifier");

	PG_RETURN_TEXT_P(cstring_to_text(CancelEvent(event_name, identifier)));
}

/*
 * stripe_meter_sync_meters() RETURNS integer
 *		Replace stripe_meter.meters with the account's meters now
 *		(meter_sync.c's MeterSyncNow).
 */
Datum
stripe_meter_sync_meters(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT32(MeterSyncNow());
}

/* a text argument of stripe_meter_reconcile(), NULL only when not required */
static char *
reconcile_text_arg(FunctionCallInfo fcinfo, int n, const char *what, bool required)
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

/*
 * stripe_meter_reconcile(event_name, customer, from, to
 *						  [, value_grouping_window [, stripe_account]])
 *		RETURNS TABLE (window_start, window_end, local_events, local_value,
 *		stripe_value, difference): reconcile.c's ReconcileRun.
 */
Datum
stripe_meter_reconcile(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	ReconcileRequest req;
	int64		step;

	req.event_name = reconcile_text_arg(fcinfo, 0, "event_name", true);
	req.customer = reconcile_text_arg(fcinfo, 1, "customer", true);
	req.grouping = reconcile_text_arg(fcinfo, 4, "value_grouping_window", false);
	req.account = reconcile_text_arg(fcinfo, 5, "stripe_account", false);
	if (PG_ARGISNULL(2) || PG_ARGISNULL(3))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("from and to must not be null")));
	req.from = PG_GETARG_TIMESTAMPTZ(2);
	req.to = PG_GETARG_TIMESTAMPTZ(3);
	if (req.grouping != NULL && strcmp(req.grouping, "day") != 0 &&
		strcmp(req.grouping, "hour") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("value_grouping_window must be \"day\", \"hour\" or NULL")));
	if (req.account != NULL &&
		(strncmp(req.account, "acct_", 5) != 0 ||
		 strspn(req.account + 5, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789") != strlen(req.account + 5) ||
		 req.account[5] == '\0'))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("stripe_account must look like acct_ followed by letters and digits")));
	step = req.grouping == NULL ? 60 :
		strcmp(req.grouping, "hour") == 0 ? SECS_PER_HOUR : SECS_PER_DAY;
	check_aligned("from", req.from, step,
				  step == 60 ? "the minute" : step == SECS_PER_HOUR ? "the hour" : "midnight UTC");
	check_aligned("to", req.to, step,
				  step == 60 ? "the minute" : step == SECS_PER_HOUR ? "the hour" : "midnight UTC");
	if (req.from >= req.to)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("from must be earlier than to")));

	InitMaterializedSRF(fcinfo, 0);
	ReconcileRun(&req, rsinfo->setResult, rsinfo->setDesc);
	return (Datum) 0;
}

/*
 * stripe_meter.worker_state(): what this database's worker publishes
 * (shmem.c).
 *
 * The row has as many columns as the caller's definition: a schema not yet
 * updated from 0.1.0 has no stream_accounts.
 */
Datum
stripe_meter_worker_state(PG_FUNCTION_ARGS)
{
	TupleDesc	desc;
	Datum		values[6];
	bool		nulls[6] = {true, true, true, true, true, true};
	DatabaseSlot slot;

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	if (desc->natts > lengthof(values))
		elog(ERROR, "stripe_meter.worker_state() has more columns than this library knows");

	if (StripeMeterReadSlot(MyDatabaseId, &slot))
	{
		values[0] = Int32GetDatum(slot.pid);
		nulls[0] = false;
		if (slot.paused[0] != '\0')
		{
			values[1] = CStringGetTextDatum(slot.paused);
			nulls[1] = false;
		}
		if (slot.last_error[0] != '\0')
		{
			values[2] = CStringGetTextDatum(slot.last_error);
			nulls[2] = false;
			values[3] = TimestampTzGetDatum(slot.last_error_at);
			nulls[3] = false;
		}
		values[4] = TimestampTzGetDatum(slot.started_at);
		nulls[4] = false;
		values[5] = Int32GetDatum(slot.stream_accounts);
		nulls[5] = false;
	}

	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(desc, values, nulls)));
}

/*
 * stripe_meter.launcher_notify(): called by the install script, so that
 * CREATE EXTENSION gets its database a worker without a restart.  The
 * launcher is told at commit, once the extension is visible to a worker.
 */
Datum
stripe_meter_launcher_notify(PG_FUNCTION_ARGS)
{
	StripeMeterWakeAtCommit();
	PG_RETURN_VOID();
}
