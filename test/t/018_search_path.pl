# SECURITY DEFINER functions, and the outbox trigger, cannot be hijacked
# through search_path.
#
# A role holding doc/security.md's GRANTs (plus EXECUTE on the retry function)
# shadows, in its own schema, every pg_catalog function and operator over
# everyday types, and creates temporary tables named like the extension's
# tables; it puts pg_temp and its schema first in search_path, and then
# calls every SECURITY DEFINER function of the extension on every path it
# has.  Each shadow bumps a sequence (which no rollback undoes): the test
# asserts it was never bumped, that the temporary tables stayed empty, and
# that the events were queued correctly all the same.  The list of SECURITY
# DEFINER functions comes from the catalog, so a new one fails this test
# until it is exercised here.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

my $mock = start_mock();
my $node = new_node('search_path', mock => $mock, conf => { 'stripe_meter.enabled' => 'off' });

my @exercised = qw(stripe_meter_event_cancel stripe_meter_event_create
  stripe_meter_event_trigger stripe_meter_reconcile stripe_meter_resume_account
  stripe_meter_retry_failed stripe_meter_set_rollup_window stripe_meter_sync_meters);
is($node->safe_psql('postgres', q{
	SELECT string_agg(p.proname, ' ' ORDER BY p.proname)
	  FROM pg_proc p JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid
	 WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e' AND p.prosecdef
	   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'stripe_meter')}),
	join(' ', sort @exercised), 'the SECURITY DEFINER functions are the ones exercised here');

$node->safe_psql('postgres', q{
	CREATE ROLE app LOGIN;
	GRANT USAGE ON SCHEMA stripe_meter TO app;
	GRANT INSERT (event_name, payload, identifier, ts, stripe_account) ON stripe_meter.outbox TO app;
	GRANT EXECUTE ON FUNCTION stripe_meter_event_create(text, jsonb, text, timestamptz, text) TO app;
	GRANT EXECUTE ON FUNCTION stripe_meter_event_trigger() TO app;
	GRANT EXECUTE ON FUNCTION stripe_meter_retry_failed(text, boolean) TO app;
	GRANT EXECUTE ON FUNCTION stripe_meter_event_cancel(text, text) TO app;
	GRANT EXECUTE ON FUNCTION stripe_meter_sync_meters() TO app;
	GRANT EXECUTE ON FUNCTION stripe_meter_reconcile(text, text, timestamptz, timestamptz, text, text) TO app;
	GRANT EXECUTE ON FUNCTION stripe_meter_resume_account(text) TO app;
	GRANT EXECUTE ON FUNCTION stripe_meter_set_rollup_window(text, interval) TO app;
	INSERT INTO stripe_meter.paused_accounts (stripe_account, reason, next_try_at)
	VALUES ('acct_1Evil', 'refused', now() + interval '1 hour');
	CREATE SCHEMA evil AUTHORIZATION app;
	INSERT INTO stripe_meter.meters VALUES ('storage', 'customer', 'gb');
	INSERT INTO stripe_meter.meters (event_name, aggregation) VALUES ('rolled', 'sum');
	INSERT INTO stripe_meter.meter_events
		(identifier, event_name, payload, ts, customer, outcome, enqueued_at, attempts)
	VALUES ('hj-delivered', 'api_requests', '{"stripe_customer_id": "cus_H", "value": "1"}',
			now(), 'cus_H', 'created', now(), 1);
	INSERT INTO stripe_meter.failed_events
		(identifier, event_name, payload, ts, customer, reason, enqueued_at, attempts)
	VALUES ('hj-f1', 'api_requests', '{"stripe_customer_id": "cus_H", "value": 5}', now(), 'cus_H', 'x', now(), 1),
		   ('hj-f2', 'storage', '{"customer": "cus_H", "gb": 6}', now(), 'cus_H', 'x', now(), 1),
		   ('hj-f-old', 'api_requests', '{"stripe_customer_id": "cus_H", "value": 7}',
			now() - interval '40 days', 'cus_H', 'x', now(), 1);
});

