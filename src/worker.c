/*-------------------------------------------------------------------------
 *
 * worker.c
 *	  The delivery worker of one database, as a process: start, signals,
 *	  the repair of an earlier worker's claims, the loop that drives the
 *	  scheduler and the lifecycle work, and exit.
 *
 * The delivery guarantee: every event queued is delivered to Stripe, and
 * none is billed twice.  How:
 *	- a claim (in flight, attempt counted) commits before its events are
 *	  sent, and an event leaves the outbox only in the transaction that
 *	  records Stripe's answer; a crash anywhere leaves it queued;
 *	- every attempt of an event carries the same identifier and
 *	  Idempotency-Key, so a resend whose first answer was lost is replayed
 *	  by Stripe, and one whose key Stripe forgot is refused as a duplicate
 *	  identifier (recorded as delivered);
 *	- an event whose first unanswered attempt is older than
 *	  stripe_meter.resend_window is failed, not resent, because past
 *	  Stripe's ~24 h windows a resend would be billed again.
 * Never two requests are in flight for the same (account, event name,
 * customer): Stripe allows one concurrent call per customer and meter.
 *
 * Who does what: scheduler.c moves claimed events from claim to record;
 * the sender picked here at start puts them on the wire (v1_sender.c, or
 * v2_stream.c for stripe_meter.api_version = v2); pauses.c holds what stops
 * delivery; delivery_store.c is the SQL.  stripe_meter.api_version is read
 * here alone: a change makes the worker finish what it holds and exit, and
 * the launcher starts a new one with the other sender.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/worker.c
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
#include "storage/lmgr.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"

/* what this one needs */
#include "access/xact.h"
#include "access/xlog.h"
#include "commands/extension.h"
#include "pgstat.h"
#include "utils/backend_status.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

#define PURGE_INTERVAL_MS	60000
#define ROLLUP_ERROR_RETRY_MS 60000 /* after a rollup pass failed */
#define REPAIR_RETRY_MS		1000	/* retry repairing rows another session locks */
#define WORKER_LOCK_TIMEOUT "50"	/* ms: the longest the worker waits for a lock */

static bool extension_dropped(void);

static TimestampTz next_purge_at = 0;
static TimestampTz next_rollup_at = 0;	/* when to look for closed windows */
static bool extension_absent = false;	/* exit frees the slot for good */
static const Sender *sender;	/* for stripe_meter.api_version at start */
static bool api_switch_pending = false; /* it changed: drain, then exit */
static bool lifecycle_woken = true;
static long lifecycle_wait = 0;
static TimestampTz repair_before;	/* claims older than this worker */
static int64 repair_left = 0;	/* of those, locked by another transaction */
static TimestampTz next_repair_at = 0;

/*
 * WorkerBegin
 *		Start a store transaction (DeliveryStoreBegin); when the extension
 *		is gone from the database, exit for good instead, saying so in the
 *		log when asked.
 */
void
WorkerBegin(bool say_stopping)
{
	if (DeliveryStoreBegin())
		return;
	if (say_stopping)
		ereport(LOG,
				(errmsg("stripe_meter worker is stopping: the extension was dropped from this database")));
	extension_absent = true;
	proc_exit(0);
}

/*
 * After a new library is installed and the server restarted, the database
 * keeps the old version's tables until ALTER EXTENSION stripe_meter UPDATE:
 * deliver nothing until then, since this code reads and writes the new
 * version's columns.  Enqueueing keeps working meanwhile.
 */
