/*-------------------------------------------------------------------------
 *
 * async_errors.c
 *	  Errors Stripe reports only after accepting an event: the worker pulls
 *	  v1.billing.meter.error_report_triggered and
 *	  v1.billing.meter.no_meter_found from the v2 Events API
 *	  (GET /v2/core/events), keeps each in stripe_meter.error_reports, and
 *	  marks the delivered events its sample errors name with the code and
 *	  message, so that a query on meter_events (and status.not_billed)
 *	  shows what Stripe will not bill.
 *
 * Stripe's reports carry sample errors, not every failed identifier: the
 * report's error_count says how many events it covers.  Reading resumes
 * from the newest report seen, with an overlap (reports are deduplicated
 * by id), and moves on only after every page was read.  Connected
 * accounts' reports are read with Stripe-Context, for each account that
 * was billed in the last three days.  The SQL is in store_errors.c.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/async_errors.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "nodes/pg_list.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"

#include "stripe_meter.h"

#define EVENTS_PATH		"/v2/core/events"
#define EVENT_TYPES		"types=v1.billing.meter.error_report_triggered&types=v1.billing.meter.no_meter_found"
#define MAX_PAGES		100
#define CURSOR_OVERLAP_SECS 600
#define MAX_ACCOUNTS	100		/* connected accounts read per turn */

/* next_page_url of a v2 list page, if it stays on the events endpoint */
static char *
next_page(const StripeResponse *page)
{
	const char *url = page->next_page_url;

	/* a path on the same host only: never follow a URL elsewhere */
	if (url == NULL || strncmp(url, EVENTS_PATH "?", strlen(EVENTS_PATH "?")) != 0)
		return NULL;
	return pstrdup(url);
}

typedef struct AccountRead
{
	char	   *account;		/* NULL: the key's own account */
	char	   *cursor;			/* RFC 3339, or NULL: from the start */
	List	   *pages;
} AccountRead;

/* the accounts to read: the key's own, and connected ones billed lately */
static List *
accounts_to_read(MemoryContext mine)
{
	List	   *reads = NIL;
	ListCell   *lc;

	foreach(lc, StoreErrorsAccounts(CURSOR_OVERLAP_SECS, MAX_ACCOUNTS, mine))
	{
		ErrorReportAccount *a = lfirst(lc);
		AccountRead *r = MemoryContextAllocZero(mine, sizeof(AccountRead));
		MemoryContext old;

		r->account = a->account;
		r->cursor = a->cursor;
		old = MemoryContextSwitchTo(mine);	/* outlives the transaction */
		reads = lappend(reads, r);
		MemoryContextSwitchTo(old);
	}
	return reads;
}

/* read every page of one account's reports; NULL, or why not */
static char *
read_account(AccountRead *r)
{
	char	   *path;
	int			i;

	path = r->cursor ?
		psprintf("%s?%s&limit=100&created%%5Bgt%%5D=%s", EVENTS_PATH, EVENT_TYPES, r->cursor) :
		psprintf("%s?%s&limit=100", EVENTS_PATH, EVENT_TYPES);
	for (i = 0; path != NULL && i < MAX_PAGES; i++)
	{
		HttpResult	http;
		StripeResponse page;

		if (!StripeSyncRequest("GET", path, NULL, NULL, r->account, &http) ||
			http.curl_code != 0 || http.status != 200)
			return StripeSyncErrorText(&http);
		StripeReadAnswer(&http, &page);
		if (!page.valid)
			return "Stripe's list of events could not be read";
		r->pages = lappend(r->pages, pnstrdup(http.body, http.body_len));
		path = next_page(&page);
	}
	return NULL;
}

/*
 * AsyncErrorsPull
 *		Read new error reports and mark the events they name: for the key's
 *		own account, and for each connected account billed in the last three
 *		days (with Stripe-Context).  Called by the worker with no
 *		transaction open; every page is read before anything is stored.
 */
void
AsyncErrorsPull(void)
{
	MemoryContext mine = CurrentMemoryContext;
	List	   *reads;
	char	   *error = NULL;
	ListCell   *lc;

	if (!DeliveryStoreBegin())
		return;
	reads = accounts_to_read(mine);
	DeliveryStoreCommit();
	MemoryContextSwitchTo(mine);

	foreach(lc, reads)
	{
		AccountRead *r = lfirst(lc);
		char	   *e = read_account(r);

		if (e != NULL)
		{
			/* the others are still read; this one is tried again next time */
			error = r->account ? psprintf("%s (account %s)", e, r->account) : e;
			list_free(r->pages);
			r->pages = NIL;
		}
	}

	if (!DeliveryStoreBegin())
		return;
	foreach(lc, reads)
	{
		AccountRead *r = lfirst(lc);
		ListCell   *pc;

		foreach(pc, r->pages)
			StoreErrorsApplyPage((char *) lfirst(pc), r->account);
	}
	if (error != NULL)
		ereport(LOG,
				(errmsg("stripe_meter could not read Stripe's error reports: %s", error)));
	StoreErrorsRecordRead(error);
	DeliveryStoreCommit();
	MemoryContextSwitchTo(mine);
}
