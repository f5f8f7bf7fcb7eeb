/*-------------------------------------------------------------------------
 *
 * cancel.c
 *	  Cancelling meter events: stripe_meter_event_cancel() and the worker's
 *	  delivery of cancel adjustments (POST /v1/billing/meter_event_adjustments).
 *
 * What a cancellation does depends on where the event is:
 *	- queued and certainly never seen by Stripe (not in flight, and every
 *	  earlier attempt got a definite answer): the row is deleted, nothing
 *	  is ever sent;
 *	- in flight, or an earlier attempt's outcome is unknown: Stripe may
 *	  already have it, and deleting the row would lose track of it.  The
 *	  cancellation waits (awaiting_delivery) until the event's delivery is
 *	  recorded, then is sent like any other;
 *	- delivered: a cancel adjustment is queued for the worker, refused if
 *	  Stripe received the event more than 24 hours ago (Stripe's limit).
 *
 * Adjustments get the delivery guarantees of events: the claim is
 * committed before the request, every attempt carries the same
 * Idempotency-Key (derived from the identifier), answers are classified
 * the same way, an attempt whose outcome is unknown is not repeated past
 * stripe_meter.resend_window, and one that can never succeed is parked as
 * failed with the reason.  Stripe answering that the event is already
 * cancelled counts as done (a lost answer to an earlier attempt).
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/cancel.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

#define ADJUSTMENTS_PATH	"/v1/billing/meter_event_adjustments"
#define CANCEL_WINDOW_SECS	(24 * SECS_PER_HOUR)

PG_FUNCTION_INFO_V1(stripe_meter_event_cancel);

static void
check_name_arg(const char *what, text *t)
{
	char	   *s;

	if (t == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", what)));
	s = text_to_cstring(t);
	if (s[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be empty", what)));
	if (pg_mbstrlen(s) > STRIPE_MAX_NAME_CHARS)
		ereport(ERROR,
				(errcode(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
				 errmsg("%s must be at most %d characters", what, STRIPE_MAX_NAME_CHARS)));
}

static void
check_event_name_matches(const char *identifier, const char *given, const char *stored)
{
	if (strcmp(given, stored) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("meter event \"%s\" has event name \"%s\", not \"%s\"",
						identifier, stored, given)));
}

/* a second cancellation of the same event */
static void
refuse_if_already_cancelled(Datum *args)
{
	int			rc;
	char	   *status;

	rc = SPI_execute_with_args("SELECT status, last_error FROM stripe_meter.adjustments"
							   " WHERE identifier = $2",
							   2, (Oid[]) {TEXTOID, TEXTOID}, args, NULL, true, 1);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "could not look up cancellations: %s", SPI_result_code_string(rc));
	if (SPI_processed == 0)
		return;
	status = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	ereport(ERROR,
			(errcode(ERRCODE_UNIQUE_VIOLATION),
			 errmsg("meter event \"%s\" is already cancelled",
					TextDatumGetCString(args[1])),
			 strcmp(status, "failed") == 0 ?
			 errdetail("The earlier cancellation failed: %s.",
					   SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2)) :
			 errdetail("Its cancellation is %s (see stripe_meter.adjustments).",
					   strcmp(status, "done") == 0 ? "done" : "queued"),
			 strcmp(status, "failed") == 0 ?
			 errhint("Delete its row from stripe_meter.adjustments to try again.") : 0));
}

static void
insert_adjustment(Datum *args, const char *stripe_account, const char *status,
				  Datum received_at, bool received_null)
{
	Datum		values[5];
	char		nulls[5] = {' ', ' ', ' ', ' ', ' '};
	int			rc;

	values[0] = args[1];
	values[1] = args[0];
	if (stripe_account)
		values[2] = CStringGetTextDatum(stripe_account);
	else
		nulls[2] = 'n';
	values[3] = CStringGetTextDatum(status);
	values[4] = received_at;
	if (received_null)
		nulls[4] = 'n';
	rc = SPI_execute_with_args("INSERT INTO stripe_meter.adjustments"
							   " (identifier, event_name, stripe_account, status, received_at)"
							   " VALUES ($1, $2, $3, $4, $5)",
							   5, (Oid[]) {TEXTOID, TEXTOID, TEXTOID, TEXTOID, TIMESTAMPTZOID},
							   values, nulls, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "could not queue a cancellation: %s", SPI_result_code_string(rc));
	StripeMeterWakeAtCommit();
}

