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
 *	  Stripe received the event more than 24 hours ago (Stripe's limit);
 *	- failed while Stripe may have billed it (maybe_billed): a cancel
 *	  adjustment is queued too.  If Stripe never received the event it
 *	  answers that it has no such event, which is recorded as done
 *	  (not_received): nothing was billed, nothing is left to cancel;
 *	- failed with a definite answer: refused, Stripe never billed it.
 *
 * Adjustments get the delivery guarantees of events: the claim is
 * committed before the request, every attempt carries the same
 * Idempotency-Key ("meter_event_adjustment:" and the identifier, never an
 * event's key; the table is new in 0.2.0, so no cancellation was ever sent
 * under an older key), answers are classified
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

#include "access/xact.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

#define ADJUSTMENTS_PATH	"/v1/billing/meter_event_adjustments"
#define CANCEL_WINDOW_SECS	(24 * SECS_PER_HOUR)

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
refuse_if_already_cancelled(const char *identifier)
{
	char	   *status;
	char	   *last_error;

	if (!StoreCancelFindAdjustment(identifier, &status, &last_error))
		return;
	ereport(ERROR,
			(errcode(ERRCODE_UNIQUE_VIOLATION),
			 errmsg("meter event \"%s\" is already cancelled", identifier),
			 strcmp(status, "failed") == 0 ?
			 errdetail("The earlier cancellation failed: %s.", last_error) :
			 errdetail("Its cancellation is %s (see stripe_meter.adjustments).",
					   strcmp(status, "done") == 0 ? "done" : "queued"),
			 strcmp(status, "failed") == 0 ?
			 errhint("Delete its row from stripe_meter.adjustments to try again.") : 0));
}

/* received_at NULL: when Stripe received the event, if at all, is unknown */
static void
queue_adjustment(const char *identifier, const char *event_name,
				 const char *stripe_account, const char *status,
				 const TimestampTz *received_at)
{
	StoreCancelQueue(identifier, event_name, stripe_account, status, received_at);
	StripeMeterWakeAtCommit();
}

/*
 * CancelEvent
 *		stripe_meter_event_cancel(): cancel one event, wherever it is.
 *		Returns removed, queued or awaiting_delivery.
 */
const char *
CancelEvent(const char *event_name, const char *identifier)
{
	CancelTarget found;

	/* 1. still queued: the row lock keeps the worker from claiming it now */
	if (StoreCancelFindQueued(identifier, &found))
	{
		check_event_name_matches(identifier, event_name, found.event_name);
		if (!found.maybe_sent)
		{
			StoreCancelRemoveQueued(identifier);
			return "removed";
		}
		refuse_if_already_cancelled(identifier);
		queue_adjustment(identifier, event_name, found.stripe_account,
						 "awaiting_delivery", NULL);
		return "awaiting_delivery";
	}

	/* 2. delivered */
	if (StoreCancelFindDelivered(identifier, &found))
	{
		check_event_name_matches(identifier, event_name, found.event_name);
		if (found.rollup_identifier != NULL)
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("meter event \"%s\" cannot be cancelled by itself", identifier),
					 errdetail("It was rolled up into the event \"%s\", which Stripe received instead.",
							   found.rollup_identifier),
					 errhint("Cancel \"%s\" as a whole, or correct the usage with a new event.",
							 found.rollup_identifier)));
		refuse_if_already_cancelled(identifier);
		if (found.received_at <= GetCurrentTransactionStartTimestamp() -
			(TimestampTz) CANCEL_WINDOW_SECS * USECS_PER_SEC)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("meter event \"%s\" can no longer be cancelled", identifier),
					 errdetail("Stripe received it at %s, and cancels events only within 24 hours of receiving them.",
							   DatumGetCString(DirectFunctionCall1(timestamptz_out,
																   TimestampTzGetDatum(found.received_at)))),
					 errhint("Correct the usage with a new event instead, or in Stripe's dashboard.")));
		queue_adjustment(identifier, event_name, found.stripe_account, "queued",
						 &found.received_at);
		return "queued";
	}

	/* 3. failed: maybe billed, or never billed */
	if (StoreCancelFindFailed(identifier, &found))
	{
		if (found.maybe_billed)
		{
			check_event_name_matches(identifier, event_name, found.event_name);
			refuse_if_already_cancelled(identifier);
			/* when Stripe received it, if at all, is unknown: let Stripe judge */
			queue_adjustment(identifier, event_name, found.stripe_account, "queued", NULL);
			return "queued";
		}
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("meter event \"%s\" was never delivered", identifier),
				 errdetail("It is in stripe_meter.failed_events: %s.", found.reason),
				 errhint("Delete its row from stripe_meter.failed_events so that it is never retried.")));
	}

	refuse_if_already_cancelled(identifier);
	ereport(ERROR,
			(errcode(ERRCODE_UNDEFINED_OBJECT),
			 errmsg("meter event \"%s\" does not exist", identifier),
			 errdetail("It is not queued, delivered or failed."),
			 errhint("Delivered events are kept for stripe_meter.delivered_retention; older ones can no longer be cancelled anyway.")));
	return NULL;				/* keep compiler quiet */
}

