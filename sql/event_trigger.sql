--
-- stripe_meter_event_trigger(event_name, customer_column, value_column
--                            [, identifier_column [, timestamp_column]]):
-- a row trigger that queues one meter event per row of a user's table, in
-- the same transaction as the row.
--
\set SHOW_CONTEXT never
SET timezone = 'UTC';

\i sql/try_helper.include

CREATE SCHEMA trig;
SELECT count(*) AS queued FROM stripe_meter.outbox;

--
-- The common case: AFTER INSERT ... FOR EACH ROW, three arguments.
--
CREATE TABLE trig.api_calls (
	id bigint GENERATED ALWAYS AS IDENTITY,
	customer text,
	tokens integer,
	made_at timestamptz DEFAULT now()
);
CREATE TRIGGER bill_api_calls AFTER INSERT ON trig.api_calls
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('api_tokens', 'customer', 'tokens');
BEGIN;
INSERT INTO trig.api_calls (customer, tokens) VALUES ('cus_A', 25), ('cus_B', 0);
-- the payload uses the default keys; an integer column gives a JSON number;
-- the identifier is a new UUID and ts the time of the insert
SELECT event_name, payload, customer,
	   identifier ~ '^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$' AS is_uuid_v4,
	   ts BETWEEN now() AND clock_timestamp() AS ts_now, stripe_account
  FROM stripe_meter.outbox ORDER BY id;
COMMIT;
DELETE FROM stripe_meter.outbox;

-- Value column types: integers and numeric become JSON numbers, anything
-- else a string, checked as one.
CREATE DOMAIN trig.usage_amount AS bigint CHECK (VALUE >= 0);
CREATE TABLE trig.typed (
	customer text, v_int2 smallint, v_int8 bigint, v_num numeric,
	v_text text, v_float float8, v_dom trig.usage_amount);
CREATE TRIGGER t_int2 AFTER INSERT ON trig.typed
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('int2', 'customer', 'v_int2');
CREATE TRIGGER t_int8 AFTER INSERT ON trig.typed
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('int8', 'customer', 'v_int8');
CREATE TRIGGER t_num AFTER INSERT ON trig.typed
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('numeric', 'customer', 'v_num');
CREATE TRIGGER t_text AFTER INSERT ON trig.typed
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('text', 'customer', 'v_text');
CREATE TRIGGER t_float AFTER INSERT ON trig.typed
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('float8', 'customer', 'v_float');
CREATE TRIGGER t_dom AFTER INSERT ON trig.typed
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('domain', 'customer', 'v_dom');
INSERT INTO trig.typed VALUES ('cus_T', 2, 999999999999999, 25.000, '0042', 3, 7);
SELECT event_name, payload FROM stripe_meter.outbox ORDER BY event_name;
DELETE FROM stripe_meter.outbox;
-- a value the column type allows but Stripe does not refuses the row
SELECT pg_temp.try($$INSERT INTO trig.typed VALUES ('cus_T', -2, 1, 1, '1', 1, 1)$$);
SELECT pg_temp.try($$INSERT INTO trig.typed VALUES ('cus_T', 1, 1000000000000000, 1, '1', 1, 1)$$);
SELECT pg_temp.try($$INSERT INTO trig.typed VALUES ('cus_T', 1, 1, 2.5, '1', 1, 1)$$);
SELECT pg_temp.try($$INSERT INTO trig.typed VALUES ('cus_T', 1, 1, 1, 'ten', 1, 1)$$);
SELECT pg_temp.try($$INSERT INTO trig.typed VALUES ('cus_T', 1, 1, 1, '1', 1e20, 1)$$);
SELECT pg_temp.try($$INSERT INTO trig.typed VALUES ('cus_T', 1, 1, 1, '1', 0.5, 1)$$);
SELECT pg_temp.try($$INSERT INTO trig.typed VALUES ('', 1, 1, 1, '1', 1, 1)$$);
SELECT count(*) AS typed_rows FROM trig.typed;
SELECT count(*) AS queued FROM stripe_meter.outbox;
DROP TABLE trig.typed;

