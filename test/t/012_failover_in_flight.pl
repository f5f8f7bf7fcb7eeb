# Failover with events in flight: a primary delivers thousands of events to
# a slow Stripe while a streaming standby (also preloading stripe_meter)
# follows it.  The primary is killed (SIGKILL) mid-delivery; the standby is
# promoted and its worker finishes the queue.  By the mock's record every
# identifier is billed exactly once, and each event that the old primary had
# in flight is resent under the same Idempotency-Key, so Stripe replays it.
#
# The standby never sends: until it is promoted its stripe_meter.api_url
# points at a second mock, which must see no request at all, and after it
# is pointed at the real one (still before promotion) that one sees nothing
# new.  009_standby.pl covers a standby whose primary was not sending.
#
# Fast: 3,000 events.  Long (STRIPE_METER_SOAK=1): 30,000.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;
use StripeMeterSoak;

my $events = fast_or_long(3000, 30000);

my $mock = start_mock(latency_ms => 200, latency_jitter_ms => 200,
	request_log_size => 4 * $events);
my $standby_sink = start_mock();

my $primary = new_node('primary', mock => $mock, init => { allows_streaming => 1 },
	conf => { 'stripe_meter.max_in_flight' => 100 });
$primary->backup('b');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'b', has_streaming => 1);
# Later settings win: until promotion the standby would only reach the sink.
$standby->append_conf('postgresql.conf',
	"stripe_meter.api_url = '" . $standby_sink->url . "'\n");
$standby->start;
is($standby->safe_psql('postgres', 'SELECT pg_is_in_recovery()'), 't', 'the standby is in recovery');
is($standby->safe_psql('postgres', 'SHOW shared_preload_libraries'), 'stripe_meter',
	'the standby preloads stripe_meter');

$primary->safe_psql('postgres', qq{
	SELECT stripe_meter_event_create('ai_search_api',
		jsonb_build_object('stripe_customer_id', 'cus_' || i % 1000, 'value', i), 'fo-' || i)
	  FROM generate_series(1, $events) i});
my @queued = map { "fo-$_" } 1 .. $events;

# Kill the primary while delivery is under way and requests are in flight.
wait_for($primary,
	'SELECT count(*) >= ' . int($events / 5) . ' FROM stripe_meter.meter_events',
	't', 'the primary is delivering');
wait_mock($mock, sub { $_[0]{in_flight} >= 20 }, 'requests are in flight at the mock');
my $claimed = $primary->safe_psql('postgres',
	'SELECT count(*) FROM stripe_meter.outbox WHERE in_flight_since IS NOT NULL');
$primary->kill9;
note("primary killed with $claimed events claimed");

is($standby_sink->stats->{requests}, 0,
	'while the primary ran, the standby sent nothing (its sink saw no request)');

# The requests the dead primary left behind finish at the mock.
wait_mock($mock, sub { $_[0]{in_flight} == 0 }, 'the dead primary\'s requests finished');

# Point the standby at the real mock, still in recovery.
$standby->append_conf('postgresql.conf', "stripe_meter.api_url = '" . $mock->url . "'\n");
$standby->reload;
$standby->poll_query_until('postgres', 'SHOW stripe_meter.api_url', $mock->url)
  or die 'the standby did not load the new URL';
my $requests_before = $mock->stats->{requests};
is( $standby->safe_psql('postgres', q{
		SELECT count(*) FROM pg_stat_activity
		 WHERE backend_type IN ('stripe_meter worker', 'stripe_meter launcher')}),
	'0', 'the standby runs no stripe_meter launcher or worker');
my $left = $standby->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.outbox');
cmp_ok($left, '>', 0, "the standby has undelivered events ($left)");
is($mock->stats->{requests}, $requests_before, 'still in recovery: nothing sent');
is($standby_sink->stats->{requests}, 0, 'the sink still saw nothing');

$standby->promote;
wait_for($standby, 'SELECT count(*) FROM stripe_meter.outbox', '0',
	'the promoted standby delivered its queue');
is($standby->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.meter_events'), $events,
	"meter_events holds all $events events");
is($standby->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.failed_events'), '0',
	'none failed');
is($standby_sink->stats->{requests}, 0, 'the sink never saw a request');

my $r = check_exactly_once($mock, \@queued, 'failover');

# Every request for an identifier, from either server, carried one key;
# events the old primary had sent were replayed, not billed again.
my %keys;
my %sent;
for my $req (@{ meter_requests($mock) })
{
	my $id = form_value($req->{body}, 'identifier') // next;
	$keys{$id}{ $req->{headers}{'idempotency-key'} // '' } = 1;
	$sent{$id}++;
}
is(scalar(grep { keys %{ $keys{$_} } != 1 || !$keys{$_}{"meter_event:$_"} } keys %keys), 0,
	'every request for an identifier carried meter_event: and that identifier as its Idempotency-Key');
my $replayed = $standby->safe_psql('postgres',
	q{SELECT count(*) FROM stripe_meter.meter_events WHERE outcome = 'replayed'});
cmp_ok($replayed, '>', 0,
	"the new primary resent events the old one had in flight, and Stripe replayed them ($replayed)");
cmp_ok($mock->stats->{replays}, '>=', $replayed, 'the mock counted those replays');
my $resent = grep { $sent{$_} > 1 } keys %sent;

figures('failover',
	events => $events,
	claimed_at_kill => $claimed,
	left_on_standby => $left,
	resent => $resent,
	replayed => $replayed,
	duplicates => $r->{duplicates},
	lost => $r->{lost});

$standby->stop;
$mock->stop;
$standby_sink->stop;
done_testing();
