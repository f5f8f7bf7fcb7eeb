/*-------------------------------------------------------------------------
 *
 * reconcile.c
 *	  stripe_meter_reconcile(event_name, customer, from, to
 *							 [, value_grouping_window [, stripe_account]]):
 *	  what this database delivered for one customer and meter, against
 *	  Stripe's event summaries (GET /v1/billing/meters/{id}/event_summaries)
 *	  for the same windows, with the difference per window.
 *
 * The local side counts delivered events (stripe_meter.meter_events) by
 * their timestamp, less those cancelled or being cancelled, aggregated with
 * the meter's formula.  Events Stripe reported as not billable stay in it,
 * so they show up as a difference.  Stripe's summaries lag behind by a few
 * minutes (they are eventually consistent), and delivered rows are purged
 * after stripe_meter.delivered_retention.  The arguments are checked in
 * sql_functions.c; the SQL is in store_meters.c and store_reconcile.c.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/reconcile.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "nodes/pg_list.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

#define MAX_PAGES	100

typedef struct MeterInfo
{
	char	   *meter_id;
	char	   *aggregation;
	char	   *value_key;
} MeterInfo;

static int64
unix_seconds(TimestampTz t)
{
	return (int64) ((t - SetEpochTimestamp()) / USECS_PER_SEC);
}

/* the meter's id from stripe_meter.meters, else from Stripe's list */
static void
find_meter(const char *event_name, const char *account, MeterInfo *m)
{
	char	   *meter_id;
	char	   *agg;
	char	   *value_key;
	char	   *after = NULL;
	int			i;

	m->meter_id = NULL;
	m->aggregation = "sum";
	m->value_key = DEFAULT_VALUE_KEY;
	if (StoreMetersFind(event_name, &meter_id, &agg, &value_key))
	{
		if (account == NULL)
			m->meter_id = meter_id;
		if (agg)
			m->aggregation = agg;
		m->value_key = value_key;
	}
	if (m->meter_id != NULL)
		return;

	/* a connected account has meters of its own: look it up there */
	for (i = 0; i < MAX_PAGES; i++)
	{
		StringInfoData path;
		char	   *body;
		bool		has_more;

		initStringInfo(&path);
		appendStringInfoString(&path, "/v1/billing/meters?limit=100");
		if (after)
		{
			appendStringInfoString(&path, "&starting_after=");
			StripeClientAppendEscaped(&path, after, strlen(after));
		}
		body = StripeClientGetJson(path.data, account);
		if (StoreReconcilePickMeter(body, event_name, &meter_id, &agg))
		{
			m->meter_id = meter_id;
			if (agg)
				m->aggregation = agg;
			return;
		}
		if (!ListPageNext(body, strlen(body), &has_more, &after) || !has_more)
			break;
	}
	ereport(ERROR,
			(errcode(ERRCODE_UNDEFINED_OBJECT),
			 errmsg("no meter for event name \"%s\"", event_name),
			 account ? errdetail("Connected account %s has no meter with this event name.", account) :
			 errdetail("The Stripe account has no meter with this event name."),
			 errhint("Run stripe_meter_sync_meters() after creating the meter in Stripe.")));
}

/*
 * ReconcileRun
 *		stripe_meter_reconcile(): put one row per window into tupstore
 *		(window_start, window_end, local_events, local_value, stripe_value,
 *		difference).  The arguments are checked: from and to are aligned
 *		to the grouping window and from is earlier.
 */
void
ReconcileRun(const ReconcileRequest *req, Tuplestorestate *tupstore,
			 TupleDesc tupdesc)
{
	int64		step;
	MeterInfo	meter;
	List	   *pages = NIL;
	char	   *after = NULL;
	int			i;

	/* without a grouping window, one window covers the whole range */
	step = req->grouping == NULL ? unix_seconds(req->to) - unix_seconds(req->from) :
		strcmp(req->grouping, "hour") == 0 ? SECS_PER_HOUR : SECS_PER_DAY;

	find_meter(req->event_name, req->account, &meter);

	for (i = 0; i < MAX_PAGES; i++)
	{
		StringInfoData path;
		char	   *body;
		bool		has_more;

		initStringInfo(&path);
		appendStringInfoString(&path, "/v1/billing/meters/");
		StripeClientAppendEscaped(&path, meter.meter_id, strlen(meter.meter_id));
		appendStringInfoString(&path, "/event_summaries?limit=100&customer=");
		StripeClientAppendEscaped(&path, req->customer, strlen(req->customer));
		appendStringInfo(&path, "&start_time=" INT64_FORMAT "&end_time=" INT64_FORMAT,
						 unix_seconds(req->from), unix_seconds(req->to));
		if (req->grouping)
			appendStringInfo(&path, "&value_grouping_window=%s", req->grouping);
		if (after)
		{
			appendStringInfoString(&path, "&starting_after=");
			StripeClientAppendEscaped(&path, after, strlen(after));
		}
		body = StripeClientGetJson(path.data, req->account);
		pages = lappend(pages, body);
		if (!ListPageNext(body, strlen(body), &has_more, &after))
			ereport(ERROR,
					(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
					 errmsg("Stripe's event summaries could not be read")));
		if (!has_more)
			break;
	}

	StoreReconcileCompare(pages, unix_seconds(req->from), unix_seconds(req->to), step,
						  req->event_name, req->customer, req->account,
						  meter.aggregation, meter.value_key, tupstore, tupdesc);
}
