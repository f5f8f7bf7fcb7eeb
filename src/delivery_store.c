/*-------------------------------------------------------------------------
 *
 * delivery_store.c
 *	  The delivery worker's SQL: claim events, record what happened to
 *	  them, repair claims a crash left behind, purge old delivered rows.
 *
 * Each call runs in its own short transaction (DeliveryStoreBegin ...
 * DeliveryStoreCommit); no transaction is ever open while requests are in
 * flight, so a slow Stripe holds no snapshot, lock or xid.
 *
 * The guarantee rests on two facts.  A claim is committed before any byte
 * of its events goes on the wire, so after a crash the repair step knows
 * which events might have reached Stripe and marks their outcome unknown.
 * And every attempt of an event sends the same body and Idempotency-Key,
 * both fixed by its row at enqueue, so a resend after a lost answer is
 * replayed by Stripe instead of billed again, for as long as the resend
 * window allows.
 * Recording is therefore committed asynchronously: losing a record in a
 * crash only causes a resend that Stripe answers with a replay.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/delivery_store.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "pgstat.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

static SPIPlanPtr claim_plan = NULL;
static SPIPlanPtr delivered_plan = NULL;
static SPIPlanPtr failed_plan = NULL;
static SPIPlanPtr retry_plan = NULL;
static SPIPlanPtr release_plan = NULL;

static ArrayType *column_array(Datum *values, bool *nulls, int n, Oid type);
static int	cmp_int64(const void *a, const void *b);

/* the caller's memory context, current again after DeliveryStoreCommit */
static MemoryContext caller_cxt = NULL;

/*
 * DeliveryStoreBegin
 *		Start a short transaction with SPI connected.
 *
 * Returns false, with no transaction open, when the extension is gone from
 * this database (DROP EXTENSION): the worker should then exit.
 */
bool
DeliveryStoreBegin(void)
{
	caller_cxt = CurrentMemoryContext;
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	if (!OidIsValid(get_extension_oid("stripe_meter", true)))
	{
		CommitTransactionCommand();
		return false;
	}
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	return true;
}

void
DeliveryStoreCommit(void)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	/* a background worker must report its statistics itself */
	pgstat_report_stat(false);

	/*
	 * Commit leaves TopMemoryContext current.  Return to the context that
	 * was current before DeliveryStoreBegin: the one current now belonged
	 * to SPI, which SPI_finish has just deleted.
	 */
	MemoryContextSwitchTo(caller_cxt);
}

/*
 * DeliveryStoreExtensionVersion
 *		Read the version of the extension's SQL objects in this database
 *		into buf; false when the extension is gone.
 */
bool
DeliveryStoreExtensionVersion(char *buf, size_t size)
{
	if (!DeliveryStoreBegin())
		return false;
	buf[0] = '\0';
	if (SPI_execute("SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'stripe_meter'",
					true, 1) == SPI_OK_SELECT && SPI_processed == 1)
	{
		char	   *v = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);

		if (v != NULL)
			strlcpy(buf, v, size);
	}
	DeliveryStoreCommit();
	return true;
}

/*
 * DeliveryStoreRepair
 *		At worker start: events a previous worker claimed (before the time
 *		given) but never recorded go back to the queue.  Those it had
 *		handed to the network may have reached Stripe: their outcome is
 *		unknown since then.  The others go back as if never claimed.
 *
 * A row another transaction has locked is left for a later call, so the
 * worker never waits for it.  Returns how many such rows are left.
 */
int64
DeliveryStoreRepair(TimestampTz claimed_before)
{
	static SPIPlanPtr repair_plan = NULL;
	static SPIPlanPtr left_plan = NULL;
	Datum		arg = TimestampTzGetDatum(claimed_before);
	bool		isnull;
	int			rc;
	uint64		i;
	uint64		nsent = 0;

	if (repair_plan == NULL)
		repair_plan = SpiPrepareSaved("UPDATE stripe_meter.outbox o"
									  "   SET in_flight_since = NULL,"
									  "       sent_at = NULL,"
									  "       unknown_outcome_since = CASE WHEN c.sent_at IS NULL"
									  "         THEN o.unknown_outcome_since"
									  "         ELSE COALESCE(o.unknown_outcome_since, c.sent_at) END,"
									  "       attempts = CASE WHEN c.sent_at IS NULL"
									  "         THEN o.attempts - 1 ELSE o.attempts END,"
									  "       first_attempt_at = CASE WHEN c.sent_at IS NULL"
									  "                               AND o.first_attempt_at = o.in_flight_since"
									  "         THEN NULL ELSE o.first_attempt_at END"
									  "  FROM (SELECT id, sent_at FROM stripe_meter.outbox"
									  "         WHERE in_flight_since < $1"
									  "           FOR UPDATE SKIP LOCKED) c"
									  " WHERE o.id = c.id"
									  " RETURNING c.sent_at IS NOT NULL",
									  1, (Oid[]) {TIMESTAMPTZOID});
	rc = SPI_execute_plan(repair_plan, &arg, NULL, false, 0);
	if (rc != SPI_OK_UPDATE_RETURNING)
		elog(ERROR, "could not repair claimed meter events: %s", SPI_result_code_string(rc));
	for (i = 0; i < SPI_processed; i++)
		if (DatumGetBool(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull)))
			nsent++;
	if (SPI_processed > 0)
		ereport(LOG,
				(errmsg("stripe_meter worker found %llu meter events claimed before a restart",
						(unsigned long long) SPI_processed),
				 errdetail("%llu of them had been sent and will be sent again with the same idempotency keys; the others had not been sent and are queued again as they were.",
						   (unsigned long long) nsent)));

	if (left_plan == NULL)
		left_plan = SpiPrepareSaved("SELECT pg_catalog.count(*) FROM stripe_meter.outbox"
									" WHERE in_flight_since < $1",
									1, (Oid[]) {TIMESTAMPTZOID});
	rc = SPI_execute_plan(left_plan, &arg, NULL, true, 1);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not count claimed meter events: %s", SPI_result_code_string(rc));
	return DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
}

uint64
DeliveryBusyKey(const char *account, const char *event_name, const char *customer)
{
	uint64		h = hash_bytes_extended((const unsigned char *) event_name,
										strlen(event_name), 0);

	h = hash_bytes_extended((const unsigned char *) customer, strlen(customer), h);
	if (account)
		h = hash_bytes_extended((const unsigned char *) account, strlen(account), h);
	return h;
}

