/*-------------------------------------------------------------------------
 *
 * v2_stream.c
 *	  Deliver claimed events through Stripe's meter event stream (API v2):
 *	  batches of up to 100 events per POST /v2/billing/meter_event_stream
 *	  on stripe_meter.stream_url, authenticated with the account's meter
 *	  event session token (v2_session.c), many batches in flight at once.
 *
 * This is the Sender for stripe_meter.api_version = v2 (v1_sender.c is
 * the one for v1).  The scheduler hands over each event once its busy key
 * (account, event name, customer) is free, and marks the key busy until
 * the event's batch is answered: so a batch never holds two events for the
 * same customer and meter, and no two batches in flight share one
 * (Stripe's one concurrent call per customer and meter).  Events of one
 * Connect account go in batches of their own, sent with that account's
 * session, each batch taking one token of the account's rate limiter.
 *
 * No Idempotency-Key is sent: after a crash or a retry, events are claimed
 * again and batched anew, so a request is never repeated byte for byte.
 * What keeps a resend from billing twice is the event's identifier, which
 * Stripe dedupes within a rolling 24 hours (the worker's resend window).
 *
 * A 200 is recorded as "accepted" for every event of the batch, with the
 * session id and the request id.  Stripe validates the events later and
 * reports invalid ones asynchronously, never in this answer.  A request
 * refused as a whole (a 4xx other than 401/403/404/429) is split: each of
 * its events is sent again in a request of its own, so only the event at
 * fault fails.
 *
 * An account's state (its session, its batches) is freed once it has been
 * idle: nothing queued or in flight, no session being created, its token
 * expired and no back-off pending.  A platform whose connected accounts
 * each send now and then therefore holds state only for the accounts of
 * the last session lifetime (15 minutes at Stripe), not for every account
 * ever seen; an account that sends again simply gets a new session.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/v2_stream.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

#define STREAM_PATH			"/v2/billing/meter_event_stream"
#define ACCOUNT_KEY_LEN		256
#define SWEEP_INTERVAL_MS	1000	/* how often idle accounts are looked for */
#define ACCOUNTS_INITIAL	64

typedef struct V2Account V2Account;

/* One stream request: up to 100 events of one account. */
typedef struct V2Batch
{
	V2Account  *account;
	uint64		generation;		/* of the session whose token it carries */
	char	   *session_id;
	StringInfoData body;
	int			n;
	ClaimedEvent *events[V2_MAX_BATCH_EVENTS];
	dlist_node	node;			/* in its account's list of full batches */
} V2Batch;

/* The events of one Connect account ("" for the key's own) not yet sent. */
struct V2Account
{
	char		key[ACCOUNT_KEY_LEN];	/* hash key */
	V2Session	session;
	V2Batch    *open;			/* being filled; NULL when none */
	dlist_head	full;			/* V2Batch: full, waiting to go */
	dlist_head	solo;			/* ClaimedEvent: each in a request of its own */
	int			in_flight;		/* its batches sent and not yet answered */
};

static MemoryContext stream_cxt = NULL;
static const SenderHooks *hooks = NULL;
static HTAB *accounts = NULL;
static V2Account *last_account = NULL;
static int	unsent = 0;			/* events handed over and not yet sent */
static TimestampTz last_sweep = 0;
static long published = -1;		/* the account count last published */
static long peak = 0;			/* most accounts held since the table was made */

