/*-------------------------------------------------------------------------
 *
 * worker.c
 *	  The delivery worker of one database: claim -> send -> record, with
 *	  many requests in flight and a window refilled as each one finishes.
 *
 * The delivery guarantee: every event queued is delivered to Stripe, and
 * none is billed twice.  How:
 *	- a claim (in flight, attempt counted) commits before its events are
 *	  sent, and an event leaves the outbox only in the transaction that
 *	  records Stripe's answer; a crash anywhere leaves it queued;
 *	- every attempt of an event carries the same identifier and
 *	  Idempotency-Key, so a resend whose first answer was lost is replayed
 *	  by Stripe, and one whose key Stripe forgot is refused as a duplicate
 *	  identifier (recorded as delivered);
 *	- an event whose first unanswered attempt is older than
 *	  stripe_meter.resend_window is failed, not resent, because past
 *	  Stripe's ~24 h windows a resend would be billed again.
 * Never two requests are in flight for the same (account, event name,
 * customer): Stripe allows one concurrent call per customer and meter.
 *
 * With stripe_meter.api_version = v2 the same loop hands events to
 * v2_stream.c, which sends them in batches on Stripe's meter event stream;
 * the busy keys, the claim, the record and the resend window are shared.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/worker.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

/* what every background worker needs */
#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lmgr.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"

/* what this one needs */
#include "access/xact.h"
#include "access/xlog.h"
#include "commands/extension.h"
#include "pgstat.h"
#include "utils/backend_status.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

#define METER_EVENTS_PATH	"/v1/billing/meter_events"
#define RECORD_BATCH		500 /* record after this many finished events */
#define RECORD_DELAY_MS		20	/* or after this long */
#define PURGE_INTERVAL_MS	60000
#define MAX_DEFERRED_PER_PASS 256	/* events passed over for rate-limited accounts */
#define LOCKED_RETRY_MS		1000	/* retry recording rows another session locks */
#define WORKER_LOCK_TIMEOUT "50"	/* ms: the longest the worker waits for a lock */

typedef struct EventQueue
{
	ClaimedEvent *head;
	ClaimedEvent *tail;
	int			n;
} EventQueue;

/* events blocked behind an in-flight one for the same customer and meter */
typedef struct BusyKey
{
	uint64		key;
	bool		in_flight;		/* a request for this key is out */
	EventQueue	waiting;
} BusyKey;

/*
 * A Connect account Stripe refused (401, 403, 404): its events wait until
 * next_try_at, when one of them goes out to see whether access is back.
 * stripe_meter.paused_accounts holds the same, for status and for a worker
 * that starts later; the table wins (stripe_meter_resume_account()).
 */
#define PAUSED_ACCOUNT_LEN	256
typedef struct PausedAccount
{
	char		account[PAUSED_ACCOUNT_LEN];	/* hash key */
	TimestampTz next_try_at;
	bool		probing;		/* an event is out to try it again */
	bool		seen;			/* still in the table at the last load */
} PausedAccount;

static HTAB *paused_accounts;

static EventQueue ready;		/* claimed, may be sent */
static EventQueue finished;		/* outcome known, to be recorded */
static HTAB *busy_keys;
static int	held = 0;			/* claimed and not yet recorded */
static TimestampTz first_finished_at = 0;
static int	locked_answers = 0;	/* finished, but their rows are locked */
static TimestampTz locked_retry_at = 0;

static bool claim_exhausted = false;	/* last claim found fewer than asked */
static TimestampTz next_poll_at = 0;
static TimestampTz next_purge_at = 0;
static char pause_reason[WORKER_TEXT_LEN];
static bool extension_absent = false;	/* exit frees the slot for good */
static int	api_version;		/* stripe_meter.api_version when we started */
static bool api_switch_pending = false; /* it changed: drain, then exit */
static bool ready_now = true;	/* claim at once: woken, or just started */
static bool lifecycle_woken = true;
static long lifecycle_wait = 0;
static TimestampTz repair_before;	/* claims older than this worker */
static int64 repair_left = 0;	/* of those, locked by another transaction */
static TimestampTz next_repair_at = 0;

static void
queue_push(EventQueue *q, ClaimedEvent *e)
{
	e->next = NULL;
	if (q->tail)
		q->tail->next = e;
	else
		q->head = e;
	q->tail = e;
	q->n++;
}

static void
queue_push_front(EventQueue *q, ClaimedEvent *e)
{
	e->next = q->head;
	q->head = e;
	if (q->tail == NULL)
		q->tail = e;
	q->n++;
}

