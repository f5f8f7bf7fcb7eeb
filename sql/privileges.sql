--
-- Privileges: nothing is granted to PUBLIC; an application role needs the
-- GRANTs of doc/security.md to enqueue, and even then can only enqueue.  Validation
-- runs as the caller, yet sees delivered and failed events the role cannot
-- read (direct index lookups need no privileges), and the role's own
-- objects cannot change what it checks (no search_path is used).
--
\set SHOW_CONTEXT never
SET timezone = 'UTC';

\i sql/try_helper.include

-- The settings exist once the library is loaded (as it is after any call
-- of the extension's functions); load it now so that what follows does not
-- depend on what ran before.
LOAD 'stripe_meter';

--
-- The catalog: no function of the extension is executable by PUBLIC, and
-- nothing in schema stripe_meter is granted to PUBLIC.
--
SELECT p.oid::regprocedure AS function,
	   has_function_privilege('public', p.oid, 'EXECUTE') AS public_execute
  FROM pg_proc p
  JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid
 WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'stripe_meter')
 ORDER BY 1::text;
SELECT has_schema_privilege('public', 'stripe_meter', 'USAGE') AS public_usage,
	   has_schema_privilege('public', 'stripe_meter', 'CREATE') AS public_create;
SELECT c.oid::regclass AS relation, c.relkind,
	   CASE WHEN c.relkind = 'S'
			THEN has_sequence_privilege('public', c.oid, 'USAGE, SELECT, UPDATE')
			ELSE has_table_privilege('public', c.oid,
					'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER')
	   END AS public_any
  FROM pg_class c
 WHERE c.relnamespace = 'stripe_meter'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
 ORDER BY c.oid::regclass::text;
SELECT count(*) AS public_column_grants
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
 WHERE c.relnamespace = 'stripe_meter'::regnamespace AND a.attacl IS NOT NULL;
-- Every SECURITY DEFINER function pins its search_path.
SELECT p.oid::regprocedure AS function, p.prosecdef, p.proconfig
  FROM pg_proc p
  JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid
 WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'stripe_meter')
 ORDER BY 1::text;

--
-- An application role without grants can do nothing.
--
CREATE ROLE app LOGIN;
CREATE SCHEMA app AUTHORIZATION app;
-- an identifier the worker delivered, and one that failed
INSERT INTO stripe_meter.meter_events
	(identifier, event_name, payload, ts, customer, outcome, enqueued_at, attempts)
VALUES ('delivered-1', 'api_requests', '{"stripe_customer_id": "cus_A", "value": "1"}',
		now(), 'cus_A', 'created', now(), 1);
INSERT INTO stripe_meter.failed_events
	(identifier, event_name, payload, ts, customer, reason, enqueued_at, attempts)
VALUES ('failed-1', 'api_requests', '{"stripe_customer_id": "cus_A", "value": 1}',
		now(), 'cus_A', 'No such customer', now(), 1);

SET ROLE app;
SELECT current_user;
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}')$$);
SELECT pg_temp.try($$INSERT INTO stripe_meter.outbox (event_name, payload) VALUES ('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}')$$);
SELECT pg_temp.try($$CREATE TABLE app.usage (customer text, n int)$$);
SELECT pg_temp.try($$CREATE TRIGGER t AFTER INSERT ON app.usage FOR EACH ROW EXECUTE FUNCTION public.stripe_meter_event_trigger('api_requests', 'customer', 'n')$$);
SELECT pg_temp.try($$SELECT count(*) FROM stripe_meter.outbox$$);
SELECT pg_temp.try($$SELECT count(*) FROM stripe_meter.meter_events$$);
SELECT pg_temp.try($$SELECT count(*) FROM stripe_meter.failed_events$$);
SELECT pg_temp.try($$SELECT count(*) FROM stripe_meter.meters$$);
SELECT pg_temp.try($$SELECT pending FROM stripe_meter.status$$);
SELECT pg_temp.try($$SELECT stripe_meter_retry_failed()$$);
SELECT pg_temp.try($$SELECT stripe_meter_retry_failed('failed-1')$$);
SELECT pg_temp.try($$SHOW stripe_meter.api_key$$);
RESET ROLE;
DROP TABLE app.usage;

--
-- doc/security.md's GRANTs for an application role.
--
GRANT USAGE ON SCHEMA stripe_meter TO app;
GRANT INSERT (event_name, payload, identifier, ts, stripe_account) ON stripe_meter.outbox TO app;
GRANT EXECUTE ON FUNCTION stripe_meter_event_create(text, jsonb, text, timestamptz, text) TO app;
GRANT EXECUTE ON FUNCTION stripe_meter_event_trigger() TO app;

