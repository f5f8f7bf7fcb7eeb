/*-------------------------------------------------------------------------
 *
 * lifecycle.c
 *	  The worker's schedule for the event lifecycle after delivery:
 *	  cancellations (cancel.c), meter syncs (meter_sync.c) and error
 *	  reports (async_errors.c).  Their settings are in guc.c.
 *
 * Each of them is a job whose run is a small state machine: a start step
 * that reads what to do and puts requests in flight on the worker's HTTP
 * client, and an advance step that reads the answers that have arrived and
 * puts the next requests in flight, until the run is over.  No step waits
 * for Stripe: the delivery loop goes on while their requests are out, and
 * their answers arrive through the same wait as the deliveries'.  A step
 * that raises an ERROR ends its run (logged); the job runs again at its
 * next turn, and never stops delivery.
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

/* one lifecycle request in flight: what its answer is for */
typedef struct LifecycleTicket
{
	LifecycleCalls *calls;
	void	   *arg;
} LifecycleTicket;

/*
 * LifecycleCallsInit
 *		Set up a job's requests: its run's memory, nothing in flight.
 */
void
LifecycleCallsInit(LifecycleCalls *calls, const char *name)
{
	memset(calls, 0, sizeof(*calls));
	calls->cxt = AllocSetContextCreate(TopMemoryContext, "stripe_meter lifecycle run",
									   ALLOCSET_DEFAULT_SIZES);
	MemoryContextSetIdentifier(calls->cxt, name);
}

/* the HTTP client's done callback: keep the answer for the advance step */
static void
call_done(void *owner, const HttpResult *http)
{
	LifecycleTicket *ticket = owner;
	LifecycleCalls *calls = ticket->calls;
	LifecycleAnswer *answer;
	MemoryContext old;

	calls->in_flight--;
	if (calls->abandoned)
	{
		/* the run ended in an ERROR: its memory goes with its last request */
		if (calls->in_flight == 0)
			LifecycleCallsEnd(calls);
		return;
	}
	old = MemoryContextSwitchTo(calls->cxt);
	answer = palloc(sizeof(LifecycleAnswer));
	answer->arg = ticket->arg;
	answer->http = StripeHttpResultCopy(http);
	calls->answers = lappend(calls->answers, answer);
	MemoryContextSwitchTo(old);
}

/*
 * LifecycleCallStart
 *		Put one request in flight for the run; its answer comes back from
 *		LifecycleCallNextAnswer with arg.  spec's strings must live in
 *		calls->cxt (the body is read while the request is out).  Returns
 *		false if the client refused it.
 */
bool
LifecycleCallStart(LifecycleCalls *calls, const StripeRequestSpec *spec, void *arg)
{
	LifecycleTicket *ticket = MemoryContextAlloc(calls->cxt, sizeof(LifecycleTicket));
	StripeRequestSpec call = *spec;

	ticket->calls = calls;
	ticket->arg = arg;
	call.owner = ticket;
	call.done = call_done;
	call.lifecycle = true;
	if (call.base_url == NULL)
		call.base_url = stripe_meter_api_url;
	if (!StripeClientStartRequest(&call))
		return false;
	calls->in_flight++;
	return true;
}

/*
 * LifecycleCallNextAnswer
 *		The oldest answer not yet read, or NULL.
 */
LifecycleAnswer *
LifecycleCallNextAnswer(LifecycleCalls *calls)
{
	LifecycleAnswer *answer;

	if (calls->answers == NIL)
		return NULL;
	answer = linitial(calls->answers);
	calls->answers = list_delete_first(calls->answers);
	return answer;
}

/*
 * LifecycleCallsEnd
 *		The run is over: forget its answers and free its memory.
 */
void
LifecycleCallsEnd(LifecycleCalls *calls)
{
	Assert(calls->in_flight == 0);
	calls->answers = NIL;
	calls->abandoned = false;
	MemoryContextReset(calls->cxt);
}

/* The jobs, their steps, and when each runs next. */
typedef bool (*LifecycleStep) (void);	/* true: the run goes on */

typedef struct LifecycleJob
{
	LifecycleStep start;
	LifecycleStep advance;
	LifecycleCalls *calls;
	int		   *interval;		/* seconds between runs (0: never); NULL:
								 * cancellations, run as they fall due */
	bool		running;
	TimestampTz next_at;
} LifecycleJob;

