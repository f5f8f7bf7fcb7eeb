# Crash storm: while thousands of events are in flight to a slow Stripe,
# the server dies again and again at random moments (SIGKILL of the
# postmaster, SIGKILL of the worker or the launcher, immediate and fast
# shutdowns), restarting each time.  Afterwards, by the mock's record, every
# queued identifier was billed exactly once and under one Idempotency-Key,
# and locally every event is in meter_events once, with nothing left queued
# or failed.  005_crash.pl covers each kind of crash once, with its own
# checks; this test piles them up.
#
# Fast: 7 crashes over 4,200 events.  Long (STRIPE_METER_SOAK=1): 40
# crashes over 60,000 events.  STRIPE_METER_SEED replays a run's choices.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use List::Util qw(shuffle);
use Time::HiRes qw(sleep);

use StripeMeterTest;
use StripeMeterSoak;

my $seed = $ENV{STRIPE_METER_SEED} // (time() ^ $$);
srand($seed);
note("seed $seed");

my $rounds = fast_or_long(7, 40);
my $per_round = fast_or_long(600, 1500);

# Latency with jitter keeps ~100 requests in flight at any moment.
my $mock = start_mock(latency_ms => 50, latency_jitter_ms => 150);
my $node = new_node('storm', mock => $mock,
	conf => {
		'stripe_meter.max_in_flight' => 100,
		'restart_after_crash' => 'on',
	});

# Every kind once (in a random order), then random kinds; the postmaster's
# own death is the most common.
my @kinds = qw(postmaster worker launcher immediate fast);
my @plan = shuffle(@kinds);
my @weighted = ((('postmaster') x 4), qw(worker launcher immediate fast));
push @plan, $weighted[ int rand @weighted ] while @plan < $rounds;
@plan = @plan[ 0 .. $rounds - 1 ];

my @queued;
my %crashes;

sub count_delivered
{
	return $node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.meter_events');
}

# SIGKILL the postmaster, and start it again once it is gone and the
# survivors of its death have let go of the shared memory (until then
# pg_ctl start fails, and is retried).
sub kill9_and_restart
{
	my $pid = $node->{_pid};
	$node->kill9;
	for (1 .. 600)
	{
		last unless kill(0, $pid);
		sleep 0.05;
	}
	for (1 .. 600)
	{
		return 1 if $node->start(fail_ok => 1);
		# a failed start may have read the old postmaster.pid
		$node->{_pid} = undef;
		sleep 0.1;
	}
	BAIL_OUT('the node did not start again after SIGKILL');
}

sub wait_ready
{
	$node->poll_query_until('postgres', 'SELECT 1', '1')
	  or BAIL_OUT('the node did not come back');
}

# SIGKILL of a backend: the postmaster kills the rest and reinitialises.
sub kill_backend
{
	my ($type) = @_;
	my $log_offset = -s $node->logfile;
	my $pid = $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'stripe_meter $type'");
	return 0 unless $pid;
	kill('KILL', $pid);
	$node->wait_for_log(qr/all server processes terminated; reinitializing/, $log_offset);
	wait_ready();
	return 1;
}

my %crash = (
	postmaster => sub { kill9_and_restart(); wait_ready(); 1 },
	worker => sub { kill_backend('worker') },
	launcher => sub { kill_backend('launcher') },
	immediate => sub { $node->stop('immediate'); $node->start; 1 },
	fast => sub { $node->stop('fast'); $node->start; 1 },
);

for my $round (1 .. $rounds)
{
	$node->safe_psql('postgres', qq{
		SELECT stripe_meter_event_create('ai_search_api',
			jsonb_build_object('stripe_customer_id', 'cus_' || i % 2000, 'value', i),
			'st$round-' || i)
		  FROM generate_series(1, $per_round) i});
	push @queued, map { "st$round-$_" } 1 .. $per_round;

	# A random moment while this round's events are being delivered.
	my $target = count_delivered() + 20 + int rand($per_round / 2);
	$node->poll_query_until('postgres',
		"SELECT count(*) >= $target FROM stripe_meter.meter_events")
	  or diag("round $round: delivery did not reach $target");
	sleep rand(0.2);

	my $kind = $plan[ $round - 1 ];
	my $in_flight = $node->safe_psql('postgres',
		'SELECT count(*) FROM stripe_meter.outbox WHERE in_flight_since IS NOT NULL');
	note("round $round: $kind with $in_flight claimed");
	if ($crash{$kind}->())
	{
		$crashes{$kind}++;
	}
	else
	{
		# The worker was between restarts; the next round tries again.
		note("round $round: no $kind process to kill");
	}
}

my $total = scalar @queued;
my $crash_count = 0;
$crash_count += $_ for values %crashes;
ok($crashes{$_}, "crashed by $_ at least once") for @kinds;

wait_for($node, 'SELECT count(*) FROM stripe_meter.outbox', '0', 'the outbox drained');
is(count_delivered(), $total, "meter_events holds all $total events");
is( $node->safe_psql('postgres',
		'SELECT count(DISTINCT identifier) FROM stripe_meter.meter_events'),
	$total, 'each identifier once in meter_events');
is( $node->safe_psql('postgres', q{
		SELECT count(*) FROM stripe_meter.meter_events
		 WHERE identifier !~ '^st[0-9]+-[0-9]+$'}),
	'0', 'nothing else in meter_events');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.failed_events'), '0',
	'failed_events empty');

my $r = check_exactly_once($mock, \@queued, 'crash storm');

# Proof that the crashes hit deliveries: events were sent again.
my ($resent, $replayed, $existed) = split /\|/, $node->safe_psql('postgres', q{
	SELECT count(*) FILTER (WHERE attempts > 1),
		   count(*) FILTER (WHERE outcome = 'replayed'),
		   count(*) FILTER (WHERE outcome = 'already_existed')
	  FROM stripe_meter.meter_events});
ok($resent + $replayed + $existed > 0, 'the crashes interrupted deliveries in flight');

figures('crash storm',
	events => $total,
	crashes => $crash_count,
	(map { ("crashes_$_" => $crashes{$_} // 0) } @kinds),
	sent_more_than_once => $resent,
	replayed => $replayed,
	already_existed => $existed,
	duplicates => $r->{duplicates},
	lost => $r->{lost},
	seed => $seed);

$node->stop;
$mock->stop;
done_testing();
