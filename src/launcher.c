/*-------------------------------------------------------------------------
 *
 * launcher.c
 *	  The launcher: one background worker per cluster that starts a
 *	  delivery worker for every database where the extension exists.
 *
 * It reads pg_database (a shared catalog, so it needs no database) every
 * stripe_meter.launcher_naptime and when told, and probes each new database
 * by starting a worker there; a worker that finds no extension exits and
 * frees its slot.  CREATE EXTENSION, and any enqueue in a database without
 * a running worker, tell the launcher at commit, so a worker starts without
 * a restart; DROP EXTENSION makes the worker exit by itself.  A worker that
 * exits for any other reason is restarted after a pause.  Both the launcher
 * and the workers start only once recovery has finished, so nothing is
 * ever sent from a standby, and delivery begins after promotion.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/launcher.c
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
#include "storage/proc.h"
#include "tcop/tcopprot.h"

/* what this one needs */
#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_database.h"
#include "pgstat.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

/* launcher-local: the databases already seen, and the workers' handles */
typedef struct KnownDatabase
{
	Oid			dboid;
	bool		seen;			/* in the latest scan */
	bool		needs_slot;		/* found while every slot was taken */
} KnownDatabase;

static HTAB *known_databases;
static BackgroundWorkerHandle **handles;	/* by slot index */

/*
 * StripeMeterRegisterLauncher
 *		Register the launcher; called from _PG_init while preloading.
 */
void
StripeMeterRegisterLauncher(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 5;
	strlcpy(worker.bgw_library_name, "stripe_meter", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "StripeMeterLauncherMain", BGW_MAXLEN);
	strlcpy(worker.bgw_name, "stripe_meter launcher", BGW_MAXLEN);
	strlcpy(worker.bgw_type, "stripe_meter launcher", BGW_MAXLEN);
	RegisterBackgroundWorker(&worker);
}

/*
 * Register a delivery worker for the database of slot i (slots.c calls
 * this, the lock held).  Returns false when it could not.
 */
static bool
start_worker(int i, Oid dboid)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	/* on 19, DROP DATABASE and its kin stop the worker instead of failing */
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION |
		WORKER_STOPPED_BY_DATABASE_COMMANDS;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	strlcpy(worker.bgw_library_name, "stripe_meter", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "StripeMeterWorkerMain", BGW_MAXLEN);
	snprintf(worker.bgw_name, BGW_MAXLEN, "stripe_meter worker for database %u",
			 dboid);
	strlcpy(worker.bgw_type, "stripe_meter worker", BGW_MAXLEN);
	worker.bgw_main_arg = ObjectIdGetDatum(dboid);
	worker.bgw_notify_pid = MyProcPid;

	if (handles[i] != NULL)
		pfree(handles[i]);
	handles[i] = NULL;
	if (!RegisterDynamicBackgroundWorker(&worker, &handles[i]))
	{
		ereport(WARNING,
				(errcode(ERRCODE_INSUFFICIENT_RESOURCES),
				 errmsg("could not start a stripe_meter worker for database %u",
						dboid),
				 errhint("Raise max_worker_processes: each database with stripe_meter needs a worker.")));
		return false;
	}
	return true;
}

/*
 * Whether the worker registered for slot i has stopped, in *gone; false
 * when this launcher did not register it (an earlier launcher did).
 */
static bool
watch_worker(int i, bool *gone)
{
	pid_t		pid;

	if (handles[i] == NULL)
		return false;
	*gone = (GetBackgroundWorkerPid(handles[i], &pid) == BGWH_STOPPED);
	return true;
}

static const SlotLauncher slot_launcher = {
	.start = start_worker,
	.watch = watch_worker,
};

/* seen by the latest scan of pg_database */
static bool
database_known(Oid dboid)
{
	return hash_search(known_databases, &dboid, HASH_FIND, NULL) != NULL;
}

/* read pg_database and ask for a probe of every database not seen before */
static void
scan_databases(void)
{
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tup;
	HASH_SEQ_STATUS seq;
	KnownDatabase *db;
	MemoryContext cxt = CurrentMemoryContext;

	hash_seq_init(&seq, known_databases);
	while ((db = hash_seq_search(&seq)) != NULL)
		db->seen = false;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while ((tup = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		Form_pg_database form = (Form_pg_database) GETSTRUCT(tup);
		bool		found;

		if (!form->datallowconn || form->datistemplate ||
			database_is_invalid_form(form))
			continue;
		db = hash_search(known_databases, &form->oid, HASH_ENTER, &found);
		db->seen = true;
		if (!found || db->needs_slot)
		{
			bool		warned = found && db->needs_slot;

			db->needs_slot = !StripeMeterNotifyLauncher(form->oid);
			if (db->needs_slot && !warned)
				ereport(WARNING,
						(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
						 errmsg("stripe_meter cannot serve database \"%s\": all %d database slots are in use",
								NameStr(form->datname), StripeMeterShmem->nslots),
						 errhint("Raise stripe_meter.max_databases (needs a restart).")));
		}
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(cxt);

	/* forget databases that are gone */
	hash_seq_init(&seq, known_databases);
	while ((db = hash_seq_search(&seq)) != NULL)
	{
		if (!db->seen)
			hash_search(known_databases, &db->dboid, HASH_REMOVE, NULL);
	}

	/* and the slots of databases that are gone */
	SlotsForgetGone(database_known);
}

/*
 * StripeMeterLauncherMain
 *		Entry point of the launcher.
 */
void
StripeMeterLauncherMain(Datum main_arg)
{
	HASHCTL		ctl;
	MemoryContext cxt;
	TimestampTz next_scan = 0;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	/* no database: pg_database is a shared catalog */
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	pgstat_report_appname("stripe_meter launcher");

	cxt = AllocSetContextCreate(TopMemoryContext, "stripe_meter launcher",
								ALLOCSET_DEFAULT_SIZES);
	MemoryContextSwitchTo(cxt);
	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(Oid);
	ctl.entrysize = sizeof(KnownDatabase);
	ctl.hcxt = cxt;
	known_databases = hash_create("stripe_meter databases", 64, &ctl,
								  HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	handles = palloc0(sizeof(BackgroundWorkerHandle *) * StripeMeterShmem->nslots);

	LWLockAcquire(StripeMeterShmem->lock, LW_EXCLUSIVE);
	StripeMeterShmem->launcher_latch = MyLatch;
	StripeMeterShmem->launcher_pid = MyProcPid;
	LWLockRelease(StripeMeterShmem->lock);

	for (;;)
	{
		long		timeout;
		long		restart_ms;
		TimestampTz now;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		now = GetCurrentTimestamp();
		if (now >= next_scan)
		{
			pgstat_report_activity(STATE_RUNNING, "looking for databases");
			scan_databases();
			next_scan = TimestampTzPlusMilliseconds(now, stripe_meter_launcher_naptime);
			pgstat_report_activity(STATE_IDLE, NULL);
		}
		restart_ms = SlotsTend(&slot_launcher);

		timeout = stripe_meter_launcher_naptime;
		if (restart_ms >= 0 && restart_ms < timeout)
			timeout = restart_ms;

		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 timeout, StripeMeterWaitEvent(SM_WAIT_LAUNCHER));
		ResetLatch(MyLatch);
	}
}
