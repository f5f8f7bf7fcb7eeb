# A 5xx that Stripe stored for an idempotency key: Stripe began to execute
# the request (it may have billed the event) and then failed, and it replays
# that 500 (Idempotent-Replayed: true) to every resend with the same key
# until the key expires.  Resending cannot succeed, so the event fails at
# once, its billing state unknown, instead of being resent for 23 hours.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

my $mock = start_mock();
my $node = new_node('replayed', mock => $mock);

# the mock executes the first request (and bills it), then answers 500 and
# stores that 500 for the key
$mock->script([ { match => { path => '/v1/billing/meter_events' }, fault => '500_after', times => 1 } ]);
$node->safe_psql('postgres', q{
	SELECT stripe_meter_event_create('api_requests',
		'{"stripe_customer_id": "cus_Replayed", "value": 4}', 'replayed-1')});

wait_for($node,
	q{SELECT reason LIKE 'billing state unknown: Stripe replays the HTTP 500 it stored for this idempotency key%'
	    FROM stripe_meter.failed_events WHERE identifier = 'replayed-1'},
	't', 'the event fails as soon as Stripe replays the stored 500');
is($node->safe_psql('postgres',
		q{SELECT attempts FROM stripe_meter.failed_events WHERE identifier = 'replayed-1'}),
	'2', 'after the first 500 and one replay of it');
is(scalar @{ requests_for($mock, 'replayed-1') }, 2, 'two requests, no more');
is(scalar @{ mock_events_for($mock, 'replayed-1') }, 1, 'which Stripe (the mock) billed once');

# an ordinary 500 (not stored for the key) is still retried and delivered
$mock->script([ { match => { path => '/v1/billing/meter_events' }, fault => '500', times => 1 } ]);
$node->safe_psql('postgres', q{
	SELECT stripe_meter_event_create('api_requests',
		'{"stripe_customer_id": "cus_Plain500", "value": 5}', 'plain-500')});
wait_for($node,
	q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier = 'plain-500'},
	'1', 'a 500 that was not stored is retried and delivered');

$node->stop;
$mock->stop;
done_testing();
