-- stripe_meter 0.1.0 -> 0.2.0
--
-- Every change made to stripe_meter.sql since 0.1.0 is repeated here, so that
-- ALTER EXTENSION stripe_meter UPDATE gives the same objects as a fresh
-- install of 0.2.0.

\echo Use "ALTER EXTENSION stripe_meter UPDATE TO '0.2.0'" to load this file. \quit

-- API v2 (the meter event stream): no per-event object comes back, so a
-- delivered event records that its request was accepted, and with which
-- meter event session.
ALTER TABLE stripe_meter.meter_events ADD COLUMN session_id text;
ALTER TABLE stripe_meter.meter_events DROP CONSTRAINT meter_events_outcome_check;
ALTER TABLE stripe_meter.meter_events ADD CONSTRAINT meter_events_outcome_check
	CHECK (outcome IN ('created', 'replayed', 'already_existed', 'accepted'));
COMMENT ON COLUMN stripe_meter.meter_events.meter_event IS
	'The billing.meter_event Stripe returned; NULL when Stripe already had the identifier or with API v2 (no per-event object)';
COMMENT ON COLUMN stripe_meter.meter_events.outcome IS
	'created: Stripe created the event; replayed: Stripe replayed its stored answer for the idempotency key; already_existed: Stripe already had the identifier; accepted: the v2 meter event stream accepted the request carrying it';
COMMENT ON COLUMN stripe_meter.meter_events.session_id IS
	'API v2: the id of the meter event session the event was sent with; NULL with API v1';
-- ---------------------------------------------------------------------------
-- The event lifecycle after delivery: cancellations, meters read from
-- Stripe, asynchronous error reports and reconciliation.
-- ---------------------------------------------------------------------------

-- Meters as Stripe has them, filled by stripe_meter_sync_meters().  Rows an
-- administrator inserted by hand have no meter_id.
ALTER TABLE stripe_meter.meters
	ADD COLUMN meter_id text,
	ADD COLUMN aggregation text
		CHECK (aggregation IN ('count', 'last', 'sum')),
	ADD COLUMN status text
		CHECK (status IN ('active', 'inactive')),
	ADD COLUMN synced_at timestamptz;
COMMENT ON COLUMN stripe_meter.meters.meter_id IS
	'Stripe''s meter id (mtr_...); NULL for a row entered by hand';
COMMENT ON COLUMN stripe_meter.meters.aggregation IS
	'Stripe''s default_aggregation.formula: count, last or sum';
COMMENT ON COLUMN stripe_meter.meters.status IS
	'active or inactive in Stripe; events for an inactive meter are refused';

-- What the worker and stripe_meter_sync_meters() last did: one row.
CREATE TABLE stripe_meter.sync_state (
	singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
	meters_synced_at timestamptz,
	meters_sync_error text,
	error_reports_pulled_at timestamptz,
	error_reports_error text
);
INSERT INTO stripe_meter.sync_state DEFAULT VALUES;
COMMENT ON TABLE stripe_meter.sync_state IS
	'When meters were last synced and how far Stripe''s error reports have been read';

-- Cancellations of delivered events: queued by stripe_meter_event_cancel()
-- and delivered by the worker as POST /v1/billing/meter_event_adjustments.
CREATE TABLE stripe_meter.adjustments (
	identifier text PRIMARY KEY,
	event_name text NOT NULL,
	stripe_account text,
	status text NOT NULL DEFAULT 'queued'
		CHECK (status IN ('awaiting_delivery', 'queued', 'done', 'failed')),
	received_at timestamptz,
	requested_at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
	attempts integer NOT NULL DEFAULT 0,
	first_attempt_at timestamptz,
	unknown_outcome_since timestamptz,
	next_attempt_at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
	in_flight_since timestamptz,
	outcome text CHECK (outcome IN ('created', 'replayed', 'already_cancelled', 'not_received')),
	adjustment jsonb,
	request_id text,
	http_status integer,
	last_error text,
	completed_at timestamptz
);
CREATE INDEX adjustments_due_idx ON stripe_meter.adjustments (next_attempt_at)
	WHERE status IN ('awaiting_delivery', 'queued');
COMMENT ON TABLE stripe_meter.adjustments IS
	'Cancellations of delivered meter events and the billing.meter_event_adjustment Stripe returned';
