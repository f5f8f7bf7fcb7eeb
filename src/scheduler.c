/*-------------------------------------------------------------------------
 *
 * scheduler.c
 *	  The delivery worker's events from claim to record: which to claim,
 *	  which may go out now, what an answer means for the others, and when
 *	  to record the finished ones.
 *
 * Every claimed event is, at any time, in exactly one of these places:
 *	ready		may be handed to the sender (as soon as its key is free)
 *	waiting		behind the event of its busy key that is out
 *	the sender	handed over, not yet answered (in a batch or in flight)
 *	finished	its outcome known, to be recorded
 * and "held" counts them all until the record commits.
 *
 * A busy key is (account, event name, customer).  Stripe allows one
 * concurrent call per customer and meter, so never two events of one key
 * are out at once: the one out holds the key, the others wait behind it.
 * The claim takes at most CLAIM_PER_KEY events per key and remembers the
 * keys that had more due than it took ("more").  When an event of such a
 * key has been answered, the next claim refills the key by name: walking
 * the keys to find it would pass every other key that holds its places,
 * and with thousands of customers in flight that walk was most of the
 * worker's time.  A key is refilled so at most MAX_REFILLS times in a row;
 * then it waits ("parked") until a claim has walked, which gives the place
 * it freed to the keys the walk comes to, and is refilled again after it.
 * So one customer's backlog, however long, holds a few places in memory
 * and never keeps other customers' events from being claimed, even when
 * backlogs hold every place the worker has.
 *
 * Finished events are recorded in batches: RECORD_BATCH of them, or after
 * RECORD_DELAY_MS, or when nothing is in flight.  Answers whose outbox row
 * another transaction holds are kept ("locked answers") and recorded
 * again every LOCKED_RETRY_MS, so that the worker never waits for a lock.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/scheduler.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

#define RECORD_BATCH		500 /* record after this many finished events */
#define RECORD_DELAY_MS		20	/* or after this long */
#define MAX_DEFERRED_PER_PASS 256	/* events passed over for rate-limited accounts */
#define LOCKED_RETRY_MS		1000	/* retry recording rows another session locks */
#define MAX_REFILLS			16	/* refills of a key between two walks */

/*
 * The claimed events of one (account, event name, customer): at most
 * CLAIM_PER_KEY, one of them in flight at a time, the others waiting.
 */
typedef struct BusyKey
{
	uint64		key;
	int			held;			/* claimed and not finished */
	bool		more;			/* the claim saw more due than it took */
	bool		in_flight;		/* a request for this key is out */
	bool		refill_queued;	/* in refill_queue or parked (kept while it is) */
	int			refills;		/* refilled since it was last parked */
	uint64		claimed_in;		/* the claim that last gave it room */
	ClaimKey	parts;			/* for the refill: strings set when first
								 * queued, due_from at each claim */
	dlist_node	refill_node;	/* in refill_queue or parked */
	dclist_head waiting;
} BusyKey;

static MemoryContext sched_cxt;
static const Sender *sender;	/* chosen by the worker at start */
static dclist_head ready;		/* claimed, may be sent */
static dclist_head finished;	/* outcome known, to be recorded */
static HTAB *busy_keys;
static dclist_head refill_queue;	/* BusyKeys to refill, oldest first */
static dclist_head parked;		/* BusyKeys refilled MAX_REFILLS times:
								 * they wait for a walk */
static uint64 claim_seq = 0;	/* counts claims */
static int	held = 0;			/* claimed and not yet recorded */
static TimestampTz first_finished_at = 0;
static int	locked_answers = 0;	/* finished, but their rows are locked */
static TimestampTz locked_retry_at = 0;
static bool claim_exhausted = false;	/* last claim found fewer than asked */
static TimestampTz next_poll_at = 0;
static bool ready_now = true;	/* claim at once: woken, or just started */
static long send_wait = -1;		/* from the last send: when a token comes */
static bool drop_unsent = false;	/* Stripe stopped answering: end the
									 * requests not yet on the wire */