# The traps, owned by the attacker.  Every shadow bumps evil.hits with fully
# qualified calls (so the trap itself cannot recurse into a shadow).
my $shadowed = $node->safe_psql('postgres', q{
	SET ROLE app;
	CREATE SEQUENCE evil.hits;
	CREATE TABLE evil.usage (id text, customer text, n int, at timestamptz);
	CREATE TRIGGER bill AFTER INSERT ON evil.usage FOR EACH ROW
		EXECUTE FUNCTION public.stripe_meter_event_trigger('storage', 'customer', 'n', 'id', 'at');
	DO $do$
	DECLARE
		r record;
		types oid[] := ARRAY['text', 'jsonb', 'json', 'int4', 'int8', 'int2', 'bool', 'timestamptz',
			'timestamp', 'numeric', 'interval', 'name', 'float8', 'date', 'uuid', 'bytea']::regtype[]::oid[];
		nf int := 0;
		nop int := 0;
	BEGIN
		FOR r IN SELECT p.proname, pg_get_function_identity_arguments(p.oid) AS args,
						p.prorettype::regtype AS rettype
				   FROM pg_proc p
				  WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.prokind IN ('f', 'a')
					AND NOT p.proretset AND p.prorettype = ANY (types)
					AND p.proargtypes::oid[] <@ types AND p.provariadic = 0
		LOOP
			BEGIN
				EXECUTE format('CREATE FUNCTION evil.%I(%s) RETURNS %s LANGUAGE plpgsql AS '
					'$f$BEGIN PERFORM pg_catalog.nextval(''evil.hits''::pg_catalog.regclass); RETURN NULL; END$f$',
					r.proname, r.args, r.rettype);
				nf := nf + 1;
			EXCEPTION WHEN OTHERS THEN NULL;
			END;
		END LOOP;
		FOR r IN SELECT o.oprname, o.oprleft::regtype AS l, o.oprright::regtype AS rt,
						o.oprresult::regtype AS res, row_number() OVER () AS n
				   FROM pg_operator o
				  WHERE o.oprnamespace = 'pg_catalog'::regnamespace
					AND o.oprleft = ANY (types) AND o.oprright = ANY (types) AND o.oprresult = ANY (types)
		LOOP
			BEGIN
				EXECUTE format('CREATE FUNCTION evil.op_%s(%s, %s) RETURNS %s LANGUAGE plpgsql AS '
					'$f$BEGIN PERFORM pg_catalog.nextval(''evil.hits''::pg_catalog.regclass); RETURN NULL; END$f$',
					r.n, r.l, r.rt, r.res);
				EXECUTE format('CREATE OPERATOR evil.%s (LEFTARG = %s, RIGHTARG = %s, FUNCTION = evil.op_%s)',
					r.oprname, r.l, r.rt, r.n);
				nop := nop + 1;
			EXCEPTION WHEN OTHERS THEN NULL;
			END;
		END LOOP;
		RAISE NOTICE 'shadowed % functions and % operators', nf, nop;
		PERFORM pg_catalog.set_config('evil.counts', nf || ' ' || nop, false);
	END
	$do$;
	SELECT current_setting('evil.counts');
});
my ($nf, $nop) = split / /, $shadowed;
cmp_ok($nf, '>', 500, "the attacker shadowed $nf pg_catalog functions");
cmp_ok($nop, '>', 100, "and $nop operators");

# The attack: one session, hostile search_path, every path.
my $attack = q{
\set VERBOSITY verbose
CREATE TEMP TABLE outbox (id bigint, identifier text, event_name text, payload jsonb,
	ts timestamptz, stripe_account text, customer text, enqueued_at timestamptz);
CREATE TEMP TABLE meters (event_name text, customer_payload_key text, value_payload_key text);
CREATE TEMP TABLE meter_events (identifier text, event_name text, payload jsonb, ts timestamptz);
CREATE TEMP TABLE failed_events (identifier text, event_name text, payload jsonb, ts timestamptz,
	stripe_account text, customer text, failed_at timestamptz);
INSERT INTO pg_temp.meters VALUES ('api_requests', 'evil_customer', 'evil_value'), ('storage', 'evil_customer', 'evil_value');
SET search_path = pg_temp, evil, pg_catalog, public;
SELECT public.stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_H", "value": 1}', 'hj-1');
SELECT public.stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_H", "value": 1}', 'hj-1');
SELECT public.stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_H", "value": 1}', 'hj-delivered');
SELECT public.stripe_meter_event_create('storage', '{"customer": "cus_H", "gb": "2"}', 'hj-2', NULL, 'acct_1Evil');
SELECT public.stripe_meter_event_create('storage', '{"customer": "cus_H", "gb": -2}', 'hj-bad');
INSERT INTO stripe_meter.outbox (event_name, payload, identifier) VALUES ('api_requests', '{"stripe_customer_id": "cus_H", "value": 3}', 'hj-3');
INSERT INTO stripe_meter.outbox (event_name, payload, identifier) VALUES ('api_requests', '{"stripe_customer_id": "cus_H", "value": 3}', 'hj-f1');
INSERT INTO evil.usage VALUES ('hj-4', 'cus_H', 4, NULL);
INSERT INTO evil.usage VALUES ('hj-4', 'cus_H', 4, NULL);
SELECT public.stripe_meter_retry_failed('hj-f1');
SELECT public.stripe_meter_retry_failed('hj-nonexistent');
SELECT public.stripe_meter_retry_failed();
INSERT INTO stripe_meter.outbox (event_name, payload, identifier) VALUES ('api_requests', '{"stripe_customer_id": "cus_H", "value": 9}', 'hj-c');
SELECT 'cancel queued: ' OPERATOR(pg_catalog.||) public.stripe_meter_event_cancel('api_requests', 'hj-c');
SELECT 'cancel delivered: ' OPERATOR(pg_catalog.||) public.stripe_meter_event_cancel('api_requests', 'hj-delivered');
SELECT * FROM public.stripe_meter_reconcile('api_requests', 'cus_H',
	pg_catalog.date_trunc('hour', pg_catalog.now()) OPERATOR(pg_catalog.-) '1 hour'::pg_catalog.interval,
	pg_catalog.date_trunc('hour', pg_catalog.now()));
SELECT public.stripe_meter_set_rollup_window('rolled', '1.5 seconds'::pg_catalog.interval);
SELECT 'window set: ' OPERATOR(pg_catalog.||) public.stripe_meter_set_rollup_window('rolled', '2 minutes'::pg_catalog.interval)::pg_catalog.text;
SELECT 'synced: ' OPERATOR(pg_catalog.||) public.stripe_meter_sync_meters();
SELECT 'resumed: ' OPERATOR(pg_catalog.||) public.stripe_meter_resume_account('acct_1Evil');
SELECT 'resumed all: ' OPERATOR(pg_catalog.||) public.stripe_meter_resume_account();
SELECT 'temp rows: ' OPERATOR(pg_catalog.||) ((SELECT pg_catalog.count(*) FROM pg_temp.outbox)
	OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM pg_temp.meter_events)
	OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM pg_temp.failed_events))::pg_catalog.text;
};
my ($out, $err) = ('', '');
$node->psql('postgres', $attack, extra_params => [ '-U', 'app' ], stdout => \$out, stderr => \$err,
	on_error_stop => 0);
