--
-- Stripe's limits count characters, not bytes: event_name and identifier
-- take at most 100, and so does every payload value.  Needs a UTF8
-- database (otherwise the file stops here; see multibyte_1.out).
--
SELECT getdatabaseencoding() <> 'UTF8' AS skip_test \gset
\if :skip_test
\quit
\endif
\set SHOW_CONTEXT never

\i sql/try_helper.include

SELECT count(*) AS queued FROM stripe_meter.outbox;

-- 100 two-byte characters fit everywhere ...
SELECT octet_length(stripe_meter_event_create(repeat('é', 100),
	jsonb_build_object('stripe_customer_id', repeat('ü', 100), 'value', 1,
					   'note', repeat('ñ', 100)),
	repeat('é', 100))) AS identifier_bytes;
SELECT char_length(event_name) AS name_chars, char_length(identifier) AS id_chars,
	   char_length(customer) AS customer_chars,
	   char_length(payload->>'note') AS note_chars
  FROM stripe_meter.outbox;
-- ... and so do 100 four-byte characters
SELECT octet_length(stripe_meter_event_create(repeat('😀', 100),
	jsonb_build_object('stripe_customer_id', 'cus_A', 'value', 1,
					   'note', repeat('😀', 100)),
	repeat('😀', 100))) AS identifier_bytes;

-- ... but 101 do not
SELECT pg_temp.try($$SELECT stripe_meter_event_create(repeat('é', 101), '{"stripe_customer_id": "cus_A", "value": 1}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', repeat('é', 101))$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', jsonb_build_object('stripe_customer_id', repeat('ü', 101), 'value', 1), 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', jsonb_build_object('stripe_customer_id', 'cus_A', 'value', 1, 'note', repeat('ñ', 101)), 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', jsonb_build_object('stripe_customer_id', 'cus_A', 'value', 1, 'note', repeat('😀', 101)), 'bad')$$);
-- non-ASCII keys are fine; digits other than 0-9 are not a value
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1, "région": "é"}', 'accented-key')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1, "caf\u00e9": "\u00e9"}', 'escaped-key')$$);
SELECT payload FROM stripe_meter.outbox WHERE identifier = 'escaped-key';
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": "٣"}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": "２５"}', 'bad')$$);
SELECT count(*) AS queued FROM stripe_meter.outbox;

DELETE FROM stripe_meter.outbox;