static inline void
queue_push(dclist_head *q, ClaimedEvent *e)
{
	dclist_push_tail(q, &e->node);
}

static inline void
queue_push_front(dclist_head *q, ClaimedEvent *e)
{
	dclist_push_head(q, &e->node);
}

static ClaimedEvent *
queue_pop(dclist_head *q)
{
	if (dclist_is_empty(q))
		return NULL;
	return dclist_container(ClaimedEvent, node, dclist_pop_head_node(q));
}

static BusyKey *
busy_key_entry(uint64 key)
{
	bool		found;
	BusyKey    *bk = hash_search(busy_keys, &key, HASH_ENTER, &found);

	if (!found)
	{
		bk->held = 0;
		bk->more = false;
		bk->in_flight = false;
		bk->refill_queued = false;
		bk->refills = 0;
		bk->claimed_in = 0;
		memset(&bk->parts, 0, sizeof(bk->parts));
		bk->parts.due_from = DT_NOBEGIN;
		dclist_init(&bk->waiting);
	}
	return bk;
}

/* bk holds nothing and waits for no refill: forget it */
static void
busy_key_remove(BusyKey *bk)
{
	if (bk->parts.customer != NULL)
		pfree((char *) bk->parts.customer);
	hash_search(busy_keys, &bk->key, HASH_REMOVE, NULL);
}

/*
 * How many events the claim under way may still mark sent itself, and how
 * many it has: see claim_room().
 */
static int	send_now_room = 0;
static int	send_now_taken = 0;
static TimestampTz claim_started_at = 0;

/*
 * The claim asks how many more events of a key it may take: a few per key,
 * so that one customer's backlog never fills the worker's memory.
 *
 * It also asks whether the key's first event will go on the wire as soon as
 * the claim commits: its key free, the sender with a place for it and
 * ready for its account (API v2: a session), and its account neither
 * paused nor out of tokens (one per request).  The claim marks such an event
 * sent itself, which saves the sent mark's own durable transaction.  An
 * event so marked that still does not go out (a pause after the claim) is
 * released as never sent; only a crash in between would count it as sent,
 * which costs a replayed resend and nothing else.  It needs none of the
 * row-lock check the sent mark makes (DeliveryStoreMarkSent): the claim
 * itself took the row with FOR UPDATE SKIP LOCKED just before, and a
 * cancellation of an event in flight already counts it as maybe sent.
 *
 * walked says who asks: the walk over all keys, or the refill of a key by
 * name.
 */
static int
claim_room(uint64 key, const char *account, bool more, bool walked,
		   bool *send_now)
{
	BusyKey    *bk = hash_search(busy_keys, &key, HASH_FIND, NULL);
	int			room;

	*send_now = false;
	/* refilled by this claim already: the walk passes it */
	if (bk != NULL && bk->claimed_in == claim_seq)
		return 0;
	if ((bk == NULL || bk->held == 0) && send_now_taken < send_now_room &&
		!PauseAccountIsPaused(account) &&
		(sender->account_ready == NULL ||
		 sender->account_ready(account, claim_started_at)) &&
		RateLimiterHasTokens(account, claim_started_at,
							 ((int) dclist_count(&ready) + send_now_taken) /
							 sender->events_per_request + 1))
	{
		*send_now = true;
		send_now_taken++;
	}
	if (bk == NULL && !more)
		return CLAIM_PER_KEY;
	if (bk == NULL)
		bk = busy_key_entry(key);
	room = Max(CLAIM_PER_KEY - bk->held, 0);
	/* remembered, to claim again as soon as one of its events is done */
	bk->more = more || room == 0;
	if (room > 0)
	{
		if (!walked)
			bk->refills++;
		bk->claimed_in = claim_seq;
	}
	return room;
}

/*
 * e's key has more due: refill it by name at the next claim, or after the
 * next walk when it has been refilled MAX_REFILLS times.
 */
