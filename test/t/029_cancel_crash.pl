# Cancellations keep the delivery guarantee through a crash: a cancellation
# claimed when the server stops is resent after the restart with the same
# Idempotency-Key, and Stripe replays its answer instead of acting twice.
# One whose outcome stays unknown past stripe_meter.resend_window is failed,
# not resent.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

my $ADJ = '/v1/billing/meter_event_adjustments';
my $mock = start_mock();
my $node = new_node('cancelcrash', mock => $mock,
	conf => { 'stripe_meter.request_timeout' => 1000, 'stripe_meter.resend_window' => 6 });

$node->safe_psql('postgres', q{
	SELECT stripe_meter_event_create('ai_search_api', '{"stripe_customer_id": "cus_X", "value": 1}', id, NULL, acct)
	  FROM (VALUES ('x-crash', 'acct_X1'), ('x-window', NULL)) v(id, acct)});
wait_for($node, 'SELECT count(*) FROM stripe_meter.meter_events', '2', 'both delivered');

# Stripe takes 2 s to answer the first cancellation; the server dies meanwhile.
$mock->script([ { match => { path => $ADJ, idempotency_key => 'meter_event_adjustment:x-crash' }, times => 1, delay_ms => 2000 } ]);
$node->safe_psql('postgres', q{SELECT stripe_meter_event_cancel('ai_search_api', 'x-crash')});
wait_for($node, q{SELECT in_flight_since IS NOT NULL FROM stripe_meter.adjustments WHERE identifier = 'x-crash'},
	't', 'x-crash: claimed and sent');
$node->stop('immediate');
$node->start;
wait_for($node, q{SELECT status || ',' || outcome FROM stripe_meter.adjustments WHERE identifier = 'x-crash'},
	'done,replayed', 'x-crash: resent after the restart, answered with a replay');
my @keys = map { $_->{headers}{'idempotency-key'} }
  grep { $_->{path} eq $ADJ } @{ $mock->requests(limit => 100000) };
cmp_ok(scalar @keys, '>=', 2, 'x-crash: sent again after the restart');
is(scalar(grep { $_ ne 'meter_event_adjustment:x-crash' } @keys), 0, 'x-crash: always with the same key');
is(scalar(grep { /\|x-crash$/ } @{ $mock->lifecycle->{cancelled} }), 1, 'x-crash: cancelled once at Stripe');
is(($mock->lifecycle->{adjustments}[0]{account} // ''), 'acct_X1', 'x-crash: cancelled in the connected account');

# Every answer is lost (Stripe executes, the client times out): resent
# within the window, then failed rather than resent.
$mock->script([ { match => { path => $ADJ, idempotency_key => 'meter_event_adjustment:x-window' }, times => -1, fault => 'timeout_after' } ]);
$node->safe_psql('postgres', q{SELECT stripe_meter_event_cancel('ai_search_api', 'x-window')});
wait_for($node, q{SELECT status FROM stripe_meter.adjustments WHERE identifier = 'x-window'},
	'failed', 'x-window: failed');
like($node->safe_psql('postgres', q{SELECT last_error FROM stripe_meter.adjustments WHERE identifier = 'x-window'}),
	qr/not resent/, 'x-window: because of the resend window');
my @all = grep { $_->{path} eq $ADJ && ($_->{headers}{'idempotency-key'} // '') eq 'meter_event_adjustment:x-window' }
  @{ $mock->requests(limit => 100000) };
cmp_ok(scalar @all, '>=', 1, 'x-window: it was sent');
is(scalar(grep { /\|x-window$/ } @{ $mock->lifecycle->{cancelled} }), 1, 'x-window: Stripe acted on it once');

$node->stop;
$mock->stop;
done_testing();