/*
 * stripe_meter_event_cancel(event_name text, identifier text) RETURNS text
 *		removed, queued or awaiting_delivery.
 */
Datum
stripe_meter_event_cancel(PG_FUNCTION_ARGS)
{
	text	   *name_t = PG_ARGISNULL(0) ? NULL : PG_GETARG_TEXT_PP(0);
	text	   *ident_t = PG_ARGISNULL(1) ? NULL : PG_GETARG_TEXT_PP(1);
	char	   *event_name;
	char	   *identifier;
	Datum		args[2];
	Oid			types[2] = {TEXTOID, TEXTOID};
	const char *result;
	int			rc;

	check_name_arg("event_name", name_t);
	check_name_arg("identifier", ident_t);
	event_name = text_to_cstring(name_t);
	identifier = text_to_cstring(ident_t);
	args[0] = PointerGetDatum(name_t);
	args[1] = PointerGetDatum(ident_t);

	SPI_connect();

	/* 1. still queued: the row lock keeps the worker from claiming it now */
	rc = SPI_execute_with_args("SELECT event_name, stripe_account,"
							   "       in_flight_since IS NOT NULL OR unknown_outcome_since IS NOT NULL"
							   "  FROM stripe_meter.outbox WHERE identifier = $2 FOR UPDATE",
							   2, types, args, NULL, false, 1);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "could not look up the outbox: %s", SPI_result_code_string(rc));
	if (SPI_processed == 1)
	{
		HeapTuple	tup = SPI_tuptable->vals[0];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *stored = SPI_getvalue(tup, desc, 1);
		char	   *account = SPI_getvalue(tup, desc, 2);
		bool		isnull;
		bool		maybe_sent = DatumGetBool(SPI_getbinval(tup, desc, 3, &isnull));

		check_event_name_matches(identifier, event_name, stored);
		if (!maybe_sent)
		{
			rc = SPI_execute_with_args("DELETE FROM stripe_meter.outbox WHERE identifier = $2",
									   2, types, args, NULL, false, 0);
			if (rc != SPI_OK_DELETE)
				elog(ERROR, "could not remove the event: %s", SPI_result_code_string(rc));
			result = "removed";
		}
		else
		{
			refuse_if_already_cancelled(args);
			insert_adjustment(args, account, "awaiting_delivery", (Datum) 0, true);
			result = "awaiting_delivery";
		}
		SPI_finish();
		PG_RETURN_TEXT_P(cstring_to_text(result));
	}

	/* 2. delivered */
	rc = SPI_execute_with_args("SELECT event_name, stripe_account,"
							   "       COALESCE(created, first_attempt_at, delivered_at),"
							   "       COALESCE(created, first_attempt_at, delivered_at)"
							   "         <= pg_catalog.now() - interval '24 hours'"
							   "  FROM stripe_meter.meter_events WHERE identifier = $2 FOR UPDATE",
							   2, types, args, NULL, false, 1);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "could not look up delivered events: %s", SPI_result_code_string(rc));
	if (SPI_processed == 1)
	{
		HeapTuple	tup = SPI_tuptable->vals[0];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *stored = SPI_getvalue(tup, desc, 1);
		char	   *account = SPI_getvalue(tup, desc, 2);
		char	   *received_text = SPI_getvalue(tup, desc, 3);
		bool		isnull;
		Datum		received = SPI_getbinval(tup, desc, 3, &isnull);
		bool		too_late = DatumGetBool(SPI_getbinval(tup, desc, 4, &isnull));

		check_event_name_matches(identifier, event_name, stored);
		refuse_if_already_cancelled(args);
		if (too_late)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("meter event \"%s\" can no longer be cancelled", identifier),
					 errdetail("Stripe received it at %s, and cancels events only within 24 hours of receiving them.",
							   received_text),
					 errhint("Correct the usage with a new event instead, or in Stripe's dashboard.")));
		insert_adjustment(args, account, "queued", received, false);
		SPI_finish();
		PG_RETURN_TEXT_P(cstring_to_text("queued"));
	}

	/* 3. failed: never billed */
	rc = SPI_execute_with_args("SELECT reason FROM stripe_meter.failed_events WHERE identifier = $2",
							   2, types, args, NULL, true, 1);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "could not look up failed events: %s", SPI_result_code_string(rc));
	if (SPI_processed == 1)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("meter event \"%s\" was never delivered", identifier),
				 errdetail("It is in stripe_meter.failed_events: %s.",
						   SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1)),
				 errhint("Delete its row from stripe_meter.failed_events so that it is never retried.")));

	refuse_if_already_cancelled(args);
	ereport(ERROR,
			(errcode(ERRCODE_UNDEFINED_OBJECT),
			 errmsg("meter event \"%s\" does not exist", identifier),
			 errdetail("It is not queued, delivered or failed."),
			 errhint("Delivered events are kept for stripe_meter.delivered_retention; older ones can no longer be cancelled anyway.")));
	PG_RETURN_NULL();			/* not reached */
}