/*
 * Where the last claim's walk over the keys stopped: the next one goes on
 * from there, so that every key gets its turn however many there are.
 * Empty strings: from the first key (no key is empty: a customer never is).
 */
static char *walk_from[3] = {NULL, NULL, NULL};

static void
set_walk_from(const char *customer, const char *event_name, const char *account)
{
	int			i;

	for (i = 0; i < 3; i++)
		if (walk_from[i] != NULL)
			pfree(walk_from[i]);
	walk_from[0] = MemoryContextStrdup(TopMemoryContext, customer);
	walk_from[1] = MemoryContextStrdup(TopMemoryContext, event_name);
	walk_from[2] = MemoryContextStrdup(TopMemoryContext, account);
}

/*
 * What a claim has chosen so far: the events to claim, and among them those
 * to be marked sent by the claim itself.
 */
typedef struct ClaimChoice
{
	int			limit;			/* events wanted in all */
	ClaimRoomFunc room;
	TimestampTz now;
	int64	   *ids;
	int			nids;
	int64	   *send_ids;
	int			nsend;
} ClaimChoice;

/* the walk's and the refill's column of a key's due ids, oldest first */
#define DUE_IDS_OF_KEY(k, per_key, from, now) \
	"ARRAY(SELECT o.id FROM stripe_meter.outbox o" \
	"       WHERE o.in_flight_since IS NULL AND o.rollup_window_end IS NULL" \
	"         AND o.customer COLLATE \"C\" = " k ".customer" \
	"         AND o.event_name COLLATE \"C\" = " k ".event_name" \
	"         AND COALESCE(o.stripe_account, '') COLLATE \"C\" = " k ".account" \
	"         AND o.next_attempt_at >= " from \
	"         AND o.next_attempt_at <= " now \
	"       ORDER BY o.next_attempt_at LIMIT " per_key ")"

/*
 * Take what room() allows of one key's due events (column 4 of the row, an
 * array of ids): its first goes into send_ids as well when room() says it
 * goes on the wire as soon as the claim commits.
 */
static void
take_due(ClaimChoice *c, HeapTuple tup, TupleDesc desc, bool walked)
{
	char	   *customer = SPI_getvalue(tup, desc, 1);
	char	   *event_name = SPI_getvalue(tup, desc, 2);
	char	   *account = SPI_getvalue(tup, desc, 3);
	bool		isnull;
	ArrayType  *arr = DatumGetArrayTypeP(SPI_getbinval(tup, desc, 4, &isnull));
	Datum	   *elems;
	int			nelems;
	int			take;
	bool		send_now = false;
	int			j;

	deconstruct_array(arr, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE,
					  &elems, NULL, &nelems);
	if (nelems == 0)
		return;
	take = c->room(DeliveryBusyKey(account[0] ? account : NULL, event_name, customer),
				   account[0] ? account : NULL, nelems >= CLAIM_PER_KEY, walked,
				   &send_now);
	for (j = 0; j < Min(take, nelems) && c->nids < c->limit; j++)
	{
		/* the key's first, the one that goes before the others */
		if (j == 0 && send_now)
			c->send_ids[c->nsend++] = DatumGetInt64(elems[j]);
		c->ids[c->nids++] = DatumGetInt64(elems[j]);
	}
}

/*
 * Choose the due events of the keys the scheduler names: keys that hold
 * places already and gave one back, so their next events are claimed
 * without walking past every other key that holds its places.
 */
static void
choose_refills(ClaimChoice *c, const ClaimKey *keys, int nkeys)
{
	static SPIPlanPtr refill_plan = NULL;
	Datum		args[6];
	Datum	   *d;
	int			i;
	int			f;
	int			rc;
	uint64		k;

	if (nkeys == 0)
		return;
	if (refill_plan == NULL)
		refill_plan = SpiPrepareSaved(
								  "SELECT k.customer, k.event_name, k.account, "
								  DUE_IDS_OF_KEY("k", "$5", "k.due_from", "$6")
								  "  FROM ROWS FROM (pg_catalog.unnest($1::text[]),"
								  "                  pg_catalog.unnest($2::text[]),"
								  "                  pg_catalog.unnest($3::text[]),"
								  "                  pg_catalog.unnest($4::timestamptz[]))"
								  "       AS k(customer, event_name, account, due_from)",
								  6, (Oid[]) {TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID,
									  TIMESTAMPTZARRAYOID, INT4OID, TIMESTAMPTZOID});
	d = palloc(sizeof(Datum) * nkeys);
	for (f = 0; f < 3; f++)
	{
		for (i = 0; i < nkeys; i++)
			d[i] = CStringGetTextDatum(f == 0 ? keys[i].customer :
									   f == 1 ? keys[i].event_name : keys[i].account);
		args[f] = PointerGetDatum(column_array(d, NULL, nkeys, TEXTOID));
	}

	/*
	 * A key's scan starts where its last claim ended: the index entries of
	 * the rows claimed before stay until vacuum, and with a long backlog
	 * reading past them cost more than the rest of the refill.
	 */
	for (i = 0; i < nkeys; i++)
		d[i] = TimestampTzGetDatum(keys[i].due_from);
	args[3] = PointerGetDatum(column_array(d, NULL, nkeys, TIMESTAMPTZOID));
	args[4] = Int32GetDatum(CLAIM_PER_KEY);
	args[5] = TimestampTzGetDatum(c->now);
	rc = SPI_execute_plan(refill_plan, args, NULL, true, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "could not choose meter events to claim: %s", SPI_result_code_string(rc));
	for (k = 0; k < SPI_processed && c->nids < c->limit; k++)
		take_due(c, SPI_tuptable->vals[k], SPI_tuptable->tupdesc, false);
	SPI_freetuptable(SPI_tuptable);
}

/*
 * Walk the keys (customer, event name, account) that have events waiting,
 * from walk_from, at most max_keys of them, and choose the due events of
 * each that room() allows (at most CLAIM_PER_KEY), up to the limit in all.
 * Returns false when the walk reached the last key.
 *
 * The walk is read through a cursor, a few keys at a time, and stops as
 * soon as enough events are chosen: each key costs index probes, and keys
 * read but not used would be read again by the next claim.
 */