-- exactly these, and no others
SELECT c.oid::regclass AS relation,
	   has_table_privilege('app', c.oid, 'SELECT') AS sel,
	   has_table_privilege('app', c.oid, 'INSERT') AS ins,
	   has_table_privilege('app', c.oid, 'UPDATE') AS upd,
	   has_table_privilege('app', c.oid, 'DELETE') AS del,
	   has_table_privilege('app', c.oid, 'TRUNCATE') AS trunc
  FROM pg_class c
 WHERE c.relnamespace = 'stripe_meter'::regnamespace AND c.relkind IN ('r', 'p', 'v')
 ORDER BY c.oid::regclass::text;
SELECT a.attname,
	   has_column_privilege('app', a.attrelid, a.attnum, 'INSERT') AS ins,
	   has_column_privilege('app', a.attrelid, a.attnum, 'SELECT') AS sel,
	   has_column_privilege('app', a.attrelid, a.attnum, 'UPDATE') AS upd
  FROM pg_attribute a
 WHERE a.attrelid = 'stripe_meter.outbox'::regclass AND a.attnum > 0 AND NOT a.attisdropped
   AND a.attname IN ('id', 'identifier', 'event_name', 'payload', 'ts', 'stripe_account',
					 'customer', 'enqueued_at', 'attempts', 'first_attempt_at',
					 'next_attempt_at', 'in_flight_since', 'last_http_status', 'last_error')
 ORDER BY a.attnum;
SELECT p.oid::regprocedure AS function, has_function_privilege('app', p.oid, 'EXECUTE') AS app_execute
  FROM pg_proc p
  JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid
 WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'stripe_meter')
 ORDER BY 1::text;

SET ROLE app;
-- It can enqueue with the function ...
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 1}', 'app-1');
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 1}') ~ '^[0-9a-f-]{36}$' AS got_uuid;
-- ... by direct INSERT, with any of the granted columns ...
INSERT INTO stripe_meter.outbox (event_name, payload)
VALUES ('api_requests', '{"stripe_customer_id": "cus_A", "value": 2}');
INSERT INTO stripe_meter.outbox (event_name, payload, identifier, ts, stripe_account)
VALUES ('api_requests', '{"stripe_customer_id": "cus_A", "value": 3}', 'app-2', now(), 'acct_1');
COPY stripe_meter.outbox (event_name, payload, identifier) FROM stdin;
api_requests	{"stripe_customer_id": "cus_A", "value": 4}	app-3
\.
-- ... and by a trigger on its own table.
CREATE TABLE app.usage (id text, customer text, n int);
CREATE TRIGGER t AFTER INSERT ON app.usage
	FOR EACH ROW EXECUTE FUNCTION public.stripe_meter_event_trigger('api_requests', 'customer', 'n', 'id');
