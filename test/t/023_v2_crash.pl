# A crash between a batch being accepted by Stripe and its acceptance being
# recorded: the postmaster is killed with SIGKILL while the mock holds the
# answers of many stream requests (latency), which it still executes.
# After a restart the claimed events are sent again with the same
# identifiers; Stripe (the mock) drops the ones it already has, so by its
# record every identifier is billed exactly once, and every event is
# recorded once.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);

use StripeMeterTest;

my $total = 6000;
my $mock = start_mock(latency_ms => 300);
my $node = new_node('v2crash', mock => $mock,
	conf => {
		'stripe_meter.api_version' => 'v2',
		'stripe_meter.stream_url' => $mock->url,
		'stripe_meter.max_in_flight' => 20,
	});

$node->safe_psql('postgres', qq{
	SELECT stripe_meter_event_create('ai_search_api',
		jsonb_build_object('stripe_customer_id', 'cus_' || i % 1000, 'value', 1), 'c-' || i)
	  FROM generate_series(1, $total) i});

# Wait until batches are being answered and more are in flight.
wait_mock($mock, sub { $_[0]{billed} >= 1000 && $_[0]{in_flight} >= 2 },
	'delivery under way, requests in flight');
$node->kill9;
pass('postmaster killed with SIGKILL');

# What the mock billed whose acceptance the database may not have recorded.
my $billed_at_kill = $mock->wait_for(sub { $_[0]{in_flight} == 0 })->{billed};
diag("billed by the mock when the postmaster died (after in-flight requests finished): $billed_at_kill");

# Orphaned children exit on postmaster death; start once they have.
my $deadline = time + $PostgreSQL::Test::Utils::timeout_default;
my $started;
while (time < $deadline)
{
	# a failed start leaves the dead postmaster's pid recorded: forget it
	$node->{_pid} = undef;
	last if ($started = $node->start(fail_ok => 1));
	sleep 0.5;
}
ok($started, 'server restarted');

wait_for($node, 'SELECT count(*) FROM stripe_meter.meter_events', $total,
	"all $total events recorded once after the restart");
is($node->safe_psql('postgres',
	'SELECT count(*) FROM stripe_meter.outbox UNION ALL SELECT count(*) FROM stripe_meter.failed_events'),
	"0\n0", 'outbox empty, none failed');

my $stats = $mock->stats;
is($stats->{billed}, $total, "the mock billed $total events");
is($stats->{identifiers_billed_multiple_times}, 0, 'no identifier billed twice');
my %seen;
$seen{ $_->{identifier} }++ for @{ $mock->events };
is(scalar(keys %seen), $total, 'the mock\'s record holds every identifier');
is(scalar(grep { $_ != 1 } values %seen), 0, 'each exactly once');
cmp_ok($stats->{stream_duplicates_dropped}, '>', 0,
	'events accepted but not recorded before the crash were resent and deduped')
  or diag('the crash did not hit accepted-but-unrecorded events; the test proved nothing');
my $resent = $node->safe_psql('postgres',
	'SELECT count(*) FROM stripe_meter.meter_events WHERE attempts > 1');
diag("$resent events sent more than once, $stats->{stream_duplicates_dropped} resends deduped by the mock");
is($stats->{concurrency_violations}, 0, 'no concurrent events for one customer and meter');

$node->stop;
$mock->stop;
done_testing();