static void
queue_refill(BusyKey *bk, const ClaimedEvent *e)
{
	if (bk->refill_queued)
		return;
	if (bk->parts.customer == NULL)
	{
		const char *account = e->stripe_account ? e->stripe_account : "";
		size_t		lc = strlen(e->customer) + 1;
		size_t		le = strlen(e->event_name) + 1;
		char	   *p = MemoryContextAlloc(sched_cxt, lc + le + strlen(account) + 1);

		/* one chunk, freed by busy_key_remove() */
		bk->parts.customer = memcpy(p, e->customer, lc);
		bk->parts.event_name = memcpy(p + lc, e->event_name, le);
		bk->parts.account = strcpy(p + lc + le, account);
	}
	if (bk->refills < MAX_REFILLS)
		dclist_push_tail(&refill_queue, &bk->refill_node);
	else
	{
		dclist_push_tail(&parked, &bk->refill_node);
		ready_now = true;		/* walk soon: it is what parked keys wait for */
	}
	bk->refill_queued = true;
}

/* e was to be the probe while Stripe does not answer, but did not go out */
static void
reach_probe_unsent(ClaimedEvent *e)
{
	if (e->reach_probe)
	{
		UnreachableProbeUnsent();
		e->reach_probe = false;
	}
}

/* e is done with (its outcome known, or never sent): to be recorded */
static void
finish_event(ClaimedEvent *e)
{
	BusyKey    *bk = hash_search(busy_keys, &e->busy_key, HASH_FIND, NULL);

	if (e->probe)
	{
		PauseAccountProbeEnded(e->stripe_account);
		e->probe = false;
	}
	reach_probe_unsent(e);
	if (bk != NULL)
	{
		bk->held--;
		/* its key has more due: claim them soon, not at the next poll */
		if (bk->more && e->sent)
			queue_refill(bk, e);
		else if (bk->more)
			ready_now = true;
		if (bk->held <= 0 && !bk->refill_queued)
			busy_key_remove(bk);
	}
	if (dclist_count(&finished) == locked_answers)
		first_finished_at = GetCurrentTimestamp();
	queue_push(&finished, e);
}

/* the in-flight event for this key finished: let the next one go */
static void
release_busy_key(uint64 key)
{
	BusyKey    *bk = hash_search(busy_keys, &key, HASH_FIND, NULL);
	ClaimedEvent *next;

	if (bk == NULL)
		return;
	bk->in_flight = false;
	next = queue_pop(&bk->waiting);
	if (next != NULL)
		queue_push_front(&ready, next); /* it goes out next */
}

/*
 * An attempt of e ended with e->outcome filled in: slow down, pause or
 * report as it says, fail a retry that would leave the resend window, and
 * let the next event for its customer and meter go.
 */
static void
settle_event(ClaimedEvent *e)
{
	TimestampTz now = GetCurrentTimestamp();

	if (e->sent && e->outcome.verdict != VERDICT_RELEASE)
	{
		if (UnreachableNoteAttempt(e->outcome.http_status != 0, e->reach_probe,
								   e->outcome.reason))
			drop_unsent = true;
		e->reach_probe = false;
	}
	RateLimiterAnswer(e->stripe_account, e->outcome.rate_limited);
	if (e->outcome.verdict == VERDICT_PAUSE)
	{
		/* refused for one Connect account: that account alone waits */
		TimestampTz until = PauseRefused(e->stripe_account, &e->outcome);

		if (until != 0)
			e->outcome.not_before = until;
	}
	else if (e->outcome.verdict != VERDICT_RELEASE && e->sent &&
			 PauseAccountAnswered(e->stripe_account, e->outcome.verdict))
		ready_now = true;
	if (e->outcome.verdict == VERDICT_FAIL || e->outcome.verdict == VERDICT_RETRY)
	{
		StripeMeterSetLastError(MyDatabaseId, e->outcome.reason);
		ereport(DEBUG1,
				(errmsg_internal("stripe_meter event \"%s\": %s", e->identifier,
								 e->outcome.reason)));
	}

	/*
	 * A retry of an event whose earlier answer was lost must stay inside
	 * Stripe's idempotency window; past it, fail it instead.
	 */
	if (e->outcome.verdict == VERDICT_RETRY)
	{
		TimestampTz since = e->unknown_outcome_since;

		if (since == 0 && e->outcome.outcome_unknown)
			since = now;		/* conservatively: from this attempt */
		if (since != 0 &&
			TimestampDifferenceExceeds(since, now, stripe_meter_resend_window * 1000))
		{
			MemoryContext o2 = MemoryContextSwitchTo(e->batch->cxt);

			e->outcome.verdict = VERDICT_FAIL;
			e->outcome.maybe_billed = true;
			e->outcome.reason = psprintf("not resent: an attempt whose outcome is unknown was made more than %d seconds ago, and a resend could be billed twice (last error: %s)",
										 stripe_meter_resend_window, e->outcome.reason);
			MemoryContextSwitchTo(o2);
		}
	}

	/*
	 * An earlier attempt whose outcome is unknown may have been billed. When
	 * the failing attempt carried the same Idempotency-Key (v1), Stripe's own
	 * refusal shows the key never billed (it would have replayed that
	 * answer); a sender without keys (the v2 stream) proves nothing by a
	 * refusal.
	 */
	if (e->outcome.verdict == VERDICT_FAIL && e->unknown_outcome_since != 0 &&
		(!sender->keyed || !e->sent))
		e->outcome.maybe_billed = true;

	release_busy_key(e->busy_key);
	finish_event(e);
}