static bool
choose_due(ClaimChoice *c, int max_keys)
{
	static SPIPlanPtr walk_plan = NULL;
	Datum		args[6];
	Portal		portal;
	int			walked = 0;
	bool		more = true;

	if (walk_plan == NULL)
		walk_plan = SpiPrepareSaved(
								"WITH RECURSIVE walk(customer, event_name, account, n) AS ("
								"  (SELECT o.customer, o.event_name, COALESCE(o.stripe_account, ''), 1"
								"     FROM stripe_meter.outbox o"
								"    WHERE o.in_flight_since IS NULL AND o.rollup_window_end IS NULL"
								"      AND (o.customer COLLATE \"C\", o.event_name COLLATE \"C\","
								"           COALESCE(o.stripe_account, '') COLLATE \"C\") > ($1, $2, $3)"
								"    ORDER BY o.customer COLLATE \"C\", o.event_name COLLATE \"C\","
								"             COALESCE(o.stripe_account, '') COLLATE \"C\""
								"    LIMIT 1)"
								"  UNION ALL"
								"  SELECT nx.customer, nx.event_name, nx.account, w.n + 1"
								"    FROM walk w, LATERAL ("
								"      SELECT o.customer, o.event_name, COALESCE(o.stripe_account, '') AS account"
								"        FROM stripe_meter.outbox o"
								"       WHERE o.in_flight_since IS NULL AND o.rollup_window_end IS NULL"
								"         AND (o.customer COLLATE \"C\", o.event_name COLLATE \"C\","
								"              COALESCE(o.stripe_account, '') COLLATE \"C\")"
								"             > (w.customer, w.event_name, w.account)"
								"       ORDER BY o.customer COLLATE \"C\", o.event_name COLLATE \"C\","
								"                COALESCE(o.stripe_account, '') COLLATE \"C\""
								"       LIMIT 1) nx"
								"   WHERE w.n < $4)"
								" SELECT w.customer, w.event_name, w.account, "
								DUE_IDS_OF_KEY("w", "$5", "'-infinity'", "$6")
								"   FROM walk w",
								6, (Oid[]) {TEXTOID, TEXTOID, TEXTOID, INT4OID, INT4OID, TIMESTAMPTZOID});

	args[0] = CStringGetTextDatum(walk_from[0] ? walk_from[0] : "");
	args[1] = CStringGetTextDatum(walk_from[1] ? walk_from[1] : "");
	args[2] = CStringGetTextDatum(walk_from[2] ? walk_from[2] : "");
	args[3] = Int32GetDatum(max_keys);
	args[4] = Int32GetDatum(CLAIM_PER_KEY);
	args[5] = TimestampTzGetDatum(c->now);
	portal = SPI_cursor_open(NULL, walk_plan, args, NULL, true);

	while (c->nids < c->limit && more)
	{
		/* enough keys for what is still wanted, if each gives its most */
		int			fetch = Min((c->limit - c->nids + CLAIM_PER_KEY - 1) / CLAIM_PER_KEY,
								max_keys - walked);
		uint64		i;

		SPI_cursor_fetch(portal, true, fetch);
		walked += (int) SPI_processed;
		for (i = 0; i < SPI_processed && c->nids < c->limit; i++)
		{
			HeapTuple	tup = SPI_tuptable->vals[i];
			TupleDesc	desc = SPI_tuptable->tupdesc;

			take_due(c, tup, desc, true);
			set_walk_from(SPI_getvalue(tup, desc, 1), SPI_getvalue(tup, desc, 2),
						  SPI_getvalue(tup, desc, 3));
		}
		/* fewer keys than asked for, all of them used: that was the last */
		if (SPI_processed < (uint64) fetch && i == SPI_processed)
			more = false;
		SPI_freetuptable(SPI_tuptable);
		if (more && walked >= max_keys)
		{
			/* as far as one claim walks: the next goes on from here */
			SPI_cursor_close(portal);
			return true;
		}
	}
	SPI_cursor_close(portal);
	if (!more)
	{
		/* the last key was reached: the next walk starts at the first */
		set_walk_from("", "", "");
		return false;
	}
	return true;
}

/*
 * DeliveryStoreClaim
 *		Claim up to limit due events, and return their rows.
 *
 * Events are chosen key by key (account, event name, customer), at most
 * what room() allows per key: so a backlog for one customer and meter,
 * however long, takes a few places in the worker's memory and never keeps
 * other customers' events from being claimed.  First come the keys named
 * in refill (keys that gave back a place and have more due); then, when
 * walk is set, the claim walks on over the keys from where the last walk
 * stopped.  Within a key, events go in the order they fell due.
 *
 * The claim marks them in flight and counts the attempt.  The first event
 * of each key that room() says may go out at once is also marked sent
 * (e->marked_by_claim), so that sending it needs no transaction of its
 * own; such events come first in the list.  The events and what their
 * rows hold (strings, payload) are allocated in batch->cxt and appended to
 * the list claimed; the request itself is the sender's to build.  Returns
 * how many.
 */
