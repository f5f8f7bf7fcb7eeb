/*-------------------------------------------------------------------------
 *
 * shmem.c
 *	  The small shared state of stripe_meter: one slot per database the
 *	  launcher knows, holding its worker's latch and what the worker wants
 *	  users to see (why delivery is paused, the last error); and the
 *	  commit-time wake-up of that worker.  A slot's state and its changes
 *	  are slots.c's; here it is only read.
 *
 * The state exists only when the library is preloaded.  Every function
 * here copes with its absence, because enqueueing must work in a server
 * that does not preload the library at all.
 *
 * Locking: StripeMeterShmem->lock guards every slot field.  Latches are set
 * without the lock held (setting a stale latch only causes a spurious
 * wake-up).
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/shmem.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

StripeMeterShared *StripeMeterShmem = NULL;

static bool wake_armed = false;
static bool xact_callback_registered = false;

static Size
shared_size(void)
{
	return add_size(offsetof(StripeMeterShared, slots),
					mul_size(stripe_meter_max_databases, sizeof(DatabaseSlot)));
}

/*
 * StripeMeterShmemRequest
 *		shmem_request_hook: reserve our memory and our lock.
 */
void
StripeMeterShmemRequest(void)
{
	RequestAddinShmemSpace(shared_size());
	RequestNamedLWLockTranche("stripe_meter", 1);
}

/*
 * StripeMeterShmemStartup
 *		shmem_startup_hook: create or attach to the shared state.
 */
void
StripeMeterShmemStartup(void)
{
	bool		found;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	StripeMeterShmem = ShmemInitStruct("stripe_meter", shared_size(), &found);
	if (!found)
	{
		memset(StripeMeterShmem, 0, shared_size());
		StripeMeterShmem->lock = &(GetNamedLWLockTranche("stripe_meter"))->lock;
		StripeMeterShmem->nslots = stripe_meter_max_databases;
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * At commit, wake the worker of this database, or, if it has none yet, ask
 * the launcher to start one.  Nothing happens on abort: a rolled-back
 * enqueue left nothing to deliver.
 */
static void
wake_xact_callback(XactEvent event, void *arg)
{
	DatabaseSlot *slot;
	Latch	   *latch = NULL;
	bool		need_launcher = false;

	if (!wake_armed)
		return;
	if (event != XACT_EVENT_COMMIT && event != XACT_EVENT_PARALLEL_COMMIT &&
		event != XACT_EVENT_ABORT && event != XACT_EVENT_PARALLEL_ABORT &&
		event != XACT_EVENT_PREPARE)
		return;
	wake_armed = false;
	if (event != XACT_EVENT_COMMIT && event != XACT_EVENT_PARALLEL_COMMIT)
		return;
	if (StripeMeterShmem == NULL)
		return;

	LWLockAcquire(StripeMeterShmem->lock, LW_SHARED);
	slot = StripeMeterFindSlot(MyDatabaseId);
	if (slot != NULL && slot->state == SLOT_RUNNING && slot->latch != NULL)
	{
		/*
		 * A paused worker neither claims events nor looks at cancellations
		 * until a reload, which makes it look again anyway: waking it would
		 * only cost a signal per commit.  The lock orders this read after
		 * our commit and before the claim that follows an unpause.
		 */
		if (slot->paused[0] == '\0')
			latch = slot->latch;
	}
	else
		need_launcher = true;
	LWLockRelease(StripeMeterShmem->lock);

	if (latch != NULL)
		SetLatch(latch);
	else if (need_launcher)
		(void) StripeMeterNotifyLauncher(MyDatabaseId);
}

/*
 * StripeMeterWakeAtCommit
 *		Ask for this database's worker to be woken when the current
 *		transaction commits.  Cheap to call once per queued row.
 */
void
StripeMeterWakeAtCommit(void)
{
	if (StripeMeterShmem == NULL || wake_armed)
		return;
	if (!xact_callback_registered)
	{
		RegisterXactCallback(wake_xact_callback, NULL);
		xact_callback_registered = true;
	}
	wake_armed = true;
}

static void
set_slot_text(Oid dboid, bool paused, const char *text)
{
	DatabaseSlot *slot;

	if (StripeMeterShmem == NULL)
		return;
	LWLockAcquire(StripeMeterShmem->lock, LW_EXCLUSIVE);
	slot = StripeMeterFindSlot(dboid);
	if (slot != NULL)
	{
		if (paused)
			strlcpy(slot->paused, text ? text : "", WORKER_TEXT_LEN);
		else
		{
			strlcpy(slot->last_error, text ? text : "", WORKER_TEXT_LEN);
			slot->last_error_at = GetCurrentTimestamp();
		}
	}
	LWLockRelease(StripeMeterShmem->lock);
}

/*
 * StripeMeterSetPaused
 *		Publish why delivery is paused for a database; NULL when it is not.
 */
void
StripeMeterSetPaused(Oid dboid, const char *reason)
{
	set_slot_text(dboid, true, reason);
}

/*
 * StripeMeterSetLastError
 *		Publish the last delivery error of a database.
 */
void
StripeMeterSetLastError(Oid dboid, const char *error)
{
	set_slot_text(dboid, false, error);
}

/*
 * StripeMeterSetStreamAccounts
 *		Publish how many Stripe accounts the worker holds API v2 state for
 *		(sessions, batches), so that an operator sees it fall back once
 *		accounts go idle.
 */
void
StripeMeterSetStreamAccounts(Oid dboid, int n)
{
	DatabaseSlot *slot;

	if (StripeMeterShmem == NULL)
		return;
	LWLockAcquire(StripeMeterShmem->lock, LW_EXCLUSIVE);
	slot = StripeMeterFindSlot(dboid);
	if (slot != NULL)
		slot->stream_accounts = n;
	LWLockRelease(StripeMeterShmem->lock);
}

/*
 * StripeMeterReadSlot
 *		Copy what the running worker of a database publishes into *copy;
 *		false when it has none running (or the library is not preloaded).
 */
bool
StripeMeterReadSlot(Oid dboid, DatabaseSlot *copy)
{
	DatabaseSlot *slot;
	bool		running = false;

	if (StripeMeterShmem == NULL)
		return false;
	LWLockAcquire(StripeMeterShmem->lock, LW_SHARED);
	slot = StripeMeterFindSlot(dboid);
	if (slot != NULL && slot->state == SLOT_RUNNING)
	{
		*copy = *slot;
		running = true;
	}
	LWLockRelease(StripeMeterShmem->lock);
	return running;
}