static void
wait_for_schema_update(void)
{
	bool		told = false;

	for (;;)
	{
		char		version[NAMEDATALEN];

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		if (!DeliveryStoreExtensionVersion(version, sizeof(version)))
		{
			extension_absent = true;
			proc_exit(0);
		}
		if (strcmp(version, STRIPE_METER_VERSION) == 0)
			break;
		if (!told)
		{
			char		reason[WORKER_TEXT_LEN];

			snprintf(reason, sizeof(reason),
					 "the extension in this database is version %s but the library is %s: run ALTER EXTENSION stripe_meter UPDATE",
					 version, STRIPE_METER_VERSION);
			PauseDelivery(reason);
			told = true;
		}
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 stripe_meter_naptime, StripeMeterWaitEvent(SM_WAIT_PAUSED));
		ResetLatch(MyLatch);
	}
	if (told)
		ereport(LOG,
				(errmsg("stripe_meter worker found the extension updated to version %s",
						STRIPE_METER_VERSION)));
}

/*
 * Once a minute, or at the next pass while a purge finds a full batch, so
 * that purging keeps pace with any delivery rate.
 */
static void
purge_if_due(TimestampTz now)
{
	int64		purged;

	if (now < next_purge_at)
		return;
	next_purge_at = TimestampTzPlusMilliseconds(now, PURGE_INTERVAL_MS);
	WorkerBegin(false);
	purged = DeliveryStorePurgeDelivered();
	DeliveryStoreCommit();
	if (purged >= PURGE_BATCH)
		next_purge_at = now;
}

/*
 * Roll up the windows that have closed (rollup.c), when one may have.  A
 * failure to roll up must not stop delivery: it is logged and shown in
 * status, and tried again a minute later.
 */
static void
rollup_if_due(TimestampTz now)
{
	MemoryContext cxt = CurrentMemoryContext;
	bool		formed = false;

	if (now < next_rollup_at)
		return;
	PG_TRY();
	{
		next_rollup_at = RollupFormDue(now, &formed);
	}
	PG_CATCH();
	{
		ErrorData  *edata;
		char		text[WORKER_TEXT_LEN];

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		/* DROP EXTENSION met mid-pass: the main loop stops, saying so */
		if (extension_dropped())
			ReThrowError(edata);
		snprintf(text, sizeof(text), "could not roll up meter events: %s", edata->message);
		StripeMeterSetLastError(MyDatabaseId, text);
		if (edata->sqlerrcode != ERRCODE_LOCK_NOT_AVAILABLE)
			ereport(LOG,
					(errmsg("stripe_meter worker could not roll up meter events: %s",
							edata->message),
					 errdetail("Delivery goes on; rolling up is tried again in a minute.")));
		next_rollup_at = TimestampTzPlusMilliseconds(now, ROLLUP_ERROR_RETRY_MS);
		FreeErrorData(edata);
	}
	PG_END_TRY();
	if (formed)
		SchedulerWake();
}

/* the slot goes back to the launcher when this process exits */
static void
worker_exit_callback(int code, Datum arg)
{
	SlotLeaveByWorker(extension_absent);
}

static void
report_activity(void)
{
	static char shown[128];
	static TimestampTz shown_at = 0;
	char		now_text[128];
	TimestampTz now = GetCurrentTimestamp();
	int			inf = StripeClientInFlight();
	const char *paused = PauseReason();
	int			held;
	int			ready;
	bool		idle;

	SchedulerCounts(&held, &ready);
	idle = (inf == 0 && held == 0) || paused != NULL;
	if (paused != NULL)
		snprintf(now_text, sizeof(now_text), "paused: %s", paused);
	else if (idle)
		strlcpy(now_text, "waiting for meter events", sizeof(now_text));
	else
		snprintf(now_text, sizeof(now_text),
				 "delivering meter events: %d in flight, %d ready", inf, ready);

	/* at most once a second while busy, but always when going idle */
	if (strcmp(now_text, shown) == 0 ||
		(!idle && !TimestampDifferenceExceeds(shown_at, now, 1000)))
		return;
	strlcpy(shown, now_text, sizeof(shown));
	shown_at = now;
	pgstat_report_activity(idle ? STATE_IDLE : STATE_RUNNING, shown);
}

/* in a transaction of its own: is the extension gone from this database? */
static bool
extension_dropped(void)
{
	bool		gone;

	StartTransactionCommand();
	gone = !OidIsValid(get_extension_oid("stripe_meter", true));
	CommitTransactionCommand();
	return gone;
}

