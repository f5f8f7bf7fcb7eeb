/*-------------------------------------------------------------------------
 *
 * v2_stream.c
 *	  Deliver claimed events through Stripe's meter event stream (API v2):
 *	  batches of up to 100 events per POST /v2/billing/meter_event_stream
 *	  on stripe_meter.stream_url, authenticated with the account's meter
 *	  event session token (v2_session.c), many batches in flight at once.
 *
 * The worker hands over each event once its busy key (account, event
 * name, customer) is free, and marks the key busy until the event's batch
 * is answered: so a batch never holds two events for the same customer
 * and meter, and no two batches in flight share one (Stripe's one
 * concurrent call per customer and meter).  Events of one Connect account
 * go in batches of their own, sent with that account's session.
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
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/v2_stream.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

#define STREAM_PATH			"/v2/billing/meter_event_stream"
#define ACCOUNT_KEY_LEN		256

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
} V2Batch;

/* The events of one Connect account ("" for the key's own) not yet sent. */
struct V2Account
{
	char		key[ACCOUNT_KEY_LEN];	/* hash key */
	V2Session	session;
	V2Batch    *open;			/* being filled; NULL when none */
	ClaimedEvent *solo_head;	/* each to go in a request of its own */
	ClaimedEvent *solo_tail;
};

static MemoryContext stream_cxt = NULL;
static const V2Hooks *hooks = NULL;
static HTAB *accounts = NULL;
static V2Account *last_account = NULL;
static int	unsent = 0;			/* events handed over and not yet sent */

void
V2StreamInit(MemoryContext parent, const V2Hooks *h)
{
	HASHCTL		ctl;

	stream_cxt = AllocSetContextCreate(parent, "stripe_meter meter event stream",
									   ALLOCSET_DEFAULT_SIZES);
	hooks = h;
	V2SessionSetup(stream_cxt, h);
	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = ACCOUNT_KEY_LEN;
	ctl.entrysize = sizeof(V2Account);
	ctl.hcxt = stream_cxt;
	accounts = hash_create("stripe_meter stream accounts", 64, &ctl,
						   HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
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
		a->solo_head = a->solo_tail = NULL;
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

/* curl's done callback for one stream request */
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
	unsent -= b->n;

	memset(&spec, 0, sizeof(spec));
	spec.owner = b;
	spec.done = stream_done;
	spec.base_url = stripe_meter_stream_url;
	spec.path = STREAM_PATH;
	spec.body = b->body.data;
	spec.content_type = "application/json";
	spec.bearer = a->session.token;
	if (!StripeClientStartRequest(&spec))
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
 * Send what account a has ready, while the session, the request window
 * and the rate limiter allow.  Returns false when a limit shared by all
 * accounts stopped it (no point trying the others).
 */
static bool
flush_account(V2Account *a, TimestampTz now, long *wait_ms)
{
	long		w;

	if (a->open == NULL && a->solo_head == NULL)
		return true;
	if (!V2SessionUsable(&a->session, now, &w))
	{
		merge_wait(wait_ms, w);
		return true;
	}
	while (a->open != NULL || a->solo_head != NULL)
	{
		V2Batch    *b;

		if (StripeClientInFlight() >= stripe_meter_max_in_flight)
			return false;
		if (!hooks->take_token(a->session.account, now, &w))
		{
			merge_wait(wait_ms, w);
			return false;
		}
		if (a->solo_head != NULL)
		{
			b = new_batch(a);
			b->events[b->n++] = a->solo_head;
			a->solo_head = a->solo_head->next;
			if (a->solo_head == NULL)
				a->solo_tail = NULL;
		}
		else
		{
			b = a->open;
			a->open = NULL;
		}
		send_batch(a, b);
	}
	return true;
}

/*
 * V2StreamAdd
 *		Take over claimed event e, its busy key held.  Returns false, not
 *		taking it, when its account's batch is full and cannot go yet.
 */
bool
V2StreamAdd(ClaimedEvent *e)
{
	V2Account  *a;
	long		wait_ms = -1;

	e->next = NULL;
	if (e->stripe_account != NULL && strlen(e->stripe_account) >= ACCOUNT_KEY_LEN)
	{
		/* no Connect account id is this long; never mix two accounts' sessions */
		e->outcome.verdict = VERDICT_FAIL;
		e->outcome.reason = "not sent: the Stripe account id is too long for a meter event session";
		hooks->event_done(e);
		return true;
	}
	a = account_for(e->stripe_account);
	if (e->v2_solo)
	{
		if (a->solo_tail)
			a->solo_tail->next = e;
		else
			a->solo_head = e;
		a->solo_tail = e;
		unsent++;
		return true;
	}
	if (a->open != NULL && a->open->n >= V2_MAX_BATCH_EVENTS)
	{
		(void) flush_account(a, GetCurrentTimestamp(), &wait_ms);
		if (a->open != NULL && a->open->n >= V2_MAX_BATCH_EVENTS)
			return false;
	}
	if (a->open == NULL)
		a->open = new_batch(a);
	a->open->events[a->open->n++] = e;
	unsent++;
	return true;
}

/*
 * V2StreamFlush
 *		Send every batch that may go now, full or not.  Returns how long to
 *		wait before something held back may go (-1: until an answer).
 */
long
V2StreamFlush(void)
{
	HASH_SEQ_STATUS seq;
	V2Account  *a;
	TimestampTz now;
	long		wait_ms = -1;

	if (unsent == 0)
		return -1;
	now = GetCurrentTimestamp();
	hash_seq_init(&seq, accounts);
	while ((a = hash_seq_search(&seq)) != NULL)
	{
		if (!flush_account(a, now, &wait_ms))
		{
			hash_seq_term(&seq);
			break;
		}
	}
	return wait_ms;
}

int
V2StreamUnsent(void)
{
	return unsent;
}

/* an account's events not yet sent go back; returns how many */
static int
release_account(V2Account *a, TimestampTz not_before)
{
	int			n = 0;
	int			i;

	while (a->solo_head != NULL)
	{
		ClaimedEvent *e = a->solo_head;

		a->solo_head = e->next;
		e->outcome.verdict = VERDICT_RELEASE;
		e->outcome.not_before = not_before;
		hooks->event_done(e);
		n++;
	}
	a->solo_tail = NULL;
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
 * V2StreamReleaseUnsent
 *		Delivery paused: every event handed over and not yet sent goes back
 *		to the worker, never sent.
 */
void
V2StreamReleaseUnsent(void)
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
 * V2StreamReleaseAccount
 *		A Connect account is paused: its events handed over and not yet sent
 *		go back to the worker, never sent, due again at not_before.
 */
void
V2StreamReleaseAccount(const char *account, TimestampTz not_before)
{
	char		key[ACCOUNT_KEY_LEN];
	V2Account  *a;

	if (accounts == NULL || account == NULL || strlen(account) >= ACCOUNT_KEY_LEN)
		return;
	memset(key, 0, sizeof(key));
	strlcpy(key, account, sizeof(key));
	a = hash_search(accounts, key, HASH_FIND, NULL);
	if (a != NULL)
		unsent -= release_account(a, not_before);
}
