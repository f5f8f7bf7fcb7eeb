--
-- stripe_meter_event_create(event_name, payload, identifier, ts, stripe_account):
-- what it queues, and every rule it enforces, each with its SQLSTATE and
-- with proof that a refused event leaves nothing in the outbox.
--
\set SHOW_CONTEXT never
-- pg_regress gives each session PGTZ=PST8PDT; Stripe's window is absolute
-- time, and "35 days" in a zone with daylight saving is not always 35*24h.
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';

-- try(stmt): runs stmt and returns 'ok[: first column]' or 'SQLSTATE: message'
-- (with DETAIL and HINT when details).  Timestamps and UUIDs are masked so
-- that the output does not depend on the clock or on chance.
CREATE FUNCTION pg_temp.mask(t text) RETURNS text LANGUAGE sql AS $$
	SELECT regexp_replace(regexp_replace(t,
		'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)?\+00', '<time>', 'g'),
		'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}', '<uuid>', 'g')
$$;
CREATE FUNCTION pg_temp.try(stmt text, details boolean DEFAULT false)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	r text;
	st text;
	msg text;
	det text;
	hnt text;
BEGIN
	IF stmt ~* '^\s*(SELECT|VALUES|WITH)\M' OR stmt ~* '\mRETURNING\M' THEN
		EXECUTE stmt INTO r;
	ELSE
		EXECUTE stmt;
	END IF;
	RETURN pg_temp.mask('ok' || coalesce(': ' || r, ''));
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT,
		det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
	IF details THEN
		msg := msg || coalesce(E'\nDETAIL: ' || nullif(det, ''), '')
				   || coalesce(E'\nHINT: ' || nullif(hnt, ''), '');
	END IF;
	RETURN pg_temp.mask(st || ': ' || msg);
END
$$;

SELECT count(*) AS queued FROM stripe_meter.outbox;

--
-- Happy paths
--

-- The seed example: the identifier given is returned and stored, with the
-- payload as given, the customer taken from it and a fresh attempt count.
BEGIN;
SELECT stripe_meter_event_create('ai_search_api',
	'{"stripe_customer_id": "cus_NciAYcXfLnqBoz", "value": 25}',
	'identifier_123', now());
SELECT identifier, event_name, payload, customer, stripe_account,
	   ts = now() AS ts_as_given,
	   enqueued_at BETWEEN now() AND clock_timestamp() AS enqueued_now,
	   attempts, first_attempt_at, in_flight_since,
	   last_http_status, last_error
  FROM stripe_meter.outbox WHERE identifier = 'identifier_123';
COMMIT;

-- A NULL identifier becomes a version 4 UUID, returned and stored.
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 1}') AS id \gset
SELECT :'id' ~ '^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$' AS is_uuid_v4,
	   (SELECT count(*) FROM stripe_meter.outbox WHERE identifier = :'id') AS stored;
-- ... a new one each time
SELECT count(DISTINCT stripe_meter_event_create('api_requests',
		'{"stripe_customer_id": "cus_A", "value": 1}', NULL)) AS distinct_ids
  FROM generate_series(1, 5);

-- A NULL ts becomes the time of the call (not the transaction's start).
BEGIN;
SELECT pg_sleep(0.01);
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 1}', 'ts-null');
SELECT ts > now() AS after_xact_start, ts <= clock_timestamp() AS not_in_future
  FROM stripe_meter.outbox WHERE identifier = 'ts-null';
COMMIT;

-- A ts given is stored exactly, microseconds included.
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 1}', 'ts-given',
	date_trunc('day', now()) - interval '2 days 0.123456 seconds');
SELECT ts = date_trunc('day', now()) - interval '2 days 0.123456 seconds' AS ts_as_given
  FROM stripe_meter.outbox WHERE identifier = 'ts-given';

-- Numbers and digit strings as the value; the payload is stored as given.
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 25}', 'value-number');
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": "25"}', 'value-string');
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 0}', 'value-zero');
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 999999999999999}', 'value-15-digits');
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": "999999999999999"}', 'value-15-digit-string');
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 25.0}', 'value-zero-fraction');
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 1e3}', 'value-exponent');
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": "0025"}', 'value-leading-zeros');
SELECT identifier, payload FROM stripe_meter.outbox
 WHERE identifier LIKE 'value-%' ORDER BY id;

-- Other payload keys: any scalar (strings, numbers of any kind, booleans).
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 3, "region": "eu-west-1",
	  "premium": true, "trial": false, "weight": 2.5, "delta": -3, "big": 1e30}',
	'extra-keys');
SELECT payload, customer FROM stripe_meter.outbox WHERE identifier = 'extra-keys';

-- A Connect account.
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 1}', 'connect', NULL, 'acct_123');
SELECT stripe_account FROM stripe_meter.outbox WHERE identifier = 'connect';

-- Named arguments.
SELECT stripe_meter_event_create(event_name => 'api_requests',
	payload => '{"stripe_customer_id": "cus_A", "value": 1}',
	stripe_account => 'acct_1Abc', identifier => 'named-args');
SELECT stripe_account FROM stripe_meter.outbox WHERE identifier = 'named-args';

-- 100 characters fit in event_name and identifier (multibyte.sql shows
-- that the limits count characters, not bytes).
SELECT length(stripe_meter_event_create(repeat('e', 100),
	'{"stripe_customer_id": "cus_A", "value": 1}', repeat('i', 100))) AS id_chars;

SELECT count(*) AS queued FROM stripe_meter.outbox;

