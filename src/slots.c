/*-------------------------------------------------------------------------
 *
 * slots.c
 *	  The state machine of the database slots in shared memory: every
 *	  change of a slot's state, by whichever process makes it.
 *
 *	FREE --(a session or the launcher's scan asks)--> REQUESTED
 *	REQUESTED --(the launcher registers a worker)--> STARTING
 *	REQUESTED, STOPPED --(the worker cannot be registered)--> STOPPED
 *	STARTING --(the worker takes the slot)--> RUNNING
 *	STARTING --(the worker died before that)--> REQUESTED or STOPPED
 *	RUNNING, STARTING --(the worker exits: no extension)--> FREE or REQUESTED
 *	RUNNING, STARTING --(the worker exits: anything else)--> STOPPED
 *	STOPPED --(RESTART_DELAY_MS later, or asked again)--> STARTING
 *	REQUESTED, STOPPED --(the database is gone)--> FREE
 *
 * A request that comes while the slot is not RUNNING sets probe_requested:
 * the launcher then starts a worker again once the current one is gone,
 * instead of freeing the slot (the worker may have looked before the
 * extension was created).
 *
 * Invariants: every change happens under StripeMeterShmem->lock; a FREE
 * slot belongs to no database; only a worker process writes a slot's pid
 * (its own, and 0 when it exits), so nothing a session does in SQL can keep
 * a worker from starting.  Latches are set after the lock is released.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/slots.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

#define RESTART_DELAY_MS 2000

/*
 * StripeMeterFindSlot
 *		The slot of a database, or NULL.  Caller holds the lock.
 */
DatabaseSlot *
StripeMeterFindSlot(Oid dboid)
{
	int			i;

	if (StripeMeterShmem == NULL)
		return NULL;
	for (i = 0; i < StripeMeterShmem->nslots; i++)
		if (StripeMeterShmem->slots[i].state != SLOT_FREE &&
			StripeMeterShmem->slots[i].dboid == dboid)
			return &StripeMeterShmem->slots[i];
	return NULL;
}

/*
 * StripeMeterNotifyLauncher
 *		Tell the launcher that this database may now need a worker.
 *
 * Returns false when every slot is taken (stripe_meter.max_databases).
 */
bool
StripeMeterNotifyLauncher(Oid dboid)
{
	DatabaseSlot *slot;
	Latch	   *latch;
	bool		have_slot = true;

	if (StripeMeterShmem == NULL)
		return false;
	LWLockAcquire(StripeMeterShmem->lock, LW_EXCLUSIVE);
	slot = StripeMeterFindSlot(dboid);
	if (slot != NULL)
	{
		/* the launcher looks again once the current worker is gone */
		if (slot->state != SLOT_RUNNING)
			slot->probe_requested = true;
	}
	else
	{
		int			i;

		have_slot = false;
		for (i = 0; i < StripeMeterShmem->nslots; i++)
		{
			if (StripeMeterShmem->slots[i].state == SLOT_FREE)
			{
				memset(&StripeMeterShmem->slots[i], 0, sizeof(DatabaseSlot));
				StripeMeterShmem->slots[i].dboid = dboid;
				StripeMeterShmem->slots[i].state = SLOT_REQUESTED;
				StripeMeterShmem->slots[i].probe_requested = true;
				have_slot = true;
				break;
			}
		}
	}
	latch = StripeMeterShmem->launcher_latch;
	LWLockRelease(StripeMeterShmem->lock);

	if (latch != NULL)
		SetLatch(latch);
	return have_slot;
}

/*
 * SlotsForgetGone (launcher)
 *		Free every idle slot whose database known() does not know, including
 *		one that CREATE EXTENSION requested for a database dropped (or closed
 *		to connections) before any scan saw it: otherwise it would be
 *		retried every few seconds for ever.
 */
void
SlotsForgetGone(bool (*known) (Oid dboid))
{
	LWLockAcquire(StripeMeterShmem->lock, LW_EXCLUSIVE);
	for (int i = 0; i < StripeMeterShmem->nslots; i++)
	{
		DatabaseSlot *slot = &StripeMeterShmem->slots[i];

		if ((slot->state == SLOT_REQUESTED || slot->state == SLOT_STOPPED) &&
			!known(slot->dboid))
			slot->state = SLOT_FREE;
	}
	LWLockRelease(StripeMeterShmem->lock);
}

