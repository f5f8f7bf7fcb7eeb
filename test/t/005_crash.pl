# Nothing lost and nothing billed twice when the server or the worker dies
# in the middle of delivery: an immediate stop, a SIGTERM to the worker, a
# kill -9 of the worker (the postmaster then restarts every backend) and a
# fast shutdown, each with ~200 requests claimed or in flight.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

my $per_round = 3000;
my $mock = start_mock(latency_ms => 200);
my $node = new_node('crash', mock => $mock,
	conf => {
		'stripe_meter.max_in_flight' => 100,
		# a crashed backend makes the postmaster restart all of them
		'restart_after_crash' => 'on',
	});

my $queued = 0;

sub crash_round
{
	my ($round, $what, $crash) = @_;

	$node->safe_psql('postgres', qq{
		SELECT stripe_meter_event_create('ai_search_api',
			jsonb_build_object('stripe_customer_id', 'cus_' || i % 1000, 'value', i),
			'$round-' || i)
		  FROM generate_series(1, $per_round) i});
	$queued += $per_round;

	wait_for($node,
		qq{SELECT count(*) >= 300 FROM stripe_meter.meter_events WHERE identifier LIKE '$round-%'},
		't', "$round: delivery under way");
	my $log_offset = -s $node->logfile;
	$crash->($log_offset);

	wait_for($node,
		qq{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE '$round-%'},
		$per_round, "$round: after $what, all $per_round delivered");
	is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.outbox'), '0',
		"$round: outbox empty");
	is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.failed_events'), '0',
		"$round: none failed");
	is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.meter_events'), $queued,
		"$round: meter_events holds every event queued so far");

	my $stats = $mock->stats;
	is($stats->{billed}, $queued, "$round: mock billed each event queued so far once");
	is($stats->{identifiers_billed_multiple_times}, 0, "$round: no identifier billed twice");
	is($stats->{identifiers_billed_under_multiple_keys}, 0,
		"$round: no identifier billed under two idempotency keys");

	# Proof that the crash hit events in flight: they were sent again.
	my ($resent, $replayed, $existed) = split /\|/, $node->safe_psql('postgres', qq{
		SELECT count(*) FILTER (WHERE attempts > 1),
			   count(*) FILTER (WHERE outcome = 'replayed'),
			   count(*) FILTER (WHERE outcome = 'already_existed')
		  FROM stripe_meter.meter_events WHERE identifier LIKE '$round-%'});
	diag("$round: $resent sent more than once, $replayed replayed, $existed already existed");
	ok($resent + $replayed + $existed > 0, "$round: the $what hit events in flight")
	  or diag("$round: the $what did not interrupt any delivery; the test proved nothing");
}

crash_round('imm', 'immediate stop', sub {
	$node->stop('immediate');
	$node->start;
});

crash_round('term', 'SIGTERM to the worker', sub {
	my $pids = worker_pids($node, 'postgres');
	is(scalar @$pids, 1, 'term: one worker');
	is($node->safe_psql('postgres', "SELECT pg_terminate_backend($pids->[0])"), 't',
		'term: pg_terminate_backend(worker)');
	# The launcher starts a new one.
	wait_for($node,
		q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'stripe_meter worker'
		     AND pid <> } . $pids->[0], '1', 'term: a new worker started');
});

crash_round('kill', 'kill -9 of the worker', sub {
	my ($log_offset) = @_;
	my $pids = worker_pids($node, 'postgres');
	is(scalar @$pids, 1, 'kill: one worker');
	is(kill('KILL', $pids->[0]), 1, 'kill: SIGKILL sent to the worker');
	$node->wait_for_log(qr/all server processes terminated; reinitializing/, $log_offset);
	# Polling during crash recovery fails: psql exits before it reads the
	# query, and the write to it breaks the test.
	$node->wait_for_log(qr/reinitializing.*database system is ready to accept connections/s,
		$log_offset);
	pass('kill: the postmaster restarted every backend');
});

crash_round('fast', 'fast shutdown', sub {
	$node->stop('fast');
	$node->start;
});

$node->stop;
$mock->stop;
done_testing();
