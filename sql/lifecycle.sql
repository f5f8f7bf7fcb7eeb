--
-- The event lifecycle after delivery, without a worker or Stripe:
-- stripe_meter_event_cancel() in every state an event can be in, the
-- enqueue check against synced meters, and the argument checks of
-- stripe_meter_sync_meters() and stripe_meter_reconcile().
--
\set SHOW_CONTEXT never
SET timezone = 'UTC';

\i sql/try_helper.include

-- Delivered events, as the worker records them (Stripe's created time).
CREATE PROCEDURE pg_temp.add_delivered(id text, age interval, event_name text DEFAULT 'api_requests',
									   account text DEFAULT NULL)
LANGUAGE sql AS $$
	INSERT INTO stripe_meter.meter_events
		(identifier, event_name, payload, ts, stripe_account, customer, meter_event,
		 outcome, request_id, enqueued_at, first_attempt_at, delivered_at, attempts)
	VALUES (id, event_name, '{"stripe_customer_id": "cus_D", "value": 5}', now() - age, account,
			'cus_D', jsonb_build_object('object', 'billing.meter_event',
										'created', extract(epoch FROM now() - age)::bigint),
			'created', 'req_1', now() - age, now() - age, now() - age, 1)
$$;

-- arguments
SELECT pg_temp.try($$SELECT stripe_meter_event_cancel(NULL, 'x')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_cancel('api_requests', NULL)$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_cancel('', 'x')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_cancel('api_requests', repeat('i', 101))$$);

-- queued and never sent: removed, nothing will reach Stripe
SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_Q", "value": 1}', 'q-1');
SELECT pg_temp.try($$SELECT stripe_meter_event_cancel('other_meter', 'q-1')$$);
SELECT stripe_meter_event_cancel('api_requests', 'q-1');
SELECT count(*) AS queued FROM stripe_meter.outbox WHERE identifier = 'q-1';
SELECT pg_temp.try($$SELECT stripe_meter_event_cancel('api_requests', 'q-1')$$);

-- in flight (or sent before without an answer): Stripe may have it, so the
-- cancellation waits for the delivery to be recorded
SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_Q", "value": 1}', 'q-2');
SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_Q", "value": 1}', 'q-3');
UPDATE stripe_meter.outbox SET in_flight_since = now(), attempts = 1 WHERE identifier = 'q-2';
UPDATE stripe_meter.outbox SET unknown_outcome_since = now(), attempts = 1 WHERE identifier = 'q-3';
SELECT stripe_meter_event_cancel('api_requests', 'q-2');
SELECT stripe_meter_event_cancel('api_requests', 'q-3');
SELECT pg_temp.try($$SELECT stripe_meter_event_cancel('api_requests', 'q-2')$$);
SELECT identifier, status FROM stripe_meter.adjustments ORDER BY identifier;
SELECT count(*) AS still_queued FROM stripe_meter.outbox WHERE identifier IN ('q-2', 'q-3');

-- delivered: a cancel adjustment is queued, with Stripe's receipt time
CALL pg_temp.add_delivered('d-1', '1 hour');
CALL pg_temp.add_delivered('d-2', '23 hours 59 minutes', account => 'acct_C1');
CALL pg_temp.add_delivered('d-old', '24 hours 1 minute');
SELECT stripe_meter_event_cancel('api_requests', 'd-1');
SELECT stripe_meter_event_cancel('api_requests', 'd-2');
SELECT pg_temp.try($$SELECT stripe_meter_event_cancel('api_requests', 'd-1')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_cancel('api_requests', 'd-old')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_cancel('other_meter', 'd-1')$$);
SELECT identifier, status, stripe_account, received_at IS NOT NULL AS has_received_at
  FROM stripe_meter.adjustments WHERE identifier LIKE 'd-%' ORDER BY identifier;

-- failed: never billed
INSERT INTO stripe_meter.failed_events
	(identifier, event_name, payload, ts, customer, reason, enqueued_at, attempts)
VALUES ('f-1', 'api_requests', '{"stripe_customer_id": "cus_F", "value": 1}', now(), 'cus_F',
		'No such customer', now(), 1);
SELECT pg_temp.try($$SELECT stripe_meter_event_cancel('api_requests', 'f-1')$$);

-- failed while Stripe may have billed it: a cancel adjustment is queued,
-- without a receipt time (Stripe judges; if it never received the event,
-- the worker records that as done)
INSERT INTO stripe_meter.failed_events
	(identifier, event_name, payload, ts, stripe_account, customer, reason, enqueued_at,
	 first_attempt_at, attempts, maybe_billed, unknown_outcome_since)
VALUES ('f-maybe', 'api_requests', '{"stripe_customer_id": "cus_F", "value": 1}', now(), 'acct_C3',
		'cus_F', 'billing state unknown', now(), now(), 2, true, now());
SELECT pg_temp.try($$SELECT stripe_meter_event_cancel('other_meter', 'f-maybe')$$);
SELECT stripe_meter_event_cancel('api_requests', 'f-maybe');
SELECT pg_temp.try($$SELECT stripe_meter_event_cancel('api_requests', 'f-maybe')$$);
SELECT identifier, status, stripe_account, received_at
  FROM stripe_meter.adjustments WHERE identifier = 'f-maybe';
SELECT count(*) AS still_failed FROM stripe_meter.failed_events WHERE identifier = 'f-maybe';

SELECT pg_temp.try($$SELECT stripe_meter_event_cancel('api_requests', 'nowhere')$$);

SELECT not_billed, cancels_pending, cancels_failed FROM stripe_meter.status;

-- Once meters are synced, an unknown or inactive meter is refused.
SELECT stripe_meter_event_create('never_synced', '{"stripe_customer_id": "cus_Q", "value": 1}', 'm-0');
INSERT INTO stripe_meter.meters (event_name, meter_id, status, aggregation, synced_at)
VALUES ('api_requests', 'mtr_1', 'active', 'sum', now()),
	   ('retired', 'mtr_2', 'inactive', 'sum', now());
UPDATE stripe_meter.sync_state SET meters_synced_at = now();
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_Q", "value": 1}', 'm-1')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('unknown_meter', '{"stripe_customer_id": "cus_Q", "value": 1}', 'm-2')$$);
SELECT pg_temp.try($$INSERT INTO stripe_meter.outbox (event_name, payload, identifier) VALUES ('retired', '{"stripe_customer_id": "cus_Q", "value": 1}', 'm-3')$$);
-- a connected account has its own meters: not checked against these
SELECT pg_temp.try($$SELECT stripe_meter_event_create('unknown_meter', '{"stripe_customer_id": "cus_Q", "value": 1}', 'm-4', NULL, 'acct_C1')$$);
UPDATE stripe_meter.sync_state SET meters_synced_at = NULL;

-- Stripe calls need the key; nothing is sent without one
SELECT pg_temp.try($$SELECT stripe_meter_sync_meters()$$);

-- reconcile: arguments are checked before Stripe is asked
SELECT pg_temp.try($$SELECT * FROM stripe_meter_reconcile(NULL, 'cus_1', '2026-01-01', '2026-01-02')$$);
SELECT pg_temp.try($$SELECT * FROM stripe_meter_reconcile('api_requests', '', '2026-01-01', '2026-01-02')$$);
SELECT pg_temp.try($$SELECT * FROM stripe_meter_reconcile('api_requests', 'cus_1', NULL, '2026-01-02')$$);
SELECT pg_temp.try($$SELECT * FROM stripe_meter_reconcile('api_requests', 'cus_1', '2026-01-02', '2026-01-01')$$);
SELECT pg_temp.try($$SELECT * FROM stripe_meter_reconcile('api_requests', 'cus_1', '2026-01-01 00:00:30', '2026-01-02')$$);
SELECT pg_temp.try($$SELECT * FROM stripe_meter_reconcile('api_requests', 'cus_1', '2026-01-01 01:00', '2026-01-02', 'day')$$);
SELECT pg_temp.try($$SELECT * FROM stripe_meter_reconcile('api_requests', 'cus_1', '2026-01-01 00:30', '2026-01-02', 'hour')$$);
SELECT pg_temp.try($$SELECT * FROM stripe_meter_reconcile('api_requests', 'cus_1', '2026-01-01', '2026-01-02', 'week')$$);
SELECT pg_temp.try($$SELECT * FROM stripe_meter_reconcile('api_requests', 'cus_1', '2026-01-01', '2026-01-02', NULL, 'acct-bad')$$);
SELECT pg_temp.try($$SELECT * FROM stripe_meter_reconcile('api_requests', 'cus_1', '-infinity', '2026-01-02')$$);
SELECT pg_temp.try($$SELECT * FROM stripe_meter_reconcile('api_requests', 'cus_1', '2026-01-01', '2026-01-02', 'day')$$);

-- privileges: nothing for PUBLIC
SELECT p.proname, has_function_privilege('public', p.oid, 'EXECUTE') AS public_execute,
	   p.prosecdef, p.proconfig
  FROM pg_proc p
 WHERE p.proname IN ('stripe_meter_event_cancel', 'stripe_meter_sync_meters', 'stripe_meter_reconcile')
 ORDER BY 1;