int
DeliveryStoreClaim(int limit, const ClaimKey *refill, int nrefill, bool walk,
				   ClaimRoomFunc room, ClaimBatch *batch, dlist_head *claimed)
{
	ClaimChoice c;
	bool		from_start = (walk_from[0] == NULL || walk_from[0][0] == '\0');
	Datum		args[2];
	Datum	   *d;
	int			rc;
	int			i;
	uint64		k;
	MemoryContext old;

	c.limit = limit;
	c.room = room;
	c.now = GetCurrentTimestamp();
	c.ids = palloc(sizeof(int64) * limit);
	c.nids = 0;
	c.send_ids = palloc(sizeof(int64) * limit);
	c.nsend = 0;

	choose_refills(&c, refill, nrefill);
	/* a walk that ends early goes round once more, from the first key */
	if (walk && c.nids < limit)
	{
		int			max_keys = (limit - c.nids) * 2;

		if (!choose_due(&c, max_keys) && !from_start && c.nids < limit)
			(void) choose_due(&c, max_keys);
	}
	if (c.nids == 0)
		return 0;

	if (claim_plan == NULL)
		claim_plan = SpiPrepareSaved(
								"WITH c AS ("
								" UPDATE stripe_meter.outbox o"
								"    SET in_flight_since = pg_catalog.now(),"
								"        sent_at = CASE WHEN o.id = ANY ($2::bigint[])"
								"                  THEN pg_catalog.now() END,"
								"        attempts = o.attempts + 1,"
								"        first_attempt_at = COALESCE(o.first_attempt_at, pg_catalog.now())"
								"  WHERE o.id IN (SELECT id FROM stripe_meter.outbox"
								"                  WHERE id = ANY ($1::bigint[])"
								"                    AND in_flight_since IS NULL"
								"                    FOR UPDATE SKIP LOCKED)"
								" RETURNING o.id, o.identifier, o.event_name, o.payload, o.ts,"
								"   o.stripe_account, o.customer, o.attempts, o.unknown_outcome_since,"
								"   COALESCE(o.value_payload_key,"
								"            (SELECT m.value_payload_key FROM stripe_meter.meters m"
								"              WHERE m.event_name = o.event_name), 'value'),"
								"   o.canonical_value, o.legacy_idempotency_key, o.next_attempt_at,"
								"   o.sent_at IS NOT NULL AS marked)"
								" SELECT * FROM c ORDER BY marked DESC, next_attempt_at, id",
								2, (Oid[]) {INT8ARRAYOID, INT8ARRAYOID});

	d = palloc(sizeof(Datum) * c.nids);
	for (i = 0; i < c.nids; i++)
		d[i] = Int64GetDatum(c.ids[i]);
	args[0] = PointerGetDatum(column_array(d, NULL, c.nids, INT8OID));
	for (i = 0; i < c.nsend; i++)
		d[i] = Int64GetDatum(c.send_ids[i]);
	args[1] = PointerGetDatum(column_array(d, NULL, c.nsend, INT8OID));

	/*
	 * The claim must be on disk before any of its events is sent, whatever
	 * synchronous_commit the server, the database or the role sets: after a
	 * crash, only a durable claim tells the repair step that an event may
	 * have reached Stripe.
	 */
	(void) set_config_option("synchronous_commit", "on", PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
	rc = SPI_execute_plan(claim_plan, args, NULL, false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "could not claim meter events: %s", SPI_result_code_string(rc));

	old = MemoryContextSwitchTo(batch->cxt);
	for (k = 0; k < SPI_processed; k++)
	{
		HeapTuple	tup = SPI_tuptable->vals[k];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		ClaimedEvent *e = palloc0(sizeof(ClaimedEvent));
		bool		isnull;
		Datum		v;

		e->batch = batch;
		e->id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		e->identifier = SPI_getvalue(tup, desc, 2);
		e->event_name = SPI_getvalue(tup, desc, 3);
		e->ts = DatumGetTimestampTz(SPI_getbinval(tup, desc, 5, &isnull));
		e->stripe_account = SPI_getvalue(tup, desc, 6);
		e->customer = SPI_getvalue(tup, desc, 7);
		e->attempts = DatumGetInt32(SPI_getbinval(tup, desc, 8, &isnull));
		v = SPI_getbinval(tup, desc, 9, &isnull);
		e->unknown_outcome_since = isnull ? 0 : DatumGetTimestampTz(v);

		/*
		 * The request comes from the row alone: the value key and
		 * canonical value were frozen at enqueue.  A row queued before
		 * 0.2.0 has neither (canonical_value NULL); for it alone the claim
		 * still reads the meter's current value key, as 0.1.0 did.  An
		 * event attempted before 0.2.0 keeps its bare-identifier key.
		 */
		e->payload = DatumGetJsonbPCopy(SPI_getbinval(tup, desc, 4, &isnull));
		e->value_key = SPI_getvalue(tup, desc, 10);
		e->canonical_value = SPI_getvalue(tup, desc, 11);
		e->legacy_idempotency_key = DatumGetBool(SPI_getbinval(tup, desc, 12, &isnull));
		e->due_at = DatumGetTimestampTz(SPI_getbinval(tup, desc, 13, &isnull));
		e->marked_by_claim = DatumGetBool(SPI_getbinval(tup, desc, 14, &isnull));
		e->busy_key = DeliveryBusyKey(e->stripe_account, e->event_name, e->customer);

		dlist_push_tail(claimed, &e->node);
		batch->live++;
	}
	MemoryContextSwitchTo(old);
	return (int) SPI_processed;
}

/*
 * DeliveryStoreMarkSent
 *		Record, durably, that the given claimed events are about to be
 *		handed to the network, and set e->sent for each.  An event whose
 *		row another transaction has locked is not marked (and must not be
 *		sent now).  Returns how many were marked.
 *
 * Only a marked claim counts as an attempt that may have reached Stripe:
 * after a crash, the repair step starts the resend clock for those alone
 * and puts the others back as if never claimed.
 */
int
DeliveryStoreMarkSent(ClaimedEvent **events, int n)
{
	static SPIPlanPtr mark_plan = NULL;
	Datum	   *d = palloc(sizeof(Datum) * n);
	int64	   *marked;
	Datum		arg;
	int			nmarked;
	int			rc;
	int			i;

	if (n == 0)
		return 0;
	for (i = 0; i < n; i++)
		d[i] = Int64GetDatum(events[i]->id);
	arg = PointerGetDatum(column_array(d, NULL, n, INT8OID));
	if (mark_plan == NULL)
		mark_plan = SpiPrepareSaved("UPDATE stripe_meter.outbox o"
									"   SET sent_at = COALESCE(o.sent_at, pg_catalog.now())"
									" WHERE o.id IN (SELECT id FROM stripe_meter.outbox"
									"                 WHERE id = ANY ($1::bigint[])"
									"                   FOR UPDATE SKIP LOCKED)"
									" RETURNING o.id",
									1, (Oid[]) {INT8ARRAYOID});
	/* on disk before the first byte goes out, as the claim is */
	(void) set_config_option("synchronous_commit", "on", PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
	rc = SPI_execute_plan(mark_plan, &arg, NULL, false, 0);
	if (rc != SPI_OK_UPDATE_RETURNING)
		elog(ERROR, "could not mark meter events sent: %s", SPI_result_code_string(rc));
	nmarked = (int) SPI_processed;
	marked = palloc(sizeof(int64) * Max(nmarked, 1));
	for (i = 0; i < nmarked; i++)
	{
		bool		isnull;

		marked[i] = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i],
												SPI_tuptable->tupdesc, 1, &isnull));
	}
	qsort(marked, nmarked, sizeof(int64), cmp_int64);
	for (i = 0; i < n; i++)
		events[i]->sent = (bsearch(&events[i]->id, marked, nmarked, sizeof(int64),
								   cmp_int64) != NULL);
	return nmarked;
}