COMMENT ON COLUMN stripe_meter.adjustments.status IS
	'awaiting_delivery: the event itself is still being delivered; queued: to be sent; done: Stripe cancelled it, or never had it (outcome not_received); failed: see last_error';
COMMENT ON COLUMN stripe_meter.adjustments.received_at IS
	'When Stripe received the event: Stripe cancels only within 24 hours of that';

-- Asynchronous errors Stripe reported through its v2 Events API.
CREATE TABLE stripe_meter.error_reports (
	id text PRIMARY KEY,
	type text NOT NULL,
	stripe_account text,
	created timestamptz NOT NULL,
	meter_id text,
	summary text,
	error_count bigint,
	event jsonb NOT NULL,
	pulled_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE stripe_meter.error_reports IS
	'v1.billing.meter.error_report_triggered and v1.billing.meter.no_meter_found events pulled from Stripe';
-- each account's reading resumes from its newest report
CREATE INDEX error_reports_account_created_idx ON stripe_meter.error_reports (stripe_account, created);

ALTER TABLE stripe_meter.meter_events
	ADD COLUMN async_error_code text,
	ADD COLUMN async_error_message text,
	ADD COLUMN async_error_report text;
CREATE INDEX meter_events_async_error_idx ON stripe_meter.meter_events (async_error_code)
	WHERE async_error_code IS NOT NULL;
COMMENT ON COLUMN stripe_meter.meter_events.async_error_code IS
	'Set when Stripe reported after delivery that it will not bill this event (error report code)';

-- sync_state is not dumped: CREATE EXTENSION makes its row, and after a
-- restore the next sync and error-report read fill it again.
SELECT pg_catalog.pg_extension_config_dump('stripe_meter.adjustments', '');
SELECT pg_catalog.pg_extension_config_dump('stripe_meter.error_reports', '');

CREATE FUNCTION @extschema@.stripe_meter_event_cancel(event_name text, identifier text)
RETURNS text
LANGUAGE c
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'stripe_meter_event_cancel';
REVOKE ALL ON FUNCTION @extschema@.stripe_meter_event_cancel(text, text) FROM PUBLIC;
COMMENT ON FUNCTION @extschema@.stripe_meter_event_cancel(text, text) IS
	'Cancels one meter event: removed if not yet sent, else a cancel adjustment is queued; returns removed, queued or awaiting_delivery';

CREATE FUNCTION @extschema@.stripe_meter_sync_meters()
RETURNS integer
LANGUAGE c
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'stripe_meter_sync_meters';
REVOKE ALL ON FUNCTION @extschema@.stripe_meter_sync_meters() FROM PUBLIC;
COMMENT ON FUNCTION @extschema@.stripe_meter_sync_meters() IS
	'Reads every meter of the Stripe account into stripe_meter.meters; returns how many';

CREATE FUNCTION @extschema@.stripe_meter_reconcile(
	event_name text,
	customer text,
	"from" timestamptz,
	"to" timestamptz,
	value_grouping_window text DEFAULT NULL,
	stripe_account text DEFAULT NULL)
RETURNS TABLE (window_start timestamptz, window_end timestamptz,
			   local_events bigint, local_value numeric,
			   stripe_value numeric, difference numeric)
LANGUAGE c
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'stripe_meter_reconcile';
REVOKE ALL ON FUNCTION @extschema@.stripe_meter_reconcile(text, text, timestamptz, timestamptz, text, text) FROM PUBLIC;
COMMENT ON FUNCTION @extschema@.stripe_meter_reconcile(text, text, timestamptz, timestamptz, text, text) IS
	'Compares delivered events with Stripe''s event summaries for one customer and meter, per window';

-- Stripe Connect accounts whose requests Stripe refused with 401, 403 or 404
-- (access revoked, say): their events stay queued while every other account,
-- and the platform itself, keeps delivering.  The worker fills it and tries
-- each account again every stripe_meter.account_retry_interval;
-- stripe_meter_resume_account() or a configuration reload resumes them.
CREATE TABLE stripe_meter.paused_accounts (
	stripe_account text PRIMARY KEY,
	reason text NOT NULL,
	http_status integer,
	paused_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
	next_try_at timestamptz NOT NULL
);
COMMENT ON TABLE stripe_meter.paused_accounts IS
	'Connect accounts whose delivery is paused because Stripe refused their requests (401, 403, 404)';

CREATE FUNCTION @extschema@.stripe_meter_resume_account(stripe_account text DEFAULT NULL)
RETURNS bigint
LANGUAGE sql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
	WITH resumed AS (
		DELETE FROM stripe_meter.paused_accounts p
		 WHERE $1 IS NULL OR p.stripe_account OPERATOR(pg_catalog.=) $1
		RETURNING p.stripe_account),
	due AS (
		UPDATE stripe_meter.outbox o
		   SET next_attempt_at = pg_catalog.clock_timestamp()
		  FROM resumed r
		 WHERE o.stripe_account OPERATOR(pg_catalog.=) r.stripe_account
		   AND o.in_flight_since IS NULL)
	SELECT pg_catalog.count(*) FROM resumed
$$;
REVOKE ALL ON FUNCTION @extschema@.stripe_meter_resume_account(text) FROM PUBLIC;
COMMENT ON FUNCTION @extschema@.stripe_meter_resume_account(text) IS
	'Resumes delivery for a paused Connect account (all when NULL) at once; returns how many were paused';

-- worker_state() has a new column, so it and the view on it are made again.
DROP VIEW stripe_meter.status;
DROP FUNCTION stripe_meter.worker_state();

-- ---------------------------------------------------------------------------
-- Upkeep: the figures stripe_meter.status shows, kept as they change so
-- that reading them never counts meter_events, which holds millions of rows
-- at high volume.
-- ---------------------------------------------------------------------------

-- Running totals.  Only the worker writes them, in the transaction that
-- moves the rows they count: each write deletes every row it sees and
-- inserts their sum plus its own change, so the table holds one row (or a
-- few, for a moment), and the figures are as exact as the rows, through
-- crashes included.  There is no key: a restore adds the dumped row to the
-- one CREATE EXTENSION made, and a worker already delivering meanwhile
-- cannot collide with it; the next write folds them together.
CREATE TABLE stripe_meter.counters (
	delivered bigint NOT NULL DEFAULT 0,
	not_billed bigint NOT NULL DEFAULT 0
);
INSERT INTO stripe_meter.counters DEFAULT VALUES;
COMMENT ON TABLE stripe_meter.counters IS
	'Running totals behind stripe_meter.status, summed over its rows; written by the delivery worker only';
COMMENT ON COLUMN stripe_meter.counters.delivered IS
	'Events delivered since the extension was installed, those purged from meter_events (stripe_meter.delivered_retention) included';
COMMENT ON COLUMN stripe_meter.counters.not_billed IS
	'Delivered events Stripe reported it will not bill (async_error_code set), purged ones included';

-- Deliveries per second over the last minute: a ring of 60 rows, the slot
-- being the second of the minute.  The worker adds each recorded batch to
-- its second's row, starting the row afresh when it holds an older second.
CREATE TABLE stripe_meter.delivered_seconds (
	slot integer PRIMARY KEY
		CHECK (slot OPERATOR(pg_catalog.>=) 0 AND slot OPERATOR(pg_catalog.<) 60),
	second timestamptz,
	delivered bigint NOT NULL DEFAULT 0
);
INSERT INTO stripe_meter.delivered_seconds (slot)
	SELECT g FROM pg_catalog.generate_series(0, 59) g;
COMMENT ON TABLE stripe_meter.delivered_seconds IS
	'Events delivered in each of the last 60 seconds, for stripe_meter.status.delivered_last_minute';

-- The totals travel with a dump, so that delivered keeps counting the
-- purged events; the last minute does not (a restored database has
-- delivered nothing yet).
SELECT pg_catalog.pg_extension_config_dump('stripe_meter.counters', '');

-- The counters start from the rows already there.
UPDATE stripe_meter.counters
   SET delivered = (SELECT pg_catalog.count(*) FROM stripe_meter.meter_events),
	   not_billed = (SELECT pg_catalog.count(*) FROM stripe_meter.meter_events m
					  WHERE m.async_error_code IS NOT NULL);
UPDATE stripe_meter.delivered_seconds s
   SET second = d.second, delivered = d.n
  FROM (SELECT pg_catalog.date_trunc('second', m.delivered_at) AS second,
			   pg_catalog.count(*) AS n
		  FROM stripe_meter.meter_events m
		 WHERE m.delivered_at OPERATOR(pg_catalog.>)
			   (pg_catalog.now() OPERATOR(pg_catalog.-) interval '1 minute')
		 GROUP BY 1) d
 WHERE s.slot OPERATOR(pg_catalog.=)
	   (pg_catalog.date_part('epoch', d.second)::bigint OPERATOR(pg_catalog.%) 60)::integer;

-- What the delivery worker of this database is doing, read from shared
-- memory.  All NULL when the library is not preloaded.
CREATE FUNCTION stripe_meter.worker_state(
	OUT worker_pid integer,
	OUT paused text,
	OUT last_error text,
	OUT last_error_at timestamptz,
	OUT started_at timestamptz,
	OUT stream_accounts integer)
RETURNS record
LANGUAGE c
STABLE
AS 'MODULE_PATHNAME', 'stripe_meter_worker_state';
REVOKE ALL ON FUNCTION stripe_meter.worker_state() FROM PUBLIC;
COMMENT ON FUNCTION stripe_meter.worker_state() IS
	'The delivery worker''s shared state; stream_accounts: Stripe accounts whose API v2 session state it holds';

-- The outbox trigger reads the tables it checks by direct index lookups now,
-- which need neither the owner's privileges nor a search_path.
ALTER FUNCTION stripe_meter.outbox_before_insert() SECURITY INVOKER RESET search_path;

-- The index the worker claims by changes: see outbox_due_idx below.
DROP INDEX stripe_meter.outbox_due_idx;

-- Whether a claimed attempt was handed to the network.  An older worker
-- recorded no such thing: whatever it had claimed may have been sent.
ALTER TABLE stripe_meter.outbox ADD COLUMN sent_at timestamptz;
UPDATE stripe_meter.outbox SET sent_at = in_flight_since
 WHERE in_flight_since IS NOT NULL;
COMMENT ON COLUMN stripe_meter.outbox.sent_at IS
	'When the claimed attempt was handed to the network; NULL while it is claimed but not sent, so a restart requeues it clean';

-- Events failed while Stripe may have billed them are flagged, and keep when
-- their outcome became unknown, so that a retry still respects the resend
-- window.  stripe_meter_retry_failed() skips them unless forced: a new
-- parameter, so the function is replaced (a GRANT on the old one is lost).
ALTER TABLE stripe_meter.failed_events
	ADD COLUMN maybe_billed boolean NOT NULL DEFAULT false,
	ADD COLUMN unknown_outcome_since timestamptz;
COMMENT ON COLUMN stripe_meter.failed_events.maybe_billed IS
	'Failed without a definite answer (outcome unknown, a replayed 5xx or 409, or a 5xx or 409 Stripe said not to retry): Stripe may have billed it; stripe_meter_retry_failed() skips it unless force => true';
COMMENT ON COLUMN stripe_meter.failed_events.unknown_outcome_since IS
	'As in the outbox: when an attempt first ended without a definite answer; a retry keeps it, so resends stay inside Stripe''s idempotency window';

DROP FUNCTION @extschema@.stripe_meter_retry_failed(text);
CREATE FUNCTION @extschema@.stripe_meter_retry_failed(identifier text DEFAULT NULL,
	force boolean DEFAULT false)
RETURNS bigint
LANGUAGE c
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'stripe_meter_retry_failed';
REVOKE ALL ON FUNCTION @extschema@.stripe_meter_retry_failed(text, boolean) FROM PUBLIC;
COMMENT ON FUNCTION @extschema@.stripe_meter_retry_failed(text, boolean) IS
	'Moves one failed event (or all when NULL, maybe-billed ones only with force) back to the outbox; returns how many';

-- ---------------------------------------------------------------------------
-- A request's body and Idempotency-Key depend only on its queued row.
-- ---------------------------------------------------------------------------

-- Stripe answers a resend under the same Idempotency-Key with an
-- idempotency error unless its parameters are those of the first attempt,
-- so what decides the request is frozen in the row when it is queued: the
-- meter's value key (a later meter sync or UPDATE of stripe_meter.meters
-- must not change which payload entry is sent as the usage value) and that
-- value's canonical text (what validation checked is what is sent).  The
-- payload itself stays as given.  Rows queued before 0.2.0 have neither:
-- the worker reads the meter's value key for them, as 0.1.0 did.
-- legacy_idempotency_key marks the events attempted before 0.2.0, which
-- must keep being resent under the key they were first sent with, their
-- bare identifier; every other event is sent under "meter_event:" and its
-- identifier, which no cancellation's key ("meter_event_adjustment:...")
-- can equal.  Cancellations did not exist before 0.2.0: they need no mark.
ALTER TABLE stripe_meter.outbox
	ADD COLUMN value_payload_key text,
	ADD COLUMN canonical_value text,
	ADD COLUMN legacy_idempotency_key boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN stripe_meter.outbox.value_payload_key IS
	'The meter''s value key when the event was queued: the payload entry sent as the usage value; NULL for events queued before 0.2.0 (the meter''s current key is used)';
