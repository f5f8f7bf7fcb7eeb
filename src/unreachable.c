/*-------------------------------------------------------------------------
 *
 * unreachable.c
 *	  When Stripe stops answering at all (down, unreachable, or a TLS
 *	  handshake that fails), one request at a time tries it again, instead
 *	  of every queued event being sent and failing in turn.
 *
 * Each event's own back-off is not enough: with a large queue the worker
 * would keep claiming, sending and requeueing events as fast as it can for
 * as long as the outage lasts, burning a CPU (a failed TLS handshake costs
 * milliseconds) and writing every attempt to the outbox, so to WAL.  After
 * UNREACHABLE_AFTER attempts in a row end without any HTTP answer, and none
 * came for a second, the worker sends nothing but a probe: one event, then
 * the next after a delay that doubles from stripe_meter.retry_min_delay up
 * to stripe_meter.retry_max_delay.  The first answer of any kind (a 5xx
 * included: the server is there) ends it, and delivery resumes at full
 * pace.  Events held meanwhile stay claimed and unsent, so a restart puts
 * them back untouched.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/unreachable.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

/*
 * Attempts in a row without an answer, over at least a second without any
 * answer, that mean the server is gone.  A window of requests fails
 * together in an outage, while the occasional reset or timeout of a healthy
 * server never makes this many in a row; the second keeps one failed v2
 * request (up to 100 events) from counting as an outage while others are
 * being answered.
 */
#define UNREACHABLE_AFTER		32
#define UNREACHABLE_SILENCE_MS	1000

static int	no_answer_streak = 0;
static TimestampTz last_answer_at = 0;
static bool unreachable = false;
static bool probe_out = false;
static int	probe_delay_ms = 0;
static TimestampTz next_probe_at = 0;

/*
 * UnreachableMaySend
 *		Whether a request may go out now.  While Stripe is unreachable only
 *		the probe may, and *probe says this is it; otherwise *wait_ms is
 *		when the next probe is due (-1: when the one out is answered).
 */
bool
UnreachableMaySend(TimestampTz now, bool *probe, long *wait_ms)
{
	long		secs;
	int			usecs;

	*probe = false;
	*wait_ms = -1;
	if (!unreachable)
		return true;
	if (probe_out)
		return false;
	if (now < next_probe_at)
	{
		TimestampDifference(now, next_probe_at, &secs, &usecs);
		*wait_ms = secs * 1000 + (usecs + 999) / 1000;
		return false;
	}
	probe_out = true;
	*probe = true;
	return true;
}

/*
 * UnreachableProbeUnsent
 *		The probe UnreachableMaySend allowed did not go out after all.
 */
void
UnreachableProbeUnsent(void)
{
	probe_out = false;
}

/*
 * UnreachableNoteAttempt
 *		An attempt that went out has ended; answered says whether any HTTP
 *		answer came back, probe whether it was the probe.  reason is the
 *		attempt's error, for the log.  Returns true when this attempt showed
 *		that Stripe does not answer: the requests not yet on the wire are
 *		then better ended than each left to try a connection.
 */
bool
UnreachableNoteAttempt(bool answered, bool probe, const char *reason)
{
	if (probe)
		probe_out = false;

	if (answered)
	{
		last_answer_at = GetCurrentTimestamp();
		if (unreachable)
			ereport(LOG,
					(errmsg("stripe_meter worker: Stripe answers again, delivery resumes")));
		no_answer_streak = 0;
		unreachable = false;
		probe_delay_ms = 0;
		return false;
	}

	if (!unreachable)
	{
		if (++no_answer_streak < UNREACHABLE_AFTER ||
			!TimestampDifferenceExceeds(last_answer_at, GetCurrentTimestamp(),
										UNREACHABLE_SILENCE_MS))
			return false;
		unreachable = true;
		probe_delay_ms = stripe_meter_retry_min_delay;
		ereport(LOG,
				(errmsg("stripe_meter worker: no answer from Stripe to %d requests in a row, so it sends one request at a time until one is answered",
						no_answer_streak),
				 errdetail("The last error was: %s", reason ? reason : "none")));
	}
	else if (probe)
		probe_delay_ms = Min(probe_delay_ms * 2, stripe_meter_retry_max_delay);
	else
		return false;			/* one sent before the outage was noticed */
	next_probe_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), probe_delay_ms);
	return true;
}

/*
 * UnreachableRetryNow
 *		A reload may have fixed the cause (the URL, the CA file): the next
 *		probe goes at once.
 */
void
UnreachableRetryNow(void)
{
	next_probe_at = 0;
}

/*
 * UnreachableProbing
 *		Whether only the probe may go out: for the worker's wait event.
 */
bool
UnreachableProbing(void)
{
	return unreachable;
}