/*
 * A one-dimensional array of n values (nulls may be NULL: none is) of one
 * of the types the statements here take a column of.
 */
static ArrayType *
column_array(Datum *values, bool *nulls, int n, Oid type)
{
	int			dims[1] = {n};
	int			lbs[1] = {1};
	int16		len;
	bool		byval;
	char		align;

	get_typlenbyvalalign(type, &len, &byval, &align);
	return construct_md_array(values, nulls, 1, dims, lbs, type, len, byval, align);
}

static Datum
text_or_null(const char *s, bool *isnull)
{
	*isnull = (s == NULL || s[0] == '\0');
	return *isnull ? (Datum) 0 : CStringGetTextDatum(s);
}

static int
cmp_int64(const void *a, const void *b)
{
	int64		x = *(const int64 *) a;
	int64		y = *(const int64 *) b;

	return (x > y) - (x < y);
}

/*
 * Lock the outbox rows of the events in the list that no other transaction
 * holds, and mark the others record_deferred: a session may hold one for as
 * long as it likes (stripe_meter_event_cancel() locks the row it looks at
 * until the caller's transaction ends), and the worker must not wait for
 * it.  A row that no longer exists is not deferred: recording it changes
 * nothing.  Returns how many were deferred.
 */
static int
lock_rows(ClaimedEvent **events, int n)
{
	Datum	   *ids = palloc(sizeof(Datum) * n);
	int64	   *locked;
	int64	   *missing = NULL;
	int			nlocked;
	int			nmissing = 0;
	int			ndeferred = 0;
	int			i;
	Datum		arg;
	int			rc;
	static SPIPlanPtr lock_plan = NULL;
	static SPIPlanPtr exists_plan = NULL;

	for (i = 0; i < n; i++)
		ids[i] = Int64GetDatum(events[i]->id);
	arg = PointerGetDatum(column_array(ids, NULL, n, INT8OID));
	if (lock_plan == NULL)
		lock_plan = SpiPrepareSaved("SELECT id FROM stripe_meter.outbox"
									" WHERE id = ANY ($1::bigint[])"
									"   FOR UPDATE SKIP LOCKED",
									1, (Oid[]) {INT8ARRAYOID});
	rc = SPI_execute_plan(lock_plan, &arg, NULL, false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "could not lock meter events: %s", SPI_result_code_string(rc));
	nlocked = (int) SPI_processed;
	if (nlocked == n)
		return 0;

	locked = palloc(sizeof(int64) * Max(nlocked, 1));
	for (i = 0; i < nlocked; i++)
	{
		bool		isnull;

		locked[i] = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i],
												SPI_tuptable->tupdesc, 1, &isnull));
	}
	qsort(locked, nlocked, sizeof(int64), cmp_int64);

	/* not locked: held by someone, or gone (then nothing is waited for) */
	if (exists_plan == NULL)
		exists_plan = SpiPrepareSaved("SELECT r.id FROM pg_catalog.unnest($1::bigint[]) r(id)"
									  " WHERE NOT EXISTS (SELECT FROM stripe_meter.outbox o"
									  "                    WHERE o.id = r.id)",
									  1, (Oid[]) {INT8ARRAYOID});
	rc = SPI_execute_plan(exists_plan, &arg, NULL, true, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "could not look up meter events: %s", SPI_result_code_string(rc));
	nmissing = (int) SPI_processed;
	if (nmissing > 0)
	{
		missing = palloc(sizeof(int64) * nmissing);
		for (i = 0; i < nmissing; i++)
		{
			bool		isnull;

			missing[i] = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i],
													 SPI_tuptable->tupdesc, 1, &isnull));
		}
		qsort(missing, nmissing, sizeof(int64), cmp_int64);
	}

	for (i = 0; i < n; i++)
	{
		ClaimedEvent *e = events[i];

		if (bsearch(&e->id, locked, nlocked, sizeof(int64), cmp_int64) != NULL ||
			(nmissing > 0 &&
			 bsearch(&e->id, missing, nmissing, sizeof(int64), cmp_int64) != NULL))
			continue;
		e->record_deferred = true;
		ndeferred++;
	}
	return ndeferred;
}

/*
 * DeliveryStoreRecord
 *		Record the outcome of the n events given, set-wise: delivered
 *		events move to meter_events with Stripe's object, failed ones to
 *		failed_events with the reason, retried ones go back to the queue
 *		due at the time the caller chose (e->next_attempt_at), released ones
 *		as if never claimed.
 *		An event whose row another transaction has locked is left out and
 *		marked record_deferred; *deferred says how many.  Returns when the
 *		first rescheduled event is due, or 0.
 */
