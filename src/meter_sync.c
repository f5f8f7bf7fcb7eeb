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
 * (stripe_account) are not checked against them.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/meter_sync.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "nodes/pg_list.h"
#include "storage/lmgr.h"
#include "storage/lock.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

#define METERS_PATH			"/v1/billing/meters?limit=100"
#define MAX_PAGES			1000

PG_FUNCTION_INFO_V1(stripe_meter_sync_meters);


/* a top-level key of a JSON object, or NULL */
static JsonbValue *
json_key(Jsonb *jb, const char *key)
{
	JsonbValue	k;

	k.type = jbvString;
	k.val.string.val = (char *) key;
	k.val.string.len = strlen(key);
	return findJsonbValueFromContainer(&jb->root, JB_FOBJECT, &k);
}

/*
 * ListPageNext
 *		For a Stripe v1 list page: whether there is more, and the id of its
 *		last object (the next page's starting_after).  False when the body
 *		is not a list.
 */
bool
ListPageNext(const char *body, size_t len, bool *has_more, char **last_id)
{
	Jsonb	   *jb;
	JsonbValue *v;
	JsonbValue *last;
	uint32		n;

	*has_more = false;
	*last_id = NULL;
	if (!DeliveryJsonIsStorable(body, len))
		return false;
	jb = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(pnstrdup(body, len))));
	if (!JB_ROOT_IS_OBJECT(jb))
		return false;
	v = json_key(jb, "data");
	if (v == NULL || v->type != jbvBinary || !JsonContainerIsArray(v->val.binary.data))
		return false;
	n = JsonContainerSize(v->val.binary.data);
	if (n > 0)
	{
		last = getIthJsonbValueFromContainer(v->val.binary.data, n - 1);
		if (last && last->type == jbvBinary && JsonContainerIsObject(last->val.binary.data))
		{
			JsonbValue	k;
			JsonbValue *id;

			k.type = jbvString;
			k.val.string.val = "id";
			k.val.string.len = 2;
			id = findJsonbValueFromContainer(last->val.binary.data, JB_FOBJECT, &k);
			if (id && id->type == jbvString)
				*last_id = pnstrdup(id->val.string.val, id->val.string.len);
		}
	}
	v = json_key(jb, "has_more");
	*has_more = (v != NULL && v->type == jbvBool && v->val.boolean && *last_id != NULL);
	return true;
}

/*
 * Read every page.  In a backend an HTTP failure raises an ERROR; in the
 * worker it returns NIL with *error set.
 */
static List *
fetch_pages(bool raise, char **error)
{
	List	   *pages = NIL;
	char	   *after = NULL;
	int			i;

	*error = NULL;
	for (i = 0; i < MAX_PAGES; i++)
	{
		StringInfoData path;
		HttpResult	http;
		bool		has_more;

		initStringInfo(&path);
		appendStringInfoString(&path, METERS_PATH);
		if (after)
		{
			appendStringInfoString(&path, "&starting_after=");
			StripeClientAppendEscaped(&path, after, strlen(after));
		}
		if (raise)
		{
			char	   *body = StripeSyncGetJson(path.data, NULL);

			http.body = body;
			http.body_len = strlen(body);
			http.status = 200;
		}
		else if (!StripeSyncRequest("GET", path.data, NULL, NULL, NULL, &http) ||
				 http.curl_code != 0 || http.status != 200)
		{
			*error = StripeSyncErrorText(&http);
			return NIL;
		}
		if (!ListPageNext(http.body, http.body_len, &has_more, &after))
		{
			if (raise)
				ereport(ERROR,
						(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
						 errmsg("Stripe's list of meters could not be read")));
			*error = "Stripe's list of meters could not be read";
			return NIL;
		}
		pages = lappend(pages, pnstrdup(http.body, http.body_len));
		if (!has_more)
			return pages;
	}
	if (raise)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("Stripe's list of meters has more than %d pages", MAX_PAGES)));
	*error = "too many pages of meters";
	return NIL;
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
 * Replace stripe_meter.meters with the meters in pages.  SPI connected, and
 * the sync lock held.  Returns how many meters the table holds.
 */