static ClaimedEvent *
queue_pop(EventQueue *q)
{
	ClaimedEvent *e = q->head;

	if (e)
	{
		q->head = e->next;
		if (q->head == NULL)
			q->tail = NULL;
		e->next = NULL;
		q->n--;
	}
	return e;
}

static void
finish_event(ClaimedEvent *e)
{
	if (finished.n == locked_answers)
		first_finished_at = GetCurrentTimestamp();
	queue_push(&finished, e);
}

/*
 * Why delivery cannot run with the current settings, or NULL.  Never
 * quotes the key.
 */
static const char *
settings_problem(void)
{
	const char *key = stripe_meter_api_key;
	const char *p;

	if (!stripe_meter_enabled)
		return "delivery is turned off (stripe_meter.enabled)";
	if (key == NULL || key[0] == '\0')
		return "stripe_meter.api_key is not set";
	if (!(strncmp(key, "sk_", 3) == 0 || strncmp(key, "rk_", 3) == 0))
		return "stripe_meter.api_key is not a Stripe secret or restricted key (sk_... or rk_...)";
	for (p = key; *p; p++)
		if (*p <= 0x20 || *p >= 0x7f)
			return "stripe_meter.api_key contains spaces or control characters";
	return NULL;
}

static void
set_paused(const char *reason)
{
	if (reason == NULL)
	{
		if (pause_reason[0] != '\0')
			ereport(LOG, (errmsg("stripe_meter worker resumed delivery")));
		pause_reason[0] = '\0';
		StripeMeterSetPaused(MyDatabaseId, NULL);
		return;
	}
	if (strcmp(pause_reason, reason) != 0)
	{
		strlcpy(pause_reason, reason, sizeof(pause_reason));
		ereport(LOG,
				(errmsg("stripe_meter worker paused delivery: %s", reason),
				 errhint("Events stay queued.  Delivery resumes after the configuration is fixed and reloaded.")));
		StripeMeterSetPaused(MyDatabaseId, reason);
	}
}

/*
 * After a new library is installed and the server restarted, the database
 * keeps the old version's tables until ALTER EXTENSION stripe_meter UPDATE:
 * deliver nothing until then, since this code reads and writes the new
 * version's columns.  Enqueueing keeps working meanwhile.
 */
static void
wait_for_schema_update(void)
{
	bool		told = false;

	for (;;)
	{
		char		version[NAMEDATALEN];

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		if (!DeliveryStoreExtensionVersion(version, sizeof(version)))
		{
			extension_absent = true;
			proc_exit(0);
		}
		if (strcmp(version, STRIPE_METER_VERSION) == 0)
			break;
		if (!told)
		{
			char		reason[WORKER_TEXT_LEN];

			snprintf(reason, sizeof(reason),
					 "the extension in this database is version %s but the library is %s: run ALTER EXTENSION stripe_meter UPDATE",
					 version, STRIPE_METER_VERSION);
			set_paused(reason);
			told = true;
		}
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 stripe_meter_naptime, StripeMeterWaitEvent(SM_WAIT_PAUSED));
		ResetLatch(MyLatch);
	}
	if (told)
		ereport(LOG,
				(errmsg("stripe_meter worker found the extension updated to version %s",
						STRIPE_METER_VERSION)));
}

static PausedAccount *
account_paused(const char *account)
{
	char		key[PAUSED_ACCOUNT_LEN];

	if (account == NULL || hash_get_num_entries(paused_accounts) == 0 ||
		strlen(account) >= PAUSED_ACCOUNT_LEN)
		return NULL;
	memset(key, 0, sizeof(key));
	strlcpy(key, account, sizeof(key));
	return hash_search(paused_accounts, key, HASH_FIND, NULL);
}

static PausedAccount *
remember_paused(const char *account, TimestampTz next_try_at, bool *found)
{
	char		key[PAUSED_ACCOUNT_LEN];
	PausedAccount *pa;

	memset(key, 0, sizeof(key));
	strlcpy(key, account, sizeof(key));
	pa = hash_search(paused_accounts, key, HASH_ENTER, found);
	if (!*found)
		pa->probing = false;
	pa->next_try_at = next_try_at;
	pa->seen = true;
	return pa;
}

static void
paused_account_loaded(const char *account, TimestampTz next_try_at)
{
	bool		found;

	if (strlen(account) < PAUSED_ACCOUNT_LEN)
		(void) remember_paused(account, next_try_at, &found);
}

