/*-------------------------------------------------------------------------
 *
 * rate_limiter.c
 *		The sender's rate limits: one token bucket per Stripe account.
 *
 * Stripe limits requests per account, so events for connected accounts
 * (Stripe-Account) each get their own bucket at the configured rate
 * (stripe_meter.rate_limit), as does the platform's own account.  Each
 * bucket also backs off on its account's 429s: every quarter second, when
 * at least a tenth of its answers were 429 the rate halves (from what was
 * being sent, or a modest rate when the sender was nearly idle); when a
 * few were, it holds; when none were, it grows back by a quarter, and the
 * back-off ends once it is past the configured limit (or well past what is
 * being sent).  A stray 429 (Stripe also uses it for lock contention)
 * therefore never collapses the rate, while a real limit halves it every
 * quarter second until the 429s stop.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/rate_limiter.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/hashfn.h"
#include "utils/hsearch.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

/* an account unused for this long is forgotten (its back-off too) */
#define IDLE_FORGET_MS	60000
/* the table is made anew once it holds a quarter of its peak, past this */
#define REBUILD_PEAK	1024

typedef struct AccountBucket
{
	uint64		account_key;	/* hash key: see account_key_of() */
	double		tokens;
	TimestampTz refilled_at;
	double		backoff_rate;	/* calls/s while backing off; 0: not */
	TimestampTz window_start;	/* a quarter second of answers */
	int			window_answers;
	int			window_429s;
	double		sent_this_second;
	double		send_rate;		/* measured over the last second */
	TimestampTz second_start;
	TimestampTz last_used;
} AccountBucket;

static HTAB *buckets = NULL;
static MemoryContext buckets_cxt = NULL;
static long peak = 0;			/* most buckets held since the table was made */

static uint64
account_key_of(const char *account)
{
	if (account == NULL || account[0] == '\0')
		return 0;				/* the key's own account */
	return hash_bytes_extended((const unsigned char *) account, strlen(account), 1) | 1;
}

static AccountBucket *
bucket_for(const char *account, TimestampTz now)
{
	uint64		key = account_key_of(account);
	bool		found;
	AccountBucket *b = hash_search(buckets, &key, HASH_ENTER, &found);

	if (!found)
	{
		memset(b, 0, sizeof(AccountBucket));
		b->account_key = key;
		b->window_start = now;
		b->second_start = now;
	}
	b->last_used = now;
	return b;
}