COMMENT ON COLUMN stripe_meter.outbox.canonical_value IS
	'The usage value exactly as every attempt sends it (canonical digits); NULL for events queued before 0.2.0';
COMMENT ON COLUMN stripe_meter.outbox.legacy_idempotency_key IS
	'true for an event first attempted before 0.2.0: its Idempotency-Key stays its bare identifier; otherwise "meter_event:" and the identifier';
-- An event the old worker claimed (attempts counted, or a first attempt
-- time) may have reached Stripe under its bare identifier: it keeps that
-- key, or a resend after the update could be billed a second time.
UPDATE stripe_meter.outbox
   SET legacy_idempotency_key = true
 WHERE attempts OPERATOR(pg_catalog.>) 0 OR first_attempt_at IS NOT NULL;
COMMENT ON COLUMN stripe_meter.outbox.identifier IS
	'Stripe''s event identifier; every attempt''s Idempotency-Key is derived from it';

-- ---------------------------------------------------------------------------
-- Rollups: the events of one customer, meter and set of dimension values
-- that fall in one time window, sent to Stripe as one event.
-- ---------------------------------------------------------------------------

-- A meter's rollup window (NULL, the default: every event is sent by
-- itself).  Only a sum or last meter may have one: Stripe bills the sum of
-- a window's values, or its last value, exactly as it bills the events one
-- by one, but it would count a rollup of a count meter as one event.
-- Windows are aligned on whole multiples of their length since the epoch.
ALTER TABLE stripe_meter.meters
	ADD COLUMN rollup_window interval,
	ADD CONSTRAINT meters_rollup_window_check
		CHECK (rollup_window IS NULL
			   OR (aggregation OPERATOR(pg_catalog.=) ANY ('{sum,last}'::text[])
				   AND rollup_window OPERATOR(pg_catalog.>=) interval '1 second'
				   AND rollup_window OPERATOR(pg_catalog.<=) interval '1 day'
				   AND pg_catalog.date_part('epoch', rollup_window)
					   OPERATOR(pg_catalog.=) pg_catalog.trunc(pg_catalog.date_part('epoch', rollup_window))));
