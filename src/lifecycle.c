/*-------------------------------------------------------------------------
 *
 * lifecycle.c
 *	  The worker's schedule for the event lifecycle after delivery:
 *	  cancellations (cancel.c), meter syncs (meter_sync.c) and error
 *	  reports (async_errors.c).  Their settings are in guc.c.
 *
 * These calls are few and made one at a time with stripe_sync.c, between
 * rounds of the delivery loop; while one is out, the delivery requests in
 * flight wait (at most stripe_meter.request_timeout).  A failure in one of
 * them is logged and retried at its next turn; it never stops delivery.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/lifecycle.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

#define CANCEL_BATCH		10	/* cancellations per turn */

static MemoryContext tick_cxt = NULL;
static TimestampTz next_cancel_at = 0;
static TimestampTz last_cancel_at = 0;
static TimestampTz next_sync_at = 0;
static TimestampTz next_poll_at = 0;
static int	last_sync_interval = -1;
static int	last_poll_interval = -1;

typedef void (*LifecycleStep) (void);

static TimestampTz cancel_next_due;

static void
step_cancel(void)
{
	cancel_next_due = CancelDeliverDue(CANCEL_BATCH);
}

static void
step_sync(void)
{
	(void) MeterSyncRun();
}

/* run one step; an ERROR in it is logged and the worker goes on */
static bool
guarded(LifecycleStep step)
{
	volatile bool ok = true;

	MemoryContextSwitchTo(tick_cxt);
	PG_TRY();
	{
		step();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(tick_cxt);
		EmitErrorReport();
		FlushErrorState();
		AbortCurrentTransaction();
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(tick_cxt);
	MemoryContextReset(tick_cxt);
	return ok;
}

static TimestampTz
after_secs(TimestampTz now, int secs)
{
	return TimestampTzPlusMilliseconds(now, (int64) secs * 1000);
}

/*
 * LifecycleWorkerRepair
 *		At worker start, with a transaction open: cancellations claimed by
 *		an earlier worker go back to the queue.
 */
void
LifecycleWorkerRepair(void)
{
	CancelRepair();
}

/*
 * LifecycleWorkerTick
 *		Called by the worker on every turn of its loop, with no transaction
 *		open.  woken: the latch was set (a cancellation may have been
 *		queued).  Returns how many milliseconds until something is due.
 */
long
LifecycleWorkerTick(bool paused, bool woken)
{
	MemoryContext caller = CurrentMemoryContext;
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz next;
	long		secs;
	int			usecs;

	if (tick_cxt == NULL)
		tick_cxt = AllocSetContextCreate(TopMemoryContext, "stripe_meter lifecycle",
										 ALLOCSET_DEFAULT_SIZES);

	/* a changed interval counts from now; the first sync runs at start */
	if (stripe_meter_meter_sync_interval != last_sync_interval)
	{
		next_sync_at = last_sync_interval == -1 ? now : after_secs(now, stripe_meter_meter_sync_interval);
		last_sync_interval = stripe_meter_meter_sync_interval;
	}
	if (stripe_meter_error_poll_interval != last_poll_interval)
	{
		next_poll_at = after_secs(now, stripe_meter_error_poll_interval);
		last_poll_interval = stripe_meter_error_poll_interval;
	}
	if (paused)
		return stripe_meter_naptime;

	/* commits wake the worker often under load: look at most 5 times a second */
	if (woken)
		next_cancel_at = Min(next_cancel_at, TimestampTzPlusMilliseconds(last_cancel_at, 200));
	if (now >= next_cancel_at)
	{
		last_cancel_at = now;
		cancel_next_due = 0;
		if (guarded(step_cancel))
			next_cancel_at = cancel_next_due != 0 ?
				Min(cancel_next_due, TimestampTzPlusMilliseconds(now, stripe_meter_naptime)) :
				TimestampTzPlusMilliseconds(now, stripe_meter_naptime);
		else
			next_cancel_at = TimestampTzPlusMilliseconds(now, stripe_meter_naptime);
	}
	if (stripe_meter_meter_sync_interval > 0 && now >= next_sync_at)
	{
		(void) guarded(step_sync);
		next_sync_at = after_secs(GetCurrentTimestamp(), stripe_meter_meter_sync_interval);
	}
	if (stripe_meter_error_poll_interval > 0 && now >= next_poll_at)
	{
		(void) guarded(AsyncErrorsPull);
		next_poll_at = after_secs(GetCurrentTimestamp(), stripe_meter_error_poll_interval);
	}
	MemoryContextSwitchTo(caller);

	next = next_cancel_at;
	if (stripe_meter_meter_sync_interval > 0 && next_sync_at < next)
		next = next_sync_at;
	if (stripe_meter_error_poll_interval > 0 && next_poll_at < next)
		next = next_poll_at;
	TimestampDifference(GetCurrentTimestamp(), next, &secs, &usecs);
	return secs * 1000 + usecs / 1000 + 1;
}
