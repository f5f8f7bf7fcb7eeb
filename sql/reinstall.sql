--
-- DROP EXTENSION and CREATE EXTENSION again in a session that has already
-- queued events: the saved plans are rebuilt against the new tables, and
-- nothing of the old tables (meters, identifiers) survives.
--
\set SHOW_CONTEXT never
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 1}', 'before-drop');
INSERT INTO stripe_meter.meters VALUES ('custom', 'account', 'units');
SELECT stripe_meter_event_create('custom', '{"account": "cus_A", "units": 1}', 'custom-1');
INSERT INTO stripe_meter.failed_events
	(identifier, event_name, payload, ts, customer, reason, enqueued_at, attempts)
VALUES ('failed-1', 'api_requests', '{"stripe_customer_id": "cus_A", "value": 1}',
		now(), 'cus_A', 'timeout', now(), 1);
SELECT stripe_meter_retry_failed('failed-1');

DROP EXTENSION stripe_meter;
SELECT count(*) AS leftover_schemas FROM pg_namespace WHERE nspname = 'stripe_meter';
CREATE EXTENSION stripe_meter;

-- The same identifiers are free again, the meter's keys are gone ...
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 1}', 'before-drop');
SELECT stripe_meter_event_create('custom', '{"stripe_customer_id": "cus_A", "value": 1}', 'custom-1');
-- ... and a retry works against the new tables.
INSERT INTO stripe_meter.failed_events
	(identifier, event_name, payload, ts, customer, reason, enqueued_at, attempts)
VALUES ('failed-1', 'api_requests', '{"stripe_customer_id": "cus_A", "value": 1}',
		now(), 'cus_A', 'timeout', now(), 1);
SELECT stripe_meter_retry_failed('failed-1');
SELECT identifier, event_name, customer FROM stripe_meter.outbox ORDER BY id;

DELETE FROM stripe_meter.outbox;