COMMENT ON COLUMN stripe_meter.meters.rollup_window IS
	'NULL: each event is sent by itself; else events are summed (sum meters) or the last one kept (last meters) per customer, dimension values and window of this length, set with stripe_meter_set_rollup_window()';

-- An event of such a meter waits in the outbox, never claimed by itself,
-- until its window has closed: its window and the meter's formula are
-- frozen when it is queued, so changing the meter later changes only the
-- events queued after.
ALTER TABLE stripe_meter.outbox
	ADD COLUMN rollup_window_end timestamptz,
	ADD COLUMN rollup_formula text
		CHECK (rollup_formula OPERATOR(pg_catalog.=) ANY ('{sum,last}'::text[])),
	ADD CONSTRAINT outbox_rollup_check
		CHECK ((rollup_window_end IS NULL) OPERATOR(pg_catalog.=) (rollup_formula IS NULL));
COMMENT ON COLUMN stripe_meter.outbox.rollup_window_end IS
	'For an event to be rolled up: the end of the window it falls in; it is sent as part of a rollup once that window has closed';
COMMENT ON COLUMN stripe_meter.outbox.rollup_formula IS
	'For an event to be rolled up: sum or last, the meter''s formula when it was queued';

-- The worker claims due events key by key (customer, meter, account), a
-- few per key, so one customer's backlog never fills a claim: the index
-- leads with that key, and leaves out claimed rows and events waiting to
-- be rolled up.
CREATE INDEX outbox_due_idx ON stripe_meter.outbox
	(customer COLLATE "C", event_name COLLATE "C",
	 (COALESCE(stripe_account, '')) COLLATE "C", next_attempt_at)
	WHERE in_flight_since IS NULL AND rollup_window_end IS NULL;