/* Stripe did not process e (its session expired): send it again soon */
static void
requeue_event(ClaimedEvent *e)
{
	/* Stripe answered, though it did not take the event */
	(void) UnreachableNoteAttempt(true, e->reach_probe, NULL);
	e->reach_probe = false;
	release_busy_key(e->busy_key);
	queue_push_front(&ready, e);
}

/* a meter event session (v2) could not be created */
static void
session_trouble(const char *account, const DeliveryOutcome *outcome)
{
	RateLimiterAnswer(account, outcome->rate_limited);
	if (outcome->verdict == VERDICT_PAUSE)
		(void) PauseRefused(account, outcome);
	else
		StripeMeterSetLastError(MyDatabaseId, outcome->reason);
}

/* how many claimed events the worker may hold: enough to fill the window */
static int
hold_limit(void)
{
	return stripe_meter_max_in_flight * sender->events_per_request * 2;
}

/* e, its key taken, does not go out now: free the key, record e as set */
static void
drop_event(ClaimedEvent *e)
{
	release_busy_key(e->busy_key);
	finish_event(e);
}

/*
 * Mark the events about to go out as sent, in one durable transaction,
 * before any of them is on the wire; the ones the claim marked already
 * (see claim_room) need none.  The ones not marked (a session holds their
 * row: see DeliveryStoreMarkSent) and the ones that may no longer be sent
 * are dropped, their keys freed; the others have e->sent set.  Returns how
 * many may go.
 */
static int
mark_sending(ClaimedEvent **events, int n)
{
	TimestampTz now = GetCurrentTimestamp();
	int			nsend = 0;
	int			i;

	for (i = 0; i < n; i++)
	{
		/* an event may have waited in a batch: check it again */
		const char *reason = DeliveryUnsendableReason(events[i], now);

		if (reason != NULL)
		{
			events[i]->sent = false;
			events[i]->outcome.verdict = VERDICT_FAIL;
			events[i]->outcome.reason = (char *) reason;
			/* an earlier attempt may have reached Stripe */
			events[i]->outcome.maybe_billed = (events[i]->unknown_outcome_since != 0);
			drop_event(events[i]);
		}
		else
			events[nsend++] = events[i];
	}
	if (nsend == 0)
		return 0;

	/* the ones the claim marked need no transaction */
	n = 0;
	for (i = 0; i < nsend; i++)
	{
		events[i]->sent = events[i]->marked_by_claim;
		if (!events[i]->sent)
			n++;
	}
	if (n > 0)
	{
		ClaimedEvent **unmarked = palloc(sizeof(ClaimedEvent *) * n);

		n = 0;
		for (i = 0; i < nsend; i++)
			if (!events[i]->sent)
				unmarked[n++] = events[i];
		WorkerBegin(false);
		(void) DeliveryStoreMarkSent(unmarked, n);
		DeliveryStoreCommit();
		pfree(unmarked);
	}

	n = nsend;
	nsend = 0;
	for (i = 0; i < n; i++)
	{
		if (events[i]->sent)
			events[nsend++] = events[i];
		else
		{
			/* back to the queue, never sent, once that session lets go */
			events[i]->outcome.verdict = VERDICT_RELEASE;
			events[i]->outcome.not_before = 0;
			drop_event(events[i]);
		}
	}
	return nsend;
}