--
-- event_name
--
SELECT pg_temp.try($$SELECT stripe_meter_event_create(NULL, '{"stripe_customer_id": "cus_A", "value": 1}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('', '{"stripe_customer_id": "cus_A", "value": 1}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create(repeat('e', 101), '{"stripe_customer_id": "cus_A", "value": 1}', 'bad')$$, true);
SELECT count(*) AS queued FROM stripe_meter.outbox;

--
-- identifier
--
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', '')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', repeat('i', 101))$$, true);
-- already queued
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'identifier_123')$$, true);
-- ... also under another event name and payload
SELECT pg_temp.try($$SELECT stripe_meter_event_create('other', '{"stripe_customer_id": "cus_B", "value": 2}', 'identifier_123')$$);
-- already delivered (as the worker would have recorded it)
INSERT INTO stripe_meter.meter_events
	(identifier, event_name, payload, ts, customer, outcome, enqueued_at, attempts)
VALUES ('delivered-1', 'api_requests', '{"stripe_customer_id": "cus_A", "value": "1"}',
	now(), 'cus_A', 'created', now(), 1);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'delivered-1')$$, true);
-- already failed
INSERT INTO stripe_meter.failed_events
	(identifier, event_name, payload, ts, customer, reason, enqueued_at, attempts)
VALUES ('failed-1', 'api_requests', '{"stripe_customer_id": "cus_A", "value": 1}',
	now(), 'cus_A', 'No such customer: ''cus_A''', now(), 1);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'failed-1')$$, true);
-- identifiers are compared exactly
SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'IDENTIFIER_123');
SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'identifier_123 ');
SELECT count(*) AS queued FROM stripe_meter.outbox;

--
-- payload: a flat JSON object
--
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', NULL, 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '[{"stripe_customer_id": "cus_A", "value": 1}]', 'bad')$$, true);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '"cus_A"', 'bad')$$, true);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '25', 'bad')$$, true);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', 'null', 'bad')$$, true);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{}', 'bad')$$, true);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"value": 1}', 'bad')$$, true);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A"}', 'bad')$$, true);
-- key names are case-sensitive
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "Value": 1}', 'bad')$$);
-- values that are not scalars, under any key
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1, "meta": {"a": "b"}}', 'bad')$$, true);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1, "tags": ["a", "b"]}', 'bad')$$, true);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1, "note": null}', 'bad')$$, true);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": {"n": 1}}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": [1]}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": null}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": null, "value": 1}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": ["cus_A"], "value": 1}', 'bad')$$);
-- keys: not empty, no brackets (the form encoding is payload[KEY]=VALUE)
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1, "": "x"}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1, "a[b": "x"}', 'bad')$$, true);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1, "a]": "x"}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1, "[0]": "x"}', 'bad')$$);
-- other values: at most 100 characters (as Stripe receives them)
SELECT pg_temp.try(format($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1, "note": "%s"}', 'long-note-ok')$$, repeat('n', 100)));
SELECT pg_temp.try(format($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1, "note": "%s"}', 'bad')$$, repeat('n', 101)), true);
SELECT pg_temp.try(format($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1, "n": %s}', 'bad')$$, repeat('9', 101)), true);
-- the customer: a non-empty string of at most 100 characters
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": 42, "value": 1}', 'bad')$$, true);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": true, "value": 1}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "", "value": 1}', 'bad')$$);
SELECT pg_temp.try(format($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "%s", "value": 1}', 'bad')$$, repeat('c', 101)));
SELECT pg_temp.try(format($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "%s", "value": 1}', 'long-customer-ok')$$, repeat('c', 100)));
SELECT identifier, length(payload->>'note') AS note_chars, length(customer) AS customer_chars
  FROM stripe_meter.outbox WHERE identifier LIKE 'long-%' ORDER BY id;
SELECT count(*) AS queued FROM stripe_meter.outbox;

--
-- value: a whole number from 0 to 999999999999999, as a JSON number or a
-- string of digits
--
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1000000000000000}', 'bad')$$, true);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": "1000000000000000"}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1e15}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": -1}', 'bad')$$, true);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": -25.5}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 25.5}', 'bad')$$, true);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 0.5}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1.5e1}', 'value-1.5e1')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": "-5"}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": "+5"}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": "2.5"}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": "25.0"}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": "1e3"}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": " 25"}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": "abc"}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": ""}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": true}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": false}', 'bad')$$);
SELECT count(*) AS queued FROM stripe_meter.outbox;

--
-- ts: from 35 days before now to 5 minutes after
--
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'ts-oldest', now() - interval '35 days' + interval '1 minute')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'ts-newest', now() + interval '4 minutes')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'bad', now() - interval '35 days' - interval '1 minute')$$, true);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'bad', now() + interval '6 minutes')$$, true);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'bad', '2000-01-01 00:00:00+00')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'bad', 'infinity')$$, true);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'bad', '-infinity')$$);
SELECT count(*) AS queued FROM stripe_meter.outbox;

--
-- stripe_account: "acct_" and letters and digits
--
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'bad', NULL, 'acct_')$$, true);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'bad', NULL, 'acct_12-3')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'bad', NULL, 'foo')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'bad', NULL, '')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'bad', NULL, 'acct_123 ')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'bad', NULL, E'acct_123\nX-Injected: 1')$$);
SELECT count(*) AS queued FROM stripe_meter.outbox;

-- Leave the tables empty for the next file.
DELETE FROM stripe_meter.outbox;
DELETE FROM stripe_meter.meter_events;
DELETE FROM stripe_meter.failed_events;