/*
 * CancelRepair
 *		At worker start: adjustments claimed by a previous worker go back to
 *		the queue, their outcome unknown since the claim.
 */
void
CancelRepair(void)
{
	int			rc = SPI_execute("UPDATE stripe_meter.adjustments"
								 "   SET in_flight_since = NULL,"
								 "       unknown_outcome_since = COALESCE(unknown_outcome_since, in_flight_since)"
								 " WHERE in_flight_since IS NOT NULL", false, 0);

	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "could not repair claimed cancellations: %s", SPI_result_code_string(rc));
}

typedef struct ClaimedCancel
{
	char	   *identifier;
	char	   *event_name;
	char	   *stripe_account;
	TimestampTz received_at;	/* 0 when unknown */
	TimestampTz unknown_outcome_since;
	int			attempts;
} ClaimedCancel;

typedef struct CancelOutcome
{
	const char *status;			/* done, failed, or NULL: retry */
	const char *outcome;		/* created, replayed, already_cancelled */
	bool		unknown;
	char	   *reason;
	char	   *json;
	long		http_status;
	const char *request_id;
} CancelOutcome;

static void
classify(const HttpResult *http, CancelOutcome *o)
{
	bool		json_ok;
	char	   *text;

	memset(o, 0, sizeof(*o));
	o->http_status = http->status;
	o->request_id = http->request_id;
	if (http->curl_code != 0)
	{
		o->unknown = http->connected;
		o->reason = StripeSyncErrorText(http);
		return;
	}
	json_ok = http->body && !http->body_truncated &&
		DeliveryJsonIsStorable(http->body, http->body_len);
	if (json_ok)
		o->json = pnstrdup(http->body, http->body_len);
	text = StripeSyncErrorText(http);

	if (http->status == 200 && o->json &&
		strstr(o->json, "\"billing.meter_event_adjustment\"") != NULL)
	{
		o->status = "done";
		o->outcome = http->replayed ? "replayed" : "created";
		return;
	}
	if (http->status == 400 && o->json && strstr(o->json, "already been cancelled") != NULL)
	{
		/* an earlier attempt's answer was lost */
		o->status = "done";
		o->outcome = "already_cancelled";
		return;
	}
	o->reason = text;
	if (http->status == 200)
	{
		o->unknown = true;		/* probably done; a resend replays it */
		return;
	}
	if (http->status == 401 || http->status == 403 || http->status == 429)
		return;					/* the key or the rate: retry later */
	if (http->should_retry == 'f' && (http->status == 409 || http->status >= 500))
	{
		o->status = "failed";
		return;
	}
	if (http->should_retry == 't' || http->status == 409 || http->status >= 500)
	{
		o->unknown = true;
		return;
	}
	if (http->status >= 400 && http->status < 500 && o->json)
	{
		o->status = "failed";
		return;
	}
	o->unknown = true;			/* not Stripe speaking: a proxy? */
}

