--
-- Payload edge cases, and which rule reports first when several are broken.
-- (event_create.sql has one case per rule; this file the corners.)
--
\set SHOW_CONTEXT never
SET timezone = 'UTC';

\i sql/try_helper.include
-- create(payload): queue an api_requests event with this payload
CREATE FUNCTION pg_temp.create(payload text) RETURNS text LANGUAGE sql AS $$
	SELECT pg_temp.try(format(
		'SELECT stripe_meter_event_create(%L, %L::jsonb, %L)',
		'api_requests', payload, 'v-' || md5(payload)))
$$;

SELECT count(*) AS queued FROM stripe_meter.outbox;

--
-- Payloads: what is stored is what jsonb makes of the text given.
--
CREATE TEMP TABLE good (n serial, payload text);
INSERT INTO good (payload) VALUES
	-- duplicate keys: the last one wins, before validation
	('{"stripe_customer_id": "cus_A", "value": -1, "value": 5}'),
	('{"stripe_customer_id": 7, "value": 1, "stripe_customer_id": "cus_A"}'),
	-- keys are free text apart from brackets
	('{"stripe_customer_id": "cus_A", "value": 1, "a key with spaces": "x"}'),
	('{"stripe_customer_id": "cus_A", "value": 1, "a=b&c%20d": "x"}'),
	('{"stripe_customer_id": "cus_A", "value": 1, "stripe_customer_id ": "x"}'),
	-- escaped characters count once
	('{"stripe_customer_id": "cus_A", "value": 1, "note": "line\nbreak \"quoted\""}'),
	-- value spellings that are whole numbers
	('{"stripe_customer_id": "cus_A", "value": 0.0}'),
	('{"stripe_customer_id": "cus_A", "value": -0}'),
	('{"stripe_customer_id": "cus_A", "value": 1E2}'),
	('{"stripe_customer_id": "cus_A", "value": 1.0e2}'),
	('{"stripe_customer_id": "cus_A", "value": 2500e-2}'),
	('{"stripe_customer_id": "cus_A", "value": 999999999999999.000}'),
	('{"stripe_customer_id": "cus_A", "value": "007"}'),
	('{"stripe_customer_id": "cus_A", "value": "0000000000000000000001"}'),
	-- the customer is any non-empty string
	('{"stripe_customer_id": " ", "value": 1}'),
	('{"stripe_customer_id": "not-a-customer-id", "value": 1}');
SELECT n, regexp_replace(pg_temp.create(payload), '^ok: .*', 'ok') AS result FROM good ORDER BY n;
SELECT g.n, g.payload AS given, o.payload AS stored, o.customer
  FROM good g LEFT JOIN stripe_meter.outbox o ON o.identifier = 'v-' || md5(g.payload)
 ORDER BY g.n;

-- ... and what is refused.
SELECT payload, pg_temp.create(payload) AS result
  FROM (VALUES
	('{"stripe_customer_id": "cus_A", "value": 5, "value": -1}'),
	('{"stripe_customer_id": "cus_A", "value": 12.50}'),
	('{"stripe_customer_id": "cus_A", "value": 1e-1}'),
	('{"stripe_customer_id": "cus_A", "value": 1.5e15}'),
	('{"stripe_customer_id": "cus_A", "value": "1000000000000000"}'),
	('{"stripe_customer_id": "cus_A", "value": "0x10"}'),
	('{"stripe_customer_id": "cus_A", "value": "1,000"}'),
	('{"stripe_customer_id": "cus_A", "value": "1_000"}'),
	('{"stripe_customer_id": "cus_A", "value": "25 "}'),
	('{"stripe_customer_id": "cus_A", "value": "25.00"}'),
	('{"stripe_customer_id": "cus_A", "value": "-0"}'),
	('{"stripe_customer_id": "cus_A", "value": "NaN"}'),
	('{"stripe_customer_id": "cus_A", "value": "Infinity"}'),
	-- other values are sent as their text: a number can be too long
	('{"stripe_customer_id": "cus_A", "value": 1, "big": 1e100}'),
	('{"stripe_customer_id": "cus_A", "value": 1, "deep": {"value": 1}}'),
	('{"stripe_customer_id": "cus_A", "value": 1, "list": []}'),
	('{"stripe_customer_id": "cus_A", "value": 1, "obj": {}}'),
	('{"stripe_customer_id": "cus_A", "value": 1, "payload[x]": 1}'),
	('{"stripe_customer_id": {"id": "cus_A"}, "value": 1}'),
	('{"customer": "cus_A", "stripe_customer_id ": "cus_A", "value": 1}')
  ) AS t(payload);
SELECT count(*) AS queued FROM stripe_meter.outbox;
SELECT count(*) FILTER (WHERE payload->>'big' IS NOT NULL) AS big_queued FROM stripe_meter.outbox;

-- Payload keys are at most 100 characters, counted as characters, not
-- bytes (the fuzzer, test/t/016, found longer keys queued that a
-- Stripe-like server refuses).
SELECT k AS key_char, n AS key_chars,
	   regexp_replace(pg_temp.create('{"stripe_customer_id": "cus_A", "value": 1, "'
			|| repeat(k, n) || '": "x"}'), '^ok: .*', 'ok') AS result
  FROM (VALUES ('k', 100), ('k', 101), (U&'\00FC', 101), (U&'\+01F642', 100), (U&'\+01F642', 101)) AS t(k, n);

--
-- Which rule is reported when several are broken: event_name, then
-- payload NULL, then event_name's and identifier's form, then the payload,
-- then the timestamp, then the account; an identifier already used last.
--
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 1}', 'used');
SELECT label, pg_temp.try(stmt) AS result
  FROM (VALUES
	('null name, null payload', $$SELECT stripe_meter_event_create(NULL, NULL, '', 'infinity', 'x')$$),
	('null payload, empty name', $$SELECT stripe_meter_event_create('', NULL, '', 'infinity', 'x')$$),
	('empty name, bad payload', $$SELECT stripe_meter_event_create('', '[]', '', 'infinity', 'x')$$),
	('empty identifier, bad payload', $$SELECT stripe_meter_event_create('api_requests', '[]', '', 'infinity', 'x')$$),
	('bad payload, bad ts', $$SELECT stripe_meter_event_create('api_requests', '{"value": -1}', 'id', 'infinity', 'x')$$),
	('bad value, no customer', $$SELECT stripe_meter_event_create('api_requests', '{"value": -1}', 'id')$$),
	('bad ts, bad account', $$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'id', 'infinity', 'x')$$),
	('bad account, used id', $$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'used', now(), 'x')$$),
	('bad payload, used id', $$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A"}', 'used')$$),
	('both keys missing', $$SELECT stripe_meter_event_create('api_requests', '{"other": 1}', 'id')$$)
  ) AS t(label, stmt);
SELECT count(*) AS queued FROM stripe_meter.outbox;

DELETE FROM stripe_meter.outbox;