/*
 * CancelRepair
 *		At worker start: adjustments claimed by a previous worker go back to
 *		the queue, their outcome unknown since the claim.
 */
void
CancelRepair(void)
{
	StoreCancelRepair();
}

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

/* Idempotency-Key on every attempt; a 404 may say the event is unknown */
static const StripeEndpoint v1_adjustments = {
	.v2 = false,
	.session_token = false,
	.names_object = true,
};

/* delivered: Stripe acknowledged the event (received_at is known) */
static void
classify(const HttpResult *http, bool delivered, CancelOutcome *o)
{
	StripeResponse resp;
	StripeJudgement j;

	memset(o, 0, sizeof(*o));
	o->http_status = http->status;
	o->request_id = http->request_id;
	StripeReadAnswer(http, &resp);
	if (resp.valid)
		o->json = pnstrdup(http->body, http->body_len);

	if (http->status == 200 && resp.object != NULL &&
		strcmp(resp.object, "billing.meter_event_adjustment") == 0)
	{
		o->status = "done";
		o->outcome = http->replayed ? "replayed" : "created";
	}
	else if (http->status == 400 && StripeErrorMessageHas(&resp, "already been cancelled"))
	{
		/* an earlier attempt's answer was lost */
		o->status = "done";
		o->outcome = "already_cancelled";
	}
	else if (!delivered && (http->status == 400 || http->status == 404) &&
			 resp.error_code != NULL && strcmp(resp.error_code, "resource_missing") == 0)
	{
		/*
		 * An event that failed without a definite answer, and Stripe has no
		 * such event: it was never billed, which is all a cancel wants.  For
		 * a delivered event the same answer means something is wrong (the
		 * account or the event name), so that one stays a failure.
		 */
		o->status = "done";
		o->outcome = "not_received";
	}
	StripeClassify(http, &resp, &v1_adjustments, o->status != NULL, &j);
	if (j.verdict == STRIPE_SUCCESS)
		return;

	o->reason = StripeAnswerText(http, &resp);
	switch (j.verdict)
	{
		case STRIPE_SUCCESS:
		case STRIPE_RETRY:
			o->unknown = j.outcome_unknown;
			break;
		case STRIPE_FAIL:
			o->status = "failed";
			if (j.rule == RULE_REPLAYED_FAILURE)
				o->reason = psprintf("cancellation state unknown: Stripe replays the HTTP %ld it stored for this idempotency key, so no resend can succeed before the key expires, and the event may or may not be cancelled (%s)",
									 http->status, o->reason);
			break;
		case STRIPE_PAUSE_ACCOUNT:
		case STRIPE_PAUSE_ALL:
			/* the key may be fixed: retry later, as for a 429 */
			break;
	}
}

static void
record(ClaimedCancel *c, CancelOutcome *o)
{
	CancelRecord r;

	r.identifier = c->identifier;
	r.status = o->status;
	r.outcome = o->outcome;
	/* Stripe's object is kept only for a cancellation that is done */
	r.adjustment = (o->json && o->status && strcmp(o->status, "done") == 0) ?
		o->json : NULL;
	r.request_id = o->request_id;
	r.http_status = o->http_status;
	r.reason = o->reason;
	r.next_attempt_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													DeliveryBackoffMs(c->attempts));
	r.unknown = o->unknown;
	StoreCancelRecord(&r);
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
 * The worker's run: a few due cancellations claimed in one short
 * transaction, then sent one at a time, each answer recorded in its own
 * transaction when it arrives.  No transaction is open while a request is
 * out, and the delivery loop goes on meanwhile.
 */