/*
 * Hand events from the ready queue to the sender while it has room, their
 * keys are free and their accounts may send, then let it send.  Returns
 * when a token comes for an event held back (-1: none is).
 */
static long
start_requests(void)
{
	TimestampTz now = GetCurrentTimestamp();
	long		wait_ms = -1;
	dclist_head deferred;
	bool		full = false;

	dclist_init(&deferred);
	while (!full && !dclist_is_empty(&ready) && PauseReason() == NULL &&
		   sender->has_room())
	{
		ClaimedEvent *e;
		BusyKey    *bk;
		TimestampTz not_before;
		long		account_wait;
		bool		reach_probe;
		long		probe_wait;

		/* while Stripe does not answer, only its probe goes out */
		if (!UnreachableMaySend(now, &reach_probe, &probe_wait))
		{
			if (probe_wait >= 0 && (wait_ms < 0 || probe_wait < wait_ms))
				wait_ms = probe_wait;
			break;
		}
		e = queue_pop(&ready);
		e->reach_probe = reach_probe;

		/*
		 * A sender that sends at once gets no event that cannot go: failed
		 * here, it takes neither its key nor its paused account's probe.
		 */
		if (sender->sends_at_once)
		{
			const char *reason = DeliveryUnsendableReason(e, now);

			if (reason != NULL)
			{
				e->outcome.verdict = VERDICT_FAIL;
				e->outcome.reason = (char *) reason;
				/* an earlier attempt may have reached Stripe */
				e->outcome.maybe_billed = (e->unknown_outcome_since != 0);
				finish_event(e);
				continue;
			}
		}

		if (!PauseAccountMaySend(e->stripe_account, now, &not_before, &e->probe))
		{
			/* back to the queue until its account is tried again */
			e->outcome.verdict = VERDICT_RELEASE;
			e->outcome.not_before = not_before;
			finish_event(e);
			continue;
		}

		bk = busy_key_entry(e->busy_key);
		if (bk->in_flight)
		{
			reach_probe_unsent(e);
			queue_push(&bk->waiting, e);
			continue;
		}

		/* set first: the sender may be done with e before it returns */
		bk->in_flight = true;
		switch (sender->add(e, now, &account_wait))
		{
			case SENDER_TAKEN:
				break;
			case SENDER_DEFER:
				/* its account must wait; others may still send */
				bk->in_flight = false;
				reach_probe_unsent(e);
				queue_push(&deferred, e);
				if (wait_ms < 0 || account_wait < wait_ms)
					wait_ms = account_wait;
				if (dclist_count(&deferred) >= MAX_DEFERRED_PER_PASS)
					full = true;
				break;
			case SENDER_FULL:
				bk->in_flight = false;
				reach_probe_unsent(e);
				queue_push_front(&ready, e);
				full = true;
				break;
		}
	}
	/* events whose account had no token go back first, in order */
	while (!dclist_is_empty(&deferred))
	{
		dlist_node *last = dclist_tail_node(&deferred);

		dclist_delete_from(&deferred, last);
		dclist_push_head(&ready, last);
	}

	if (PauseReason() == NULL)
	{
		long		flush_wait = sender->flush();

		if (flush_wait >= 0 && (wait_ms < 0 || flush_wait < wait_ms))
			wait_ms = flush_wait;
	}
	return wait_ms;
}