static LifecycleJob cancel_job = {CancelRunStart, CancelRunAdvance, &CancelCalls, NULL};
static LifecycleJob sync_job = {MeterSyncRunStart, MeterSyncRunAdvance, &MeterSyncCalls,
&stripe_meter_meter_sync_interval};
static LifecycleJob poll_job = {AsyncErrorsRunStart, AsyncErrorsRunAdvance, &AsyncErrorsCalls,
&stripe_meter_error_poll_interval};
static LifecycleJob *const jobs[] = {&cancel_job, &sync_job, &poll_job};

static MemoryContext tick_cxt = NULL;
static TimestampTz last_cancel_at = 0;
static int	last_sync_interval = -1;
static int	last_poll_interval = -1;

static TimestampTz
after_secs(TimestampTz now, int secs)
{
	return TimestampTzPlusMilliseconds(now, (int64) secs * 1000);
}

/* a job's run is over, or did not start: when it runs next */
static void
schedule_next(LifecycleJob *job)
{
	TimestampTz now = GetCurrentTimestamp();

	if (job->interval != NULL)
	{
		job->next_at = after_secs(now, *job->interval);
		return;
	}
	job->next_at = TimestampTzPlusMilliseconds(now, stripe_meter_naptime);
	if (CancelRunNextDue() != 0 && CancelRunNextDue() < job->next_at)
		job->next_at = CancelRunNextDue();
}

/*
 * Run one step of a job.  An ERROR in it is logged and ends the run; the
 * requests it has out are let finish, their answers dropped.
 */
static void
run_step(LifecycleJob *job, LifecycleStep step)
{
	volatile bool going = false;

	MemoryContextSwitchTo(tick_cxt);
	PG_TRY();
	{
		going = step();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(tick_cxt);
		EmitErrorReport();
		FlushErrorState();
		AbortCurrentTransaction();
		going = false;
		if (job->calls->in_flight > 0)
			job->calls->abandoned = true;
		else
			LifecycleCallsEnd(job->calls);
	}
	PG_END_TRY();
	MemoryContextSwitchTo(tick_cxt);
	MemoryContextReset(tick_cxt);
	job->running = going;
	if (!going)
		schedule_next(job);
}

/* not running, nothing of an abandoned run still out, and switched on */
static bool
may_start(const LifecycleJob *job, TimestampTz now)
{
	return !job->running && job->calls->in_flight == 0 &&
		(job->interval == NULL || *job->interval > 0) && now >= job->next_at;
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
	int			i;

	if (tick_cxt == NULL)
	{
		tick_cxt = AllocSetContextCreate(TopMemoryContext, "stripe_meter lifecycle",
										 ALLOCSET_DEFAULT_SIZES);
		LifecycleCallsInit(&CancelCalls, "stripe_meter cancellations");
		LifecycleCallsInit(&MeterSyncCalls, "stripe_meter meter sync");
		LifecycleCallsInit(&AsyncErrorsCalls, "stripe_meter error reports");
	}

	/* a changed interval counts from now; the first sync runs at start */
	if (stripe_meter_meter_sync_interval != last_sync_interval)
	{
		sync_job.next_at = last_sync_interval == -1 ? now :
			after_secs(now, stripe_meter_meter_sync_interval);
		last_sync_interval = stripe_meter_meter_sync_interval;
	}
	if (stripe_meter_error_poll_interval != last_poll_interval)
	{
		poll_job.next_at = after_secs(now, stripe_meter_error_poll_interval);
		last_poll_interval = stripe_meter_error_poll_interval;
	}

	/* runs under way read their answers, paused or not */
	for (i = 0; i < lengthof(jobs); i++)
		if (jobs[i]->running && jobs[i]->calls->answers != NIL)
			run_step(jobs[i], jobs[i]->advance);

	if (!paused)
	{
		/* commits wake the worker often under load: look at most 5 times a second */
		if (woken)
			cancel_job.next_at = Min(cancel_job.next_at,
									 TimestampTzPlusMilliseconds(last_cancel_at, 200));
		if (may_start(&cancel_job, now))
			last_cancel_at = now;
		for (i = 0; i < lengthof(jobs); i++)
			if (may_start(jobs[i], now))
				run_step(jobs[i], jobs[i]->start);
	}
	MemoryContextSwitchTo(caller);
	if (paused)
		return stripe_meter_naptime;

	/* a run under way is woken by its answers, through the client's wait */
	next = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), stripe_meter_naptime);
	for (i = 0; i < lengthof(jobs); i++)
		if (!jobs[i]->running &&
			(jobs[i]->interval == NULL || *jobs[i]->interval > 0) &&
			jobs[i]->next_at < next)
			next = jobs[i]->next_at;
	TimestampDifference(GetCurrentTimestamp(), next, &secs, &usecs);
	return secs * 1000 + usecs / 1000 + 1;
}
