/*-------------------------------------------------------------------------
 *
 * v1_sender.c
 *	  Deliver claimed events with POST /v1/billing/meter_events on
 *	  stripe_meter.api_url (API v1): one form-encoded request per event,
 *	  with the event's Idempotency-Key, many in flight at once.
 *
 * The scheduler hands over each event once its busy key is free, and the
 * event goes out at the next flush, after it is marked sent.  Each request
 * takes one token of its account's rate limiter: an account with no token
 * left makes its event wait (SENDER_DEFER) while other accounts still send.
 *
 * Every attempt of an event carries the same body and Idempotency-Key, so
 * a resend whose first answer was lost is replayed by Stripe, and a refusal
 * after an unanswered attempt shows the key never billed (Sender.keyed).
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/v1_sender.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "utils/memutils.h"

#include "stripe_meter.h"

#define METER_EVENTS_PATH	"/v1/billing/meter_events"

static const SenderHooks *hooks = NULL;
static dclist_head pending;		/* added, to go out at the next flush */

static void
v1_init(MemoryContext cxt, const SenderHooks *h)
{
	hooks = h;
	dclist_init(&pending);
}

/* the form body and the Idempotency-Key, the same for every attempt */
static void
v1_encode(ClaimedEvent *e)
{
	e->body = FormEncodeMeterEvent(e->event_name, e->payload, e->identifier,
								   e->ts, e->value_key, e->canonical_value);
	/* an event attempted before 0.2.0 keeps its bare-identifier key */
	if (e->legacy_idempotency_key)
		e->idempotency_key = FormEncodeLegacyIdempotencyKey(e->identifier);
	else
		e->idempotency_key = FormEncodeIdempotencyKey(IDEMPOTENCY_KIND_EVENT,
													  e->identifier);
}

static char *
v1_destination(void)
{
	return pstrdup(stripe_meter_api_url);
}

/* a request for each added event, within the window of requests in flight */
static bool
v1_has_room(void)
{
	return StripeClientInFlight() + (int) dclist_count(&pending) <
		stripe_meter_max_in_flight;
}

/* the requests the next flush may start */
static int
v1_room_now(void)
{
	return Max(stripe_meter_max_in_flight - StripeClientInFlight() -
			   (int) dclist_count(&pending), 0);
}

static SenderTake
v1_add(ClaimedEvent *e, TimestampTz now, long *wait_ms)
{
	if (!RateLimiterTake(e->stripe_account, now, wait_ms))
		return SENDER_DEFER;
	dclist_push_tail(&pending, &e->node);
	return SENDER_TAKEN;
}

/*
 * stripe_client.c calls this once per finished request, in the worker's
 * loop (never inside a transaction).
 */
static void
request_done(void *owner, const HttpResult *http)
{
	ClaimedEvent *e = owner;
	MemoryContext old = MemoryContextSwitchTo(e->batch->cxt);

	DeliveryClassify(http, e->identifier, &e->outcome);
	MemoryContextSwitchTo(old);
	hooks->event_done(e);
}

/* the added events, marked sent first, go on the wire */
static long
v1_flush(void)
{
	ClaimedEvent **going;
	int			n = 0;
	int			i;

	if (dclist_is_empty(&pending))
		return -1;
	going = palloc(sizeof(ClaimedEvent *) * dclist_count(&pending));
	while (!dclist_is_empty(&pending))
		going[n++] = dclist_container(ClaimedEvent, node,
									  dclist_pop_head_node(&pending));

	/* on disk as sent before the first byte goes out */
	n = hooks->mark_sending(going, n);
	for (i = 0; i < n; i++)
	{
		ClaimedEvent *e = going[i];
		StripeRequestSpec spec;

		memset(&spec, 0, sizeof(spec));
		spec.owner = e;
		spec.done = request_done;
		spec.base_url = stripe_meter_api_url;
		spec.path = METER_EVENTS_PATH;
		spec.body = e->body;
		spec.content_type = "application/x-www-form-urlencoded";
		spec.idempotency_key = e->idempotency_key;
		spec.stripe_account = e->stripe_account;
		if (!StripeClientStartRequest(&spec))
		{
			e->outcome.verdict = VERDICT_RETRY;
			e->outcome.reason = "could not start the HTTP request";
			hooks->event_dropped(e);
		}
	}
	pfree(going);
	return -1;
}

static int
v1_unsent(void)
{
	return (int) dclist_count(&pending);
}

/* events added and not yet flushed go back, never sent */
static void
release_pending(const char *account, bool all, TimestampTz not_before)
{
	dlist_mutable_iter iter;

	dclist_foreach_modify(iter, &pending)
	{
		ClaimedEvent *e = dclist_container(ClaimedEvent, node, iter.cur);

		if (!all && (e->stripe_account == NULL ||
					 strcmp(e->stripe_account, account) != 0))
			continue;
		dclist_delete_from(&pending, iter.cur);
		e->outcome.verdict = VERDICT_RELEASE;
		e->outcome.not_before = not_before;
		hooks->event_dropped(e);
	}
}

static void
v1_release_unsent(void)
{
	release_pending(NULL, true, 0);
}

static void
v1_release_account(const char *account, TimestampTz not_before)
{
	release_pending(account, false, not_before);
}

const Sender V1Sender = {
	.api_version = STRIPE_API_V1,
	.events_per_request = 1,
	.keyed = true,
	.sends_at_once = true,
	.init = v1_init,
	.encode = v1_encode,
	.destination = v1_destination,
	.has_room = v1_has_room,
	.room_now = v1_room_now,
	.add = v1_add,
	.flush = v1_flush,
	.unsent = v1_unsent,
	.release_unsent = v1_release_unsent,
	.release_account = v1_release_account,
};
