--
-- stripe_meter.meters: the payload keys a meter's events carry the customer
-- and the value under, when they are not Stripe's defaults
-- (stripe_customer_id and value).
--
\set SHOW_CONTEXT never
SET timezone = 'UTC';

\i sql/try_helper.include

SELECT count(*) AS meters FROM stripe_meter.meters;
SELECT count(*) AS queued FROM stripe_meter.outbox;

-- Column defaults are Stripe's defaults.
INSERT INTO stripe_meter.meters (event_name) VALUES ('plain_meter') RETURNING *;
INSERT INTO stripe_meter.meters VALUES ('llm_tokens', 'account_id', 'tokens') RETURNING *;

-- Events of a meter with its own keys use them ...
SELECT stripe_meter_event_create('llm_tokens', '{"account_id": "cus_L", "tokens": 1500}', 'llm-1');
SELECT stripe_meter_event_create('llm_tokens', '{"account_id": "cus_L", "tokens": "12", "model": "large"}', 'llm-2');
-- stripe_customer_id and value are ordinary keys there, checked as such
SELECT stripe_meter_event_create('llm_tokens', '{"account_id": "cus_L", "tokens": 1, "value": -2.5, "stripe_customer_id": 7}', 'llm-3');
SELECT identifier, payload, customer FROM stripe_meter.outbox ORDER BY id;
-- ... and the default keys are then missing
SELECT pg_temp.try($$SELECT stripe_meter_event_create('llm_tokens', '{"stripe_customer_id": "cus_L", "value": 1}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('llm_tokens', '{"account_id": "cus_L", "value": 1}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('llm_tokens', '{"stripe_customer_id": "cus_L", "tokens": 1}', 'bad')$$);
-- the value and customer rules apply under the meter's keys
SELECT pg_temp.try($$SELECT stripe_meter_event_create('llm_tokens', '{"account_id": "cus_L", "tokens": -1}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('llm_tokens', '{"account_id": "cus_L", "tokens": 2.5}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('llm_tokens', '{"account_id": 5, "tokens": 1}', 'bad')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('llm_tokens', '{"account_id": "", "tokens": 1}', 'bad')$$);
-- ... also for direct inserts
SELECT pg_temp.try($$INSERT INTO stripe_meter.outbox (event_name, payload) VALUES ('llm_tokens', '{"stripe_customer_id": "cus_L", "value": 1}')$$);
INSERT INTO stripe_meter.outbox (event_name, payload, identifier)
VALUES ('llm_tokens', '{"account_id": "cus_M", "tokens": 3}', 'llm-4') RETURNING customer;
SELECT count(*) AS queued FROM stripe_meter.outbox;

-- Event names are matched exactly: other names keep the defaults.
SELECT stripe_meter_event_create('LLM_TOKENS', '{"stripe_customer_id": "cus_L", "value": 1}', 'upper-1');
SELECT stripe_meter_event_create('plain_meter', '{"stripe_customer_id": "cus_L", "value": 1}', 'plain-1');
SELECT pg_temp.try($$SELECT stripe_meter_event_create('LLM_TOKENS', '{"account_id": "cus_L", "tokens": 1}', 'bad')$$);

-- A change to a meter applies to events queued afterwards; queued events
-- keep their payload.
UPDATE stripe_meter.meters SET value_payload_key = 'units' WHERE event_name = 'llm_tokens';
SELECT pg_temp.try($$SELECT stripe_meter_event_create('llm_tokens', '{"account_id": "cus_L", "tokens": 1}', 'bad')$$);
SELECT stripe_meter_event_create('llm_tokens', '{"account_id": "cus_L", "units": 9}', 'llm-5');
-- ... also within one transaction
BEGIN;
UPDATE stripe_meter.meters SET customer_payload_key = 'cust' WHERE event_name = 'llm_tokens';
SELECT stripe_meter_event_create('llm_tokens', '{"cust": "cus_L", "units": 10}', 'llm-6');
ROLLBACK;
SELECT pg_temp.try($$SELECT stripe_meter_event_create('llm_tokens', '{"cust": "cus_L", "units": 10}', 'bad')$$);
-- Removing the row restores the defaults.
DELETE FROM stripe_meter.meters WHERE event_name = 'llm_tokens';
SELECT stripe_meter_event_create('llm_tokens', '{"stripe_customer_id": "cus_L", "value": 11}', 'llm-7');
SELECT identifier, event_name, payload->>'value' AS value, customer
  FROM stripe_meter.outbox ORDER BY id;

-- CHECK constraints
SELECT pg_temp.try($$INSERT INTO stripe_meter.meters VALUES ('', 'a', 'b')$$);
SELECT pg_temp.try($$INSERT INTO stripe_meter.meters VALUES (NULL, 'a', 'b')$$);
SELECT pg_temp.try($$INSERT INTO stripe_meter.meters VALUES (repeat('m', 101), 'a', 'b')$$);
SELECT pg_temp.try($$INSERT INTO stripe_meter.meters VALUES (repeat('m', 100), 'a', 'b')$$);
SELECT pg_temp.try($$INSERT INTO stripe_meter.meters VALUES ('m', '', 'b')$$);
SELECT pg_temp.try($$INSERT INTO stripe_meter.meters VALUES ('m', 'a', '')$$);
SELECT pg_temp.try($$INSERT INTO stripe_meter.meters VALUES ('m', NULL, 'b')$$);
SELECT pg_temp.try($$INSERT INTO stripe_meter.meters VALUES ('m', 'a', NULL)$$);
SELECT pg_temp.try($$INSERT INTO stripe_meter.meters VALUES ('m', 'same', 'same')$$);
SELECT pg_temp.try($$INSERT INTO stripe_meter.meters (event_name, customer_payload_key) VALUES ('m', 'value')$$);
SELECT pg_temp.try($$INSERT INTO stripe_meter.meters (event_name, value_payload_key) VALUES ('m', 'stripe_customer_id')$$);
SELECT pg_temp.try($$INSERT INTO stripe_meter.meters (event_name) VALUES ('plain_meter')$$);
SELECT left(event_name, 12) AS event_name, char_length(event_name) AS chars,
	   customer_payload_key, value_payload_key
  FROM stripe_meter.meters ORDER BY event_name;

DELETE FROM stripe_meter.meters;
DELETE FROM stripe_meter.outbox;