LifecycleCalls CancelCalls;
static ClaimedCancel *run_claimed;	/* in CancelCalls.cxt */
static int	run_count;
static int	run_next;			/* the next to send */
static TimestampTz run_next_due;	/* when the next queued one is due */

#define CANCEL_BATCH		10	/* cancellations claimed per run */

static void
record_in_transaction(ClaimedCancel *c, CancelOutcome *o)
{
	if (o->status == NULL || strcmp(o->status, "done") != 0)
		ereport(o->status ? LOG : DEBUG1,
				(errmsg("stripe_meter cancellation of \"%s\" %s: %s", c->identifier,
						o->status ? "failed" : "will be retried", o->reason)));
	/* the extension is gone: the worker notices and exits */
	if (!DeliveryStoreBegin())
		return;
	record(c, o);
	DeliveryStoreCommit();
}

/* the run is over: when the next queued cancellation is due */
static bool
end_run(void)
{
	run_next_due = 0;
	if (DeliveryStoreBegin())
	{
		run_next_due = StoreCancelNextDue();
		DeliveryStoreCommit();
	}
	LifecycleCallsEnd(&CancelCalls);
	run_claimed = NULL;
	return false;
}

/* send the next claimed cancellation that may still go; false: none left */
static bool
send_next(void)
{
	while (run_next < run_count)
	{
		ClaimedCancel *c = &run_claimed[run_next++];
		CancelOutcome o;
		TimestampTz now = GetCurrentTimestamp();
		StripeRequestSpec spec = {0};
		MemoryContext old;

		memset(&o, 0, sizeof(o));
		if (c->received_at != 0 &&
			TimestampDifferenceExceeds(c->received_at, now, CANCEL_WINDOW_SECS * 1000))
		{
			o.status = "failed";
			o.reason = "not sent: Stripe received the event more than 24 hours ago and no longer cancels it";
			record_in_transaction(c, &o);
			continue;
		}
		if (c->unknown_outcome_since != 0 &&
			TimestampDifferenceExceeds(c->unknown_outcome_since, now,
									   stripe_meter_resend_window * 1000))
		{
			o.status = "failed";
			o.reason = "not resent: an attempt whose outcome is unknown was made longer ago than stripe_meter.resend_window";
			record_in_transaction(c, &o);
			continue;
		}

		old = MemoryContextSwitchTo(CancelCalls.cxt);
		spec.path = ADJUSTMENTS_PATH;
		spec.body = adjustment_body(c);
		spec.idempotency_key = FormEncodeIdempotencyKey(IDEMPOTENCY_KIND_ADJUSTMENT,
														c->identifier);
		spec.stripe_account = c->stripe_account;
		MemoryContextSwitchTo(old);
		if (LifecycleCallStart(&CancelCalls, &spec, c))
			return true;
		o.reason = "the HTTP client refused the request";
		record_in_transaction(c, &o);
	}
	return false;
}

/*
 * CancelRunStart
 *		Claim up to CANCEL_BATCH due cancellations and send the first.
 */
bool
CancelRunStart(void)
{
	if (!DeliveryStoreBegin())
		return false;
	/* cancellations waiting for their event's outcome, now recorded */
	StoreCancelPromoteAwaiting();
	run_count = StoreCancelClaim(CANCEL_BATCH, CancelCalls.cxt, &run_claimed);
	DeliveryStoreCommit();
	run_next = 0;
	return send_next() || end_run();
}

/*
 * CancelRunAdvance
 *		Record the answer that arrived, and send the next.
 */
bool
CancelRunAdvance(void)
{
	LifecycleAnswer *answer;

	while ((answer = LifecycleCallNextAnswer(&CancelCalls)) != NULL)
	{
		ClaimedCancel *c = answer->arg;
		CancelOutcome o;

		classify(answer->http, c->received_at != 0, &o);
		record_in_transaction(c, &o);
	}
	return send_next() || end_run();
}

/*
 * CancelRunNextDue
 *		When the next queued cancellation is due, as the last run saw; 0
 *		when none is queued.
 */
TimestampTz
CancelRunNextDue(void)
{
	return run_next_due;
}
