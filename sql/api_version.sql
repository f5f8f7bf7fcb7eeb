--
-- stripe_meter.api_version selects v1 or v2 per database, superuser only;
-- stripe_meter.stream_url follows the same URL rules as api_url.
--
\set SHOW_CONTEXT never

\i sql/try_helper.include

LOAD 'stripe_meter';

SELECT pg_temp.try($$SHOW stripe_meter.api_version$$);
SELECT pg_temp.try($$SHOW stripe_meter.stream_url$$);
SELECT pg_temp.try($$SET stripe_meter.api_version = 'v3'$$);

-- per database: ALTER DATABASE stores it for the worker's next start
SELECT pg_temp.try(format('ALTER DATABASE %I SET stripe_meter.api_version = %L',
						  current_database(), 'v2'));
SELECT c AS database_setting
  FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase, unnest(s.setconfig) c
 WHERE d.datname = current_database() AND s.setrole = 0 AND c LIKE 'stripe_meter.%';
SELECT pg_temp.try(format('ALTER DATABASE %I RESET stripe_meter.api_version',
						  current_database()));

-- stream_url: https, or plain http to a loopback address only
ALTER SYSTEM SET stripe_meter.stream_url = 'http://meter-events.example.com';
ALTER SYSTEM SET stripe_meter.stream_url = 'ftp://127.0.0.1';

-- not for ordinary roles
CREATE ROLE api_version_app LOGIN;
SET ROLE api_version_app;
SELECT pg_temp.try($$SET stripe_meter.api_version = 'v2'$$);
SELECT pg_temp.try($$SHOW stripe_meter.api_version$$);
SELECT pg_temp.try($$ALTER ROLE api_version_app SET stripe_meter.api_version = 'v2'$$);
RESET ROLE;
DROP ROLE api_version_app;