/* the table is what counts: an operator may have resumed accounts */
static void
load_paused_accounts(void)
{
	HASH_SEQ_STATUS seq;
	PausedAccount *pa;

	hash_seq_init(&seq, paused_accounts);
	while ((pa = hash_seq_search(&seq)) != NULL)
		pa->seen = false;
	DeliveryStoreLoadPausedAccounts(paused_account_loaded);
	hash_seq_init(&seq, paused_accounts);
	while ((pa = hash_seq_search(&seq)) != NULL)
		if (!pa->seen)
			hash_search(paused_accounts, pa->account, HASH_REMOVE, NULL);
}

/*
 * Stripe refused a request for this Connect account: pause the account
 * alone, its events kept.  Returns when it is tried again.
 */
static TimestampTz
pause_account(const char *account, const DeliveryOutcome *o)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz next_try_at = TimestampTzPlusMilliseconds(now,
														  stripe_meter_account_retry_interval * 1000L);
	PausedAccount *pa = account_paused(account);
	bool		found;

	/* the other answers of the same refusal: once is enough */
	if (pa != NULL && !pa->probing &&
		pa->next_try_at > TimestampTzPlusMilliseconds(now, stripe_meter_account_retry_interval * 500L))
		return pa->next_try_at;
	pa = remember_paused(account, next_try_at, &found);
	pa->probing = false;
	if (!DeliveryStoreBegin())
	{
		extension_absent = true;
		proc_exit(0);
	}
	DeliveryStorePauseAccount(account, o->reason, o->http_status, next_try_at);
	DeliveryStoreCommit();
	if (!found)
		ereport(LOG,
				(errmsg("stripe_meter worker paused delivery for Stripe account %s: %s",
						account, o->reason ? o->reason : "refused"),
				 errhint("Its events stay queued, and every other account is delivered.  It is tried again every stripe_meter.account_retry_interval, or at once after stripe_meter_resume_account() or a configuration reload.")));
	if (api_version == STRIPE_API_V2)
		V2StreamReleaseAccount(account, next_try_at);
	return next_try_at;
}

/* Stripe answered for a paused account again: deliver its events */
static void
resume_account(PausedAccount *pa)
{
	char		account[PAUSED_ACCOUNT_LEN];

	strlcpy(account, pa->account, sizeof(account));
	hash_search(paused_accounts, account, HASH_REMOVE, NULL);
	if (!DeliveryStoreBegin())
	{
		extension_absent = true;
		proc_exit(0);
	}
	DeliveryStoreResumeAccount(account);
	DeliveryStoreCommit();
	ereport(LOG,
			(errmsg("stripe_meter worker resumed delivery for Stripe account %s", account)));
	ready_now = true;
}

/* a reload resumes every paused account */
static void
resume_all_accounts(void)
{
	HASH_SEQ_STATUS seq;
	PausedAccount *pa;

	hash_seq_init(&seq, paused_accounts);
	while ((pa = hash_seq_search(&seq)) != NULL)
		hash_search(paused_accounts, pa->account, HASH_REMOVE, NULL);
	if (!DeliveryStoreBegin())
	{
		extension_absent = true;
		proc_exit(0);
	}
	DeliveryStoreResumeAccount(NULL);
	DeliveryStoreCommit();
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
	if (bk->waiting.n == 0 && next == NULL)
		hash_search(busy_keys, &key, HASH_REMOVE, NULL);
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

	RateLimiterAnswer(e->stripe_account, e->outcome.rate_limited);
	if (e->outcome.verdict == VERDICT_PAUSE)
	{
		/* refused for one Connect account: that account alone waits */
		if (e->stripe_account != NULL && strlen(e->stripe_account) < PAUSED_ACCOUNT_LEN)
			e->outcome.not_before = pause_account(e->stripe_account, &e->outcome);
		else
			set_paused(e->outcome.reason);
	}
	else if (e->outcome.verdict != VERDICT_RELEASE && e->sent)
	{
		PausedAccount *pa = account_paused(e->stripe_account);

		/* an answer that got past Stripe's access check: access is back */
		if (pa != NULL && (e->outcome.verdict == VERDICT_DELIVERED ||
						   e->outcome.verdict == VERDICT_FAIL))
			resume_account(pa);
		else if (pa != NULL)
			pa->probing = false;
	}
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
			e->outcome.reason = psprintf("not resent: an attempt whose outcome is unknown was made more than %d seconds ago, and a resend could be billed twice (last error: %s)",
										 stripe_meter_resend_window, e->outcome.reason);
			MemoryContextSwitchTo(o2);
		}
	}

	release_busy_key(e->busy_key);
	finish_event(e);
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
	settle_event(e);
}