TimestampTz
DeliveryStoreRecord(ClaimedEvent **events, int n, int *deferred)
{
	TimestampTz earliest = 0;
	int			i;
	int			nd = 0,
				nf = 0,
				nr = 0,
				nl = 0;
	Datum	   *d_id,
			   *d_obj,
			   *d_how,
			   *d_req,
			   *d_ses;
	bool	   *d_objn,
			   *d_reqn,
			   *d_sesn;
	Datum	   *f_id,
			   *f_reason,
			   *f_status,
			   *f_err,
			   *f_req,
			   *f_maybe;
	bool	   *f_statusn,
			   *f_errn,
			   *f_reqn;
	Datum	   *r_id,
			   *r_next,
			   *r_status,
			   *r_reason,
			   *r_unknown;
	bool	   *r_statusn,
			   *r_reasonn;
	Datum	   *l_id,
			   *l_next,
			   *l_sent;
	bool	   *l_nextn;
	int			rc;

	*deferred = 0;
	for (i = 0; i < n; i++)
		events[i]->record_deferred = false;
	if (n == 0)
		return 0;
	*deferred = lock_rows(events, n);

	d_id = palloc(sizeof(Datum) * n);
	d_obj = palloc(sizeof(Datum) * n);
	d_how = palloc(sizeof(Datum) * n);
	d_req = palloc(sizeof(Datum) * n);
	d_ses = palloc(sizeof(Datum) * n);
	d_objn = palloc(sizeof(bool) * n);
	d_reqn = palloc(sizeof(bool) * n);
	d_sesn = palloc(sizeof(bool) * n);
	f_id = palloc(sizeof(Datum) * n);
	f_reason = palloc(sizeof(Datum) * n);
	f_status = palloc(sizeof(Datum) * n);
	f_err = palloc(sizeof(Datum) * n);
	f_req = palloc(sizeof(Datum) * n);
	f_statusn = palloc(sizeof(bool) * n);
	f_errn = palloc(sizeof(bool) * n);
	f_reqn = palloc(sizeof(bool) * n);
	f_maybe = palloc(sizeof(Datum) * n);
	r_id = palloc(sizeof(Datum) * n);
	r_next = palloc(sizeof(Datum) * n);
	r_status = palloc(sizeof(Datum) * n);
	r_reason = palloc(sizeof(Datum) * n);
	r_unknown = palloc(sizeof(Datum) * n);
	r_statusn = palloc(sizeof(bool) * n);
	r_reasonn = palloc(sizeof(bool) * n);
	l_id = palloc(sizeof(Datum) * n);
	l_next = palloc(sizeof(Datum) * n);
	l_nextn = palloc(sizeof(bool) * n);
	l_sent = palloc(sizeof(Datum) * n);

	for (i = 0; i < n; i++)
	{
		ClaimedEvent *e = events[i];
		DeliveryOutcome *o = &e->outcome;

		if (e->record_deferred)
			continue;
		switch (o->verdict)
		{
			case VERDICT_DELIVERED:
				d_id[nd] = Int64GetDatum(e->id);
				d_obj[nd] = text_or_null(o->response_json, &d_objn[nd]);
				d_how[nd] = CStringGetTextDatum(o->delivery);
				d_req[nd] = text_or_null(o->request_id, &d_reqn[nd]);
				d_ses[nd] = text_or_null(o->session_id, &d_sesn[nd]);
				nd++;
				break;
			case VERDICT_FAIL:
				f_id[nf] = Int64GetDatum(e->id);
				f_reason[nf] = CStringGetTextDatum(o->reason);
				f_status[nf] = Int32GetDatum((int32) o->http_status);
				f_statusn[nf] = (o->http_status == 0);
				f_err[nf] = text_or_null(o->response_json, &f_errn[nf]);
				f_req[nf] = text_or_null(o->request_id, &f_reqn[nf]);
				f_maybe[nf] = BoolGetDatum(o->maybe_billed);
				nf++;
				break;
			case VERDICT_RETRY:
			case VERDICT_PAUSE:
				if (earliest == 0 || e->next_attempt_at < earliest)
					earliest = e->next_attempt_at;
				r_next[nr] = TimestampTzGetDatum(e->next_attempt_at);
				r_id[nr] = Int64GetDatum(e->id);
				r_status[nr] = Int32GetDatum((int32) o->http_status);
				r_statusn[nr] = (o->http_status == 0);
				r_reason[nr] = text_or_null(o->reason, &r_reasonn[nr]);
				r_unknown[nr] = BoolGetDatum(o->outcome_unknown);
				nr++;
				break;
			case VERDICT_RELEASE:
				l_id[nl] = Int64GetDatum(e->id);
				l_next[nl] = TimestampTzGetDatum(o->not_before);
				l_nextn[nl] = (o->not_before == 0);
				l_sent[nl] = BoolGetDatum(e->sent);
				nl++;
				break;
		}
	}

	/* losing this commit in a crash only causes a replayed resend */
	(void) set_config_option("synchronous_commit", "off", PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);

	if (nd > 0)
	{
		Datum		args[5];

		if (delivered_plan == NULL)
		{
			Oid			types[5] = {INT8ARRAYOID, TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID};

			delivered_plan = SpiPrepareSaved(
										"WITH r AS (SELECT * FROM ROWS FROM (pg_catalog.unnest($1::bigint[]), pg_catalog.unnest($2::text[]), pg_catalog.unnest($3::text[]), pg_catalog.unnest($4::text[]), pg_catalog.unnest($5::text[]))"
										"             AS r(id, meter_event, delivery, request_id, session_id)),"
										" d AS (DELETE FROM stripe_meter.outbox o USING r WHERE o.id = r.id"
										"       RETURNING o.identifier, o.event_name, o.payload, o.ts, o.stripe_account,"
										"                 o.customer, o.enqueued_at, o.first_attempt_at, o.attempts,"
										"                 r.meter_event, r.delivery, r.request_id, r.session_id)"
										" INSERT INTO stripe_meter.meter_events"
										"  (identifier, event_name, payload, ts, stripe_account, customer, meter_event,"
										"   outcome, request_id, enqueued_at, first_attempt_at, attempts, session_id)"
										" SELECT identifier, event_name, payload, ts, stripe_account, customer,"
										"        meter_event::jsonb, delivery, request_id, enqueued_at, first_attempt_at, attempts,"
										"        session_id"
										"   FROM d"
										" ON CONFLICT (identifier) DO NOTHING",
										5, types);
		}
		args[0] = PointerGetDatum(column_array(d_id, NULL, nd, INT8OID));
		args[1] = PointerGetDatum(column_array(d_obj, d_objn, nd, TEXTOID));
		args[2] = PointerGetDatum(column_array(d_how, NULL, nd, TEXTOID));
		args[3] = PointerGetDatum(column_array(d_req, d_reqn, nd, TEXTOID));
		args[4] = PointerGetDatum(column_array(d_ses, d_sesn, nd, TEXTOID));
		rc = SPI_execute_plan(delivered_plan, args, NULL, false, 0);
		if (rc != SPI_OK_INSERT)
			elog(ERROR, "could not record delivered meter events: %s", SPI_result_code_string(rc));
		/* the rows inserted: an identifier already delivered adds nothing */
		CountersDelivered((int64) SPI_processed);
	}

	if (nf > 0)
	{
		Datum		args[6];

		if (failed_plan == NULL)
		{
			Oid			types[6] = {INT8ARRAYOID, TEXTARRAYOID, INT4ARRAYOID, TEXTARRAYOID, TEXTARRAYOID, BOOLARRAYOID};

			/*
			 * unknown_outcome_since goes along (from this attempt when it
			 * is the one that may have billed), so that a retry of the
			 * event still respects stripe_meter.resend_window
			 */
			failed_plan = SpiPrepareSaved(
									 "WITH r AS (SELECT * FROM ROWS FROM (pg_catalog.unnest($1::bigint[]), pg_catalog.unnest($2::text[]), pg_catalog.unnest($3::int[]), pg_catalog.unnest($4::text[]), pg_catalog.unnest($5::text[]), pg_catalog.unnest($6::bool[]))"
									 "             AS r(id, reason, http_status, stripe_error, request_id, maybe_billed)),"
									 " d AS (DELETE FROM stripe_meter.outbox o USING r WHERE o.id = r.id"
									 "       RETURNING o.identifier, o.event_name, o.payload, o.ts, o.stripe_account,"
									 "                 o.customer, o.enqueued_at, o.first_attempt_at, o.attempts,"
									 "                 r.reason, r.http_status, r.stripe_error, r.request_id, r.maybe_billed,"
									 "                 CASE WHEN r.maybe_billed"
									 "                   THEN COALESCE(o.unknown_outcome_since, o.in_flight_since)"
									 "                   ELSE o.unknown_outcome_since END AS unknown_outcome_since)"
									 " INSERT INTO stripe_meter.failed_events"
									 "  (identifier, event_name, payload, ts, stripe_account, customer, reason,"
									 "   http_status, stripe_error, request_id, enqueued_at, first_attempt_at, attempts,"
									 "   maybe_billed, unknown_outcome_since)"
									 " SELECT identifier, event_name, payload, ts, stripe_account, customer, reason,"
									 "        http_status, stripe_error::jsonb, request_id, enqueued_at, first_attempt_at, attempts,"
									 "        maybe_billed, unknown_outcome_since"
									 "   FROM d"
									 " ON CONFLICT (identifier) DO NOTHING",
									 6, types);
		}
		args[0] = PointerGetDatum(column_array(f_id, NULL, nf, INT8OID));
		args[1] = PointerGetDatum(column_array(f_reason, NULL, nf, TEXTOID));
		args[2] = PointerGetDatum(column_array(f_status, f_statusn, nf, INT4OID));
		args[3] = PointerGetDatum(column_array(f_err, f_errn, nf, TEXTOID));
		args[4] = PointerGetDatum(column_array(f_req, f_reqn, nf, TEXTOID));
		args[5] = PointerGetDatum(column_array(f_maybe, NULL, nf, BOOLOID));
		rc = SPI_execute_plan(failed_plan, args, NULL, false, 0);
		if (rc != SPI_OK_INSERT)
			elog(ERROR, "could not record failed meter events: %s", SPI_result_code_string(rc));
	}

	if (nr > 0)
	{
		Datum		args[5];

		if (retry_plan == NULL)
		{
			Oid			types[5] = {INT8ARRAYOID, TIMESTAMPTZARRAYOID, INT4ARRAYOID, TEXTARRAYOID, BOOLARRAYOID};

			retry_plan = SpiPrepareSaved(
									"UPDATE stripe_meter.outbox o"
									"   SET in_flight_since = NULL,"
									"       sent_at = NULL,"
									"       next_attempt_at = r.next_at,"
									"       last_http_status = r.http_status,"
									"       last_error = r.reason,"
									"       unknown_outcome_since = CASE WHEN r.unknown"
									"         THEN COALESCE(o.unknown_outcome_since, o.sent_at, o.in_flight_since)"
									"         ELSE o.unknown_outcome_since END"
									"  FROM ROWS FROM (pg_catalog.unnest($1::bigint[]), pg_catalog.unnest($2::timestamptz[]), pg_catalog.unnest($3::int[]), pg_catalog.unnest($4::text[]), pg_catalog.unnest($5::bool[]))"
									"       AS r(id, next_at, http_status, reason, unknown)"
									" WHERE o.id = r.id",
									5, types);
		}
		args[0] = PointerGetDatum(column_array(r_id, NULL, nr, INT8OID));
		args[1] = PointerGetDatum(column_array(r_next, NULL, nr, TIMESTAMPTZOID));
		args[2] = PointerGetDatum(column_array(r_status, r_statusn, nr, INT4OID));
		args[3] = PointerGetDatum(column_array(r_reason, r_reasonn, nr, TEXTOID));
		args[4] = PointerGetDatum(column_array(r_unknown, NULL, nr, BOOLOID));
		rc = SPI_execute_plan(retry_plan, args, NULL, false, 0);
		if (rc != SPI_OK_UPDATE)
			elog(ERROR, "could not reschedule meter events: %s", SPI_result_code_string(rc));
	}

	if (nl > 0)
	{
		Datum		args[3];

		if (release_plan == NULL)
		{
			Oid			types[3] = {INT8ARRAYOID, TIMESTAMPTZARRAYOID, BOOLARRAYOID};

			/*
			 * never sent: undo the claim's attempt count, and its
			 * first_attempt_at if this claim set it (a retried failed event
			 * keeps the one of its earlier life); due again as before, or
			 * later when its account is paused.  A row the claim marked sent
			 * whose event this worker never handed to the network (r.sent
			 * false) was never sent either.  (One handed to the network is
			 * never released; should it be, its outcome is unknown.)
			 */
			release_plan = SpiPrepareSaved(
									  "UPDATE stripe_meter.outbox o"
									  "   SET in_flight_since = NULL,"
									  "       sent_at = NULL,"
									  "       unknown_outcome_since = CASE WHEN o.sent_at IS NULL OR NOT r.sent"
									  "         THEN o.unknown_outcome_since"
									  "         ELSE COALESCE(o.unknown_outcome_since, o.sent_at) END,"
									  "       attempts = CASE WHEN o.sent_at IS NULL OR NOT r.sent"
									  "         THEN o.attempts - 1 ELSE o.attempts END,"
									  "       first_attempt_at = CASE WHEN (o.sent_at IS NULL OR NOT r.sent)"
									  "                               AND o.first_attempt_at = o.in_flight_since"
									  "         THEN NULL ELSE o.first_attempt_at END,"
									  "       next_attempt_at = COALESCE(r.next_at, o.next_attempt_at)"
									  "  FROM ROWS FROM (pg_catalog.unnest($1::bigint[]), pg_catalog.unnest($2::timestamptz[]),"
									  "                 pg_catalog.unnest($3::bool[]))"
									  "       AS r(id, next_at, sent)"
									  " WHERE o.id = r.id",
									  3, types);
		}
		args[0] = PointerGetDatum(column_array(l_id, NULL, nl, INT8OID));
		args[1] = PointerGetDatum(column_array(l_next, l_nextn, nl, TIMESTAMPTZOID));
		args[2] = PointerGetDatum(column_array(l_sent, NULL, nl, BOOLOID));
		rc = SPI_execute_plan(release_plan, args, NULL, false, 0);
		if (rc != SPI_OK_UPDATE)
			elog(ERROR, "could not release meter events: %s", SPI_result_code_string(rc));
	}
	return earliest;
}

