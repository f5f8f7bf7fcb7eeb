/*-------------------------------------------------------------------------
 *
 * delivery_policy.c
 *	  When a claimed event may still go out, and when an event that must
 *	  be tried again is due: the retry back-off and the limits of Stripe's
 *	  windows.  Pure functions of an event, the clock and the settings.
 *
 * The back-off serves the meter events, the meter event sessions (v2) and
 * the cancellations alike.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/delivery_policy.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/pg_prng.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

/*
 * DeliveryBackoffMs
 *		Capped exponential backoff with jitter, as Stripe's SDKs do it:
 *		min_delay doubling per attempt up to max_delay, then a random half
 *		to whole of that, never below min_delay.
 */
int
DeliveryBackoffMs(int attempts)
{
	double		delay = stripe_meter_retry_min_delay;
	int			i;

	for (i = 1; i < attempts && delay < stripe_meter_retry_max_delay; i++)
		delay *= 2;
	if (delay > stripe_meter_retry_max_delay)
		delay = stripe_meter_retry_max_delay;
	delay *= 0.5 * (1.0 + pg_prng_double(&pg_global_prng_state));
	if (delay < stripe_meter_retry_min_delay)
		delay = stripe_meter_retry_min_delay;
	return (int) delay;
}

/*
 * DeliveryNextAttempt
 *		When an event retried or paused (as its outcome says) is due again,
 *		recorded at now: at the time its outcome names, else at once after
 *		a pause (its account's events were moved to the next try), else
 *		after the back-off for its attempts.
 */
TimestampTz
DeliveryNextAttempt(const ClaimedEvent *e, TimestampTz now)
{
	if (e->outcome.not_before != 0)
		return e->outcome.not_before;
	if (e->outcome.verdict == VERDICT_PAUSE)
		return now;
	return TimestampTzPlusMilliseconds(now, DeliveryBackoffMs(e->attempts));
}

/*
 * DeliveryUnsendableReason
 *		Why an event can no longer be sent safely, or NULL: Stripe refuses
 *		a timestamp more than 35 days old, and a resend after an attempt
 *		whose outcome is unknown is safe only within the resend window.
 */
const char *
DeliveryUnsendableReason(const ClaimedEvent *e, TimestampTz now)
{
	if (e->ts < now - (TimestampTz) STRIPE_TS_PAST_LIMIT_SECS * USECS_PER_SEC)
		return "not sent: its timestamp is more than 35 days old, outside the window Stripe accepts";
	if (e->unknown_outcome_since != 0 &&
		TimestampDifferenceExceeds(e->unknown_outcome_since, now,
								   stripe_meter_resend_window * 1000))
		return "not resent: an attempt whose outcome is unknown was made longer ago than stripe_meter.resend_window, and a resend could be billed twice";
	return NULL;
}