/* v2: Stripe did not process e (its session expired): send it again soon */
static void
requeue_event(ClaimedEvent *e)
{
	release_busy_key(e->busy_key);
	queue_push_front(&ready, e);
}

/* v2: a meter event session could not be created */
static void
session_trouble(const char *account, const DeliveryOutcome *outcome)
{
	RateLimiterAnswer(account, outcome->rate_limited);
	if (outcome->verdict == VERDICT_PAUSE && account != NULL &&
		strlen(account) < PAUSED_ACCOUNT_LEN)
		(void) pause_account(account, outcome);
	else if (outcome->verdict == VERDICT_PAUSE)
		set_paused(outcome->reason);
	else
		StripeMeterSetLastError(MyDatabaseId, outcome->reason);
}

/* v2: a token for one stream request */
static bool
take_request_token(const char *account, TimestampTz now, long *wait_ms)
{
	return RateLimiterTake(account, now, wait_ms);
}

static const V2Hooks v2_hooks = {
	.event_done = settle_event,
	.event_requeue = requeue_event,
	.take_token = take_request_token,
	.session_trouble = session_trouble,
};

/* how many claimed events the worker may hold: enough to fill the window */
static int
hold_limit(void)
{
	if (api_version == STRIPE_API_V2)
		return stripe_meter_max_in_flight * V2_MAX_BATCH_EVENTS * 2;
	return stripe_meter_max_in_flight * 2;
}

/*
 * Before sending: an event that can no longer be sent safely is failed
 * here, with the reason, and never goes on the wire.
 */
static bool
fail_if_unsendable(ClaimedEvent *e, TimestampTz now)
{
	const char *reason = NULL;

	if (e->ts < now - (TimestampTz) STRIPE_TS_PAST_LIMIT_SECS * USECS_PER_SEC)
		reason = "not sent: its timestamp is more than 35 days old, outside the window Stripe accepts";
	else if (e->unknown_outcome_since != 0 &&
			 TimestampDifferenceExceeds(e->unknown_outcome_since, now,
										stripe_meter_resend_window * 1000))
		reason = "not resent: an attempt whose outcome is unknown was made longer ago than stripe_meter.resend_window, and a resend could be billed twice";
	if (reason == NULL)
		return false;

	e->outcome.verdict = VERDICT_FAIL;
	e->outcome.reason = (char *) reason;
	finish_event(e);
	return true;
}

/* send from the ready queue while the window, the limiter and keys allow */
static long
start_requests(void)
{
	TimestampTz now = GetCurrentTimestamp();
	long		wait_ms = -1;
	long		account_wait;
	EventQueue	deferred = {0};

	while (ready.n > 0 && pause_reason[0] == '\0' &&
		   StripeClientInFlight() < stripe_meter_max_in_flight)
	{
		ClaimedEvent *e = ready.head;
		BusyKey    *bk;
		bool		found;

		if (fail_if_unsendable(queue_pop(&ready), now))
			continue;

		if (e->stripe_account != NULL)
		{
			PausedAccount *pa = account_paused(e->stripe_account);

			if (pa != NULL && (now < pa->next_try_at || pa->probing))
			{
				/* back to the queue until its account is tried again */
				e->outcome.verdict = VERDICT_RELEASE;
				e->outcome.not_before = Max(pa->next_try_at,
											TimestampTzPlusMilliseconds(now, stripe_meter_naptime));
				finish_event(e);
				continue;
			}
			if (pa != NULL)
				pa->probing = true; /* this one finds out whether access is back */
		}

		bk = hash_search(busy_keys, &e->busy_key, HASH_ENTER, &found);
		if (!found)
		{
			bk->in_flight = false;
			memset(&bk->waiting, 0, sizeof(EventQueue));
		}
		if (bk->in_flight)
		{
			queue_push(&bk->waiting, e);
			continue;
		}

		if (api_version != STRIPE_API_V2 &&
			!RateLimiterTake(e->stripe_account, now, &account_wait))
		{
			/* its account must wait; others may still send */
			if (bk->waiting.n == 0)
				hash_search(busy_keys, &e->busy_key, HASH_REMOVE, NULL);
			queue_push(&deferred, e);
			if (wait_ms < 0 || account_wait < wait_ms)
				wait_ms = account_wait;
			if (deferred.n >= MAX_DEFERRED_PER_PASS)
				break;
			continue;
		}
		bk->in_flight = true;

		if (api_version == STRIPE_API_V2)
		{
			e->sent = true;
			if (!V2StreamAdd(e))
			{
				/* its account's batch is full and cannot go yet */
				e->sent = false;
				bk->in_flight = false;
				if (bk->waiting.n == 0)
					hash_search(busy_keys, &e->busy_key, HASH_REMOVE, NULL);
				queue_push_front(&ready, e);
				break;
			}
			continue;
		}

		e->sent = true;
		if (!StripeClientStart(e, METER_EVENTS_PATH, e->body, e->idempotency_key,
							   e->stripe_account))
		{
			e->outcome.verdict = VERDICT_RETRY;
			e->outcome.reason = "could not start the HTTP request";
			release_busy_key(e->busy_key);
			finish_event(e);
		}
	}
	/* events whose account had no token go back first, in order */
	if (deferred.n > 0)
	{
		deferred.tail->next = ready.head;
		ready.head = deferred.head;
		if (ready.tail == NULL)
			ready.tail = deferred.tail;
		ready.n += deferred.n;
	}

	if (api_version == STRIPE_API_V2 && pause_reason[0] == '\0')
	{
		long		v2_wait = V2StreamFlush();

		if (v2_wait >= 0 && (wait_ms < 0 || v2_wait < wait_ms))
			wait_ms = v2_wait;
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

	if (api_version == STRIPE_API_V2)
		V2StreamReleaseUnsent();
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
		if (!bk->in_flight)
			hash_search(busy_keys, &bk->key, HASH_REMOVE, NULL);
	}
}

