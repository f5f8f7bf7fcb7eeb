--
-- Enqueueing is transactional: an event exists only if the transaction
-- that queued it commits.
--
\set SHOW_CONTEXT never
SET timezone = 'UTC';

SELECT count(*) AS queued FROM stripe_meter.outbox;

-- ROLLBACK takes the event back, whichever way it was queued.
BEGIN;
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 1}', 'rb-1');
INSERT INTO stripe_meter.outbox (event_name, payload, identifier)
VALUES ('api_requests', '{"stripe_customer_id": "cus_A", "value": 2}', 'rb-2');
SELECT identifier FROM stripe_meter.outbox ORDER BY id;
ROLLBACK;
SELECT count(*) AS queued FROM stripe_meter.outbox;

-- The identifiers of rolled-back events are free again.
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 1}', 'rb-1');
DELETE FROM stripe_meter.outbox;

-- ROLLBACK TO SAVEPOINT takes back only what followed the savepoint.
BEGIN;
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 1}', 'sp-before');
SAVEPOINT s;
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 1}', 'sp-inside');
ROLLBACK TO SAVEPOINT s;
-- ... so its identifier can be used again in the same transaction
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 3}', 'sp-inside');
SAVEPOINT t;
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 1}', 'sp-released');
RELEASE SAVEPOINT t;
COMMIT;
SELECT identifier, payload->'value' AS value FROM stripe_meter.outbox ORDER BY id;

-- A refused event aborts the transaction; the events queued before it in
-- that transaction are lost with it.
BEGIN;
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 1}', 'err-1');
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": -1}', 'err-2');
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 1}', 'err-3');
COMMIT;
SELECT count(*) AS queued, count(*) FILTER (WHERE identifier LIKE 'err-%') AS err_queued
  FROM stripe_meter.outbox;

-- An error caught in PL/pgSQL rolls back that block only.
DO $$
BEGIN
	PERFORM stripe_meter_event_create('api_requests',
		'{"stripe_customer_id": "cus_A", "value": 1}', 'do-1');
	BEGIN
		PERFORM stripe_meter_event_create('api_requests',
			'{"stripe_customer_id": "cus_A", "value": 1}', 'do-2');
		PERFORM stripe_meter_event_create('api_requests',
			'{"stripe_customer_id": "cus_A", "value": "x"}', 'do-3');
	EXCEPTION WHEN invalid_parameter_value THEN
		RAISE NOTICE 'caught %: %', SQLSTATE, SQLERRM;
	END;
	PERFORM stripe_meter_event_create('api_requests',
		'{"stripe_customer_id": "cus_A", "value": 1}', 'do-4');
END
$$;
SELECT identifier FROM stripe_meter.outbox WHERE identifier LIKE 'do-%' ORDER BY id;

-- COMMIT keeps the events, with the ts each was given when queued.
BEGIN;
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_B", "value": 7}', 'commit-1');
INSERT INTO stripe_meter.outbox (event_name, payload, identifier)
VALUES ('api_requests', '{"stripe_customer_id": "cus_B", "value": 8}', 'commit-2');
SELECT pg_sleep(0.01);
COMMIT;
SELECT identifier, customer, payload->'value' AS value,
	   ts < clock_timestamp() - interval '0.005 seconds' AS ts_is_enqueue_time
  FROM stripe_meter.outbox WHERE identifier LIKE 'commit-%' ORDER BY id;

-- A multi-statement transaction that queues in a loop and then fails
-- loses all of them.
BEGIN;
SELECT count(stripe_meter_event_create('api_requests',
	jsonb_build_object('stripe_customer_id', 'cus_' || g, 'value', g)))
  FROM generate_series(1, 100) g;
SELECT count(*) AS queued_in_xact FROM stripe_meter.outbox;
SELECT 1 / 0;
ROLLBACK;
SELECT count(*) AS queued FROM stripe_meter.outbox;

DELETE FROM stripe_meter.outbox;
