/*-------------------------------------------------------------------------
 *
 * meter_sync.c
 *	  Meters from Stripe: stripe_meter_sync_meters() reads every meter of
 *	  the account (GET /v1/billing/meters, page by page) into
 *	  stripe_meter.meters, so that validation uses the account's real
 *	  payload keys; and once meters are synced, enqueueing an event for an
 *	  unknown or inactive meter is refused (or warned about, as
 *	  stripe_meter.unknown_meter says).
 *
 * All pages are read before the table is touched, so a failure part-way
 * leaves the previous contents.  A sync replaces the table: meters Stripe
 * no longer has, and rows entered by hand, are removed.  Meters belong to
 * the account the API key belongs to; events for a connected account
 * (stripe_account) are not checked against them.  The SQL is in
 * store_meters.c, the SQL-callable entry point in sql_functions.c.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/meter_sync.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "nodes/pg_list.h"
#include "storage/lmgr.h"
#include "storage/lock.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"

#include "stripe_meter.h"

#define METERS_PATH			"/v1/billing/meters?limit=100"
#define MAX_PAGES			1000


/* the path of the page after the meter with id after (NULL: the first) */
static char *
page_path(const char *after)
{
	StringInfoData path;

	initStringInfo(&path);
	appendStringInfoString(&path, METERS_PATH);
	if (after)
	{
		appendStringInfoString(&path, "&starting_after=");
		StripeClientAppendEscaped(&path, after, strlen(after));
	}
	return path.data;
}

/*
 * Read every page, in a backend: an HTTP failure raises an ERROR.
 */
static List *
fetch_pages(void)
{
	List	   *pages = NIL;
	char	   *after = NULL;
	int			i;

	for (i = 0; i < MAX_PAGES; i++)
	{
		char	   *body = StripeClientGetJson(page_path(after), NULL);
		bool		has_more;

		if (!ListPageNext(body, strlen(body), &has_more, &after))
			ereport(ERROR,
					(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
					 errmsg("Stripe's list of meters could not be read")));
		pages = lappend(pages, body);
		if (!has_more)
			return pages;
	}
	ereport(ERROR,
			(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
			 errmsg("Stripe's list of meters has more than %d pages", MAX_PAGES)));
	return NIL;					/* keep compiler quiet */
}

/*
 * One sync of a database's meters at a time, until the end of the syncing
 * transaction.  The lock's tag has a form no SQL function makes (the
 * advisory lock functions put 1 or 2 in its last field), so only a sync can
 * hold it, never a session's pg_advisory_lock().  Returns false when it is
 * held and the caller would not wait.
 */
static bool
lock_meter_sync(bool wait)
{
	LOCKTAG		tag;

	SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, 0x53544d57, 3, 9);
	return LockAcquire(&tag, ExclusiveLock, false, !wait) != LOCKACQUIRE_NOT_AVAIL;
}

/*
 * MeterSyncNow
 *		stripe_meter_sync_meters(): sync in the caller's transaction, waiting
 *		for any other sync.  Returns how many meters the table holds.
 */
int
MeterSyncNow(void)
{
	List	   *pages = fetch_pages();

	(void) lock_meter_sync(true);
	return StoreMetersReplace(pages);
}

/*
 * The worker's scheduled sync: the pages are read one after the other on
 * the worker's HTTP client, with no transaction open, then applied in one
 * transaction.  A failure is logged and kept in sync_state.meters_sync_error.
 */
LifecycleCalls MeterSyncCalls;
static List *run_pages;			/* in MeterSyncCalls.cxt */

static bool
request_page(const char *after)
{
	StripeRequestSpec spec = {0};

	spec.path = MemoryContextStrdup(MeterSyncCalls.cxt, page_path(after));
	return LifecycleCallStart(&MeterSyncCalls, &spec, NULL);
}

/* the run is over: apply the pages, or record why not */
static bool
end_run(const char *error)
{
	if (DeliveryStoreBegin())
	{
		/*
		 * A sync that a session runs holds the lock, and the rows it wrote,
		 * until that session's transaction ends: never wait for it.
		 */
		if (!lock_meter_sync(false))
			StripeMeterSetLastError(MyDatabaseId,
									"the scheduled meter sync was skipped: another transaction is syncing meters (stripe_meter_sync_meters() in a transaction still open); it runs again at the next interval");
		else if (error == NULL)
			(void) StoreMetersReplace(run_pages);
		else
		{
			ereport(LOG,
					(errmsg("stripe_meter could not sync meters: %s", error)));
			StoreMetersSyncError(error);
		}
		DeliveryStoreCommit();
	}
	run_pages = NIL;
	LifecycleCallsEnd(&MeterSyncCalls);
	return false;
}

/*
 * MeterSyncRunStart
 *		Ask for the first page.
 */
bool
MeterSyncRunStart(void)
{
	run_pages = NIL;
	return request_page(NULL) || end_run("the HTTP client refused the request");
}

/*
 * MeterSyncRunAdvance
 *		Keep the page that arrived and ask for the next, or apply them all.
 */
bool
MeterSyncRunAdvance(void)
{
	LifecycleAnswer *answer = LifecycleCallNextAnswer(&MeterSyncCalls);
	HttpResult *http;
	bool		has_more;
	char	   *after = NULL;
	MemoryContext old;

	if (answer == NULL)
		return true;
	http = answer->http;
	if (http->transport_code != 0 || http->status != 200)
		return end_run(StripeFailureText(http));
	if (!ListPageNext(http->body, http->body_len, &has_more, &after))
		return end_run("Stripe's list of meters could not be read");
	old = MemoryContextSwitchTo(MeterSyncCalls.cxt);
	run_pages = lappend(run_pages, (char *) http->body);
	MemoryContextSwitchTo(old);
	if (!has_more)
		return end_run(NULL);
	if (list_length(run_pages) >= MAX_PAGES)
		return end_run("too many pages of meters");
	return request_page(after) || end_run("the HTTP client refused the request");
}

/*
 * MeterSyncCheckEnqueue
 *		Once meters are synced, refuse (or warn about) an event whose name
 *		has no meter, or whose meter is inactive.  meter is the event name's
 *		row in stripe_meter.meters (store_probe.c).
 */
void
MeterSyncCheckEnqueue(const char *event_name, const EnqueueMeter *meter,
					  const char *stripe_account)
{
	char	   *status = meter->status;
	bool		known = meter->found;
	int			level = stripe_meter_unknown_meter == UNKNOWN_METER_WARNING ? WARNING : ERROR;

	/* a connected account has its own meters, which are not mirrored */
	if (stripe_account != NULL)
		return;
	/* an active meter passes whether or not meters were synced */
	if (known && (status == NULL || strcmp(status, "inactive") != 0))
		return;
	if (!StoreProbeMetersSynced())
		return;					/* never synced: nothing to check against */
	if (!known)
		ereport(level,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("no meter for event name \"%s\"", event_name),
				 errdetail("The Stripe account has no meter with this event name (as of the last stripe_meter_sync_meters()), so Stripe would not bill the event."),
				 errhint("Create the meter in Stripe and run stripe_meter_sync_meters().")));
	else if (status != NULL && strcmp(status, "inactive") == 0)
		ereport(level,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("the meter for event name \"%s\" is inactive", event_name),
				 errdetail("Stripe refuses events for an inactive meter."),
				 errhint("Reactivate the meter in Stripe and run stripe_meter_sync_meters().")));
}
