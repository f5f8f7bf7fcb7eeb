/*-------------------------------------------------------------------------
 *
 * wait_events.c
 *	  Names for what the launcher and the delivery worker wait on, so that
 *	  pg_stat_activity.wait_event tells an operator why a worker sits still.
 *
 * From PostgreSQL 17 each wait has a name of its own (wait_event_type
 * "Extension", wait_event "StripeMeterStripe" and so on, also listed in
 * pg_wait_events).  Before 17 an extension has one wait event only, so
 * every wait shows as "Extension".
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/wait_events.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "stripe_meter.h"

static const char *const wait_names[SM_WAIT_COUNT] = {
	[SM_WAIT_STRIPE] = "StripeMeterStripe",
	[SM_WAIT_CLAIM] = "StripeMeterClaim",
	[SM_WAIT_RECORD] = "StripeMeterRecord",
	[SM_WAIT_RATE_LIMIT] = "StripeMeterRateLimit",
	[SM_WAIT_PAUSED] = "StripeMeterPaused",
	[SM_WAIT_UNREACHABLE] = "StripeMeterUnreachable",
	[SM_WAIT_LAUNCHER] = "StripeMeterLauncher",
};

/* registered on first use; a name gets the same number in every process */
static uint32 wait_ids[SM_WAIT_COUNT];

/*
 * StripeMeterWaitEvent
 *		The wait_event_info to pass to WaitLatch and WaitEventSetWait.
 */
uint32
StripeMeterWaitEvent(StripeMeterWait wait)
{
	Assert(wait >= 0 && wait < SM_WAIT_COUNT);
	if (wait_ids[wait] == 0)
		wait_ids[wait] = register_wait_event(wait_names[wait]);
	return wait_ids[wait];
}