/* while paused, claimed events that were never sent go back untouched */
static void
release_unsent(void)
{
	ClaimedEvent *e;
	HASH_SEQ_STATUS seq;
	BusyKey    *bk;

	sender->release_unsent();
	while ((e = queue_pop(&ready)) != NULL)
	{
		e->outcome.verdict = VERDICT_RELEASE;
		finish_event(e);
	}
	hash_seq_init(&seq, busy_keys);
	while ((bk = hash_seq_search(&seq)) != NULL)
	{
		while ((e = queue_pop(&bk->waiting)) != NULL)
		{
			e->outcome.verdict = VERDICT_RELEASE;
			finish_event(e);
		}
		/* (finish_event removes a key once none of its events is held) */
	}
}

static void
record_finished(void)
{
	ClaimedEvent **events;
	int			n = 0;
	int			i;
	TimestampTz now;
	TimestampTz earliest_retry;
	int			deferred;

	if (dclist_is_empty(&finished))
		return;
	/* taken off the queue: the deferred ones go back to it below */
	events = palloc(sizeof(ClaimedEvent *) * dclist_count(&finished));
	while (!dclist_is_empty(&finished))
		events[n++] = queue_pop(&finished);
	/* counted from this record, also for one deferred by a lock before */
	now = GetCurrentTimestamp();
	for (i = 0; i < n; i++)
		if (events[i]->outcome.verdict == VERDICT_RETRY ||
			events[i]->outcome.verdict == VERDICT_PAUSE)
			events[i]->next_attempt_at = DeliveryNextAttempt(events[i], now);
	WorkerBegin(true);
	earliest_retry = DeliveryStoreRecord(events, n, &deferred);
	DeliveryStoreCommit();

	/* look again when the first rescheduled event is due */
	if (earliest_retry != 0 && (next_poll_at == 0 || earliest_retry < next_poll_at ||
								!claim_exhausted))
		next_poll_at = earliest_retry;

	first_finished_at = 0;
	for (i = 0; i < n; i++)
	{
		ClaimedEvent *e = events[i];
		ClaimBatch *batch = e->batch;

		if (e->record_deferred)
		{
			/* kept, to be recorded once the other transaction ends */
			queue_push(&finished, e);
			continue;
		}
		held--;
		if (--batch->live == 0)
		{
			MemoryContextDelete(batch->cxt);
			pfree(batch);
		}
	}
	locked_answers = deferred;
	if (deferred > 0)
	{
		char		text[WORKER_TEXT_LEN];

		snprintf(text, sizeof(text),
				 "%d answers wait to be recorded: another transaction holds their outbox rows (for example stripe_meter_event_cancel() in a transaction still open); they are recorded when it ends",
				 deferred);
		StripeMeterSetLastError(MyDatabaseId, text);
		/* try again in a while, not at every turn of the loop */
		locked_retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													  LOCKED_RETRY_MS);
	}
	pfree(events);
}

/*
 * Claim what the worker has room for: the keys queued to refill, then, when
 * walk is set, what the walk over all the keys finds.
 */