/* start a worker for slot i; the lock is held */
static void
start_worker(int i, const SlotLauncher *launcher)
{
	DatabaseSlot *slot = &StripeMeterShmem->slots[i];

	if (!launcher->start(i, slot->dboid))
	{
		slot->state = SLOT_STOPPED;
		slot->stopped_at = GetCurrentTimestamp();
		return;
	}
	slot->state = SLOT_STARTING;
	slot->probe_requested = false;
}

/*
 * SlotsTend (launcher)
 *		Start what is requested, restart what stopped, and notice a worker
 *		that died before it took its slot.  Returns the milliseconds until
 *		the next restart is due, or -1.
 */
long
SlotsTend(const SlotLauncher *launcher)
{
	TimestampTz now = GetCurrentTimestamp();
	long		next_ms = -1;
	int			i;

	LWLockAcquire(StripeMeterShmem->lock, LW_EXCLUSIVE);
	for (i = 0; i < StripeMeterShmem->nslots; i++)
	{
		DatabaseSlot *slot = &StripeMeterShmem->slots[i];

		/* a worker that died before reaching its loop leaves STARTING */
		if (slot->state == SLOT_STARTING)
		{
			bool		gone;

			if (!launcher->watch(i, &gone))
			{
				/* started by an earlier launcher: we cannot watch it */
				slot->state = SLOT_STOPPED;
				slot->stopped_at = now;
			}
			else if (gone)
			{
				slot->state = slot->probe_requested ? SLOT_REQUESTED : SLOT_STOPPED;
				slot->stopped_at = now;
			}
		}

		if (slot->state == SLOT_REQUESTED ||
			(slot->state == SLOT_STOPPED && slot->probe_requested))
			start_worker(i, launcher);
		else if (slot->state == SLOT_STOPPED)
		{
			TimestampTz due = TimestampTzPlusMilliseconds(slot->stopped_at, RESTART_DELAY_MS);

			if (now >= due)
				start_worker(i, launcher);
			else
			{
				long		secs;
				int			usecs;
				long		ms;

				TimestampDifference(now, due, &secs, &usecs);
				ms = secs * 1000 + usecs / 1000 + 1;
				if (next_ms < 0 || ms < next_ms)
					next_ms = ms;
			}
		}
	}
	LWLockRelease(StripeMeterShmem->lock);
	return next_ms;
}

/*
 * SlotTakeForWorker (worker)
 *		Make this process the database's only worker: take its slot, unless
 *		another live worker holds it.  Returns false then, or when the
 *		database has no slot.
 */
bool
SlotTakeForWorker(void)
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
		slot->stream_accounts = 0;
	}
	LWLockRelease(StripeMeterShmem->lock);
	return slot != NULL;
}

/*
 * SlotLeaveByWorker (worker, at exit)
 *		Give the slot back to the launcher: freed for good when the
 *		extension is absent (unless asked again meanwhile), else stopped, to
 *		be restarted after a pause.  Only a slot this process runs, or one
 *		the launcher started it for and nobody runs.
 */
void
SlotLeaveByWorker(bool extension_absent)
{
	DatabaseSlot *slot;
	Latch	   *launcher_latch = NULL;

	if (StripeMeterShmem == NULL)
		return;
	LWLockAcquire(StripeMeterShmem->lock, LW_EXCLUSIVE);
	slot = StripeMeterFindSlot(MyDatabaseId);
	if (slot != NULL &&
		(slot->pid == MyProcPid || (slot->state == SLOT_STARTING && slot->pid == 0)))
	{
		slot->latch = NULL;
		slot->pid = 0;
		if (extension_absent)
			slot->state = slot->probe_requested ? SLOT_REQUESTED : SLOT_FREE;
		else
		{
			slot->state = SLOT_STOPPED;
			slot->stopped_at = GetCurrentTimestamp();
		}
		launcher_latch = StripeMeterShmem->launcher_latch;
	}
	LWLockRelease(StripeMeterShmem->lock);
	if (launcher_latch)
		SetLatch(launcher_latch);
}