-- The customer column may be of any type; its text is the customer.
CREATE TABLE trig.by_number (customer_no integer, n integer);
CREATE TRIGGER t AFTER INSERT ON trig.by_number
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('by_number', 'customer_no', 'n');
INSERT INTO trig.by_number VALUES (42, 1);
-- ... and any text is escaped properly into the JSON payload
CREATE TABLE trig.odd_text (customer text, n integer);
CREATE TRIGGER t AFTER INSERT ON trig.odd_text
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('odd_text', 'customer', 'n');
INSERT INTO trig.odd_text VALUES (E'cus_"quoted"\\backslash', 1);
SELECT event_name, payload, customer FROM stripe_meter.outbox ORDER BY id;
DELETE FROM stripe_meter.outbox;

--
-- Identifier and timestamp columns
--
CREATE TABLE trig.usage (
	id text, customer text, amount numeric,
	at_tz timestamptz, at_plain timestamp, on_day date);
CREATE TRIGGER t_tz AFTER INSERT ON trig.usage
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('at_tz', 'customer', 'amount', 'id', 'at_tz');
BEGIN;
INSERT INTO trig.usage VALUES ('row-1', 'cus_U', 3, now() - interval '1 hour');
SELECT identifier, ts = now() - interval '1 hour' AS ts_from_column
  FROM stripe_meter.outbox;
COMMIT;
-- a NULL identifier column gives a new UUID, a NULL timestamp column now
BEGIN;
INSERT INTO trig.usage VALUES (NULL, 'cus_U', 4, NULL);
SELECT identifier ~ '^[0-9a-f-]{36}$' AS is_uuid, ts BETWEEN now() AND clock_timestamp() AS ts_now
  FROM stripe_meter.outbox WHERE payload->'value' = '4';
COMMIT;
-- the identifier column's value must be unused, like any identifier
SELECT pg_temp.try($$INSERT INTO trig.usage VALUES ('row-1', 'cus_U', 5, now())$$);
-- and the timestamp within Stripe's window
SELECT pg_temp.try($$INSERT INTO trig.usage VALUES ('row-2', 'cus_U', 5, now() - interval '36 days')$$);
SELECT count(*) AS usage_rows FROM trig.usage;
DROP TRIGGER t_tz ON trig.usage;
DELETE FROM stripe_meter.outbox;
-- timestamp without time zone: read in the session's time zone
CREATE TRIGGER t_plain AFTER INSERT ON trig.usage
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('at_plain', 'customer', 'amount', 'id', 'at_plain');
BEGIN;
INSERT INTO trig.usage (id, customer, amount, at_plain)
VALUES ('plain-1', 'cus_U', 1, (now() AT TIME ZONE 'UTC') - interval '2 hours');
SET timezone = 'Asia/Tokyo';
INSERT INTO trig.usage (id, customer, amount, at_plain)
VALUES ('plain-2', 'cus_U', 1, (now() AT TIME ZONE 'Asia/Tokyo') - interval '2 hours');
SET timezone = 'UTC';
SELECT identifier, ts = now() - interval '2 hours' AS ts_two_hours_ago
  FROM stripe_meter.outbox ORDER BY id;
COMMIT;
DROP TRIGGER t_plain ON trig.usage;
DELETE FROM stripe_meter.outbox;
-- date: midnight at the start of that day, in the session's time zone
CREATE TRIGGER t_day AFTER INSERT ON trig.usage
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('on_day', 'customer', 'amount', 'id', 'on_day');
BEGIN;
INSERT INTO trig.usage (id, customer, amount, on_day)
VALUES ('day-1', 'cus_U', 1, current_date - 1);
SELECT identifier, ts = (current_date - 1)::timestamptz AS ts_midnight
  FROM stripe_meter.outbox;
COMMIT;
DROP TRIGGER t_day ON trig.usage;
DELETE FROM stripe_meter.outbox;
-- an identifier column of another type is used as text
CREATE TABLE trig.numbered (id bigint, customer text, n int);
CREATE TRIGGER t AFTER INSERT ON trig.numbered
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('numbered', 'customer', 'n', 'id');
INSERT INTO trig.numbered VALUES (1001, 'cus_N', 1);
SELECT identifier FROM stripe_meter.outbox;
DELETE FROM stripe_meter.outbox;