CREATE INDEX outbox_rollup_idx ON stripe_meter.outbox (rollup_window_end)
	WHERE rollup_window_end IS NOT NULL;

-- Every rollup the worker formed.  A window's events committed after its
-- rollup was formed go into the next generation for that window; a sum too
-- large for Stripe's 15 digits is split into parts.  The identifier, also
-- the Idempotency-Key's base, is derived from the group, the window, the
-- generation and the part, so forming it again after a crash gives the same.
CREATE TABLE stripe_meter.rollups (
	identifier text PRIMARY KEY,
	group_hash text NOT NULL,
	window_end timestamptz NOT NULL,
	generation integer NOT NULL,
	part integer NOT NULL,
	event_name text NOT NULL,
	stripe_account text,
	customer text NOT NULL,
	formula text NOT NULL,
	events integer NOT NULL,
	formed_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
	CONSTRAINT rollups_window_key UNIQUE (group_hash, window_end, generation, part)
);
COMMENT ON TABLE stripe_meter.rollups IS
	'Rollups formed from events of meters with a rollup_window: one row per event sent for a group, window, generation and part';
COMMENT ON COLUMN stripe_meter.rollups.group_hash IS
	'Identifies the group: Stripe account, event name and the payload without its value (customer and dimension values)';
SELECT pg_catalog.pg_extension_config_dump('stripe_meter.rollups', '');

