--
-- Applications may INSERT into stripe_meter.outbox directly; the BEFORE
-- INSERT trigger fills in what is missing and validates every row exactly
-- as stripe_meter_event_create() does.
--
\set SHOW_CONTEXT never
SET timezone = 'UTC';

\i sql/try_helper.include

SELECT count(*) AS queued FROM stripe_meter.outbox;

-- Only event_name and payload: the identifier becomes a UUID, ts the time
-- of the insert, customer comes from the payload.
BEGIN;
INSERT INTO stripe_meter.outbox (event_name, payload)
VALUES ('api_requests', '{"stripe_customer_id": "cus_A", "value": 5}')
RETURNING identifier ~ '^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$' AS is_uuid_v4,
		  ts BETWEEN now() AND clock_timestamp() AS ts_now,
		  enqueued_at BETWEEN now() AND clock_timestamp() AS enqueued_now,
		  customer, stripe_account, attempts, in_flight_since;
COMMIT;

-- Every column an application may give.
INSERT INTO stripe_meter.outbox (event_name, payload, identifier, ts, stripe_account)
VALUES ('api_requests', '{"stripe_customer_id": "cus_B", "value": "6", "region": "eu"}',
		'direct-1', date_trunc('hour', now()) - interval '1 hour', 'acct_1XyZ')
RETURNING identifier, event_name, payload, customer, stripe_account,
		  ts = date_trunc('hour', now()) - interval '1 hour' AS ts_as_given;

-- NULL identifier and ts given explicitly behave like omitted ones.
INSERT INTO stripe_meter.outbox (event_name, payload, identifier, ts)
VALUES ('api_requests', '{"stripe_customer_id": "cus_C", "value": 7}', NULL, NULL)
RETURNING identifier ~ '^[0-9a-f-]{36}$' AS is_uuid, ts IS NOT NULL AS has_ts;

-- The customer column is always derived from the payload.
INSERT INTO stripe_meter.outbox (event_name, payload, identifier, customer)
VALUES ('api_requests', '{"stripe_customer_id": "cus_D", "value": 8}', 'direct-2', 'cus_SOMEONE_ELSE')
RETURNING customer;

-- COPY goes through the same trigger.
COPY stripe_meter.outbox (event_name, payload, identifier) FROM stdin;
api_requests	{"stripe_customer_id": "cus_E", "value": 9}	copy-1
api_requests	{"stripe_customer_id": "cus_E", "value": 10}	copy-2
\.
SELECT identifier, customer FROM stripe_meter.outbox WHERE identifier LIKE 'copy-%' ORDER BY id;
COPY stripe_meter.outbox (event_name, payload, identifier) FROM stdin;
api_requests	{"stripe_customer_id": "cus_E", "value": 11}	copy-3
api_requests	{"stripe_customer_id": "cus_E", "value": -11}	copy-4
\.
SELECT count(*) AS queued FROM stripe_meter.outbox;

-- Each kind of bad event fails with the same SQLSTATE and message whether
-- it is queued with the function or inserted directly.
CREATE TEMP TABLE bad_events (label text, event_name text, payload jsonb,
							  identifier text, ts timestamptz, stripe_account text);
INSERT INTO stripe_meter.meter_events
	(identifier, event_name, payload, ts, customer, outcome, enqueued_at, attempts)
VALUES ('delivered-1', 'api_requests', '{"stripe_customer_id": "cus_A", "value": "1"}',
		now(), 'cus_A', 'created', now(), 1);
INSERT INTO stripe_meter.failed_events
	(identifier, event_name, payload, ts, customer, reason, enqueued_at, attempts)
VALUES ('failed-1', 'api_requests', '{"stripe_customer_id": "cus_A", "value": 1}',
		now(), 'cus_A', 'No such customer', now(), 1);
