/*-------------------------------------------------------------------------
 *
 * shmem.c
 *	  The small shared state of stripe_meter: one slot per database the
 *	  launcher knows, holding its worker's latch and what the worker wants
 *	  users to see (why delivery is paused, the last error); and the
 *	  commit-time wake-up of that worker.
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
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

PG_FUNCTION_INFO_V1(stripe_meter_worker_state);
PG_FUNCTION_INFO_V1(stripe_meter_launcher_notify);

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
 * stripe_meter.worker_state(): what this database's worker publishes.
 */
Datum
stripe_meter_worker_state(PG_FUNCTION_ARGS)
{
	TupleDesc	desc;
	Datum		values[5];
	bool		nulls[5] = {true, true, true, true, true};
	DatabaseSlot *slot;

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	if (StripeMeterShmem != NULL)
	{
		LWLockAcquire(StripeMeterShmem->lock, LW_SHARED);
		slot = StripeMeterFindSlot(MyDatabaseId);
		if (slot != NULL && slot->state == SLOT_RUNNING)
		{
			values[0] = Int32GetDatum(slot->pid);
			nulls[0] = false;
			if (slot->paused[0] != '\0')
			{
				values[1] = CStringGetTextDatum(slot->paused);
				nulls[1] = false;
			}
			if (slot->last_error[0] != '\0')
			{
				values[2] = CStringGetTextDatum(slot->last_error);
				nulls[2] = false;
				values[3] = TimestampTzGetDatum(slot->last_error_at);
				nulls[3] = false;
			}
			values[4] = TimestampTzGetDatum(slot->started_at);
			nulls[4] = false;
		}
		LWLockRelease(StripeMeterShmem->lock);
	}

	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(desc, values, nulls)));
}

/*
 * stripe_meter.launcher_notify(): called by the install script, so that
 * CREATE EXTENSION gets its database a worker without a restart.  The
 * launcher is told at commit, once the extension is visible to a worker.
 */
Datum
stripe_meter_launcher_notify(PG_FUNCTION_ARGS)
{
	StripeMeterWakeAtCommit();
	PG_RETURN_VOID();
}