/*
 * A statement found one of the extension's tables gone, yet the extension
 * is still there: DROP EXTENSION may be on its way.  Look again for a
 * moment before taking the error for a failure (which restarts the worker).
 */
static bool
extension_dropped_soon(void)
{
	int			i;

	for (i = 0; i < 10; i++)
	{
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 50, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		if (extension_dropped())
			return true;
	}
	return false;
}

/*
 * One turn of the delivery loop: read a reload, repair what is left to
 * repair, let the scheduler claim, send and record, run the lifecycle
 * work, then wait for the latch, a socket or a timeout.
 */
static void
delivery_pass(void)
{
	TimestampTz now;
	long		timeout;
	StripeMeterWait wait;
	bool		latch_set;

	CHECK_FOR_INTERRUPTS();
	if (ConfigReloadPending)
	{
		ConfigReloadPending = false;
		ProcessConfigFile(PGC_SIGHUP);
		StripeClientSettingsChanged();
		/* a reload is how a key or URL problem gets fixed: try again */
		PauseForSettings();
		PauseAccountsResumeAll();
		UnreachableRetryNow();
		SchedulerWake();
		if (stripe_meter_api_version != sender->api_version && !api_switch_pending)
		{
			api_switch_pending = true;
			ereport(LOG,
					(errmsg("stripe_meter worker restarts to apply stripe_meter.api_version = %s",
							stripe_meter_api_version == STRIPE_API_V2 ? "v2" : "v1"),
					 errdetail("Events already claimed are delivered first.")));
		}
	}

	/* a new API: finish what is claimed, then let a new worker start */
	if (api_switch_pending && SchedulerDrained())
		proc_exit(1);

	now = GetCurrentTimestamp();
	RateLimiterTick(now);

	/* claims of an earlier worker whose rows were locked at the start */
	if (repair_left > 0 && now >= next_repair_at)
	{
		next_repair_at = TimestampTzPlusMilliseconds(now, REPAIR_RETRY_MS);
		WorkerBegin(false);
		repair_left = DeliveryStoreRepair(repair_before);
		DeliveryStoreCommit();
		if (repair_left > 0)
		{
			char		text[WORKER_TEXT_LEN];

			snprintf(text, sizeof(text),
					 "%lld events claimed before a restart wait to go back to the queue: another transaction holds their outbox rows",
					 (long long) repair_left);
			StripeMeterSetLastError(MyDatabaseId, text);
		}
	}

	if (!SchedulerTurn(now, api_switch_pending))
		return;

	/* paused (stripe_meter.enabled off, a bad key): events stay as they are */
	if (PauseReason() == NULL)
		rollup_if_due(now);
	purge_if_due(now);
	/* lifecycle.c: cancellations, meter sync, error reports */
	lifecycle_wait = LifecycleWorkerTick(PauseReason() != NULL, lifecycle_woken);
	lifecycle_woken = false;
	report_activity();

	timeout = SchedulerTimeout(&wait);
	if (timeout < 0 || lifecycle_wait < timeout)
		timeout = lifecycle_wait;
	/* a purge that found a full batch goes on at once */
	if (next_purge_at <= now)
		timeout = 0;
	/*
	 * and windows close on time (rounded up: not a pass too early); while
	 * paused no pass runs, and the end of the pause wakes the loop
	 */
	if (timeout != 0 && PauseReason() == NULL)
	{
		long		rollup_wait = TimestampDifferenceMilliseconds(GetCurrentTimestamp(),
																  next_rollup_at) + 1;

		if (timeout < 0 || rollup_wait < timeout)
			timeout = rollup_wait;
	}
	latch_set = StripeClientWait(timeout, StripeMeterWaitEvent(wait));
	if (latch_set)
	{
		SchedulerWake();
		lifecycle_woken = true;
	}
}

/*
 * A pass stopped at a lock that another transaction holds: its work is
 * skipped, and done in a later pass.
 */