--
-- BEFORE triggers, UPDATE triggers
--
CREATE TABLE trig.before_t (id text, customer text, n int);
CREATE TRIGGER t BEFORE INSERT OR UPDATE ON trig.before_t
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('before', 'customer', 'n', 'id');
-- the row itself is stored unchanged
INSERT INTO trig.before_t VALUES ('b-1', 'cus_B', 10) RETURNING *;
-- an UPDATE queues one event for the new row
UPDATE trig.before_t SET n = 11, id = 'b-2' RETURNING *;
SELECT identifier, payload FROM stripe_meter.outbox ORDER BY id;
-- ... which needs an unused identifier like any other event
SELECT pg_temp.try($$UPDATE trig.before_t SET n = 12$$);
SELECT * FROM trig.before_t;
DELETE FROM stripe_meter.outbox;
CREATE TABLE trig.after_update (customer text, n int);
INSERT INTO trig.after_update VALUES ('cus_AU', 1);
CREATE TRIGGER t AFTER UPDATE ON trig.after_update
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('after_update', 'customer', 'n');
UPDATE trig.after_update SET n = 2;
SELECT payload FROM stripe_meter.outbox;
DELETE FROM stripe_meter.outbox;

-- A partitioned table: the trigger is cloned to every partition.
CREATE TABLE trig.parted (customer text, n int) PARTITION BY LIST (customer);
CREATE TABLE trig.parted_a PARTITION OF trig.parted FOR VALUES IN ('cus_PA');
CREATE TRIGGER t AFTER INSERT ON trig.parted
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('parted', 'customer', 'n');
CREATE TABLE trig.parted_b PARTITION OF trig.parted FOR VALUES IN ('cus_PB');
INSERT INTO trig.parted VALUES ('cus_PA', 1), ('cus_PB', 2);
SELECT customer, payload->'value' AS value FROM stripe_meter.outbox ORDER BY customer;
DELETE FROM stripe_meter.outbox;

--
-- A meter with its own payload keys (a row in stripe_meter.meters).
--
INSERT INTO stripe_meter.meters (event_name, customer_payload_key, value_payload_key)
VALUES ('llm_tokens', 'account', 'tokens');
CREATE TABLE trig.llm (customer text, tokens int);
CREATE TRIGGER t AFTER INSERT ON trig.llm
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('llm_tokens', 'customer', 'tokens');
INSERT INTO trig.llm VALUES ('cus_L', 1234);
SELECT event_name, payload, customer FROM stripe_meter.outbox;
SELECT pg_temp.try($$INSERT INTO trig.llm VALUES ('cus_L', -1)$$);
DELETE FROM stripe_meter.outbox;
DELETE FROM stripe_meter.meters;

--
-- Refused events roll back the user's row as well.
--
SELECT pg_temp.try($$INSERT INTO trig.api_calls (customer, tokens) VALUES ('cus_A', 1), ('cus_A', -1)$$);
SELECT pg_temp.try($$INSERT INTO trig.api_calls (customer, tokens) VALUES (repeat('c', 101), 1)$$);
SELECT count(*) AS api_calls_rows FROM trig.api_calls;
SELECT count(*) AS queued FROM stripe_meter.outbox;

--
-- Misuse
--
CREATE TABLE trig.misuse (id text, customer text, n int, note text);
INSERT INTO trig.misuse VALUES ('m-0', 'cus_M', 1, 'x');
-- NULL customer or value
CREATE TRIGGER t AFTER INSERT ON trig.misuse
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('misuse', 'customer', 'n');
SELECT pg_temp.try($$INSERT INTO trig.misuse VALUES ('m-1', NULL, 1)$$);
SELECT pg_temp.try($$INSERT INTO trig.misuse VALUES ('m-1', 'cus_M', NULL)$$);
DROP TRIGGER t ON trig.misuse;
-- statement-level triggers
CREATE TRIGGER t AFTER INSERT ON trig.misuse
	FOR EACH STATEMENT EXECUTE FUNCTION stripe_meter_event_trigger('misuse', 'customer', 'n');
SELECT pg_temp.try($$INSERT INTO trig.misuse VALUES ('m-1', 'cus_M', 1)$$);
DROP TRIGGER t ON trig.misuse;
CREATE TRIGGER t AFTER TRUNCATE ON trig.misuse
	FOR EACH STATEMENT EXECUTE FUNCTION stripe_meter_event_trigger('misuse', 'customer', 'n');