static int
apply_pages(List *pages)
{
	ListCell   *lc;
	Datum		stamp = TimestampTzGetDatum(GetCurrentTimestamp());
	int			rc;

	foreach(lc, pages)
	{
		Datum		args[2] = {CStringGetTextDatum((char *) lfirst(lc)), stamp};

		/*
		 * Stripe may hold an inactive meter and an active one with the same
		 * event name: the active one wins.  Meters whose keys could not be
		 * form-encoded are left out.
		 */
		rc = SPI_execute_with_args(
								   "WITH m AS ("
								   " SELECT DISTINCT ON (x->>'event_name')"
								   "   x->>'event_name' AS event_name,"
								   "   COALESCE(x->'customer_mapping'->>'event_payload_key', 'stripe_customer_id') AS ck,"
								   "   COALESCE(x->'value_settings'->>'event_payload_key', 'value') AS vk,"
								   "   x->>'id' AS id,"
								   "   x->'default_aggregation'->>'formula' AS agg,"
								   "   x->>'status' AS st"
								   "   FROM pg_catalog.jsonb_array_elements($1::jsonb->'data') x"
								   "  WHERE pg_catalog.jsonb_typeof(x) = 'object'"
								   "    AND COALESCE(x->>'event_name', '') <> ''"
								   "    AND pg_catalog.char_length(x->>'event_name') <= 100"
								   "  ORDER BY x->>'event_name', (x->>'status' = 'active') DESC,"
								   "           x->>'created' DESC NULLS LAST)"
								   " INSERT INTO stripe_meter.meters AS t"
								   "   (event_name, customer_payload_key, value_payload_key, meter_id,"
								   "    aggregation, status, synced_at)"
								   " SELECT event_name, ck, vk, id,"
								   "        CASE WHEN agg IN ('count', 'last', 'sum') THEN agg END,"
								   "        CASE WHEN st IN ('active', 'inactive') THEN st ELSE 'inactive' END, $2"
								   "   FROM m"
								   "  WHERE ck <> '' AND vk <> '' AND ck <> vk"
								   "    AND pg_catalog.strpos(ck, '[') = 0 AND pg_catalog.strpos(ck, ']') = 0"
								   "    AND pg_catalog.strpos(vk, '[') = 0 AND pg_catalog.strpos(vk, ']') = 0"
								   " ON CONFLICT (event_name) DO UPDATE SET"
								   "   customer_payload_key = EXCLUDED.customer_payload_key,"
								   "   value_payload_key = EXCLUDED.value_payload_key,"
								   "   meter_id = EXCLUDED.meter_id, aggregation = EXCLUDED.aggregation,"
								   "   status = EXCLUDED.status, synced_at = EXCLUDED.synced_at"
								   " WHERE t.synced_at IS DISTINCT FROM EXCLUDED.synced_at"
								   "    OR (EXCLUDED.status = 'active' AND t.status <> 'active')",
								   2, (Oid[]) {TEXTOID, TIMESTAMPTZOID}, args, NULL, false, 0);
		if (rc != SPI_OK_INSERT)
			elog(ERROR, "could not store meters: %s", SPI_result_code_string(rc));
	}
	rc = SPI_execute_with_args("DELETE FROM stripe_meter.meters WHERE synced_at IS DISTINCT FROM $1",
							   1, (Oid[]) {TIMESTAMPTZOID}, &stamp, NULL, false, 0);
	if (rc != SPI_OK_DELETE)
		elog(ERROR, "could not remove old meters: %s", SPI_result_code_string(rc));
	rc = SPI_execute_with_args("UPDATE stripe_meter.sync_state"
							   "   SET meters_synced_at = $1, meters_sync_error = NULL",
							   1, (Oid[]) {TIMESTAMPTZOID}, &stamp, NULL, false, 0);
	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "could not record the sync: %s", SPI_result_code_string(rc));
	rc = SPI_execute("SELECT pg_catalog.count(*)::int4 FROM stripe_meter.meters", false, 0);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not count meters");
	{
		bool		isnull;

		return DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	}
}

/*
 * stripe_meter_sync_meters() RETURNS integer
 */
Datum
stripe_meter_sync_meters(PG_FUNCTION_ARGS)
{
	char	   *error;
	List	   *pages = fetch_pages(true, &error);
	int			n;

	SPI_connect();
	(void) lock_meter_sync(true);
	n = apply_pages(pages);
	SPI_finish();
	PG_RETURN_INT32(n);
}

/*
 * MeterSyncRun
 *		The worker's scheduled sync: fetch with no transaction open, then
 *		apply in one.  Returns the number of meters, or -1 on failure
 *		(logged and kept in sync_state.meters_sync_error).
 */
int
MeterSyncRun(void)
{
	char	   *error;
	List	   *pages = fetch_pages(false, &error);
	MemoryContext mine = CurrentMemoryContext;
	int			n = -1;

	if (!DeliveryStoreBegin())
		return -1;

	/*
	 * A sync that a session runs holds the lock, and the rows it wrote,
	 * until that session's transaction ends: never wait for it.
	 */
	if (!lock_meter_sync(false))
	{
		StripeMeterSetLastError(MyDatabaseId,
								"the scheduled meter sync was skipped: another transaction is syncing meters (stripe_meter_sync_meters() in a transaction still open); it runs again at the next interval");
		DeliveryStoreCommit();
		MemoryContextSwitchTo(mine);
		return -1;
	}
	if (error == NULL)
		n = apply_pages(pages);
	else
	{
		Datum		arg = CStringGetTextDatum(error);

		ereport(LOG,
				(errmsg("stripe_meter could not sync meters: %s", error)));
		(void) SPI_execute_with_args("UPDATE stripe_meter.sync_state SET meters_sync_error = $1",
									 1, (Oid[]) {TEXTOID}, &arg, NULL, false, 0);
	}
	DeliveryStoreCommit();
	MemoryContextSwitchTo(mine);
	return n;
}

/*
 * MeterSyncCheckEnqueue
 *		Once meters are synced, refuse (or warn about) an event whose name
 *		has no meter, or whose meter is inactive.  meter is the event name's
 *		row in stripe_meter.meters (enqueue_probe.c).
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
	if (!EnqueueProbeMetersSynced())
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
