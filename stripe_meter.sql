/* stripe_meter: the complete install script for the current version */

\echo Use "CREATE EXTENSION stripe_meter" to load this file. \quit

-- The extension's tables and views live in their own schema, created here so
-- that it is a member of the extension and is dropped with it.  The functions
-- users call live in the schema the extension is created in (@extschema@).
CREATE SCHEMA stripe_meter;
COMMENT ON SCHEMA stripe_meter IS 'stripe_meter: outbox, delivered and failed meter events';
REVOKE ALL ON SCHEMA stripe_meter FROM PUBLIC;

-- Meters: which payload keys carry the customer and the value for an event
-- name.  Events whose name has no row here use Stripe's defaults.
CREATE TABLE stripe_meter.meters (
	event_name text PRIMARY KEY
		CHECK (pg_catalog.char_length(event_name) OPERATOR(pg_catalog.<=) 100
			   AND event_name OPERATOR(pg_catalog.<>) ''),
	-- brackets delimit keys in the form encoding (payload[KEY]=VALUE)
	customer_payload_key text NOT NULL DEFAULT 'stripe_customer_id'
		CHECK (customer_payload_key OPERATOR(pg_catalog.<>) ''
			   AND pg_catalog.strpos(customer_payload_key, '[') OPERATOR(pg_catalog.=) 0
			   AND pg_catalog.strpos(customer_payload_key, ']') OPERATOR(pg_catalog.=) 0),
	value_payload_key text NOT NULL DEFAULT 'value'
		CHECK (value_payload_key OPERATOR(pg_catalog.<>) ''
			   AND pg_catalog.strpos(value_payload_key, '[') OPERATOR(pg_catalog.=) 0
			   AND pg_catalog.strpos(value_payload_key, ']') OPERATOR(pg_catalog.=) 0),
	CHECK (customer_payload_key OPERATOR(pg_catalog.<>) value_payload_key)
);
COMMENT ON TABLE stripe_meter.meters IS
	'Stripe meters billed from this database: the payload keys each event name uses';

-- The outbox: events recorded but not yet delivered.  Applications may INSERT
-- into it directly; the BEFORE INSERT trigger validates each row exactly as
-- stripe_meter_event_create() does.  Delivered and failed events move out, so
-- the table stays small and hot.
CREATE TABLE stripe_meter.outbox (
	id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	identifier text NOT NULL,
	event_name text NOT NULL,
	payload jsonb NOT NULL,
	ts timestamptz NOT NULL,
	stripe_account text,
	customer text NOT NULL,
	enqueued_at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
	attempts integer NOT NULL DEFAULT 0,
	first_attempt_at timestamptz,
	unknown_outcome_since timestamptz,
	next_attempt_at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
	in_flight_since timestamptz,
	last_http_status integer,
	last_error text,
	CONSTRAINT outbox_identifier_key UNIQUE (identifier)
) WITH (fillfactor = 80);
-- The worker claims the events that are due, in the order they fell due.
-- Claimed rows are left out, so a claim never walks past the events in
-- flight.
CREATE INDEX outbox_due_idx ON stripe_meter.outbox (next_attempt_at)
	WHERE in_flight_since IS NULL;
COMMENT ON TABLE stripe_meter.outbox IS
	'Meter events waiting to be delivered to Stripe';
COMMENT ON COLUMN stripe_meter.outbox.identifier IS
	'Stripe''s event identifier, also the Idempotency-Key of every attempt';
COMMENT ON COLUMN stripe_meter.outbox.customer IS
	'The customer the payload names (derived from the meter''s customer key)';
COMMENT ON COLUMN stripe_meter.outbox.first_attempt_at IS
	'When the worker first claimed the event for sending';
COMMENT ON COLUMN stripe_meter.outbox.unknown_outcome_since IS
	'When an attempt first ended without a definite answer (timeout, reset, 5xx, crash); resends stay inside Stripe''s idempotency window from then';
COMMENT ON COLUMN stripe_meter.outbox.in_flight_since IS
	'Set while the worker has the event claimed';