SELECT pg_temp.try($$TRUNCATE trig.misuse$$);
DROP TRIGGER t ON trig.misuse;
-- DELETE triggers
CREATE TRIGGER t AFTER DELETE ON trig.misuse
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('misuse', 'customer', 'n');
SELECT pg_temp.try($$DELETE FROM trig.misuse$$);
DROP TRIGGER t ON trig.misuse;
CREATE TRIGGER t BEFORE DELETE ON trig.misuse
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('misuse', 'customer', 'n');
SELECT pg_temp.try($$DELETE FROM trig.misuse$$);
DROP TRIGGER t ON trig.misuse;
-- wrong number of arguments
CREATE TRIGGER t AFTER INSERT ON trig.misuse
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger();
SELECT pg_temp.try($$INSERT INTO trig.misuse VALUES ('m-1', 'cus_M', 1)$$);
DROP TRIGGER t ON trig.misuse;
CREATE TRIGGER t AFTER INSERT ON trig.misuse
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('misuse', 'customer');
SELECT pg_temp.try($$INSERT INTO trig.misuse VALUES ('m-1', 'cus_M', 1)$$);
DROP TRIGGER t ON trig.misuse;
CREATE TRIGGER t AFTER INSERT ON trig.misuse
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('misuse', 'customer', 'n', 'id', 'note', 'extra');
SELECT pg_temp.try($$INSERT INTO trig.misuse VALUES ('m-1', 'cus_M', 1)$$);
DROP TRIGGER t ON trig.misuse;
-- columns that do not exist (system columns are not accepted either)
CREATE TRIGGER t AFTER INSERT ON trig.misuse
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('misuse', 'cust', 'n');
SELECT pg_temp.try($$INSERT INTO trig.misuse VALUES ('m-1', 'cus_M', 1)$$);
DROP TRIGGER t ON trig.misuse;
CREATE TRIGGER t AFTER INSERT ON trig.misuse
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('misuse', 'customer', 'N');
SELECT pg_temp.try($$INSERT INTO trig.misuse VALUES ('m-1', 'cus_M', 1)$$);
DROP TRIGGER t ON trig.misuse;
CREATE TRIGGER t AFTER INSERT ON trig.misuse
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('misuse', 'customer', 'n', 'ident');
SELECT pg_temp.try($$INSERT INTO trig.misuse VALUES ('m-1', 'cus_M', 1)$$);
DROP TRIGGER t ON trig.misuse;
CREATE TRIGGER t AFTER INSERT ON trig.misuse
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('misuse', 'customer', 'n', 'ctid');
SELECT pg_temp.try($$INSERT INTO trig.misuse VALUES ('m-1', 'cus_M', 1)$$);
DROP TRIGGER t ON trig.misuse;
CREATE TRIGGER t AFTER INSERT ON trig.misuse
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('misuse', 'customer', 'n', 'id', 'made_at');
SELECT pg_temp.try($$INSERT INTO trig.misuse VALUES ('m-1', 'cus_M', 1)$$);
DROP TRIGGER t ON trig.misuse;
-- a timestamp column of another type
CREATE TRIGGER t AFTER INSERT ON trig.misuse
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('misuse', 'customer', 'n', 'id', 'note');
SELECT pg_temp.try($$INSERT INTO trig.misuse VALUES ('m-1', 'cus_M', 1, 'yesterday')$$);
DROP TRIGGER t ON trig.misuse;
-- a bad event name from the trigger's arguments
CREATE TRIGGER t AFTER INSERT ON trig.misuse
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('', 'customer', 'n');
SELECT pg_temp.try($$INSERT INTO trig.misuse VALUES ('m-1', 'cus_M', 1)$$);
DROP TRIGGER t ON trig.misuse;
-- called as a plain function
SELECT pg_temp.try($$SELECT stripe_meter_event_trigger()$$);
SELECT count(*) AS misuse_rows FROM trig.misuse;
SELECT count(*) AS queued FROM stripe_meter.outbox;

DROP SCHEMA trig CASCADE;
DELETE FROM stripe_meter.outbox;