-- A rolled-up event is kept in meter_events with the identifier of the
-- rollup it went into; Stripe's answer is kept once, on the rollup's row.
ALTER TABLE stripe_meter.meter_events
	ADD COLUMN rollup_identifier text,
	DROP CONSTRAINT meter_events_outcome_check,
	ADD CONSTRAINT meter_events_outcome_check
		CHECK (outcome IN ('created', 'replayed', 'already_existed', 'accepted', 'rolled_up'));
CREATE INDEX meter_events_rollup_idx ON stripe_meter.meter_events (rollup_identifier)
	WHERE rollup_identifier IS NOT NULL;
COMMENT ON COLUMN stripe_meter.meter_events.rollup_identifier IS
	'For an event rolled up (outcome rolled_up): the identifier of the rollup that carried it, whose own row holds Stripe''s answer';

CREATE FUNCTION @extschema@.stripe_meter_set_rollup_window(event_name text,
	rollup_window interval DEFAULT interval '1 minute')
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
	formula text;
BEGIN
	SELECT m.aggregation INTO formula
	  FROM stripe_meter.meters m
	 WHERE m.event_name OPERATOR(pg_catalog.=) $1
	   FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'meter for event name "%" does not exist', $1
			USING ERRCODE = 'undefined_object',
				  HINT = 'Run stripe_meter_sync_meters() to read the meters from Stripe.';
	END IF;
	IF $2 IS NOT NULL AND formula IS NULL THEN
		RAISE EXCEPTION 'cannot roll up events of meter "%": its aggregation formula is not known', $1
			USING ERRCODE = 'object_not_in_prerequisite_state',
				  HINT = 'Run stripe_meter_sync_meters() to read the meter''s formula from Stripe.';
	END IF;
	IF $2 IS NOT NULL AND formula OPERATOR(pg_catalog.=) 'count' THEN
		RAISE EXCEPTION 'cannot roll up events of meter "%": it counts events', $1
			USING ERRCODE = 'feature_not_supported',
				  DETAIL = 'Stripe would count a rollup as one event.';
	END IF;
	IF $2 IS NOT NULL AND ($2 OPERATOR(pg_catalog.<) interval '1 second'
						   OR $2 OPERATOR(pg_catalog.>) interval '1 day'
						   OR pg_catalog.date_part('epoch', $2)
							  OPERATOR(pg_catalog.<>) pg_catalog.trunc(pg_catalog.date_part('epoch', $2))) THEN
		RAISE EXCEPTION 'rollup window must be a whole number of seconds from 1 second to 1 day'
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	UPDATE stripe_meter.meters m SET rollup_window = $2
	 WHERE m.event_name OPERATOR(pg_catalog.=) $1;
