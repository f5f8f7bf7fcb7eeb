--
-- stripe_meter.status: queue depth, delivery counts and the worker's state;
-- and the columns stripe_meter.meter_events derives from Stripe's answer.
--
\set SHOW_CONTEXT never
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';

-- The view's columns and their types.
SELECT attname, format_type(atttypid, atttypmod) AS type
  FROM pg_attribute
 WHERE attrelid = 'stripe_meter.status'::regclass AND attnum > 0
 ORDER BY attnum;

-- Nothing queued, delivered or failed; no worker (the library is not
-- preloaded here), so its columns are NULL.
SELECT pending, in_flight, delivered, failed, oldest_pending_age,
	   paused, last_error, delivered_last_minute, worker_pid
  FROM stripe_meter.status;

-- Three events queued, one of them claimed by the worker.
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 1}', 'q-' || g)
  FROM generate_series(1, 3) g;
UPDATE stripe_meter.outbox SET in_flight_since = clock_timestamp(), attempts = 1
 WHERE identifier = 'q-3';
-- Two delivered (one an hour ago), and one failed.
INSERT INTO stripe_meter.meter_events
	(identifier, event_name, payload, ts, customer, meter_event, outcome,
	 request_id, enqueued_at, first_attempt_at, delivered_at, attempts)
VALUES
	('d-1', 'api_requests', '{"stripe_customer_id": "cus_A", "value": "25"}',
	 '2026-01-01 00:00:00+00', 'cus_A',
	 '{"object": "billing.meter_event", "created": 1767225600, "livemode": false,
	   "event_name": "api_requests", "identifier": "d-1",
	   "payload": {"stripe_customer_id": "cus_A", "value": "25"}, "timestamp": 1767225600}',
	 'created', 'req_1', now(), now(), now(), 1),
	('d-2', 'api_requests', '{"stripe_customer_id": "cus_A", "value": "3"}',
	 '2026-01-01 00:00:00+00', 'cus_A', NULL, 'already_existed', 'req_2',
	 now() - interval '2 hours', now() - interval '2 hours', now() - interval '1 hour', 2);
INSERT INTO stripe_meter.failed_events
	(identifier, event_name, payload, ts, customer, reason, http_status, enqueued_at, attempts)
VALUES ('f-1', 'api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', now(), 'cus_A',
		'No such customer: ''cus_A''', 400, now(), 1);
-- delivered, delivered_last_minute and not_billed are the worker's running
-- counters, not counts of meter_events: rows written there by hand do not
-- change them.
SELECT pending, in_flight, delivered, failed,
	   oldest_pending_age > interval '0' AS oldest_pending_age_positive,
	   paused, last_error, delivered_last_minute, worker_pid, not_billed
  FROM stripe_meter.status;
-- What the worker writes when it records deliveries: the totals are the sum
-- of the counters' rows (a restore may add one), the last minute the sum
-- of the seconds within it.
INSERT INTO stripe_meter.counters (delivered, not_billed) VALUES (5, 2);
UPDATE stripe_meter.delivered_seconds
   SET second = date_trunc('second', now()), delivered = 3
 WHERE slot = (date_part('epoch', date_trunc('second', now()))::bigint % 60)::integer;
UPDATE stripe_meter.delivered_seconds
   SET second = date_trunc('second', now()) - interval '2 minutes', delivered = 7
 WHERE slot = (date_part('epoch', date_trunc('second', now()) - interval '2 minutes')::bigint % 60 + 1)::integer % 60;
SELECT delivered, delivered_last_minute, not_billed FROM stripe_meter.status;
-- The view never reads meter_events, however many rows it holds.
SELECT pg_get_viewdef('stripe_meter.status'::regclass) LIKE '%meter_events%' AS reads_meter_events;
SELECT count(*) AS fresh_counter_rows FROM stripe_meter.counters;
SELECT count(*) AS ring_slots, min(slot), max(slot) FROM stripe_meter.delivered_seconds;
-- The age is that of the oldest queued event.
UPDATE stripe_meter.outbox SET enqueued_at = clock_timestamp() - interval '10 minutes'
 WHERE identifier = 'q-1';
SELECT oldest_pending_age BETWEEN interval '10 minutes' AND interval '11 minutes' AS about_ten_minutes
  FROM stripe_meter.status;

-- An empty outbox has no oldest event.
DELETE FROM stripe_meter.outbox;
SELECT pending, in_flight, delivered, failed, oldest_pending_age FROM stripe_meter.status;

--
-- stripe_meter.meter_events: created and livemode come from the object
-- Stripe returned (generated columns), and are NULL without one.
--
SELECT identifier, outcome, created, livemode,
	   meter_event->>'object' AS object, meter_event->'payload'->>'value' AS sent_value
  FROM stripe_meter.meter_events ORDER BY identifier;
INSERT INTO stripe_meter.meter_events
	(identifier, event_name, payload, ts, customer, meter_event, outcome, enqueued_at, attempts)
VALUES ('d-3', 'api_requests', '{"stripe_customer_id": "cus_B", "value": "1"}', now(), 'cus_B',
		'{"object": "billing.meter_event", "created": 1767225600, "livemode": true}',
		'replayed', now(), 3)
RETURNING identifier, created, livemode, delivered_at = now() AS delivered_now;
-- they cannot be set directly
\set VERBOSITY terse
INSERT INTO stripe_meter.meter_events
	(identifier, event_name, payload, ts, customer, outcome, enqueued_at, attempts, created)
VALUES ('d-4', 'api_requests', '{}', now(), 'cus_B', 'created', now(), 1, now());
UPDATE stripe_meter.meter_events SET livemode = true WHERE identifier = 'd-1';
-- the outcome is one of three
INSERT INTO stripe_meter.meter_events
	(identifier, event_name, payload, ts, customer, outcome, enqueued_at, attempts)
VALUES ('d-5', 'api_requests', '{}', now(), 'cus_B', 'delivered', now(), 1);
\set VERBOSITY default
SELECT column_name, data_type, is_generated
  FROM information_schema.columns
 WHERE table_schema = 'stripe_meter' AND table_name = 'meter_events'
   AND column_name IN ('created', 'livemode', 'meter_event')
 ORDER BY column_name;

DELETE FROM stripe_meter.meter_events;
DELETE FROM stripe_meter.failed_events;
-- delivered counts what was ever delivered: deleting rows leaves it
SELECT pending, in_flight, delivered, failed FROM stripe_meter.status;

-- The claim's index leads with the key (customer, meter, account), so a
-- claim takes a few events per key, and leaves out events in flight.
SELECT pg_catalog.pg_get_indexdef('stripe_meter.outbox_due_idx'::regclass);