static void
make_accounts(void)
{
	HASHCTL		ctl;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = ACCOUNT_KEY_LEN;
	ctl.entrysize = sizeof(V2Account);
	ctl.hcxt = stream_cxt;
	accounts = hash_create("stripe_meter stream accounts", ACCOUNTS_INITIAL, &ctl,
						   HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
	peak = 0;
}

static void
v2_init(MemoryContext parent, const SenderHooks *h)
{
	stream_cxt = AllocSetContextCreate(parent, "stripe_meter meter event stream",
									   ALLOCSET_DEFAULT_SIZES);
	hooks = h;
	V2SessionSetup(stream_cxt, h);
	make_accounts();
}

/* the account's entry (NULL: the key's own), or NULL when it has none */
static V2Account *
known_account(const char *stripe_account)
{
	const char *key = stripe_account ? stripe_account : "";

	if (accounts == NULL || strlen(key) >= ACCOUNT_KEY_LEN)
		return NULL;
	return hash_search(accounts, key, HASH_FIND, NULL);
}

static V2Account *
account_for(const char *stripe_account)
{
	const char *key = stripe_account ? stripe_account : "";
	bool		found;
	V2Account  *a;

	if (last_account != NULL && strcmp(last_account->key, key) == 0)
		return last_account;
	a = hash_search(accounts, key, HASH_ENTER, &found);
	if (!found)
	{
		a->open = NULL;
		dlist_init(&a->full);
		dlist_init(&a->solo);
		a->in_flight = 0;
		V2SessionInit(&a->session, stripe_account);
	}
	last_account = a;
	return a;
}

static V2Batch *
new_batch(V2Account *a)
{
	V2Batch    *b = MemoryContextAllocZero(stream_cxt, sizeof(V2Batch));

	b->account = a;
	return b;
}

static void
free_batch(V2Batch *b)
{
	if (b->body.data)
		pfree(b->body.data);
	if (b->session_id)
		pfree(b->session_id);
	pfree(b);
}

/* give event e the batch's outcome, its strings in e's own memory */
static void
set_outcome(ClaimedEvent *e, const DeliveryOutcome *o, const V2Batch *b)
{
	MemoryContext old = MemoryContextSwitchTo(e->batch->cxt);

	e->outcome = *o;
	if (o->reason)
		e->outcome.reason = pstrdup(o->reason);
	if (o->response_json)
		e->outcome.response_json = pstrdup(o->response_json);
	e->outcome.session_id = b->session_id ? pstrdup(b->session_id) : NULL;
	MemoryContextSwitchTo(old);
}

/* the HTTP client's done callback for one stream request */
static void
stream_done(void *owner, const HttpResult *http)
{
	V2Batch    *b = owner;
	MemoryContext tmp = AllocSetContextCreate(stream_cxt, "stripe_meter stream answer",
											  ALLOCSET_SMALL_SIZES);
	MemoryContext old = MemoryContextSwitchTo(tmp);
	DeliveryOutcome o;
	V2StreamVerdict verdict = V2ClassifyStream(http, &o);
	int			i;

	MemoryContextSwitchTo(old);
	b->account->in_flight--;
	switch (verdict)
	{
		case V2_STREAM_SESSION_EXPIRED:
			V2SessionExpired(&b->account->session, b->generation);
			for (i = 0; i < b->n; i++)
				hooks->event_requeue(b->events[i]);
			break;
		case V2_STREAM_REFUSED:
			if (b->n > 1)
			{
				/* find the event at fault: each goes again on its own */
				for (i = 0; i < b->n; i++)
				{
					b->events[i]->v2_solo = true;
					hooks->event_requeue(b->events[i]);
				}
				break;
			}
			pg_fallthrough;
		case V2_STREAM_TOKEN_REFUSED:
		case V2_STREAM_ACCEPTED:
		case V2_STREAM_OTHER:
			if (verdict == V2_STREAM_TOKEN_REFUSED)
				V2SessionExpired(&b->account->session, b->generation);
			for (i = 0; i < b->n; i++)
			{
				set_outcome(b->events[i], &o, b);
				hooks->event_done(b->events[i]);
			}
			break;
	}
	MemoryContextDelete(tmp);
	free_batch(b);
}

static void
send_batch(V2Account *a, V2Batch *b)
{
	StripeRequestSpec spec;
	MemoryContext old = MemoryContextSwitchTo(stream_cxt);
	int			i;

	initStringInfo(&b->body);
	appendStringInfoString(&b->body, "{\"events\":[");
	for (i = 0; i < b->n; i++)
	{
		if (i > 0)
			appendStringInfoChar(&b->body, ',');
		appendStringInfoString(&b->body, b->events[i]->body);
	}
	appendStringInfoString(&b->body, "]}");
	b->generation = a->session.generation;
	b->session_id = pstrdup(a->session.id);
	MemoryContextSwitchTo(old);

	memset(&spec, 0, sizeof(spec));
	spec.owner = b;
	spec.done = stream_done;
	spec.base_url = stripe_meter_stream_url;
	spec.path = STREAM_PATH;
	spec.body = b->body.data;
	spec.content_type = "application/json";
	spec.bearer = a->session.token;
	if (StripeClientStartRequest(&spec))
		a->in_flight++;
	else
	{
		for (i = 0; i < b->n; i++)
		{
			ClaimedEvent *e = b->events[i];

			e->outcome.verdict = VERDICT_RETRY;
			e->outcome.reason = "could not start the HTTP request";
			hooks->event_done(e);
		}
		free_batch(b);
	}
}

static void
merge_wait(long *wait_ms, long w)
{
	if (w >= 0 && (*wait_ms < 0 || w < *wait_ms))
		*wait_ms = w;
}

/*
 * Take the batches account a has ready, while the session, the request
 * window and the rate limiter allow, into going[].  Returns false when a
 * limit shared by all accounts stopped it (no point trying the others).
 */
static bool
take_ready_batches(V2Account *a, TimestampTz now, long *wait_ms,
				   V2Batch **going, int *ngoing)
{
	long		w;

	if (a->open == NULL && dlist_is_empty(&a->full) && dlist_is_empty(&a->solo))
		return true;
	if (!V2SessionUsable(&a->session, now, &w))
	{
		merge_wait(wait_ms, w);
		return true;
	}
	while (a->open != NULL || !dlist_is_empty(&a->full) || !dlist_is_empty(&a->solo))
	{
		V2Batch    *b;

		if (StripeClientInFlight() + *ngoing >= stripe_meter_max_in_flight)
			return false;
		if (!RateLimiterTake(a->session.account, now, &w))
		{
			merge_wait(wait_ms, w);
			return false;
		}
		if (!dlist_is_empty(&a->solo))
		{
			b = new_batch(a);
			b->events[b->n++] = dlist_container(ClaimedEvent, node,
												dlist_pop_head_node(&a->solo));
		}
		else if (!dlist_is_empty(&a->full))
			b = dlist_container(V2Batch, node, dlist_pop_head_node(&a->full));
		else
		{
			b = a->open;
			a->open = NULL;
		}
		going[(*ngoing)++] = b;
	}
	return true;
}

/* the event's JSON object; the stream sends no Idempotency-Key */
static void
v2_encode(ClaimedEvent *e)
{
	e->body = JsonEncodeMeterEvent(e->event_name, e->payload, e->identifier,
								   e->ts, e->value_key, e->canonical_value);
}

static char *
v2_destination(void)
{
	return psprintf("the meter event stream at %s (API v2)", stripe_meter_stream_url);
}

/*
 * The events the next flush could put on the wire: a batch for each free
 * place in the request window, less those already waiting.  Which of them
 * may go is up to their account's session (v2_account_ready).
 */
static int
v2_room_now(void)
{
	int			places = stripe_meter_max_in_flight - StripeClientInFlight();

	return Max(places * V2_MAX_BATCH_EVENTS - unsent, 0);
}

/*
 * An account's events go at the next flush when its session has a token
 * now; one still to be created (or failing) makes them wait.  Only looks:
 * V2SessionUsable() would start a creation, which the claim must not.
 */
static bool
v2_account_ready(const char *account, TimestampTz now)
{
	V2Account  *a = known_account(account);

	return a != NULL && V2SessionHasToken(&a->session, now);
}

/* batches wait for their session and token: only the window limits */
static bool
v2_has_room(void)
{
	return StripeClientInFlight() < stripe_meter_max_in_flight;
}

/*
 * Take over claimed event e, its busy key held.  It goes out with the
 * next flush that its account's session and the limits allow.
 */
static SenderTake
v2_add(ClaimedEvent *e, TimestampTz now, long *wait_ms)
{
	V2Account  *a;

	if (e->stripe_account != NULL && strlen(e->stripe_account) >= ACCOUNT_KEY_LEN)
	{
		/* no Connect account id is this long; never mix two accounts' sessions */
		e->outcome.verdict = VERDICT_FAIL;
		e->outcome.reason = "not sent: the Stripe account id is too long for a meter event session";
		hooks->event_done(e);
		return SENDER_TAKEN;
	}
	a = account_for(e->stripe_account);
	if (e->v2_solo)
	{
		dlist_push_tail(&a->solo, &e->node);
		unsent++;
		return SENDER_TAKEN;
	}
	if (a->open != NULL && a->open->n >= V2_MAX_BATCH_EVENTS)
	{
		/* full: it waits its turn behind the account's other full ones */
		dlist_push_tail(&a->full, &a->open->node);
		a->open = NULL;
	}
	if (a->open == NULL)
		a->open = new_batch(a);
	a->open->events[a->open->n++] = e;
	unsent++;
	return SENDER_TAKEN;
}

/* nothing of account a is waiting, in flight or worth keeping at now */
static bool
account_idle(V2Account *a, TimestampTz now)
{
	const V2Session *s = &a->session;

	return a->open == NULL && dlist_is_empty(&a->full) && dlist_is_empty(&a->solo) &&
		a->in_flight == 0 &&
		!s->creating &&
		!V2SessionHasToken(s, now) &&
		(s->retry_at == 0 || now >= s->retry_at);
}

/*
 * Free the state of every idle account, and publish how many accounts are
 * left.  When none is left, the table itself is made again: a hash table
 * keeps the entries it once had for reuse, so one busy hour of many
 * accounts would otherwise hold their memory for good.  Nothing points
 * into an empty table (batches and session requests in flight keep their
 * account from being idle).
 */
static void
sweep_idle(TimestampTz now)
{
	HASH_SEQ_STATUS seq;
	V2Account  *a;
	long		n;

	if (!TimestampDifferenceExceeds(last_sweep, now, SWEEP_INTERVAL_MS))
		return;
	last_sweep = now;
	n = hash_get_num_entries(accounts);
	if (n > peak)
		peak = n;
	hash_seq_init(&seq, accounts);
	while ((a = hash_seq_search(&seq)) != NULL)
	{
		if (!account_idle(a, now))
			continue;
		if (last_account == a)
			last_account = NULL;
		V2SessionFree(&a->session);
		/* removing the entry just returned is allowed during the scan */
		hash_search(accounts, a->key, HASH_REMOVE, NULL);
	}
	n = hash_get_num_entries(accounts);
	if (n == 0 && peak > ACCOUNTS_INITIAL)
	{
		hash_destroy(accounts);
		make_accounts();
	}
	if (n != published)
	{
		StripeMeterSetStreamAccounts(MyDatabaseId, (int) n);
		published = n;
	}
}

/*
 * Send every batch that may go now, full or not.  Their events are
 * checked and marked sent first (hooks->mark_sending), all in one go: an
 * event that may no longer be sent, or whose row a session holds, leaves
 * its batch.  Returns how long to wait before something held back may go
 * (-1: until an answer).
 */
static long
v2_flush(void)
{
	HASH_SEQ_STATUS seq;
	V2Account  *a;
	TimestampTz now;
	long		wait_ms = -1;
	V2Batch   **going;
	ClaimedEvent **events;
	int			ngoing = 0;
	int			nevents = 0;
	int			i;

	now = GetCurrentTimestamp();
	sweep_idle(now);
	if (unsent == 0 || stripe_meter_max_in_flight <= StripeClientInFlight())
		return -1;
	going = palloc(sizeof(V2Batch *) * stripe_meter_max_in_flight);
	hash_seq_init(&seq, accounts);
	while ((a = hash_seq_search(&seq)) != NULL)
	{
		if (!take_ready_batches(a, now, &wait_ms, going, &ngoing))
		{
			hash_seq_term(&seq);
			break;
		}
	}

	events = palloc(sizeof(ClaimedEvent *) * Max(ngoing, 1) * V2_MAX_BATCH_EVENTS);
	for (i = 0; i < ngoing; i++)
	{
		int			j;

		for (j = 0; j < going[i]->n; j++)
			events[nevents++] = going[i]->events[j];
		unsent -= going[i]->n;
	}
	(void) hooks->mark_sending(events, nevents);

	for (i = 0; i < ngoing; i++)
	{
		V2Batch    *b = going[i];
		int			j;
		int			kept = 0;

		for (j = 0; j < b->n; j++)
			if (b->events[j]->sent)
				b->events[kept++] = b->events[j];
		b->n = kept;
		if (b->n > 0)
			send_batch(b->account, b);
		else
			free_batch(b);
	}
	pfree(events);
	pfree(going);
	return wait_ms;
}

static int
v2_unsent(void)
{
	return unsent;
}

/* an account's events not yet sent go back; returns how many */
static int
release_account(V2Account *a, TimestampTz not_before)
{
	int			n = 0;
	int			i;

	while (!dlist_is_empty(&a->solo))
	{
		ClaimedEvent *e = dlist_container(ClaimedEvent, node,
										  dlist_pop_head_node(&a->solo));

		e->outcome.verdict = VERDICT_RELEASE;
		e->outcome.not_before = not_before;
		hooks->event_done(e);
		n++;
	}
	while (!dlist_is_empty(&a->full))
	{
		V2Batch    *b = dlist_container(V2Batch, node,
										dlist_pop_head_node(&a->full));

		for (i = 0; i < b->n; i++)
		{
			b->events[i]->outcome.verdict = VERDICT_RELEASE;
			b->events[i]->outcome.not_before = not_before;
			hooks->event_done(b->events[i]);
			n++;
		}
		free_batch(b);
	}
	if (a->open != NULL)
	{
		V2Batch    *b = a->open;

		a->open = NULL;
		for (i = 0; i < b->n; i++)
		{
			b->events[i]->outcome.verdict = VERDICT_RELEASE;
			b->events[i]->outcome.not_before = not_before;
			hooks->event_done(b->events[i]);
			n++;
		}
		free_batch(b);
	}
	return n;
}

/*
 * Delivery paused: every event handed over and not yet sent goes back to
 * the scheduler, never sent.
 */
static void
v2_release_unsent(void)
{
	HASH_SEQ_STATUS seq;
	V2Account  *a;

	if (unsent == 0)
		return;
	hash_seq_init(&seq, accounts);
	while ((a = hash_seq_search(&seq)) != NULL)
		release_account(a, 0);
	unsent = 0;
}

/*
 * A Connect account is paused: its events handed over and not yet sent go
 * back to the scheduler, never sent, due again at not_before.
 */
static void
v2_release_account(const char *account, TimestampTz not_before)
{
	V2Account  *a;

	if (account == NULL)
		return;
	a = known_account(account);
	if (a != NULL)
		unsent -= release_account(a, not_before);
}

const Sender V2Sender = {
	.api_version = STRIPE_API_V2,
	.events_per_request = V2_MAX_BATCH_EVENTS,
	.keyed = false,
	.sends_at_once = false,
	.init = v2_init,
	.encode = v2_encode,
	.destination = v2_destination,
	.has_room = v2_has_room,
	.room_now = v2_room_now,
	.account_ready = v2_account_ready,
	.add = v2_add,
	.flush = v2_flush,
	.unsent = v2_unsent,
	.release_unsent = v2_release_unsent,
	.release_account = v2_release_account,
};