-- Delivered events: one row per identifier, with the object Stripe returned.
CREATE TABLE stripe_meter.meter_events (
	identifier text PRIMARY KEY,
	event_name text NOT NULL,
	payload jsonb NOT NULL,
	ts timestamptz NOT NULL,
	stripe_account text,
	customer text NOT NULL,
	meter_event jsonb,
	-- read defensively: an odd answer must never stop recording
	created timestamptz GENERATED ALWAYS AS
		(CASE WHEN pg_catalog.jsonb_typeof(meter_event OPERATOR(pg_catalog.->) 'created') OPERATOR(pg_catalog.=) 'number'
				   AND (meter_event OPERATOR(pg_catalog.->>) 'created')::numeric
					   OPERATOR(pg_catalog.<=) 100000000000::numeric
				   AND (meter_event OPERATOR(pg_catalog.->>) 'created')::numeric
					   OPERATOR(pg_catalog.>=) 0::numeric
			  THEN pg_catalog.to_timestamp((meter_event OPERATOR(pg_catalog.->>) 'created')::double precision)
		 END) STORED,
	livemode boolean GENERATED ALWAYS AS
		(CASE WHEN pg_catalog.jsonb_typeof(meter_event OPERATOR(pg_catalog.->) 'livemode') OPERATOR(pg_catalog.=) 'boolean'
			  THEN (meter_event OPERATOR(pg_catalog.->>) 'livemode')::boolean
		 END) STORED,
	outcome text NOT NULL,
	request_id text,
	enqueued_at timestamptz NOT NULL,
	first_attempt_at timestamptz,
	delivered_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
	attempts integer NOT NULL,
	-- API v2: the meter event session whose token carried the event
	session_id text,
	CONSTRAINT meter_events_outcome_check
		CHECK (outcome IN ('created', 'replayed', 'already_existed', 'accepted'))
);
CREATE INDEX meter_events_delivered_at_idx ON stripe_meter.meter_events (delivered_at);
COMMENT ON TABLE stripe_meter.meter_events IS
	'Meter events Stripe accepted, with the billing.meter_event object it returned';
COMMENT ON COLUMN stripe_meter.meter_events.meter_event IS
	'The billing.meter_event Stripe returned; NULL when Stripe already had the identifier or with API v2 (no per-event object)';
COMMENT ON COLUMN stripe_meter.meter_events.outcome IS
	'created: Stripe created the event; replayed: Stripe replayed its stored answer for the idempotency key; already_existed: Stripe already had the identifier; accepted: the v2 meter event stream accepted the request carrying it';
COMMENT ON COLUMN stripe_meter.meter_events.session_id IS
	'API v2: the id of the meter event session the event was sent with; NULL with API v1';

-- Failed events: could never be delivered, kept with Stripe's reason.
CREATE TABLE stripe_meter.failed_events (
	identifier text PRIMARY KEY,
	event_name text NOT NULL,
	payload jsonb NOT NULL,
	ts timestamptz NOT NULL,
	stripe_account text,
	customer text NOT NULL,
	reason text NOT NULL,
	http_status integer,
	stripe_error jsonb,
	request_id text,
	enqueued_at timestamptz NOT NULL,
	first_attempt_at timestamptz,
	failed_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
	attempts integer NOT NULL
);
COMMENT ON TABLE stripe_meter.failed_events IS
	'Meter events that can never be delivered as they are, with the reason';