static void
record_finished(void)
{
	ClaimedEvent *list = finished.head;
	ClaimedEvent *e;
	ClaimedEvent *next;
	TimestampTz earliest_retry;
	int			deferred;

	if (finished.n == 0)
		return;
	if (!DeliveryStoreBegin())
	{
		ereport(LOG,
				(errmsg("stripe_meter worker is stopping: the extension was dropped from this database")));
		extension_absent = true;
		proc_exit(0);
	}
	earliest_retry = DeliveryStoreRecord(list, &deferred);
	DeliveryStoreCommit();

	/* look again when the first rescheduled event is due */
	if (earliest_retry != 0 && (next_poll_at == 0 || earliest_retry < next_poll_at ||
								!claim_exhausted))
		next_poll_at = earliest_retry;

	finished.head = finished.tail = NULL;
	finished.n = 0;
	first_finished_at = 0;
	for (e = list; e; e = next)
	{
		ClaimBatch *batch = e->batch;

		next = e->next;
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
}

static void
claim_more(MemoryContext parent)
{
	int			room = hold_limit() - held;
	int			want = Min(room, stripe_meter_claim_batch_size);
	ClaimBatch *batch;
	ClaimedEvent *head = NULL;
	ClaimedEvent *tail = NULL;
	ClaimedEvent *e;
	int			got;

	if (want <= 0)
		return;
	batch = MemoryContextAlloc(parent, sizeof(ClaimBatch));
	batch->cxt = GenerationContextCreate(parent, "stripe_meter claimed events",
										 ALLOCSET_DEFAULT_SIZES);
	batch->live = 0;

	if (!DeliveryStoreBegin())
	{
		ereport(LOG,
				(errmsg("stripe_meter worker is stopping: the extension was dropped from this database")));
		extension_absent = true;
		proc_exit(0);
	}
	load_paused_accounts();
	got = DeliveryStoreClaim(want, batch, &head, &tail);
	DeliveryStoreCommit();

	claim_exhausted = (got < want);
	held += got;
	while ((e = head) != NULL)
	{
		head = e->next;
		queue_push(&ready, e);
	}
	if (got == 0)
	{
		MemoryContextDelete(batch->cxt);
		pfree(batch);
	}
}

/*
 * Once a minute, or at the next pass while a purge finds a full batch, so
 * that purging keeps pace with any delivery rate.
 */
static void
purge_if_due(TimestampTz now)
{
	int64		purged;

	if (now < next_purge_at)
		return;
	next_purge_at = TimestampTzPlusMilliseconds(now, PURGE_INTERVAL_MS);
	if (!DeliveryStoreBegin())
	{
		extension_absent = true;
		proc_exit(0);
	}
	purged = DeliveryStorePurgeDelivered();
	DeliveryStoreCommit();
	if (purged >= PURGE_BATCH)
		next_purge_at = now;
}

/* the slot goes back to the launcher when this process exits */
static void
worker_exit(int code, Datum arg)
{
	DatabaseSlot *slot;
	bool		wake_launcher = false;
	Latch	   *launcher_latch = NULL;

	if (StripeMeterShmem == NULL)
		return;
	LWLockAcquire(StripeMeterShmem->lock, LW_EXCLUSIVE);
	slot = StripeMeterFindSlot(MyDatabaseId);
	/* ours if we run it, or if the launcher started us and nobody runs it */
	if (slot != NULL &&
		(slot->pid == MyProcPid || (slot->state == SLOT_STARTING && slot->pid == 0)))
	{
		slot->latch = NULL;
		slot->pid = 0;
		if (DatumGetBool(arg))
			slot->state = slot->probe_requested ? SLOT_REQUESTED : SLOT_FREE;
		else
		{
			slot->state = SLOT_STOPPED;
			slot->stopped_at = GetCurrentTimestamp();
		}
		wake_launcher = true;
		launcher_latch = StripeMeterShmem->launcher_latch;
	}
	LWLockRelease(StripeMeterShmem->lock);
	if (wake_launcher && launcher_latch)
		SetLatch(launcher_latch);
}

static void
worker_exit_callback(int code, Datum arg)
{
	worker_exit(code, BoolGetDatum(extension_absent));
}

/*
 * Make this process the database's only worker: take its slot in shared
 * memory, unless another live worker holds it.  Only the worker processes
 * write a slot's pid (and clear it on exit), so nothing a session can do in
 * SQL, such as holding an advisory lock, can keep a worker from starting.
 */
static bool
become_the_worker(void)
{
	DatabaseSlot *slot;

	LWLockAcquire(StripeMeterShmem->lock, LW_EXCLUSIVE);
	slot = StripeMeterFindSlot(MyDatabaseId);
	if (slot != NULL && slot->pid != 0 && slot->pid != MyProcPid)
		slot = NULL;			/* another worker serves this database */
	if (slot != NULL)
	{
		slot->state = SLOT_RUNNING;
		slot->pid = MyProcPid;
		slot->latch = MyLatch;
		slot->started_at = GetCurrentTimestamp();
		slot->paused[0] = '\0';
		slot->last_error[0] = '\0';
	}
	LWLockRelease(StripeMeterShmem->lock);
	return slot != NULL;
}

static void
report_activity(void)
{
	static char shown[128];
	static TimestampTz shown_at = 0;
	char		now_text[128];
	TimestampTz now = GetCurrentTimestamp();
	int			inf = StripeClientInFlight();
	bool		idle = (inf == 0 && held == 0) || pause_reason[0] != '\0';

	if (pause_reason[0] != '\0')
		snprintf(now_text, sizeof(now_text), "paused: %s", pause_reason);
	else if (idle)
		strlcpy(now_text, "waiting for meter events", sizeof(now_text));
	else
		snprintf(now_text, sizeof(now_text),
				 "delivering meter events: %d in flight, %d ready", inf, ready.n);

	/* at most once a second while busy, but always when going idle */
	if (strcmp(now_text, shown) == 0 ||
		(!idle && !TimestampDifferenceExceeds(shown_at, now, 1000)))
		return;
	strlcpy(shown, now_text, sizeof(shown));
	shown_at = now;
	pgstat_report_activity(idle ? STATE_IDLE : STATE_RUNNING, shown);
}

/* in a transaction of its own: is the extension gone from this database? */
static bool
extension_dropped(void)
{
	bool		gone;

	StartTransactionCommand();
	gone = !OidIsValid(get_extension_oid("stripe_meter", true));
	CommitTransactionCommand();
	return gone;
}

/*
 * One turn of the delivery loop: read a reload, claim, send, record, run
 * the lifecycle work, then wait for the latch, a socket or a timeout.
 */
static void
delivery_pass(MemoryContext worker_cxt)
{
	TimestampTz now;
	long		timeout;
	StripeMeterWait wait;
	long		limiter_wait;
	bool		latch_set;

	CHECK_FOR_INTERRUPTS();
	if (ConfigReloadPending)
	{
		ConfigReloadPending = false;
		ProcessConfigFile(PGC_SIGHUP);
		StripeClientSettingsChanged();
		/* a reload is how a key or URL problem gets fixed: try again */
		set_paused(settings_problem());
		if (hash_get_num_entries(paused_accounts) > 0)
			resume_all_accounts();
		ready_now = true;
		if (stripe_meter_api_version != api_version && !api_switch_pending)
		{
			api_switch_pending = true;
			ereport(LOG,
					(errmsg("stripe_meter worker restarts to apply stripe_meter.api_version = %s",
							stripe_meter_api_version == STRIPE_API_V2 ? "v2" : "v1"),
					 errdetail("Events already claimed are delivered first.")));
		}
	}

	/* a new API: finish what is claimed, then let a new worker start */
	if (api_switch_pending && held == 0 && StripeClientInFlight() == 0)
		proc_exit(1);

	now = GetCurrentTimestamp();
	RateLimiterTick(now);

	/* claims of an earlier worker whose rows were locked at the start */
	if (repair_left > 0 && now >= next_repair_at)
	{
		next_repair_at = TimestampTzPlusMilliseconds(now, LOCKED_RETRY_MS);
		if (!DeliveryStoreBegin())
		{
			extension_absent = true;
			proc_exit(0);
		}
		repair_left = DeliveryStoreRepair(repair_before);
		DeliveryStoreCommit();
		if (repair_left > 0)
		{
			char		text[WORKER_TEXT_LEN];

			snprintf(text, sizeof(text),
					 "%lld events claimed before a restart wait to go back to the queue: another transaction holds their outbox rows",
					 (long long) repair_left);
			StripeMeterSetLastError(MyDatabaseId, text);
		}
	}

	if (pause_reason[0] != '\0')
		release_unsent();
	else if (!api_switch_pending &&
			 (ready_now || !claim_exhausted || now >= next_poll_at))
	{
		if (held < hold_limit())
		{
			claim_more(worker_cxt);
			ready_now = false;
			if (claim_exhausted && (next_poll_at <= now))
				next_poll_at = TimestampTzPlusMilliseconds(now, stripe_meter_naptime);
		}
	}

	limiter_wait = start_requests();

	/* record in batches: after enough, after a moment, or when idle */
	if (finished.n > locked_answers &&
		(finished.n >= RECORD_BATCH || StripeClientInFlight() == 0 ||
		 TimestampDifferenceExceeds(first_finished_at, GetCurrentTimestamp(),
									RECORD_DELAY_MS)))
	{
		record_finished();
		return;
	}
	/* only answers whose rows are locked: now and then */
	if (locked_answers > 0 && finished.n == locked_answers &&
		GetCurrentTimestamp() >= locked_retry_at)
	{
		record_finished();
		return;
	}

	purge_if_due(now);
	/* lifecycle.c: cancellations, meter sync, error reports */
	lifecycle_wait = LifecycleWorkerTick(pause_reason[0] != '\0', lifecycle_woken);
	lifecycle_woken = false;
	report_activity();

	/* how long to wait: a record, a token, more to claim, or the poll */
	if (finished.n > locked_answers)
	{
		timeout = RECORD_DELAY_MS;
		wait = SM_WAIT_RECORD;
	}
	else if ((ready.n > 0 || V2StreamUnsent() > 0) &&
			 pause_reason[0] == '\0' && limiter_wait >= 0 &&
			 StripeClientInFlight() < stripe_meter_max_in_flight)
	{
		timeout = limiter_wait;
		wait = SM_WAIT_RATE_LIMIT;
	}
	else if (!claim_exhausted && pause_reason[0] == '\0' &&
			 held < hold_limit())
	{
		timeout = 0;
		wait = SM_WAIT_CLAIM;
	}
	else if (claim_exhausted && pause_reason[0] == '\0')
	{
		long		secs;
		int			usecs;

		TimestampDifference(GetCurrentTimestamp(), next_poll_at, &secs, &usecs);
		timeout = Min(secs * 1000 + usecs / 1000, (long) stripe_meter_naptime);
		wait = SM_WAIT_CLAIM;
	}
	else
	{
		timeout = stripe_meter_naptime;
		wait = pause_reason[0] != '\0' ? SM_WAIT_PAUSED : SM_WAIT_CLAIM;
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
	if (StripeClientInFlight() > 0 && wait != SM_WAIT_RECORD)
		wait = SM_WAIT_STRIPE;

	if (timeout < 0 || lifecycle_wait < timeout)
		timeout = lifecycle_wait;
	latch_set = StripeClientWait(timeout, StripeMeterWaitEvent(wait),
								 request_done);
	if (latch_set)
		ready_now = lifecycle_woken = true;
}

/*
 * A pass stopped at a lock that another transaction holds: its work is
 * skipped, and done in a later pass.
 */
static void
skipped_for_lock(ErrorData *edata)
{
	char		text[WORKER_TEXT_LEN];

	snprintf(text, sizeof(text),
			 "skipped for now, waiting for no one: %s (another transaction holds a lock on the extension's tables)",
			 edata->message ? edata->message : "lock not available");
	StripeMeterSetLastError(MyDatabaseId, text);
	ereport(DEBUG1, (errmsg_internal("stripe_meter worker: %s", text)));
}

/*
 * StripeMeterWorkerMain
 *		Entry point of a database's delivery worker (main_arg: its OID).
 */
void
StripeMeterWorkerMain(Datum main_arg)
{
	Oid			dboid = DatumGetObjectId(main_arg);
	MemoryContext worker_cxt;
	HASHCTL		ctl;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	before_shmem_exit(worker_exit_callback, (Datum) 0);
	BackgroundWorkerInitializeConnectionByOid(dboid, InvalidOid, 0);
	pgstat_report_appname("stripe_meter worker");

	/* every name in our SQL is qualified; leave nothing to a user's schema */
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_OVERRIDE);
	/* never wait long for a lock a session holds (see the loop below) */
	SetConfigOption("lock_timeout", WORKER_LOCK_TIMEOUT, PGC_SUSET, PGC_S_OVERRIDE);

	worker_cxt = AllocSetContextCreate(TopMemoryContext, "stripe_meter worker",
									   ALLOCSET_DEFAULT_SIZES);
	MemoryContextSwitchTo(worker_cxt);

	/* never send from a standby; the launcher starts us after promotion */
	if (RecoveryInProgress())
		proc_exit(1);

	if (!DeliveryStoreBegin())
	{
		extension_absent = true;
		proc_exit(0);
	}
	DeliveryStoreCommit();

	if (!become_the_worker())
	{
		ereport(LOG,
				(errmsg("stripe_meter worker for database %u exits: another worker serves it",
						dboid)));
		extension_absent = true;
		proc_exit(0);
	}

	wait_for_schema_update();

	if (!DeliveryStoreBegin())
	{
		extension_absent = true;
		proc_exit(0);
	}
	repair_before = GetCurrentTimestamp();
	repair_left = DeliveryStoreRepair(repair_before);
	LifecycleWorkerRepair();	/* lifecycle.c: claimed cancellations */
	DeliveryStoreCommit();

	StripeClientInit();
	StripeClientSettingsChanged();

	/* read once: a change needs a new worker (see the reload below) */
	api_version = stripe_meter_api_version;
	if (api_version == STRIPE_API_V2)
		V2StreamInit(worker_cxt, &v2_hooks);

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(uint64);
	ctl.entrysize = sizeof(BusyKey);
	ctl.hcxt = worker_cxt;
	busy_keys = hash_create("stripe_meter busy customers", 1024, &ctl,
							HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = PAUSED_ACCOUNT_LEN;
	ctl.entrysize = sizeof(PausedAccount);
	ctl.hcxt = worker_cxt;
	paused_accounts = hash_create("stripe_meter paused accounts", 16, &ctl,
								  HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
	RateLimiterInit(worker_cxt);

	if (api_version == STRIPE_API_V2)
		ereport(LOG,
				(errmsg("stripe_meter worker started delivering to the meter event stream at %s (API v2)",
						stripe_meter_stream_url)));
	else
		ereport(LOG,
				(errmsg("stripe_meter worker started delivering to %s", stripe_meter_api_url)));
	set_paused(settings_problem());

	/*
	 * An ERROR in a pass ends the worker (the launcher starts another),
	 * with two exceptions.  DROP EXTENSION can commit between a
	 * transaction's check that the extension exists and its first
	 * statement, which then fails: stop as quietly as when the drop is seen
	 * first.  And a lock another transaction holds (lock_timeout, set
	 * below) skips that work for this pass, said in status.last_error,
	 * instead of stalling delivery behind that transaction.
	 */
	ready_now = true;
	for (;;)
	{
		PG_TRY();
		{
			delivery_pass(worker_cxt);
		}
		PG_CATCH();
		{
			ErrorData  *edata;

			MemoryContextSwitchTo(worker_cxt);
			edata = CopyErrorData();
			FlushErrorState();
			AbortCurrentTransaction();
			if (extension_dropped())
			{
				ereport(LOG,
						(errmsg("stripe_meter worker is stopping: the extension was dropped from this database")));
				extension_absent = true;
				proc_exit(0);
			}
			if (edata->sqlerrcode != ERRCODE_LOCK_NOT_AVAILABLE)
				ReThrowError(edata);
			skipped_for_lock(edata);
			FreeErrorData(edata);
		}
		PG_END_TRY();
	}
}
