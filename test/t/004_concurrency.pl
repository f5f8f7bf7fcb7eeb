# Stripe allows one call at a time per customer and meter.  Under load, with
# many requests in flight, the worker never sends two for the same customer
# and event name at once, and still sends many in parallel.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

my $events = 2000;
my $mock = start_mock(latency_ms => 30);
my $node = new_node('concurrency', mock => $mock,
	conf => { 'stripe_meter.max_in_flight' => 64 });

# 2,000 events over 20 customers and two event names (40 keys), queued in
# one transaction so that the worker finds them all at once.
$node->safe_psql('postgres', qq{
	SELECT stripe_meter_event_create(
		CASE WHEN i % 2 = 0 THEN 'ai_search_api' ELSE 'ai_chat_api' END,
		jsonb_build_object('stripe_customer_id', 'cus_load' || (i / 2) % 20, 'value', i),
		'load-' || i)
	  FROM generate_series(1, $events) i});
is($node->safe_psql('postgres',
		q{SELECT count(DISTINCT (event_name, customer)) FROM stripe_meter.outbox}),
	'40', '40 distinct customer and meter pairs queued');

wait_for($node, 'SELECT count(*) FROM stripe_meter.meter_events', $events,
	"all $events delivered");
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.outbox'), '0', 'outbox empty');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.failed_events'), '0',
	'none failed');

my $stats = $mock->stats;
is($stats->{concurrency_violations}, 0,
	'never two calls at once for the same customer and meter');
is($stats->{billed}, $events, 'billed once each');
is($stats->{identifiers_billed_multiple_times}, 0, 'no identifier billed twice');
is($stats->{by_status}{429} // 0, 0, 'no 429 from the mock');
is($node->safe_psql('postgres', q{SELECT count(*) FROM stripe_meter.meter_events WHERE attempts > 1}),
	'0', 'every event delivered on its first attempt');

# Not one at a time: several customers are served in parallel, within the
# configured window.
cmp_ok($stats->{max_in_flight}, '>', 1, 'more than one request in flight at once');
cmp_ok($stats->{max_in_flight}, '<=', 64, 'never more than stripe_meter.max_in_flight');
diag("mock max_in_flight: $stats->{max_in_flight}");

$node->stop;
$mock->stop;
done_testing();
