# Upgrades: a database created at any released version and updated with
# ALTER EXTENSION stripe_meter UPDATE has exactly the objects of a fresh
# install of the current version (members, their definitions, ACLs, initial
# privileges, comments, pg_dump configuration), and the events it had queued
# survive the update and are then delivered, once each.
#
# Nothing here names today's objects: whatever stripe_meter.sql and the delta
# scripts add, a difference between the two paths fails the test.
use strict;
use warnings;

use Digest::SHA qw(sha256_hex);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

# The install scripts of released versions (released/), as released: a
# release's script must never change once databases were created from it.
my %released_sha256 = (
	'0.1.0' => '8b1a94d6598f59e2ab1a38aa26cd1aab0a4cc6bd913cffe67d8609cd51a1d047',
);

my $mock = start_mock();
# Delivery off until the update is checked, so the queued events stay queued.
my $node = new_node('upgrade', mock => $mock, databases => [],
	conf => { 'stripe_meter.enabled' => 'off' });

my $current = $node->safe_psql('postgres',
	q{SELECT default_version FROM pg_available_extensions WHERE name = 'stripe_meter'});
my $sharedir = $node->config_data('--sharedir');
my @old_versions;
opendir(my $dh, "$sharedir/extension") or die "cannot read $sharedir/extension: $!";
for my $f (sort readdir $dh)
{
	next unless $f =~ /^stripe_meter--([^-]+(?:-[^-]+)*)\.sql$/ && $f !~ /--.*--/;
	push @old_versions, $1 if $1 ne $current;
}
closedir $dh;
ok(scalar @old_versions, "released install scripts are installed (current: $current)");

for my $v (@old_versions)
{
	ok(exists $released_sha256{$v}, "$v is a known release");
	is(sha256_hex(slurp_file("$sharedir/extension/stripe_meter--$v.sql")),
		$released_sha256{$v} // '', "the $v install script is unchanged since its release");
}

# Everything that makes up the installed extension, except what pg_dump shows
# once the members are detached (see detached_dump).
sub extension_catalog
{
	my ($db) = @_;
	my $ext = q{(SELECT oid FROM pg_extension WHERE extname = 'stripe_meter')};
	my $members = qq{
		SELECT d.classid, d.objid FROM pg_depend d
		 WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = $ext AND d.deptype = 'e'};
	return $node->safe_psql($db, qq{
		SELECT 'extension ' || extname || ' ' || extversion || ' relocatable=' || extrelocatable
		       || ' schema=' || extnamespace::regnamespace
		  FROM pg_extension WHERE oid = $ext
		UNION ALL
		(SELECT 'member ' || i.type || ' ' || i.identity
		   FROM ($members) m, pg_identify_object(m.classid, m.objid, 0) i
		  ORDER BY 1)
		UNION ALL
		(SELECT 'config ' || cfg::regclass || ' ' || coalesce(cond, '<null>')
		   FROM pg_extension e, unnest(e.extconfig, e.extcondition) AS u(cfg, cond)
		  WHERE e.oid = $ext ORDER BY 1)
		UNION ALL
		(SELECT 'initprivs ' || pg_describe_object(p.classoid, p.objoid, p.objsubid) || ' '
		        || p.privtype::text || ' ' || p.initprivs::text
		   FROM pg_init_privs p
		  WHERE (p.classoid, p.objoid) IN (SELECT classid, objid FROM ($members) m)
		  ORDER BY 1)});
}

# pg_dump leaves out an extension's members (CREATE EXTENSION makes them),
# so detach every member and dump the schema: the full DDL of each object,
# its columns, defaults, constraints, indexes, triggers, grants and comments.
# This changes the database: run it last.
my $tempdir = PostgreSQL::Test::Utils::tempdir;

sub detached_dump
{
	my ($db) = @_;
	$node->safe_psql($db, q{
		DO $$
		DECLARE
			m record;
		BEGIN
			FOR m IN
				SELECT CASE i.type WHEN 'composite type' THEN 'type' ELSE i.type END AS type,
				       i.identity
				  FROM pg_depend d, pg_identify_object(d.classid, d.objid, 0) i
				 WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
				   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'stripe_meter')
				   -- from 17 a relation's row type and its array are members,
				   -- which leave with the relation and cannot be dropped alone
				   AND NOT (d.classid = 'pg_type'::regclass AND EXISTS (
				            SELECT FROM pg_type t LEFT JOIN pg_type elem ON elem.oid = t.typelem
				             WHERE t.oid = d.objid AND (t.typrelid <> 0 OR elem.typrelid <> 0)))
			LOOP
				EXECUTE format('ALTER EXTENSION stripe_meter DROP %s %s', m.type, m.identity);
			END LOOP;
		END
		$$});
	# app: the test's own table, not the extension's
	$node->command_ok([ 'pg_dump', '--schema-only', '--exclude-schema=app', '-d', $db,
			'-f', "$tempdir/$db.sql" ],
		"pg_dump --schema-only $db");
	my @lines = grep { !/^--/ && !/^\\(?:un)?restrict / && /\S/ }
	  split /\n/, slurp_file("$tempdir/$db.sql");
	return \@lines;
}