/*
 * DeliveryStorePurgeDelivered
 *		Delete delivered rows older than stripe_meter.delivered_retention, at
 *		most PURGE_BATCH at a time, skipping rows another transaction has
 *		locked.  Returns how many; PURGE_BATCH means there may be more.
 */
int64
DeliveryStorePurgeDelivered(void)
{
	static SPIPlanPtr purge_plan = NULL;
	Datum		args[2];
	int			rc;

	if (stripe_meter_delivered_retention < 0)
		return 0;
	if (purge_plan == NULL)
		purge_plan = SpiPrepareSaved("DELETE FROM stripe_meter.meter_events WHERE ctid = ANY (ARRAY("
									 " SELECT ctid FROM stripe_meter.meter_events"
									 "  WHERE delivered_at < pg_catalog.now() - $1 * interval '1 minute'"
									 "  LIMIT $2 FOR UPDATE SKIP LOCKED))",
									 2, (Oid[]) {INT4OID, INT4OID});
	args[0] = Int32GetDatum(stripe_meter_delivered_retention);
	args[1] = Int32GetDatum(PURGE_BATCH);
	rc = SPI_execute_plan(purge_plan, args, NULL, false, 0);
	if (rc != SPI_OK_DELETE)
		elog(ERROR, "could not purge delivered meter events: %s", SPI_result_code_string(rc));
	return (int64) SPI_processed;
}