INSERT INTO bad_events VALUES
	('null event_name', NULL, '{"stripe_customer_id": "cus_A", "value": 1}', 'x', NULL, NULL),
	('empty event_name', '', '{"stripe_customer_id": "cus_A", "value": 1}', 'x', NULL, NULL),
	('long event_name', repeat('e', 101), '{"stripe_customer_id": "cus_A", "value": 1}', 'x', NULL, NULL),
	('empty identifier', 'api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', '', NULL, NULL),
	('long identifier', 'api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', repeat('i', 101), NULL, NULL),
	('queued identifier', 'api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'direct-1', NULL, NULL),
	('delivered identifier', 'api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'delivered-1', NULL, NULL),
	('failed identifier', 'api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'failed-1', NULL, NULL),
	('null payload', 'api_requests', NULL, 'x', NULL, NULL),
	('array payload', 'api_requests', '[1, 2]', 'x', NULL, NULL),
	('string payload', 'api_requests', '"cus_A"', 'x', NULL, NULL),
	('no customer', 'api_requests', '{"value": 1}', 'x', NULL, NULL),
	('no value', 'api_requests', '{"stripe_customer_id": "cus_A"}', 'x', NULL, NULL),
	('nested object', 'api_requests', '{"stripe_customer_id": "cus_A", "value": 1, "o": {}}', 'x', NULL, NULL),
	('null value', 'api_requests', '{"stripe_customer_id": "cus_A", "value": 1, "o": null}', 'x', NULL, NULL),
	('empty key', 'api_requests', '{"stripe_customer_id": "cus_A", "value": 1, "": 1}', 'x', NULL, NULL),
	('bracket key', 'api_requests', '{"stripe_customer_id": "cus_A", "value": 1, "a[b]": 1}', 'x', NULL, NULL),
	('long value', 'api_requests', jsonb_build_object('stripe_customer_id', 'cus_A', 'value', 1, 'note', repeat('n', 101)), 'x', NULL, NULL),
	('numeric customer', 'api_requests', '{"stripe_customer_id": 1, "value": 1}', 'x', NULL, NULL),
	('empty customer', 'api_requests', '{"stripe_customer_id": "", "value": 1}', 'x', NULL, NULL),
	('16 digits', 'api_requests', '{"stripe_customer_id": "cus_A", "value": 1000000000000000}', 'x', NULL, NULL),
	('negative', 'api_requests', '{"stripe_customer_id": "cus_A", "value": -1}', 'x', NULL, NULL),
	('fraction', 'api_requests', '{"stripe_customer_id": "cus_A", "value": 25.5}', 'x', NULL, NULL),
	('not digits', 'api_requests', '{"stripe_customer_id": "cus_A", "value": "2.5"}', 'x', NULL, NULL),
	('boolean value', 'api_requests', '{"stripe_customer_id": "cus_A", "value": true}', 'x', NULL, NULL),
	('too old', 'api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'x', now() - interval '35 days 1 minute', NULL),
	('too new', 'api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'x', now() + interval '6 minutes', NULL),
	('infinite ts', 'api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'x', 'infinity', NULL),
	('bad account', 'api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'x', NULL, 'acct_12-3');
SELECT label, f AS via_function, i = f AS insert_same
  FROM bad_events,
	   LATERAL pg_temp.try(format('SELECT stripe_meter_event_create(%L, %L, %L, %L, %L)',
								  event_name, payload, identifier, ts, stripe_account)) AS f,
	   LATERAL pg_temp.try(format('INSERT INTO stripe_meter.outbox (event_name, payload, identifier, ts, stripe_account) VALUES (%L, %L, %L, %L, %L)',
								  event_name, payload, identifier, ts, stripe_account)) AS i
 ORDER BY label COLLATE "C";
SELECT count(*) AS queued FROM stripe_meter.outbox;

-- A multi-row INSERT with one bad row inserts nothing.
SELECT pg_temp.try($$
	INSERT INTO stripe_meter.outbox (event_name, payload, identifier) VALUES
		('api_requests', '{"stripe_customer_id": "cus_F", "value": 1}', 'multi-1'),
		('api_requests', '{"stripe_customer_id": "cus_F", "value": 2}', 'multi-2'),
		('api_requests', '{"stripe_customer_id": "cus_F", "value": "two"}', 'multi-3'),
		('api_requests', '{"stripe_customer_id": "cus_F", "value": 4}', 'multi-4')$$);
-- ... also when two rows of one statement share an identifier
SELECT pg_temp.try($$
	INSERT INTO stripe_meter.outbox (event_name, payload, identifier) VALUES
		('api_requests', '{"stripe_customer_id": "cus_F", "value": 1}', 'multi-5'),
		('api_requests', '{"stripe_customer_id": "cus_F", "value": 2}', 'multi-5')$$);
SELECT count(*) AS queued FROM stripe_meter.outbox;

-- INSERT ... SELECT of many rows: each validated, each with its own UUID
-- and its own customer.
INSERT INTO stripe_meter.outbox (event_name, payload)
SELECT 'api_requests', jsonb_build_object('stripe_customer_id', 'cus_' || g, 'value', g)
  FROM generate_series(1, 1000) g;
SELECT count(*) AS rows, count(DISTINCT identifier) AS identifiers,
	   count(*) FILTER (WHERE customer = payload->>'stripe_customer_id') AS customer_ok,
	   count(*) FILTER (WHERE identifier ~ '^[0-9a-f-]{36}$') AS uuids
  FROM stripe_meter.outbox WHERE customer ~ '^cus_[0-9]+$';

-- A restored row keeps its enqueue time, and Stripe's window is anchored
-- there rather than at now.
INSERT INTO stripe_meter.outbox (event_name, payload, identifier, ts, enqueued_at)
VALUES ('api_requests', '{"stripe_customer_id": "cus_G", "value": 1}', 'restored-1',
		now() - interval '44 days', now() - interval '10 days')
RETURNING identifier, enqueued_at = now() - interval '10 days' AS enqueued_as_given;
SELECT pg_temp.try($$
	INSERT INTO stripe_meter.outbox (event_name, payload, identifier, ts, enqueued_at)
	VALUES ('api_requests', '{"stripe_customer_id": "cus_G", "value": 1}', 'restored-2',
			now() - interval '46 days', now() - interval '10 days')$$);

-- A wide payload (found by the fuzzer, test/t/016): the validated row was
-- built in SPI memory that SPI_finish freed before the trigger returned it,
-- and a row this large, in its own malloc'd block, crashed the backend.
INSERT INTO stripe_meter.outbox (event_name, payload, identifier)
SELECT 'api_requests',
	   jsonb_build_object('stripe_customer_id', 'cus_Wide', 'value', 1)
		 || (SELECT jsonb_object_agg('key_' || i, repeat('x', 100)) FROM generate_series(1, 2000) i),
	   'wide-1';
SELECT identifier, customer, (SELECT count(*) FROM jsonb_object_keys(payload)) AS keys
  FROM stripe_meter.outbox WHERE identifier = 'wide-1';

DELETE FROM stripe_meter.outbox;
DELETE FROM stripe_meter.meter_events;
DELETE FROM stripe_meter.failed_events;