# Compares two lists of lines; on a mismatch, says which lines differ.
sub same_lines
{
	my ($got, $want, $name) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $ok = is(join("\n", @$got), join("\n", @$want), $name);
	if (!$ok)
	{
		my (%g, %w);
		$g{$_}++ for @$got;
		$w{$_}++ for @$want;
		diag("only after the update: $_") for grep { !$w{$_}-- } @$got;
		diag("only in a fresh install: $_") for grep { !$g{$_}-- } @$want;
	}
	return $ok;
}

$node->safe_psql('postgres', 'CREATE DATABASE fresh');
$node->safe_psql('fresh', 'CREATE EXTENSION stripe_meter');
my $fresh_catalog = extension_catalog('fresh');
like($fresh_catalog, qr/^extension stripe_meter \Q$current\E /, "fresh install is at $current");

my %queued;    # database => the outbox rows before the update
for my $v (@old_versions)
{
	(my $db = "from_$v") =~ s/\W/_/g;
	$node->safe_psql('postgres', "CREATE DATABASE $db");
	$node->safe_psql($db, "CREATE EXTENSION stripe_meter VERSION '$v'");

	# Events queued through each path a release offers.
	$node->safe_psql($db, qq{
		INSERT INTO stripe_meter.meters (event_name, customer_payload_key, value_payload_key)
		VALUES ('storage_gb', 'customer', 'gigabytes');
		SELECT stripe_meter_event_create('ai_search_api',
			jsonb_build_object('stripe_customer_id', 'cus_' || i % 7, 'value', i), '$db-' || i)
		  FROM generate_series(1, 50) i;
		SELECT stripe_meter_event_create('gpu_seconds', '{"stripe_customer_id": "cus_G", "value": 30}',
			'$db-gpu', now() - interval '1 day', 'acct_1UpgradeTest');
		CREATE SCHEMA app;
		CREATE TABLE app.usage (customer_id text, tokens bigint);
		CREATE TRIGGER bill AFTER INSERT ON app.usage FOR EACH ROW
			EXECUTE FUNCTION stripe_meter_event_trigger('ai_search_api', 'customer_id', 'tokens');
		INSERT INTO app.usage VALUES ('cus_T', 42);
		INSERT INTO stripe_meter.outbox (event_name, payload, identifier)
		VALUES ('ai_search_api', '{"stripe_customer_id": "cus_D", "value": 5}', '$db-direct');
	});
	$queued{$db} = query_json($node, $db,
		q{SELECT jsonb_agg(to_jsonb(o) ORDER BY id) FROM stripe_meter.outbox o});
	is(scalar @{ $queued{$db} }, 53, "$db: 53 events queued at $v");

	# The release's stripe_meter_retry_failed(), run by the new library on
	# the old tables (no maybe_billed column yet), still queues failed events
	# again, one by name and all.
	$node->safe_psql($db, qq{
		INSERT INTO stripe_meter.failed_events
			(identifier, event_name, payload, ts, customer, reason, enqueued_at, attempts)
		SELECT '$db-failed-' || i, 'ai_search_api', '{"stripe_customer_id": "cus_F", "value": 1}',
			   now(), 'cus_F', 'refused', now(), 1
		  FROM generate_series(1, 2) i});
	is($node->safe_psql($db, qq{
		SELECT stripe_meter_retry_failed('$db-failed-1');
		SELECT stripe_meter_retry_failed();
		DELETE FROM stripe_meter.outbox WHERE identifier LIKE '$db-failed-%';
		SELECT count(*) FROM stripe_meter.failed_events}),
		"1\n1\n0", "$db: retry_failed() of $v works with the new library");

	# The new library meets the old schema (a package upgrade and a restart
	# before ALTER EXTENSION ... UPDATE): enqueueing works, as above, and the
	# worker delivers nothing until the update, saying why.
	wait_for($node, q{SELECT paused FROM stripe_meter.worker_state()},
		"the extension in this database is version $v but the library is $current: run ALTER EXTENSION stripe_meter UPDATE",
		"$db: before the update, the worker waits for it", $db);

	$node->safe_psql($db, 'ALTER EXTENSION stripe_meter UPDATE');
	wait_for($node, q{SELECT paused FROM stripe_meter.worker_state()},
		'delivery is turned off (stripe_meter.enabled)',
		"$db: after the update, the worker goes on by itself", $db);
	same_lines([ split /\n/, extension_catalog($db) ], [ split /\n/, $fresh_catalog ],
		"$db: after UPDATE, the same members, pg_dump configuration and initial privileges as a fresh install");

	# Every column an event had keeps its value (an update may add columns).
	my %after = map { $_->{id} => $_ } @{ query_json($node, $db,
			q{SELECT jsonb_agg(to_jsonb(o) ORDER BY id) FROM stripe_meter.outbox o}) // [] };
	my @kept = map {
		my $old = $_;
		my $new = $after{ $old->{id} } // {};
		+{ map { $_ => $new->{$_} } keys %$old }
	} @{ $queued{$db} };
	is_deeply(\@kept, $queued{$db}, "$db: every queued event survives the update unchanged");
	is(scalar keys %after, 53, "$db: and nothing else is queued");
	is($node->safe_psql($db, q{SELECT event_name || ' ' || customer_payload_key || ' ' || value_payload_key
			FROM stripe_meter.meters}), 'storage_gb customer gigabytes', "$db: the meters are kept");
	$node->safe_psql($db, q{
		SELECT stripe_meter_event_create('ai_search_api',
			'{"stripe_customer_id": "cus_N", "value": 1}', current_database() || '-after')});
}

# The updated databases deliver, each event once.
set_conf($node, 'stripe_meter.enabled' => 'on');
for my $db (sort keys %queued)
{
	wait_for($node, q{SELECT count(*) FROM stripe_meter.outbox}, '0',
		"$db: the queue drains after the update", $db);
	is($node->safe_psql($db, q{SELECT count(*) FROM stripe_meter.meter_events}), '54',
		"$db: all 54 events recorded as delivered")
	  or diag($node->safe_psql($db, q{SELECT identifier, reason FROM stripe_meter.failed_events}));
	my @twice = grep { @{ mock_events_for($mock, $_->{identifier}) } != 1 } @{ $queued{$db} };
	is(scalar @twice, 0, "$db: the mock billed each queued event exactly once");
}

# Finally, the definitions themselves.
set_conf($node, 'stripe_meter.enabled' => 'off');
my $fresh_dump = detached_dump('fresh');
ok(scalar(grep { /^CREATE TABLE / } @$fresh_dump), 'the detached fresh install dumps its tables');
for my $db (sort keys %queued)
{
	same_lines(detached_dump($db), $fresh_dump,
		"$db: pg_dump --schema-only of the updated extension equals a fresh install");
}

$node->stop;
$mock->stop;
done_testing();