/*
 * DeliveryStorePauseAccount
 *		Record that Stripe refused requests for a Connect account, and move
 *		its queued events to the time it is tried again, so that claims
 *		pass over none of them meanwhile.
 */
void
DeliveryStorePauseAccount(const char *account, const char *reason, long http_status,
						  TimestampTz next_try_at)
{
	static SPIPlanPtr pause_plan = NULL;
	Datum		args[4];
	char		nulls[4] = {' ', ' ', ' ', ' '};
	int			rc;

	if (pause_plan == NULL)
		pause_plan = SpiPrepareSaved("WITH p AS ("
									 " INSERT INTO stripe_meter.paused_accounts AS p"
									 "   (stripe_account, reason, http_status, next_try_at)"
									 " VALUES ($1, $2, $3, $4)"
									 " ON CONFLICT (stripe_account) DO UPDATE"
									 "   SET reason = EXCLUDED.reason, http_status = EXCLUDED.http_status,"
									 "       next_try_at = EXCLUDED.next_try_at)"
									 " UPDATE stripe_meter.outbox o SET next_attempt_at = $4"
									 "  WHERE o.id IN (SELECT id FROM stripe_meter.outbox"
									 "                  WHERE stripe_account = $1 AND in_flight_since IS NULL"
									 "                    AND next_attempt_at < $4"
									 "                    FOR UPDATE SKIP LOCKED)",
									 4, (Oid[]) {TEXTOID, TEXTOID, INT4OID, TIMESTAMPTZOID});
	args[0] = CStringGetTextDatum(account);
	args[1] = CStringGetTextDatum(reason ? reason : "refused");
	args[2] = Int32GetDatum((int32) http_status);
	nulls[2] = http_status == 0 ? 'n' : ' ';
	args[3] = TimestampTzGetDatum(next_try_at);
	rc = SPI_execute_plan(pause_plan, args, nulls, false, 0);
	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "could not pause a Stripe account: %s", SPI_result_code_string(rc));
}

/*
 * DeliveryStoreResumeAccount
 *		An account (every account when NULL) is delivered again: forget its
 *		pause, and make its queued events due now.
 */
void
DeliveryStoreResumeAccount(const char *account)
{
	static SPIPlanPtr resume_plan = NULL;
	Datum		arg;
	char		null;
	int			rc;

	if (resume_plan == NULL)
		resume_plan = SpiPrepareSaved("WITH r AS ("
									  " DELETE FROM stripe_meter.paused_accounts p"
									  "  WHERE $1::text IS NULL OR p.stripe_account = $1"
									  "  RETURNING p.stripe_account)"
									  " UPDATE stripe_meter.outbox o SET next_attempt_at = pg_catalog.clock_timestamp()"
									  "   FROM r WHERE o.stripe_account = r.stripe_account"
									  "    AND o.in_flight_since IS NULL",
									  1, (Oid[]) {TEXTOID});
	arg = account ? CStringGetTextDatum(account) : (Datum) 0;
	null = account ? ' ' : 'n';
	rc = SPI_execute_plan(resume_plan, &arg, &null, false, 0);
	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "could not resume a Stripe account: %s", SPI_result_code_string(rc));
}

/*
 * DeliveryStoreLoadPausedAccounts
 *		Call found(account, next_try_at) for every paused account.
 */
void
DeliveryStoreLoadPausedAccounts(void (*found) (const char *account, TimestampTz next_try_at))
{
	int			rc;
	uint64		i;

	rc = SPI_execute("SELECT stripe_account, next_try_at FROM stripe_meter.paused_accounts",
					 true, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "could not read the paused Stripe accounts: %s", SPI_result_code_string(rc));
	for (i = 0; i < SPI_processed; i++)
	{
		bool		isnull;
		char	   *account = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
		Datum		next = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2, &isnull);

		found(account, DatumGetTimestampTz(next));
	}
}