static void
claim_more(bool walk)
{
	int			room = hold_limit() - held;
	int			want = Min(room, stripe_meter_claim_batch_size);
	ClaimBatch *batch;
	dlist_head	claimed;
	dlist_iter	iter;
	MemoryContext old;
	ClaimKey   *refill;
	int			max_refill;
	int			nrefill = 0;
	int			got;

	if (want <= 0)
		return;
	batch = MemoryContextAlloc(sched_cxt, sizeof(ClaimBatch));
	batch->cxt = GenerationContextCreate(sched_cxt, "stripe_meter claimed events",
										 ALLOCSET_DEFAULT_SIZES);
	batch->live = 0;

	WorkerBegin(true);
	PauseAccountsLoad();
	dlist_init(&claimed);
	/* the ready events go out first; while Stripe does not answer, none */
	claim_started_at = GetCurrentTimestamp();
	send_now_taken = 0;
	send_now_room = UnreachableProbing() ? 0 :
		sender->room_now() - (int) dclist_count(&ready);
	claim_seq++;
	/* a claim that walks leaves it half its room at least */
	max_refill = walk ? want / 2 / CLAIM_PER_KEY : want;
	refill = palloc(sizeof(ClaimKey) * Max(Min(max_refill, (int) dclist_count(&refill_queue)), 1));
	dclist_foreach(iter, &refill_queue)
	{
		if (nrefill == max_refill)
			break;
		refill[nrefill++] = dlist_container(BusyKey, refill_node, iter.cur)->parts;
	}
	got = DeliveryStoreClaim(want, refill, nrefill, walk, claim_room, batch,
							 &claimed);

	/*
	 * Every attempt of this claim sends the request built now.  Built in the
	 * claim's transaction: hashing a long identifier into its key needs a
	 * resource owner.
	 */
	old = MemoryContextSwitchTo(batch->cxt);
	dlist_foreach(iter, &claimed)
	{
		ClaimedEvent *e = dlist_container(ClaimedEvent, node, iter.cur);

		sender->encode(e);
		pfree(e->payload);
		e->payload = NULL;
	}
	MemoryContextSwitchTo(old);
	DeliveryStoreCommit();

	/* only a walk can tell whether more is due */
	if (walk)
		claim_exhausted = (got < want);
	held += got;
	while (!dlist_is_empty(&claimed))
	{
		ClaimedEvent *e = dlist_container(ClaimedEvent, node,
										  dlist_pop_head_node(&claimed));

		BusyKey    *bk = busy_key_entry(e->busy_key);

		bk->held++;
		/* its next refill reads from here on */
		if (e->due_at > bk->parts.due_from)
			bk->parts.due_from = e->due_at;
		queue_push(&ready, e);
	}
	/* the keys refilled (or found with nothing due) leave the queue */
	while (nrefill-- > 0)
	{
		BusyKey    *bk = dclist_container(BusyKey, refill_node,
										  dclist_pop_head_node(&refill_queue));

		bk->refill_queued = false;
		if (bk->held <= 0)
			busy_key_remove(bk);
	}
	/* the walk had its turn: the parked keys are refilled again */
	if (walk)
	{
		while (!dclist_is_empty(&parked))
		{
			BusyKey    *bk = dclist_container(BusyKey, refill_node,
											  dclist_pop_head_node(&parked));

			bk->refills = 0;
			dclist_push_tail(&refill_queue, &bk->refill_node);
		}
	}
	if (got == 0)
	{
		MemoryContextDelete(batch->cxt);
		pfree(batch);
	}
}

static const SenderHooks hooks = {
	.event_done = settle_event,
	.event_dropped = drop_event,
	.mark_sending = mark_sending,
	.event_requeue = requeue_event,
	.session_trouble = session_trouble,
};

/*
 * SchedulerInit
 *		Set up the queues and the busy keys in cxt, and the sender the
 *		worker chose.
 */