static void
record(ClaimedCancel *c, CancelOutcome *o)
{
	Datum		values[8];
	char		nulls[8] = {' ', ' ', ' ', ' ', ' ', ' ', ' ', ' '};
	int			rc;

	(void) set_config_option("synchronous_commit", "off", PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
	values[0] = CStringGetTextDatum(c->identifier);
	values[1] = o->status ? CStringGetTextDatum(o->status) : (Datum) 0;
	nulls[1] = o->status ? ' ' : 'n';
	values[2] = o->outcome ? CStringGetTextDatum(o->outcome) : (Datum) 0;
	nulls[2] = o->outcome ? ' ' : 'n';
	values[3] = (o->json && o->status && strcmp(o->status, "done") == 0) ?
		CStringGetTextDatum(o->json) : (Datum) 0;
	nulls[3] = values[3] ? ' ' : 'n';
	values[4] = o->request_id ? CStringGetTextDatum(o->request_id) : (Datum) 0;
	nulls[4] = o->request_id ? ' ' : 'n';
	values[5] = Int32GetDatum((int32) o->http_status);
	nulls[5] = o->http_status ? ' ' : 'n';
	values[6] = o->reason ? CStringGetTextDatum(o->reason) : (Datum) 0;
	nulls[6] = o->reason ? ' ' : 'n';
	values[7] = TimestampTzGetDatum(TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
																DeliveryBackoffMs(c->attempts)));
	rc = SPI_execute_with_args("UPDATE stripe_meter.adjustments SET"
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
								   TEXTOID, TIMESTAMPTZOID, BOOLOID},
							   (Datum[]) {values[0], values[1], values[2], values[3], values[4],
								   values[5], values[6], values[7], BoolGetDatum(o->unknown)},
							   (char[]) {nulls[0], nulls[1], nulls[2], nulls[3], nulls[4],
								   nulls[5], nulls[6], nulls[7], ' '},
							   false, 0);
	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "could not record a cancellation: %s", SPI_result_code_string(rc));
}

static char *
adjustment_body(ClaimedCancel *c)
{
	StringInfoData body;

	initStringInfo(&body);
	appendStringInfoString(&body, "event_name=");
	StripeClientAppendEscaped(&body, c->event_name, strlen(c->event_name));
	appendStringInfoString(&body, "&type=cancel&cancel%5Bidentifier%5D=");
	StripeClientAppendEscaped(&body, c->identifier, strlen(c->identifier));
	return body.data;
}

/*
 * CancelDeliverDue
 *		Send up to limit due cancellations, one at a time, recording each
 *		answer in its own short transaction.  No transaction is open while a
 *		request is out.  Returns when the next queued one is due, or 0.
 */
