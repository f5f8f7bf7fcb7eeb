# One delivery worker per database that has the extension, started and
# stopped without a restart: two databases deliver side by side, a third
# gets a worker as soon as it creates the extension, DROP EXTENSION stops
# that database's worker only, and a database without the extension keeps
# no worker.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);

use StripeMeterTest;

my $mock = start_mock();
my $node = new_node('databases', mock => $mock, databases => [],
	# nothing but our workers may run transactions in the databases whose
	# transaction counts are read below
	conf => { 'autovacuum' => 'off' });
$node->safe_psql('postgres', 'CREATE DATABASE noext');
for my $db ('db1', 'db2')
{
	$node->safe_psql('postgres', "CREATE DATABASE $db");
	$node->safe_psql($db, 'CREATE EXTENSION stripe_meter');
}

sub enqueue
{
	my ($db, $prefix, $n) = @_;
	$node->safe_psql($db, qq{
		SELECT stripe_meter_event_create('ai_search_api',
			jsonb_build_object('stripe_customer_id', 'cus_' || i, 'value', i), '$prefix-' || i)
		  FROM generate_series(1, $n) i});
}

sub workers_in
{
	my ($db) = @_;
	return qq{SELECT count(*) FROM pg_stat_activity
	           WHERE backend_type = 'stripe_meter worker' AND datname = '$db'};
}

sub commits_in
{
	my ($db) = @_;
	return $node->safe_psql('postgres',
		"SELECT xact_commit FROM pg_stat_database WHERE datname = '$db'");
}

# --- two databases ---------------------------------------------------------
enqueue('db1', 'db1', 20);
enqueue('db2', 'db2', 20);
wait_for($node, 'SELECT count(*) FROM stripe_meter.meter_events', '20', 'db1 delivered', 'db1');
wait_for($node, 'SELECT count(*) FROM stripe_meter.meter_events', '20', 'db2 delivered', 'db2');
wait_for($node, q{
	SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_stat_activity
	 WHERE backend_type = 'stripe_meter worker' AND datname IN ('db1', 'db2')},
	'db1,db2', 'pg_stat_activity shows one worker in each of db1 and db2');
for my $db ('db1', 'db2')
{
	is( $node->safe_psql($db, q{
			SELECT s.worker_pid = a.pid FROM stripe_meter.status s, pg_stat_activity a
			 WHERE a.backend_type = 'stripe_meter worker' AND a.datname = current_database()}),
		't', "$db: status.worker_pid is its own worker");
}
my $stats = $mock->stats;
is($stats->{billed}, 40, 'mock billed 40');
is(scalar @{ mock_events_for($mock, 'db1-1') }, 1, 'an event of db1 billed');
is(scalar @{ mock_events_for($mock, 'db2-1') }, 1, 'an event of db2 billed');

# --- a database without the extension ------------------------------------------
# The launcher probes every database it finds; the probe leaves at once.  Its
# transactions in noext show that it ran.
wait_for($node, "SELECT xact_commit > 0 FROM pg_stat_database WHERE datname = 'noext'",
	't', 'noext was probed');
wait_for($node, workers_in('noext'), '0', 'noext: no worker stays');
my $noext_commits = commits_in('noext');
my $noext_since = time;

# --- a new database, no restart ----------------------------------------------------
$node->safe_psql('postgres', 'CREATE DATABASE db3');
$node->safe_psql('db3', 'CREATE EXTENSION stripe_meter');
enqueue('db3', 'db3', 10);
wait_for($node, 'SELECT count(*) FROM stripe_meter.meter_events', '10',
	'db3: delivered without a restart', 'db3');
wait_for($node, workers_in('db3'), '1', 'db3: a worker appeared');

# --- DROP EXTENSION stops that database's worker only ---------------------------------
my $log_offset = -s $node->logfile;
$node->safe_psql('db1', 'DROP EXTENSION stripe_meter');
wait_for($node, workers_in('db1'), '0', 'db1: its worker exits after DROP EXTENSION');
ok($node->log_contains(qr/stripe_meter worker is stopping: the extension was dropped/, $log_offset),
	'db1: the worker said why it stopped');
my $db1_commits = commits_in('db1');
my $db1_since = time;

enqueue('db2', 'db2-after', 10);
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'db2-after-%'},
	'10', 'db2 keeps delivering', 'db2');
is($node->safe_psql('postgres', workers_in('db2')), '1', 'db2 still has its worker');

$stats = $mock->stats;
is($stats->{billed}, 60, 'mock billed 60 in all');
is($stats->{identifiers_billed_multiple_times}, 0, 'no identifier billed twice');
is($stats->{concurrency_violations}, 0, 'no concurrency violation');

# No worker lasts, nor comes back, where the extension is not.
is($node->safe_psql('postgres', workers_in('db1')), '0', 'db1: still no worker');
is($node->safe_psql('postgres', workers_in('noext')), '0', 'noext: still no worker');

# A worker that found no extension must not be started again.  Proving that
# something does not happen takes a bound: the launcher restarts a worker it
# takes for crashed after 2 s (RESTART_DELAY_MS in slots.c), so watch
# each database for three times that long after its worker left, and stop
# as soon as a new worker's transactions show up.
sub started_again
{
	my ($db, $commits, $since) = @_;
	while (time < $since + 6)
	{
		return 1 if commits_in($db) > $commits;
		sleep 0.2;
	}
	return commits_in($db) > $commits;
}
{
	# The probe of a database without the extension exits before it takes
	# its slot (become_the_worker), so worker_exit() leaves the slot
	# STARTING; the launcher's tend_slots() then takes it for a crash
	# (SLOT_STOPPED) and starts the probe again every 2 s, forever.
	ok(!started_again('noext', $noext_commits, $noext_since), 'noext: not probed again');
}
ok(!started_again('db1', $db1_commits, $db1_since),
	'db1: no worker started again after DROP EXTENSION');

# A database dropped before the launcher's next scan saw it, right after
# CREATE EXTENSION asked for a worker there: its slot must be freed, not
# restarted every 2 s for ever with "database ... does not exist".
{
	$node->safe_psql('postgres', 'CREATE DATABASE shortlived');
	my $oid = $node->safe_psql('postgres',
		q{SELECT oid FROM pg_database WHERE datname = 'shortlived'});
	$node->safe_psql('shortlived', 'CREATE EXTENSION stripe_meter');
	$node->safe_psql('postgres', 'DROP DATABASE shortlived WITH (FORCE)');
	my $gone = qr/database $oid does not exist/;
	my $count = sub { my @m = (slurp_file($node->logfile) =~ /$gone/g); scalar @m };
	my ($last, $quiet_since, $deadline) = ($count->(), time, time + 60);
	while (time < $deadline && time < $quiet_since + 6)
	{
		sleep 0.2;
		my $now = $count->();
		($last, $quiet_since) = ($now, time) if $now != $last;
	}
	ok(time >= $quiet_since + 6,
		"dropped database: its worker stops being restarted ($last failed starts)");
}

$node->stop;
$mock->stop;
done_testing();
