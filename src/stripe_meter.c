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
#include "storage/ipc.h"

#include "stripe_meter.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

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

	StripeMeterRegisterLauncher();
}