void
SchedulerInit(MemoryContext cxt, const Sender *s)
{
	HASHCTL		ctl;

	sched_cxt = cxt;
	sender = s;
	dclist_init(&ready);
	dclist_init(&finished);
	dclist_init(&refill_queue);
	dclist_init(&parked);
	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(uint64);
	ctl.entrysize = sizeof(BusyKey);
	ctl.hcxt = cxt;
	busy_keys = hash_create("stripe_meter busy customers", 1024, &ctl,
							HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	sender->init(cxt, &hooks);
	PauseInit(cxt, sender->release_account);
}

/*
 * SchedulerWake
 *		Claim at the next turn, not at the next poll: the latch was set
 *		(new events), or a reload may have changed what is due.
 */
void
SchedulerWake(void)
{
	ready_now = true;
}

/*
 * SchedulerDrained
 *		Nothing is held and no request is out.
 */
bool
SchedulerDrained(void)
{
	return held == 0 && StripeClientInFlight() == 0;
}

/*
 * SchedulerCounts
 *		For the activity line: events held, and ready to go.
 */
void
SchedulerCounts(int *nheld, int *nready)
{
	*nheld = held;
	*nready = (int) dclist_count(&ready);
}

/*
 * SchedulerTurn
 *		One turn: claim if due (never while draining, nothing while paused:
 *		then what was never sent goes back), send what may go, and record
 *		if due.  Returns false when it recorded: the caller's pass ends
 *		there, and the next starts at once.
 */
bool
SchedulerTurn(TimestampTz now, bool draining)
{
	if (drop_unsent)
	{
		/* not from a done callback: this calls them */
		drop_unsent = false;
		(void) StripeClientDropUnsent("not sent: Stripe gave no answer to the requests before it, so one request at a time tries again");
	}
	if (PauseReason() != NULL)
		release_unsent();
	else if (!draining && held < hold_limit())
	{
		bool		walk = (ready_now || !claim_exhausted || now >= next_poll_at);

		if (walk || !dclist_is_empty(&refill_queue))
			claim_more(walk);
		if (walk)
		{
			ready_now = false;
			if (claim_exhausted && (next_poll_at <= now))
				next_poll_at = TimestampTzPlusMilliseconds(now, stripe_meter_naptime);
		}
	}

	send_wait = start_requests();

	/* record in batches: after enough, after a moment, or when idle */
	if (dclist_count(&finished) > locked_answers &&
		(dclist_count(&finished) >= RECORD_BATCH || StripeClientInFlight() == 0 ||
		 TimestampDifferenceExceeds(first_finished_at, GetCurrentTimestamp(),
									RECORD_DELAY_MS)))
	{
		record_finished();
		return false;
	}
	/* only answers whose rows are locked: now and then */
	if (locked_answers > 0 && dclist_count(&finished) == locked_answers &&
		GetCurrentTimestamp() >= locked_retry_at)
	{
		record_finished();
		return false;
	}
	return true;
}

/*
 * SchedulerTimeout
 *		How long the worker may wait before the scheduler has work (-1: for
 *		an answer), and what it waits for: a record, a token, more to
 *		claim, or the poll.
 */
long
SchedulerTimeout(StripeMeterWait *wait)
{
	bool		paused = (PauseReason() != NULL);
	long		timeout;
	int			unsent = sender->unsent();

	if (dclist_count(&finished) > locked_answers)
	{
		timeout = RECORD_DELAY_MS;
		*wait = SM_WAIT_RECORD;
	}
	else if ((!dclist_is_empty(&ready) || unsent > 0) &&
			 !paused && send_wait >= 0 &&
			 StripeClientInFlight() < stripe_meter_max_in_flight)
	{
		timeout = send_wait;
		*wait = UnreachableProbing() ? SM_WAIT_UNREACHABLE : SM_WAIT_RATE_LIMIT;
	}
	else if ((!claim_exhausted || !dclist_is_empty(&refill_queue)) &&
			 !paused && held < hold_limit())
	{
		timeout = 0;
		*wait = SM_WAIT_CLAIM;
	}
	else if (claim_exhausted && !paused)
	{
		long		secs;
		int			usecs;

		TimestampDifference(GetCurrentTimestamp(), next_poll_at, &secs, &usecs);
		timeout = Min(secs * 1000 + usecs / 1000, (long) stripe_meter_naptime);
		*wait = SM_WAIT_CLAIM;
	}
	else
	{
		timeout = stripe_meter_naptime;
		*wait = paused ? SM_WAIT_PAUSED : SM_WAIT_CLAIM;
	}
	if (locked_answers > 0)
	{
		long		secs;
		int			usecs;
		long		ms;

		TimestampDifference(GetCurrentTimestamp(), locked_retry_at, &secs, &usecs);
		ms = secs * 1000 + usecs / 1000 + 1;
		if (timeout < 0 || ms < timeout)
			timeout = ms;
	}
	/* answers awaited say more than an idle poll or a full window */
	if (StripeClientInFlight() > 0 && *wait != SM_WAIT_RECORD)
		*wait = SM_WAIT_STRIPE;
	return timeout;
}
