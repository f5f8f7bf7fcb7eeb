/*-------------------------------------------------------------------------
 *
 * stripe_meter.c
 *	  Module entry: settings always; shared memory and the launcher only
 *	  when the library is preloaded.
 *
 * Enqueueing needs neither, so CREATE EXTENSION and every enqueue path work
 * in a server that does not preload the library; only delivery does.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/stripe_meter.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "storage/ipc.h"
#include "tcop/utility.h"

#include "stripe_meter.h"

/* 18 and later: pg_get_loaded_modules() shows the name and version */
#ifdef PG_MODULE_MAGIC_EXT
PG_MODULE_MAGIC_EXT(.name = "stripe_meter",.version = STRIPE_METER_VERSION);
#else
PG_MODULE_MAGIC;
#endif

void		_PG_init(void);

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;
static ProcessUtility_hook_type prev_process_utility_hook = NULL;

static void
shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	StripeMeterShmemRequest();
}

static void
shmem_startup(void)
{
	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	StripeMeterShmemStartup();
}

/*
 * Events queued in a prepared transaction become visible only at COMMIT
 * PREPARED, possibly in another session, whose commit wakes the worker.
 */
static void
process_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
				ProcessUtilityContext context, ParamListInfo params,
				QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *tree = pstmt->utilityStmt;

	if (IsA(tree, TransactionStmt) &&
		((TransactionStmt *) tree)->kind == TRANS_STMT_COMMIT_PREPARED)
		StripeMeterWakeAtCommit();

	if (prev_process_utility_hook)
		prev_process_utility_hook(pstmt, queryString, readOnlyTree, context,
								  params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context,
								params, queryEnv, dest, qc);
}

void
_PG_init(void)
{
	StripeMeterDefineSettings();

	/* nothing runs during pg_upgrade, and delivery needs preloading */
	if (IsBinaryUpgrade || !process_shared_preload_libraries_in_progress)
		return;

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = shmem_startup;
	prev_process_utility_hook = ProcessUtility_hook;
	ProcessUtility_hook = process_utility;

	StripeMeterRegisterLauncher();
}
