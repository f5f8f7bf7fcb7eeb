/*-------------------------------------------------------------------------
 *
 * store_probe.c
 *	  The per-row lookups of the outbox's validation trigger, done as direct
 *	  probes of the unique indexes instead of SQL.  Part of the store layer
 *	  (store.c): the one place besides the SQL of the store files that
 *	  reads the extension's tables.
 *
 * Every queued row needs its meter's payload keys and status, whether
 * meters were ever synced, and whether its identifier is already queued,
 * delivered or failed.  Through SPI each of these paid for an executor
 * start-up and shut-down, several times the cost of the probe itself.  The
 * probes here read the same rows with the caller's active snapshot, which
 * is the snapshot a read-only SPI query in the trigger would have used, so
 * they see exactly what that query saw.
 *
 * The OIDs of the tables, their indexes and columns are looked up once per
 * backend and forgotten on any relcache invalidation of a relation (DDL,
 * DROP EXTENSION, an index rebuilt) and on any change to pg_class names
 * (a table created), so they are looked up again after the extension is
 * dropped, recreated or updated.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/store_probe.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/nbtree.h"
#include "access/relscan.h"
#include "access/table.h"
#include "access/tableam.h"
#include "catalog/namespace.h"
#include "executor/tuptable.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

/* one table and the unique index on its key column */
typedef struct ProbeTarget
{
	Oid			heap;
	Oid			index;
} ProbeTarget;

typedef struct ProbeCache
{
	bool		valid;
	ProbeTarget outbox;			/* outbox_identifier_key */
	ProbeTarget delivered;		/* meter_events_pkey */
	ProbeTarget failed;			/* failed_events_pkey */
	ProbeTarget meters;			/* meters_pkey */
	AttrNumber	meters_customer_key;
	AttrNumber	meters_value_key;
	AttrNumber	meters_status;	/* InvalidAttrNumber before 0.2.0 */
	AttrNumber	meters_aggregation; /* InvalidAttrNumber before 0.2.0 */
	AttrNumber	meters_rollup_window;	/* InvalidAttrNumber before rollups */
	Oid			sync_state;		/* InvalidOid before 0.2.0 */
	AttrNumber	sync_state_synced_at;
} ProbeCache;

static ProbeCache cache;
static bool callback_registered = false;

static void
forget_cache(Datum arg, Oid relid)
{
	cache.valid = false;
}

/* a relation created or renamed (ALTER EXTENSION UPDATE adds sync_state) */
static void
forget_cache_names(Datum arg, int cacheid, uint32 hashvalue)
{
	cache.valid = false;
}

static Oid
required_relid(const char *name, Oid nsp)
{
	Oid			relid = get_relname_relid(name, nsp);

	if (!OidIsValid(relid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation \"stripe_meter.%s\" does not exist", name),
				 errhint("Run ALTER EXTENSION stripe_meter UPDATE, or reinstall the extension.")));
	return relid;
}

static AttrNumber
required_attnum(Oid relid, const char *column)
{
	AttrNumber	attnum = get_attnum(relid, column);

	if (attnum <= 0)
		elog(ERROR, "column \"%s\" is missing from \"%s\"",
			 column, get_rel_name(relid));
	return attnum;
}

static void
find_target(ProbeTarget *t, const char *table, const char *index, Oid nsp)
{
	t->heap = required_relid(table, nsp);
	t->index = required_relid(index, nsp);
}

static void
fill_cache(void)
{
	Oid			nsp;

	if (cache.valid)
		return;
	if (!callback_registered)
	{
		CacheRegisterRelcacheCallback(forget_cache, (Datum) 0);
		CacheRegisterSyscacheCallback(RELNAMENSP, forget_cache_names, (Datum) 0);
		callback_registered = true;
	}

	memset(&cache, 0, sizeof(cache));
	nsp = get_namespace_oid("stripe_meter", false);
	find_target(&cache.outbox, "outbox", "outbox_identifier_key", nsp);
	find_target(&cache.delivered, "meter_events", "meter_events_pkey", nsp);
	find_target(&cache.failed, "failed_events", "failed_events_pkey", nsp);
	find_target(&cache.meters, "meters", "meters_pkey", nsp);
	cache.meters_customer_key = required_attnum(cache.meters.heap, "customer_payload_key");
	cache.meters_value_key = required_attnum(cache.meters.heap, "value_payload_key");

	/*
	 * Before ALTER EXTENSION stripe_meter UPDATE, a database can still have
	 * the schema of a version that never synced meters.
	 */
	cache.sync_state = get_relname_relid("sync_state", nsp);
	if (OidIsValid(cache.sync_state))
	{
		cache.sync_state_synced_at = required_attnum(cache.sync_state, "meters_synced_at");
		cache.meters_status = required_attnum(cache.meters.heap, "status");
		cache.meters_aggregation = required_attnum(cache.meters.heap, "aggregation");
	}
	cache.meters_rollup_window = get_attnum(cache.meters.heap, "rollup_window");
	cache.valid = true;
}