INSERT INTO app.usage VALUES ('app-4', 'cus_A', 5);
-- Validation sees what the role cannot read: delivered and failed events.
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'delivered-1')$$);
SELECT pg_temp.try($$INSERT INTO stripe_meter.outbox (event_name, payload, identifier) VALUES ('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'failed-1')$$);
SELECT pg_temp.try($$INSERT INTO app.usage VALUES ('app-1', 'cus_A', 1)$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": -1}')$$);

-- It still cannot read or change anything else.
SELECT pg_temp.try($$SELECT count(*) FROM stripe_meter.outbox$$);
SELECT pg_temp.try($$SELECT count(*) FROM stripe_meter.meter_events$$);
SELECT pg_temp.try($$SELECT count(*) FROM stripe_meter.failed_events$$);
SELECT pg_temp.try($$SELECT count(*) FROM stripe_meter.meters$$);
SELECT pg_temp.try($$SELECT pending FROM stripe_meter.status$$);
SELECT pg_temp.try($$SELECT worker_pid FROM stripe_meter.worker_state()$$);
SELECT pg_temp.try($$SELECT stripe_meter.launcher_notify()$$);
-- (so a direct INSERT cannot return the identifier it was given)
SELECT pg_temp.try($$INSERT INTO stripe_meter.outbox (event_name, payload) VALUES ('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}') RETURNING identifier$$);
-- the worker's columns
SELECT pg_temp.try($$INSERT INTO stripe_meter.outbox (event_name, payload, attempts) VALUES ('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 0)$$);
SELECT pg_temp.try($$INSERT INTO stripe_meter.outbox (event_name, payload, in_flight_since) VALUES ('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', now())$$);
SELECT pg_temp.try($$INSERT INTO stripe_meter.outbox (event_name, payload, customer) VALUES ('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'cus_A')$$);
SELECT pg_temp.try($$INSERT INTO stripe_meter.outbox (event_name, payload, enqueued_at) VALUES ('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', now())$$);
SELECT pg_temp.try($$UPDATE stripe_meter.outbox SET attempts = 0$$);
SELECT pg_temp.try($$DELETE FROM stripe_meter.outbox$$);
SELECT pg_temp.try($$TRUNCATE stripe_meter.outbox$$);
SELECT pg_temp.try($$INSERT INTO stripe_meter.meters VALUES ('api_requests', 'a', 'b')$$);
SELECT pg_temp.try($$INSERT INTO stripe_meter.meter_events (identifier, event_name, payload, ts, customer, outcome, enqueued_at, attempts) VALUES ('x', 'e', '{}', now(), 'c', 'created', now(), 1)$$);
SELECT pg_temp.try($$DELETE FROM stripe_meter.failed_events$$);
SELECT pg_temp.try($$SELECT stripe_meter_retry_failed()$$);
SELECT pg_temp.try($$SELECT stripe_meter_retry_failed('failed-1')$$);
-- nor the settings
SELECT pg_temp.try($$SHOW stripe_meter.api_key$$);
SELECT pg_temp.try($$SELECT current_setting('stripe_meter.api_key')$$);
SELECT pg_temp.try($$SELECT current_setting('stripe_meter.api_key', true)$$);
SELECT pg_temp.try($$SHOW stripe_meter.api_url$$);
SELECT pg_temp.try($$SET stripe_meter.api_url = 'https://attacker.example'$$);
SELECT pg_temp.try($$SET stripe_meter.enabled = off$$);
SELECT name FROM pg_settings WHERE name LIKE 'stripe_meter.%' ORDER BY name;

--
-- search_path hijack: the role shadows pg_catalog's text equality,
-- clock_timestamp() and now() with its own, and puts them first.
--
CREATE FUNCTION app.text_eq(text, text) RETURNS boolean
	LANGUAGE sql IMMUTABLE AS $$ SELECT false $$;
CREATE OPERATOR app.= (LEFTARG = text, RIGHTARG = text, PROCEDURE = app.text_eq);
CREATE FUNCTION app.clock_timestamp() RETURNS timestamptz
	LANGUAGE sql AS $$ SELECT '2000-01-01 00:00:00+00'::timestamptz $$;
CREATE FUNCTION app.now() RETURNS timestamptz
	LANGUAGE sql AS $$ SELECT '2000-01-01 00:00:00+00'::timestamptz $$;
SET search_path = app, pg_catalog, public;
-- the shadows are in effect for the role's own queries ...
SELECT 'x'::text = 'x'::text AS text_equal, now() = '2000-01-01 00:00:00+00' AS now_is_2000;
-- ... but not inside the extension: used identifiers are still found ...
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'delivered-1')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'failed-1')$$);
SELECT pg_temp.try($$SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'app-1')$$);
SELECT pg_temp.try($$INSERT INTO stripe_meter.outbox (event_name, payload, identifier) VALUES ('api_requests', '{"stripe_customer_id": "cus_A", "value": 1}', 'app-2')$$);
SELECT pg_temp.try($$INSERT INTO app.usage VALUES ('app-3', 'cus_A', 1)$$);
-- ... and new events get the real time
SELECT stripe_meter_event_create('api_requests',
	'{"stripe_customer_id": "cus_A", "value": 6}', 'app-hijack-1');
INSERT INTO stripe_meter.outbox (event_name, payload, identifier)
VALUES ('api_requests', '{"stripe_customer_id": "cus_A", "value": 7}', 'app-hijack-2');
INSERT INTO app.usage VALUES ('app-hijack-3', 'cus_A', 8);
RESET search_path;
RESET ROLE;

-- What the role queued, as the superuser sees it.
SELECT regexp_replace(identifier, '^[0-9a-f-]{36}$', '<uuid>') AS identifier,
	   customer, payload->'value' AS value, stripe_account,
	   ts > now() - interval '1 hour' AND ts <= clock_timestamp() AS ts_now,
	   enqueued_at > now() - interval '1 hour' AS enqueued_now
  FROM stripe_meter.outbox ORDER BY id;

DROP SCHEMA app CASCADE;
DROP OWNED BY app;
DROP ROLE app;
DELETE FROM stripe_meter.outbox;
DELETE FROM stripe_meter.meter_events;
DELETE FROM stripe_meter.failed_events;
