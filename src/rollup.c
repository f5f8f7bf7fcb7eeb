/*-------------------------------------------------------------------------
 *
 * rollup.c
 *	  Rollups: the events of a meter with a rollup_window that share a
 *	  Stripe account, event name, customer and dimension values and fall in
 *	  one window are sent to Stripe as one event, once the window has closed
 *	  and settled.
 *
 * An event to be rolled up waits in the outbox with the end of its window
 * (frozen at enqueue), never claimed by itself.  Forming takes the events
 * of closed windows and, in one transaction, queues each rollup as an
 * ordinary outbox row and moves its events to meter_events (outcome
 * rolled_up, naming the rollup).  From there a rollup is claimed, sent,
 * resent and recorded exactly as any event: its identifier, and so its
 * Idempotency-Key, is derived from its group, window, generation and part,
 * and it is fixed in its row before it is first sent.  A crash before the
 * forming transaction commits leaves the events queued; forming them again
 * gives the same rollups.
 *
 * A sum meter's rollup carries the sum of its events' values, split into
 * parts when it would pass Stripe's 15 digits; a last meter's carries the
 * value of its latest event.  Either way it carries the latest event's
 * timestamp, so it is billed in that event's period.  Events committed
 * after their window's rollup was formed go into the next generation of the
 * same window.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/rollup.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/namespace.h"
#include "datatype/timestamp.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

/* how long to wait before looking again at windows whose events were locked */
#define ROLLUP_RETRY_MS 1000

/* microseconds from the Unix epoch to PostgreSQL's */
#define UNIX_TO_PG_EPOCH_USECS \
	((int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * USECS_PER_DAY)

/* true while this process queues the rollups it forms */
static bool forming = false;

/*
 * RollupForming
 *		Whether the outbox row being inserted is a rollup this process
 *		formed: the outbox trigger leaves such a row as it is, since its
 *		request is fixed already and its events were validated when queued.
 */
bool
RollupForming(void)
{
	return forming;
}

/*
 * RollupIsIdentifier
 *		Whether an identifier has the form of a rollup's.
 */
bool
RollupIsIdentifier(const char *identifier)
{
	return strncmp(identifier, ROLLUP_ID_PREFIX, strlen(ROLLUP_ID_PREFIX)) == 0;
}

/*
 * RollupCheckIdentifier
 *		Refuse an identifier of the form rollups have to anyone who may not
 *		write stripe_meter.rollups: a rollup's identifier can be computed
 *		from its group, and an event queued under it would take it from the
 *		rollup still to be formed.  The worker forming rollups, and a
 *		session restoring a dump as the extension's owner or a superuser,
 *		may.  The session's user decides, not the current one: every
 *		enqueue function runs as the extension's owner.
 */
void
RollupCheckIdentifier(const char *identifier)
{
	Oid			rollups;

	if (forming || !RollupIsIdentifier(identifier))
		return;
	rollups = get_relname_relid("rollups", get_namespace_oid("stripe_meter", false));
	if (!OidIsValid(rollups) ||
		pg_class_aclcheck(rollups, GetSessionUserId(), ACL_INSERT) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("meter event identifier \"%s\" is reserved for rollups", identifier),
				 errdetail("Identifiers beginning with \"%s\" name the events stripe_meter forms from rolled-up events.",
						   ROLLUP_ID_PREFIX)));
}

/*
 * RollupWindowEnd
 *		The end of the window of window_secs that ts falls in.  Windows are
 *		aligned on whole multiples of their length since the Unix epoch, so
 *		a one-minute window starts on a whole minute.
 */
TimestampTz
RollupWindowEnd(TimestampTz ts, int64 window_secs)
{
	int64		width = window_secs * USECS_PER_SEC;
	int64		unix_us = ts + UNIX_TO_PG_EPOCH_USECS;
	int64		into = ((unix_us % width) + width) % width;

	return unix_us - into + width - UNIX_TO_PG_EPOCH_USECS;
}

static void
start_part(RollupPart *p, const RollupSource *s, int generation, int part)
{
	memset(p, 0, sizeof(*p));
	p->group_hash = s->group_hash;
	p->window_end = s->window_end;
	p->generation = generation;
	p->part = part;
	p->event_name = s->event_name;
	p->stripe_account = s->stripe_account;
	p->customer = s->customer;
	p->formula = s->formula;
	p->dimensions = s->dimensions;
	p->value_key = s->value_key;
	/* 20 hex digits of the group's hash: 80 bits, and room under Stripe's 100 */
	p->identifier = psprintf("%s%.20s_%lld_%d_%d", ROLLUP_ID_PREFIX, s->group_hash,
							 (long long) ((s->window_end + UNIX_TO_PG_EPOCH_USECS) / USECS_PER_SEC),
							 generation, part);
}

static void
queue_part(RollupPart *p, int64 value)
{
	p->value = psprintf(INT64_FORMAT, value);
	StoreRollupQueue(p);
}