static void
skipped_for_lock(ErrorData *edata)
{
	char		text[WORKER_TEXT_LEN];

	snprintf(text, sizeof(text),
			 "skipped for now, waiting for no one: %s (another transaction holds a lock on the extension's tables)",
			 edata->message ? edata->message : "lock not available");
	StripeMeterSetLastError(MyDatabaseId, text);
	ereport(DEBUG1, (errmsg_internal("stripe_meter worker: %s", text)));
}

/*
 * StripeMeterWorkerMain
 *		Entry point of a database's delivery worker (main_arg: its OID).
 */
void
StripeMeterWorkerMain(Datum main_arg)
{
	Oid			dboid = DatumGetObjectId(main_arg);
	MemoryContext worker_cxt;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	before_shmem_exit(worker_exit_callback, (Datum) 0);
	BackgroundWorkerInitializeConnectionByOid(dboid, InvalidOid, 0);
	pgstat_report_appname("stripe_meter worker");

	/* every name in our SQL is qualified; leave nothing to a user's schema */
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_OVERRIDE);
	/* never wait long for a lock a session holds (see the loop below) */
	SetConfigOption("lock_timeout", WORKER_LOCK_TIMEOUT, PGC_SUSET, PGC_S_OVERRIDE);

	worker_cxt = AllocSetContextCreate(TopMemoryContext, "stripe_meter worker",
									   ALLOCSET_DEFAULT_SIZES);
	MemoryContextSwitchTo(worker_cxt);

	/* never send from a standby; the launcher starts us after promotion */
	if (RecoveryInProgress())
		proc_exit(1);

	WorkerBegin(false);
	DeliveryStoreCommit();

	/* this process alone serves the database, whatever a session does */
	if (!SlotTakeForWorker())
	{
		ereport(LOG,
				(errmsg("stripe_meter worker for database %u exits: another worker serves it",
						dboid)));
		extension_absent = true;
		proc_exit(0);
	}

	wait_for_schema_update();

	WorkerBegin(false);
	repair_before = GetCurrentTimestamp();
	repair_left = DeliveryStoreRepair(repair_before);
	LifecycleWorkerRepair();	/* lifecycle.c: claimed cancellations */
	DeliveryStoreCommit();

	StripeClientInit();
	StripeClientSettingsChanged();

	/* read once: a change needs a new worker (see the reload above) */
	sender = (stripe_meter_api_version == STRIPE_API_V2) ? &V2Sender : &V1Sender;
	SchedulerInit(worker_cxt, sender);
	RateLimiterInit(worker_cxt);

	ereport(LOG,
			(errmsg("stripe_meter worker started delivering to %s",
					sender->destination())));
	PauseForSettings();

	/*
	 * An ERROR in a pass ends the worker (the launcher starts another),
	 * with two exceptions.  DROP EXTENSION can commit between a
	 * transaction's check that the extension exists and its first
	 * statement, which then fails: stop as quietly as when the drop is seen
	 * first.  And a lock another transaction holds (lock_timeout, set
	 * below) skips that work for this pass, said in status.last_error,
	 * instead of stalling delivery behind that transaction.
	 */
	for (;;)
	{
		PG_TRY();
		{
			delivery_pass();
		}
		PG_CATCH();
		{
			ErrorData  *edata;

			MemoryContextSwitchTo(worker_cxt);
			edata = CopyErrorData();
			FlushErrorState();
			AbortCurrentTransaction();
			if (extension_dropped() ||
				(edata->sqlerrcode == ERRCODE_UNDEFINED_TABLE && extension_dropped_soon()))
			{
				ereport(LOG,
						(errmsg("stripe_meter worker is stopping: the extension was dropped from this database")));
				extension_absent = true;
				proc_exit(0);
			}
			if (edata->sqlerrcode != ERRCODE_LOCK_NOT_AVAILABLE)
				ReThrowError(edata);
			skipped_for_lock(edata);
			FreeErrorData(edata);
		}
		PG_END_TRY();
	}
}