-- pg_dump keeps the queue, the delivery record and the meters.
SELECT pg_catalog.pg_extension_config_dump('stripe_meter.meters', '');
SELECT pg_catalog.pg_extension_config_dump('stripe_meter.outbox', '');
SELECT pg_catalog.pg_extension_config_dump('stripe_meter.outbox_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('stripe_meter.meter_events', '');
SELECT pg_catalog.pg_extension_config_dump('stripe_meter.failed_events', '');

-- Validation of every row entering the outbox.  It reads the meters and the
-- delivered and failed events by direct index lookups, which need no
-- privilege on them and no search_path, so a role allowed only to INSERT is
-- still checked against them without being able to read them; it therefore
-- need not be SECURITY DEFINER, which would cost a settings save and restore
-- on every row.
CREATE FUNCTION stripe_meter.outbox_before_insert()
RETURNS trigger
LANGUAGE c
AS 'MODULE_PATHNAME', 'stripe_meter_outbox_before_insert';
REVOKE ALL ON FUNCTION stripe_meter.outbox_before_insert() FROM PUBLIC;

CREATE TRIGGER outbox_validate
	BEFORE INSERT ON stripe_meter.outbox
	FOR EACH ROW EXECUTE FUNCTION stripe_meter.outbox_before_insert();

-- The user-facing API.

CREATE FUNCTION @extschema@.stripe_meter_event_create(
	event_name text,
	payload jsonb,
	identifier text DEFAULT NULL,
	ts timestamptz DEFAULT NULL,
	stripe_account text DEFAULT NULL)
RETURNS text
LANGUAGE c
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'stripe_meter_event_create';
REVOKE ALL ON FUNCTION @extschema@.stripe_meter_event_create(text, jsonb, text, timestamptz, text) FROM PUBLIC;
COMMENT ON FUNCTION @extschema@.stripe_meter_event_create(text, jsonb, text, timestamptz, text) IS
	'Validates one meter event and queues it in the current transaction; returns its identifier';

CREATE FUNCTION @extschema@.stripe_meter_event_trigger()
RETURNS trigger
LANGUAGE c
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'stripe_meter_event_trigger';
REVOKE ALL ON FUNCTION @extschema@.stripe_meter_event_trigger() FROM PUBLIC;
COMMENT ON FUNCTION @extschema@.stripe_meter_event_trigger() IS
	'Row trigger: queues one meter event per row; arguments: event name, customer column, value column [, identifier column [, timestamp column]]';

CREATE FUNCTION @extschema@.stripe_meter_retry_failed(identifier text DEFAULT NULL)
RETURNS bigint
LANGUAGE c
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'stripe_meter_retry_failed';
REVOKE ALL ON FUNCTION @extschema@.stripe_meter_retry_failed(text) FROM PUBLIC;
COMMENT ON FUNCTION @extschema@.stripe_meter_retry_failed(text) IS
	'Moves one failed event (or all when NULL) back to the outbox; returns how many';

-- What the delivery worker of this database is doing, read from shared
-- memory.  All NULL when the library is not preloaded.
CREATE FUNCTION stripe_meter.worker_state(
	OUT worker_pid integer,
	OUT paused text,
	OUT last_error text,
	OUT last_error_at timestamptz,
	OUT started_at timestamptz)
RETURNS record
LANGUAGE c
STABLE
AS 'MODULE_PATHNAME', 'stripe_meter_worker_state';
REVOKE ALL ON FUNCTION stripe_meter.worker_state() FROM PUBLIC;

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
	outcome text CHECK (outcome IN ('created', 'replayed', 'already_cancelled')),
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
	'awaiting_delivery: the event itself is still being delivered; queued: to be sent; done: Stripe cancelled it; failed: see last_error';
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

-- What an operator watches: queue, deliveries, failures, the worker's state,
-- and what happened after delivery.
CREATE VIEW stripe_meter.status AS
SELECT
	(SELECT pg_catalog.count(*) FROM stripe_meter.outbox o
	  WHERE o.in_flight_since IS NULL) AS pending,
	(SELECT pg_catalog.count(*) FROM stripe_meter.outbox o
	  WHERE o.in_flight_since IS NOT NULL) AS in_flight,
	(SELECT pg_catalog.count(*) FROM stripe_meter.meter_events) AS delivered,
	(SELECT pg_catalog.count(*) FROM stripe_meter.failed_events) AS failed,
	pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-)
		(SELECT o.enqueued_at FROM stripe_meter.outbox o ORDER BY o.id LIMIT 1)
		AS oldest_pending_age,
	w.paused,
	w.last_error,
	(SELECT pg_catalog.count(*) FROM stripe_meter.meter_events d
	  WHERE d.delivered_at OPERATOR(pg_catalog.>)
			(pg_catalog.now() OPERATOR(pg_catalog.-) interval '1 minute'))
		AS delivered_last_minute,
	w.worker_pid,
	(SELECT pg_catalog.count(*) FROM stripe_meter.meter_events d
	  WHERE d.async_error_code IS NOT NULL) AS not_billed,
	(SELECT pg_catalog.count(*) FROM stripe_meter.adjustments a
	  WHERE a.status IN ('awaiting_delivery', 'queued')) AS cancels_pending,
	(SELECT pg_catalog.count(*) FROM stripe_meter.adjustments a
	  WHERE a.status OPERATOR(pg_catalog.=) 'failed') AS cancels_failed,
	(SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
				'stripe_account', p.stripe_account, 'reason', p.reason,
				'http_status', p.http_status, 'paused_at', p.paused_at,
				'next_try_at', p.next_try_at) ORDER BY p.stripe_account)
	   FROM stripe_meter.paused_accounts p) AS paused_accounts
FROM stripe_meter.worker_state() w;
COMMENT ON VIEW stripe_meter.status IS
	'Queue depth, delivery counts and the delivery worker''s state for this database';

-- Tell a running launcher that this database now has the extension.
CREATE FUNCTION stripe_meter.launcher_notify()
RETURNS void
LANGUAGE c
AS 'MODULE_PATHNAME', 'stripe_meter_launcher_notify';
REVOKE ALL ON FUNCTION stripe_meter.launcher_notify() FROM PUBLIC;
SELECT stripe_meter.launcher_notify();
