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
#include "utils/memutils.h"

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
	int			npages;
	char	   *error;			/* why its reports could not be read */
} AccountRead;

/*
 * The worker's run: every account's pages are read on the worker's HTTP
 * client, a few accounts at a time and each account's pages one after the
 * other, with no transaction open; then everything is stored in one
 * transaction.  All of it lives in AsyncErrorsCalls.cxt until the run ends.
 */
LifecycleCalls AsyncErrorsCalls;
static List *run_reads;			/* AccountRead * */
static int	run_next_account;	/* the next to start reading */

#define ACCOUNTS_AT_ONCE	8	/* accounts read side by side */

/* ask for one page of an account's reports: path NULL is the first page */
static bool
request_page(AccountRead *r, char *path)
{
	StripeRequestSpec spec = {0};

	if (path == NULL)
		path = r->cursor ?
			psprintf("%s?%s&limit=100&created%%5Bgt%%5D=%s", EVENTS_PATH, EVENT_TYPES, r->cursor) :
			psprintf("%s?%s&limit=100", EVENTS_PATH, EVENT_TYPES);
	spec.path = MemoryContextStrdup(AsyncErrorsCalls.cxt, path);
	spec.stripe_account = r->account;
	spec.stripe_context = true;
	if (LifecycleCallStart(&AsyncErrorsCalls, &spec, r))
		return true;
	r->error = "the HTTP client refused the request";
	return false;
}

/* start reading more accounts, up to ACCOUNTS_AT_ONCE in flight */
static void
start_accounts(void)
{
	while (AsyncErrorsCalls.in_flight < ACCOUNTS_AT_ONCE &&
		   run_next_account < list_length(run_reads))
		(void) request_page(list_nth(run_reads, run_next_account++), NULL);
}

/* every account read: store what was read, note what was not */
static bool
end_run(void)
{
	char	   *error = NULL;
	ListCell   *lc;

	foreach(lc, run_reads)
	{
		AccountRead *r = lfirst(lc);

		/* the others are still stored; this one is read again next time */
		if (r->error != NULL)
			error = r->account ? psprintf("%s (account %s)", r->error, r->account) :
				r->error;
	}
	if (DeliveryStoreBegin())
	{
		foreach(lc, run_reads)
		{
			AccountRead *r = lfirst(lc);
			ListCell   *pc;

			if (r->error != NULL)
				continue;
			foreach(pc, r->pages)
				StoreErrorsApplyPage((char *) lfirst(pc), r->account);
		}
		if (error != NULL)
			ereport(LOG,
					(errmsg("stripe_meter could not read Stripe's error reports: %s", error)));
		StoreErrorsRecordRead(error);
		DeliveryStoreCommit();
	}
	run_reads = NIL;
	LifecycleCallsEnd(&AsyncErrorsCalls);
	return false;
}

/*
 * AsyncErrorsRunStart
 *		Read new error reports and mark the events they name: for the key's
 *		own account, and for each connected account billed in the last three
 *		days (with Stripe-Context).  Every page is read before anything is
 *		stored.
 */
bool
AsyncErrorsRunStart(void)
{
	ListCell   *lc;
	MemoryContext old;

	run_reads = NIL;
	run_next_account = 0;
	if (!DeliveryStoreBegin())
		return false;
	foreach(lc, StoreErrorsAccounts(CURSOR_OVERLAP_SECS, MAX_ACCOUNTS, AsyncErrorsCalls.cxt))
	{
		ErrorReportAccount *a = lfirst(lc);
		AccountRead *r = MemoryContextAllocZero(AsyncErrorsCalls.cxt, sizeof(AccountRead));

		r->account = a->account;
		r->cursor = a->cursor;
		/* not SPI's memory, current after a statement: the run's */
		old = MemoryContextSwitchTo(AsyncErrorsCalls.cxt);
		run_reads = lappend(run_reads, r);
		MemoryContextSwitchTo(old);
	}
	DeliveryStoreCommit();

	start_accounts();
	return AsyncErrorsCalls.in_flight > 0 || end_run();
}

/*
 * AsyncErrorsRunAdvance
 *		Keep the pages that arrived and ask for the next ones; store all
 *		when every account has been read.
 */
bool
AsyncErrorsRunAdvance(void)
{
	LifecycleAnswer *answer;

	while ((answer = LifecycleCallNextAnswer(&AsyncErrorsCalls)) != NULL)
	{
		AccountRead *r = answer->arg;
		HttpResult *http = answer->http;
		StripeResponse page;
		char	   *next;
		MemoryContext old;

		if (http->transport_code != 0 || http->status != 200)
		{
			r->error = MemoryContextStrdup(AsyncErrorsCalls.cxt, StripeFailureText(http));
			continue;
		}
		StripeReadAnswer(http, &page);
		if (!page.valid)
		{
			r->error = "Stripe's list of events could not be read";
			continue;
		}
		old = MemoryContextSwitchTo(AsyncErrorsCalls.cxt);
		r->pages = lappend(r->pages, (char *) http->body);
		MemoryContextSwitchTo(old);
		next = next_page(&page);
		if (next != NULL && ++r->npages < MAX_PAGES)
			(void) request_page(r, next);
	}
	start_accounts();
	return AsyncErrorsCalls.in_flight > 0 || end_run();
}