/*
 * Form the rollups of sources (ordered by window, group, timestamp, id),
 * queue them and retire their events.  Returns how many rollups.
 */
static int
form(List *sources)
{
	int			n = list_length(sources);
	int64	   *ids = palloc(sizeof(int64) * n);
	char	  **rollup_ids = palloc(sizeof(char *) * n);
	RollupSource *prev = NULL;
	RollupPart	part;
	int64		value = 0;
	int			nrollups = 0;
	int			i = 0;
	ListCell   *lc;

	foreach(lc, sources)
	{
		RollupSource *s = lfirst(lc);
		bool		sum = (strcmp(s->formula, "sum") == 0);
		int64		v = strtoi64(s->value, NULL, 10);

		if (prev == NULL || prev->window_end != s->window_end ||
			strcmp(prev->group_hash, s->group_hash) != 0)
		{
			if (prev != NULL)
				queue_part(&part, value);
			start_part(&part, s, StoreRollupNextGeneration(s->group_hash, s->window_end), 1);
			value = 0;
			nrollups++;
		}
		else if (sum && value + v > ROLLUP_MAX_VALUE)
		{
			/* each value has at most 15 digits: v alone always fits */
			queue_part(&part, value);
			start_part(&part, s, part.generation, part.part + 1);
			value = 0;
			nrollups++;
		}
		/* sorted by timestamp: the latest comes last */
		value = sum ? value + v : v;
		part.events++;
		part.ts = s->ts;
		part.enqueued_at = s->enqueued_at;
		ids[i] = s->id;
		rollup_ids[i++] = part.identifier;
		prev = s;
	}
	if (prev != NULL)
		queue_part(&part, value);
	StoreRollupRetire(ids, rollup_ids, n);
	return nrollups;
}

/*
 * A pass that read as many events as it may can end inside a group: leave
 * that group to the next pass, which reads it whole, so that it goes as one
 * rollup rather than two generations.  A group larger than a pass is split
 * all the same.
 */
static List *
whole_groups(List *sources)
{
	RollupSource *last = llast(sources);
	int			keep = list_length(sources);

	while (keep > 0)
	{
		RollupSource *s = list_nth(sources, keep - 1);

		if (s->window_end != last->window_end ||
			strcmp(s->group_hash, last->group_hash) != 0)
			break;
		keep--;
	}
	return keep > 0 ? list_truncate(sources, keep) : sources;
}

/*
 * RollupFormDue
 *		Roll up the events of every window that closed at least
 *		stripe_meter.rollup_settle_delay ago, in one transaction.  Returns
 *		when to look again; *formed says whether a rollup was queued.
 */
TimestampTz
RollupFormDue(TimestampTz now, bool *formed)
{
	static MemoryContext cxt = NULL;
	TimestampTz closed_by = now - (int64) stripe_meter_rollup_settle_delay * 1000;
	MemoryContext old;
	List	   *sources;
	TimestampTz oldest;
	TimestampTz next;
	int			nsources;
	int			nrolled;
	int			nrollups = 0;

	/* reset here rather than after the pass: an ERROR may have left it full */
	if (cxt == NULL)
		cxt = AllocSetContextCreate(TopMemoryContext, "stripe_meter rollups",
									ALLOCSET_DEFAULT_SIZES);
	MemoryContextReset(cxt);

	WorkerBegin(true);
	old = MemoryContextSwitchTo(cxt);
	sources = StoreRollupDueSources(closed_by, ROLLUP_FORM_LIMIT, cxt);
	nsources = list_length(sources);
	if (nsources == ROLLUP_FORM_LIMIT)
		sources = whole_groups(sources);
	nrolled = list_length(sources);
	if (sources != NIL)
	{
		forming = true;
		PG_TRY();
		{
			nrollups = form(sources);
		}
		PG_FINALLY();
		{
			forming = false;
		}
		PG_END_TRY();
	}
	MemoryContextSwitchTo(old);
	oldest = StoreRollupOldestWindow();
	DeliveryStoreCommit();
	MemoryContextReset(cxt);

	if (nrollups > 0)
		ereport(DEBUG1,
				(errmsg_internal("stripe_meter worker rolled up %d events into %d events",
								 nrolled, nrollups)));
	*formed = (nrollups > 0);
	if (nsources >= ROLLUP_FORM_LIMIT)
		return now;				/* more are due */
	next = TimestampTzPlusMilliseconds(now, stripe_meter_naptime);
	if (oldest != 0)
	{
		TimestampTz due = oldest + (int64) stripe_meter_rollup_settle_delay * 1000;

		/* due but not formed: its events were locked; look again soon */
		if (due <= now)
			due = TimestampTzPlusMilliseconds(now, ROLLUP_RETRY_MS);
		next = Min(next, due);
	}
	return next;
}