TimestampTz
CancelDeliverDue(int limit)
{
	ClaimedCancel *claimed;
	int			n;
	int			i;
	int			rc;
	TimestampTz next_due = 0;
	MemoryContext mine = CurrentMemoryContext;

	if (!DeliveryStoreBegin())
		return 0;

	/* cancellations waiting for their event's delivery to be recorded */
	rc = SPI_execute("UPDATE stripe_meter.adjustments a"
					 "   SET status = 'queued',"
					 "       received_at = COALESCE(m.created, m.first_attempt_at, m.delivered_at)"
					 "  FROM stripe_meter.meter_events m"
					 " WHERE a.status = 'awaiting_delivery' AND m.identifier = a.identifier",
					 false, 0);
	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "could not update cancellations: %s", SPI_result_code_string(rc));
	/* failed without a definite answer: Stripe may have it, so cancel anyway */
	rc = SPI_execute("UPDATE stripe_meter.adjustments a SET status = 'queued'"
					 "  FROM stripe_meter.failed_events f"
					 " WHERE a.status = 'awaiting_delivery' AND f.identifier = a.identifier",
					 false, 0);
	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "could not update cancellations: %s", SPI_result_code_string(rc));

	rc = SPI_execute_with_args("UPDATE stripe_meter.adjustments a"
							   "   SET in_flight_since = pg_catalog.now(),"
							   "       attempts = a.attempts + 1,"
							   "       first_attempt_at = COALESCE(a.first_attempt_at, pg_catalog.now())"
							   " WHERE a.identifier IN (SELECT identifier FROM stripe_meter.adjustments"
							   "        WHERE status = 'queued' AND in_flight_since IS NULL"
							   "          AND next_attempt_at <= pg_catalog.clock_timestamp()"
							   "        ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
							   " RETURNING a.identifier, a.event_name, a.stripe_account, a.received_at,"
							   "           a.unknown_outcome_since, a.attempts",
							   1, (Oid[]) {INT4OID}, (Datum[]) {Int32GetDatum(limit)}, NULL,
							   false, 0);
	if (rc != SPI_OK_UPDATE_RETURNING)
		elog(ERROR, "could not claim cancellations: %s", SPI_result_code_string(rc));
	n = (int) SPI_processed;
	claimed = MemoryContextAllocZero(mine, sizeof(ClaimedCancel) * Max(n, 1));
	for (i = 0; i < n; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		Datum		d;
		char	   *account = SPI_getvalue(tup, desc, 3);

		claimed[i].identifier = MemoryContextStrdup(mine, SPI_getvalue(tup, desc, 1));
		claimed[i].event_name = MemoryContextStrdup(mine, SPI_getvalue(tup, desc, 2));
		claimed[i].stripe_account = account ? MemoryContextStrdup(mine, account) : NULL;
		d = SPI_getbinval(tup, desc, 4, &isnull);
		claimed[i].received_at = isnull ? 0 : DatumGetTimestampTz(d);
		d = SPI_getbinval(tup, desc, 5, &isnull);
		claimed[i].unknown_outcome_since = isnull ? 0 : DatumGetTimestampTz(d);
		claimed[i].attempts = DatumGetInt32(SPI_getbinval(tup, desc, 6, &isnull));
	}
	DeliveryStoreCommit();
	MemoryContextSwitchTo(mine);

	for (i = 0; i < n; i++)
	{
		ClaimedCancel *c = &claimed[i];
		CancelOutcome o;
		TimestampTz now = GetCurrentTimestamp();

		memset(&o, 0, sizeof(o));
		if (c->received_at != 0 &&
			TimestampDifferenceExceeds(c->received_at, now, CANCEL_WINDOW_SECS * 1000))
		{
			o.status = "failed";
			o.reason = "not sent: Stripe received the event more than 24 hours ago and no longer cancels it";
		}
		else if (c->unknown_outcome_since != 0 &&
				 TimestampDifferenceExceeds(c->unknown_outcome_since, now,
											stripe_meter_resend_window * 1000))
		{
			o.status = "failed";
			o.reason = "not resent: an attempt whose outcome is unknown was made longer ago than stripe_meter.resend_window";
		}
		else
		{
			HttpResult	http;

			(void) StripeSyncRequest("POST", ADJUSTMENTS_PATH, adjustment_body(c),
									 FormEncodeIdempotencyKey(psprintf("cancel-%s", c->identifier)),
									 c->stripe_account, &http);
			classify(&http, &o);
		}
		if (o.status == NULL || strcmp(o.status, "done") != 0)
			ereport(o.status ? LOG : DEBUG1,
					(errmsg("stripe_meter cancellation of \"%s\" %s: %s", c->identifier,
							o.status ? "failed" : "will be retried", o.reason)));

		if (!DeliveryStoreBegin())
			return 0;
		record(c, &o);
		DeliveryStoreCommit();
		MemoryContextSwitchTo(mine);
	}

	if (!DeliveryStoreBegin())
		return 0;
	rc = SPI_execute("SELECT min(next_attempt_at) FROM stripe_meter.adjustments"
					 " WHERE status = 'queued' AND in_flight_since IS NULL", true, 0);
	if (rc == SPI_OK_SELECT && SPI_processed == 1)
	{
		bool		isnull;
		Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

		if (!isnull)
			next_due = DatumGetTimestampTz(d);
	}
	DeliveryStoreCommit();
	MemoryContextSwitchTo(mine);
	return next_due;
}