note("attack session output:\n$out\n$err");
like($err, qr/23505: meter event identifier "hj-1" is already queued/,
	'a queued identifier is still recognised');
like($err, qr/23505: meter event identifier "hj-delivered" was already delivered/,
	'a delivered identifier is still recognised');
like($err, qr/22003: meter event value -2 is negative/, "the meter's own keys were used for validation");
like($err, qr/23505: meter event identifier "hj-f1" belongs to a failed event/,
	'a failed identifier is still recognised');
like($err, qr/23505: meter event identifier "hj-4" is already queued/, 'the trigger path checks too');
like($err, qr/42704: no failed meter event has identifier "hj-nonexistent"/,
	'retry of an unknown identifier is refused');
like($out, qr/^cancel queued: removed$/m, 'cancelling a queued event removes it');
like($out, qr/^cancel delivered: queued$/m, 'cancelling a delivered event queues its adjustment');
like($err, qr/42704: .*api_requests/, 'reconcile looked for the meter (Stripe has none)');
like($err, qr/22023: rollup window must be a whole number of seconds/, 'a bad rollup window is refused');
like($out, qr/^window set: $/m, 'a rollup window is set');
like($out, qr/^synced: 0$/m, 'the meter sync ran (Stripe has no meters)');
like($out, qr/^resumed: 1$/m, 'the paused account was resumed');
like($out, qr/^resumed all: 0$/m, 'and no other was paused');
like($out, qr/^temp rows: 0$/m, "nothing went into the attacker's temporary tables");

is($node->safe_psql('postgres', 'SELECT is_called FROM evil.hits'), 'f',
	'no shadow function or operator of the attacker ever ran');

is($node->safe_psql('postgres', q{
	SELECT string_agg(identifier || ':' || customer || ':' || (payload ->> (CASE event_name
			WHEN 'storage' THEN 'gb' ELSE 'value' END)) || ':' || coalesce(stripe_account, '-'), ' '
		ORDER BY identifier)
	  FROM stripe_meter.outbox}),
	'hj-1:cus_H:1:- hj-2:cus_H:2:acct_1Evil hj-3:cus_H:3:- hj-4:cus_H:4:- hj-f1:cus_H:5:- hj-f2:cus_H:6:-',
	'every valid event was queued, as given');
is($node->safe_psql('postgres', q{
	SELECT bool_and(ts BETWEEN now() - interval '1 hour' AND clock_timestamp()
				AND enqueued_at BETWEEN now() - interval '1 hour' AND clock_timestamp())
	  FROM stripe_meter.outbox WHERE identifier NOT LIKE 'hj-f%'}),
	't', 'with the real time');
is($node->safe_psql('postgres', q{SELECT string_agg(identifier, ' ') FROM stripe_meter.failed_events}),
	'hj-f-old', 'the event outside the window stayed failed');

# The trap works: the same search_path catches the attacker's own query.
$node->safe_psql('postgres', 'SET search_path = evil, pg_catalog; SELECT now();',
	extra_params => [ '-U', 'app' ]);
is($node->safe_psql('postgres', 'SELECT is_called FROM evil.hits'), 't',
	'(the trap fires for a query that is not pinned)');

$node->stop;
$mock->stop;
done_testing();