END
$fn$;
REVOKE ALL ON FUNCTION @extschema@.stripe_meter_set_rollup_window(text, interval) FROM PUBLIC;
COMMENT ON FUNCTION @extschema@.stripe_meter_set_rollup_window(text, interval) IS
	'Rolls up the events of a sum or last meter queued from now on, per customer, dimension values and window of this length (NULL: send each event by itself)';

-- What an operator watches: queue, deliveries, failures, the worker's state,
-- and what happened after delivery.  delivered, delivered_last_minute and
-- not_billed come from the counters above and never read meter_events.
-- pending, in_flight and oldest_pending_age still count the outbox, and
-- failed counts failed_events: both stay small (the outbox is emptied as
-- fast as Stripe accepts, failed events wait for a person), and a counter
-- on the outbox would make every enqueueing transaction update one row.
-- Events waiting in open rollup windows are counted apart from those
-- waiting to be sent.
CREATE VIEW stripe_meter.status AS
SELECT
	(SELECT pg_catalog.count(*) FROM stripe_meter.outbox o
	  WHERE o.in_flight_since IS NULL AND o.rollup_window_end IS NULL) AS pending,
	(SELECT pg_catalog.count(*) FROM stripe_meter.outbox o
	  WHERE o.in_flight_since IS NOT NULL) AS in_flight,
	(SELECT COALESCE(pg_catalog.sum(c.delivered), 0)::bigint
	   FROM stripe_meter.counters c) AS delivered,
	(SELECT pg_catalog.count(*) FROM stripe_meter.failed_events) AS failed,
	pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-)
		(SELECT o.enqueued_at FROM stripe_meter.outbox o ORDER BY o.id LIMIT 1)
		AS oldest_pending_age,
	w.paused,
	w.last_error,
	(SELECT COALESCE(pg_catalog.sum(s.delivered), 0)::bigint
	   FROM stripe_meter.delivered_seconds s
	  WHERE s.second OPERATOR(pg_catalog.>)
			(pg_catalog.now() OPERATOR(pg_catalog.-) interval '1 minute'))
		AS delivered_last_minute,
	w.worker_pid,
	(SELECT COALESCE(pg_catalog.sum(c.not_billed), 0)::bigint
	   FROM stripe_meter.counters c) AS not_billed,
	(SELECT pg_catalog.count(*) FROM stripe_meter.adjustments a
	  WHERE a.status IN ('awaiting_delivery', 'queued')) AS cancels_pending,
	(SELECT pg_catalog.count(*) FROM stripe_meter.adjustments a
	  WHERE a.status OPERATOR(pg_catalog.=) 'failed') AS cancels_failed,
	(SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
				'stripe_account', p.stripe_account, 'reason', p.reason,
				'http_status', p.http_status, 'paused_at', p.paused_at,
				'next_try_at', p.next_try_at) ORDER BY p.stripe_account)
	   FROM stripe_meter.paused_accounts p) AS paused_accounts,
	(SELECT pg_catalog.count(*) FROM stripe_meter.outbox o
	  WHERE o.rollup_window_end IS NOT NULL) AS rollup_waiting,
	(SELECT pg_catalog.min(o.rollup_window_end) FROM stripe_meter.outbox o
	  WHERE o.rollup_window_end IS NOT NULL) AS rollup_oldest_window_end
FROM stripe_meter.worker_state() w;
COMMENT ON VIEW stripe_meter.status IS
	'Queue depth, delivery counts and the delivery worker''s state for this database';
COMMENT ON COLUMN stripe_meter.status.delivered IS
	'Events delivered since the extension was installed, including those since purged from meter_events';
COMMENT ON COLUMN stripe_meter.status.delivered_last_minute IS
	'Events delivered in the last minute, counted per whole second';
COMMENT ON COLUMN stripe_meter.status.not_billed IS
	'Delivered events Stripe reported it will not bill, including those since purged from meter_events';
COMMENT ON COLUMN stripe_meter.status.pending IS
	'Events waiting to be sent, not counting those waiting in an open rollup window';
COMMENT ON COLUMN stripe_meter.status.rollup_waiting IS
	'Events waiting for their rollup window to close';
COMMENT ON COLUMN stripe_meter.status.rollup_oldest_window_end IS
	'When the oldest rollup window with events waiting closes';