static HTAB *
make_buckets(long size)
{
	HASHCTL		ctl;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(uint64);
	ctl.entrysize = sizeof(AccountBucket);
	ctl.hcxt = buckets_cxt;
	return hash_create("stripe_meter rate limits", size, &ctl,
					   HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
}

void
RateLimiterInit(MemoryContext cxt)
{
	buckets_cxt = cxt;
	buckets = make_buckets(16);
}

/*
 * A hash table keeps the entries it removed for reuse, so after a burst of
 * many accounts the forgotten ones would still hold their memory: copy the
 * live buckets into a new table and drop the old one.  Nothing outside
 * this file points at a bucket.
 */
static void
shrink_buckets(void)
{
	HTAB	   *fresh;
	HASH_SEQ_STATUS seq;
	AccountBucket *b;
	long		n = hash_get_num_entries(buckets);

	if (n > peak)
		peak = n;
	if (peak < REBUILD_PEAK || n * 4 > peak)
		return;
	fresh = make_buckets(Max(n, 16));
	hash_seq_init(&seq, buckets);
	while ((b = hash_seq_search(&seq)) != NULL)
		memcpy(hash_search(fresh, &b->account_key, HASH_ENTER, NULL), b,
			   sizeof(AccountBucket));
	hash_destroy(buckets);
	buckets = fresh;
	peak = n;
}

/* calls per second allowed now for this bucket, 0 for no limit */
static double
current_rate(AccountBucket *b)
{
	double		limit = StripeMeterEffectiveRateLimit();

	if (b->backoff_rate > 0 && (limit == 0 || b->backoff_rate < limit))
		return b->backoff_rate;
	return limit;
}

/* refill b for the time since it was last refilled; returns its rate */
static double
refill(AccountBucket *b, TimestampTz now)
{
	double		rate = current_rate(b);
	double		burst;

	if (rate > 0)
	{
		burst = Max(1.0, rate / 20.0);
		if (b->refilled_at != 0)
		{
			b->tokens += rate * (double) (now - b->refilled_at) / USECS_PER_SEC;
			if (b->tokens > burst)
				b->tokens = burst;
		}
		else
			b->tokens = burst;
		b->refilled_at = now;
	}
	return rate;
}

/*
 * RateLimiterTake
 *		Take a token to send one request for this account (NULL: the key's
 *		own); when none is left, return false and say in *wait_ms when the
 *		next one comes.  The bucket holds a twentieth of a second's worth,
 *		so a burst stays small.
 */
bool
RateLimiterTake(const char *account, TimestampTz now, long *wait_ms)
{
	AccountBucket *b = bucket_for(account, now);
	double		rate = refill(b, now);

	if (rate > 0)
	{
		if (b->tokens < 1.0)
		{
			*wait_ms = (long) ((1.0 - b->tokens) / rate * 1000.0) + 1;
			return false;
		}
		b->tokens -= 1.0;
	}
	b->sent_this_second++;
	return true;
}

/*
 * RateLimiterHasTokens
 *		Whether n requests for this account could be sent now, without
 *		taking their tokens.
 */
bool
RateLimiterHasTokens(const char *account, TimestampTz now, int n)
{
	AccountBucket *b = bucket_for(account, now);

	return refill(b, now) == 0 || b->tokens >= (double) n;
}

/*
 * RateLimiterAnswer
 *		Count an answer from Stripe for this account (or a failed session
 *		creation), and whether it was a 429.
 */
void
RateLimiterAnswer(const char *account, bool rate_limited)
{
	AccountBucket *b = bucket_for(account, GetCurrentTimestamp());

	b->window_answers++;
	if (rate_limited)
		b->window_429s++;
}

static void
tick_bucket(AccountBucket *b, TimestampTz now)
{
	if (TimestampDifferenceExceeds(b->second_start, now, 1000))
	{
		b->send_rate = b->sent_this_second * USECS_PER_SEC / (double) (now - b->second_start);
		b->sent_this_second = 0;
		b->second_start = now;
	}

	if (!TimestampDifferenceExceeds(b->window_start, now, 250))
		return;
	if (b->window_429s > 0 && b->window_429s * 10 >= b->window_answers)
	{
		double		base = b->backoff_rate > 0 ? b->backoff_rate : Max(b->send_rate, 50.0);

		b->backoff_rate = Max(2.0, base / 2.0);
	}
	else if (b->window_429s == 0 && b->backoff_rate > 0)
	{
		double		limit = StripeMeterEffectiveRateLimit();

		b->backoff_rate *= 1.25;
		if ((limit > 0 && b->backoff_rate >= limit) ||
			(limit == 0 && b->backoff_rate > 2 * Max(b->send_rate, 100.0)))
			b->backoff_rate = 0;
	}
	b->window_start = now;
	b->window_answers = 0;
	b->window_429s = 0;
}

/*
 * RateLimiterTick
 *		Called from the worker's loop: measure send rates, adjust each
 *		account's back-off, and forget accounts idle for a minute.
 */
void
RateLimiterTick(TimestampTz now)
{
	static TimestampTz last_tick = 0;
	HASH_SEQ_STATUS seq;
	AccountBucket *b;

	/* the loop turns often; a few ticks per window are plenty */
	if (!TimestampDifferenceExceeds(last_tick, now, 10))
		return;
	last_tick = now;
	hash_seq_init(&seq, buckets);
	while ((b = hash_seq_search(&seq)) != NULL)
	{
		if (b->backoff_rate == 0 &&
			TimestampDifferenceExceeds(b->last_used, now, IDLE_FORGET_MS))
		{
			hash_search(buckets, &b->account_key, HASH_REMOVE, NULL);
			continue;
		}
		tick_bucket(b, now);
	}
	shrink_buckets();
}