/*
 * Look up key in the single-column unique index of a target with the
 * active snapshot.  Returns whether a row is visible; with slot non-NULL,
 * the row is left in *slot (created in the current memory context) for
 * the caller to read and drop.
 */
static bool
probe(const ProbeTarget *t, Datum key, TupleTableSlot **slotp)
{
	Relation	heap;
	Relation	index;
	IndexScanDesc scan;
	ScanKeyData skey;
	TupleTableSlot *slot;
	bool		found;

	heap = table_open(t->heap, AccessShareLock);
	index = index_open(t->index, AccessShareLock);
	if (index->rd_index->indrelid != t->heap ||
		index->rd_index->indnkeyatts != 1 ||
		TupleDescAttr(RelationGetDescr(index), 0)->atttypid != TEXTOID)
		elog(ERROR, "index \"%s\" is not the expected text key of \"%s\"",
			 RelationGetRelationName(index), RelationGetRelationName(heap));

	/* compare as the index sorts: with its collation */
	ScanKeyEntryInitialize(&skey, 0, 1, BTEqualStrategyNumber, InvalidOid,
						   index->rd_indcollation[0], F_TEXTEQ, key);

	slot = table_slot_create(heap, NULL);
	scan = begin_index_scan(heap, index, GetActiveSnapshot(), 1);
	index_rescan(scan, &skey, 1, NULL, 0);
	found = index_getnext_slot(scan, ForwardScanDirection, slot);
	index_endscan(scan);

	index_close(index, NoLock);
	table_close(heap, NoLock);

	if (found && slotp != NULL)
		*slotp = slot;
	else
		ExecDropSingleTupleTableSlot(slot);
	return found;
}

static char *
slot_text_or_null(TupleTableSlot *slot, AttrNumber attnum)
{
	bool		isnull;
	Datum		d = slot_getattr(slot, attnum, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

/*
 * StoreProbeMeter
 *		The row of stripe_meter.meters for an event name, if any.
 *
 * Strings are palloc'd in the current memory context.
 */
void
StoreProbeMeter(const char *event_name, EnqueueMeter *meter)
{
	TupleTableSlot *slot;

	fill_cache();
	memset(meter, 0, sizeof(*meter));
	meter->found = probe(&cache.meters, CStringGetTextDatum(event_name), &slot);
	if (!meter->found)
		return;
	meter->customer_key = slot_text_or_null(slot, cache.meters_customer_key);
	meter->value_key = slot_text_or_null(slot, cache.meters_value_key);
	if (cache.meters_status != InvalidAttrNumber)
		meter->status = slot_text_or_null(slot, cache.meters_status);
	if (cache.meters_aggregation != InvalidAttrNumber)
		meter->aggregation = slot_text_or_null(slot, cache.meters_aggregation);
	if (cache.meters_rollup_window != InvalidAttrNumber)
	{
		bool		isnull;
		Datum		d = slot_getattr(slot, cache.meters_rollup_window, &isnull);

		/* whole seconds of at most a day: the table's CHECK says so */
		if (!isnull)
		{
			Interval   *w = DatumGetIntervalP(d);

			meter->rollup_window_secs = w->day * SECS_PER_DAY +
				w->time / USECS_PER_SEC;
		}
	}
	ExecDropSingleTupleTableSlot(slot);
}

/*
 * StoreProbeMetersSynced
 *		Whether stripe_meter_sync_meters() ever succeeded: false as well
 *		when the schema predates meter sync or its one row is missing.
 */
bool
StoreProbeMetersSynced(void)
{
	Relation	rel;
	TableScanDesc scan;
	TupleTableSlot *slot;
	bool		synced = false;

	fill_cache();
	if (!OidIsValid(cache.sync_state))
		return false;

	rel = table_open(cache.sync_state, AccessShareLock);
	slot = table_slot_create(rel, NULL);
	scan = begin_table_scan(rel, GetActiveSnapshot());
	if (table_scan_getnextslot(scan, ForwardScanDirection, slot))
	{
		bool		isnull;

		(void) slot_getattr(slot, cache.sync_state_synced_at, &isnull);
		synced = !isnull;
	}
	table_endscan(scan);
	ExecDropSingleTupleTableSlot(slot);
	table_close(rel, NoLock);
	return synced;
}

/*
 * StoreProbeIdentifier
 *		Where an identifier is in use: ENQUEUE_ID_UNUSED, or queued,
 *		delivered or failed (checked in that order).
 */
EnqueueIdentifierUse
StoreProbeIdentifier(const char *identifier)
{
	Datum		key;

	fill_cache();
	key = CStringGetTextDatum(identifier);
	if (probe(&cache.outbox, key, NULL))
		return ENQUEUE_ID_QUEUED;
	if (probe(&cache.delivered, key, NULL))
		return ENQUEUE_ID_DELIVERED;
	if (probe(&cache.failed, key, NULL))
		return ENQUEUE_ID_FAILED;
	return ENQUEUE_ID_UNUSED;
}
