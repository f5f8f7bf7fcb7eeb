# Cancellations: an event still queued is removed and never sent; a
# delivered one gets a cancel adjustment delivered by the worker with the
# event's guarantees (same Idempotency-Key on every attempt, retried on 5xx,
# a lost answer replayed, a 5xx Stripe stored for the key failed at once,
# Stripe's refusal parked with the reason, the
# connected account's header); one in flight is cancelled once its delivery
# is recorded.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

my $mock = start_mock();
my $node = new_node('cancel', mock => $mock,
	conf => { 'stripe_meter.request_timeout' => 2000 });

my $ADJ = '/v1/billing/meter_event_adjustments';

sub enqueue
{
	my ($id, $account) = @_;
	my $acct = defined $account ? "'$account'" : 'NULL';
	$node->safe_psql('postgres', qq{
		SELECT stripe_meter_event_create('ai_search_api',
			'{"stripe_customer_id": "cus_C", "value": 3}', '$id', NULL, $acct)});
}

sub delivered
{
	my ($id) = @_;
	wait_for($node, "SELECT count(*) FROM stripe_meter.meter_events WHERE identifier = '$id'",
		'1', "$id: delivered");
}

sub cancel
{
	my ($id) = @_;
	return $node->safe_psql('postgres', "SELECT stripe_meter_event_cancel('ai_search_api', '$id')");
}

sub adjustment
{
	my ($id) = @_;
	return query_json($node, 'postgres',
		"SELECT to_jsonb(a) FROM stripe_meter.adjustments a WHERE identifier = '$id'");
}

sub adj_requests
{
	my ($id) = @_;
	return [ grep { $_->{path} eq $ADJ && (form_value($_->{body}, 'cancel[identifier]') // '') eq $id }
		  @{ $mock->requests(limit => 1000000) } ];
}

sub cancelled_at_stripe
{
	my ($id) = @_;
	return scalar grep { /\|\Q$id\E$/ } @{ $mock->lifecycle->{cancelled} };
}

# 1. Queued and cancelled in the same transaction: nothing reaches Stripe.
is($node->safe_psql('postgres', q{
	BEGIN;
	SELECT stripe_meter_event_create('ai_search_api', '{"stripe_customer_id": "cus_C", "value": 3}', 'c-queued');
	SELECT stripe_meter_event_cancel('ai_search_api', 'c-queued');
	COMMIT;}), "c-queued\nremoved", 'c-queued: removed from the queue');
enqueue('c-after');
delivered('c-after');
is(scalar @{ requests_for($mock, 'c-queued') }, 0, 'c-queued: never sent');

# 2. Delivered, then cancelled: one adjustment, the event's name and identifier.
enqueue('c-1');
delivered('c-1');
is(cancel('c-1'), 'queued', 'c-1: cancellation queued');
wait_for($node, q{SELECT status || ',' || outcome FROM stripe_meter.adjustments WHERE identifier = 'c-1'},
	'done,created', 'c-1: cancelled at Stripe');
my $a = adjustment('c-1');
is($a->{adjustment}{object}, 'billing.meter_event_adjustment', 'c-1: Stripe\'s object recorded');
is($a->{adjustment}{cancel}{identifier}, 'c-1', 'c-1: it names the event');
my $reqs = adj_requests('c-1');
is(scalar @$reqs, 1, 'c-1: one request');
is(form_value($reqs->[0]{body}, 'type'), 'cancel', 'c-1: type=cancel');
is(form_value($reqs->[0]{body}, 'event_name'), 'ai_search_api', 'c-1: the event name');
is($reqs->[0]{headers}{'idempotency-key'}, 'meter_event_adjustment:c-1', 'c-1: Idempotency-Key derived from the identifier');
ok(!defined $reqs->[0]{headers}{'stripe-account'}, 'c-1: no Stripe-Account');
is(cancelled_at_stripe('c-1'), 1, 'c-1: the mock cancelled it');

# Twice: refused, with the state of the first.
my ($rc, $out, $err) = $node->psql('postgres', "SELECT stripe_meter_event_cancel('ai_search_api', 'c-1')",
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/23505.*already cancelled/s, 'c-1: a second cancellation is refused (23505)');

# 3. Connect: the event's account goes along.
enqueue('c-acct', 'acct_C1');
delivered('c-acct');
cancel('c-acct');
wait_for($node, q{SELECT status FROM stripe_meter.adjustments WHERE identifier = 'c-acct'},
	'done', 'c-acct: cancelled');
is(adj_requests('c-acct')->[0]{headers}{'stripe-account'}, 'acct_C1', 'c-acct: Stripe-Account sent');

# 4. A 500 is retried with the same key; a lost answer is replayed.
enqueue('c-500');
enqueue('c-lost');
delivered('c-500');
delivered('c-lost');
$mock->script([
	{ match => { path => $ADJ, idempotency_key => 'meter_event_adjustment:c-500' }, times => 1, fault => '500' },
	{ match => { path => $ADJ, idempotency_key => 'meter_event_adjustment:c-lost' }, times => 1, fault => 'reset_after' },
]);
cancel('c-500');
cancel('c-lost');
wait_for($node, q{SELECT status || ',' || outcome || ',' || attempts FROM stripe_meter.adjustments WHERE identifier = 'c-500'},
	'done,created,2', 'c-500: delivered on the second attempt');
# Cancellations share the worker's connections now, and libcurl resends a
# request itself, on a fresh connection, when a reused one dies before any
# answer (as for o-reset-after in 002): one attempt or two, the same key.
wait_for($node, q{SELECT status || ',' || outcome || ',' || (attempts IN (1, 2)) FROM stripe_meter.adjustments WHERE identifier = 'c-lost'},
	'done,replayed,true', 'c-lost: the resend got the stored answer');
my @keys = map { $_->{headers}{'idempotency-key'} } @{ adj_requests('c-lost') };
is_deeply(\@keys, [ 'meter_event_adjustment:c-lost', 'meter_event_adjustment:c-lost' ], 'c-lost: both attempts carried the same key');
is(cancelled_at_stripe('c-lost'), 1, 'c-lost: cancelled once');

# A 500 that Stripe stored for the cancellation's key (it began to execute,
# then failed) is replayed to every resend before the key expires: failed
# at once, its state unknown, not resent until the resend window ends.
enqueue('c-stored');
delivered('c-stored');
$mock->script([
	{ match => { path => $ADJ, idempotency_key => 'meter_event_adjustment:c-stored' }, times => 1, fault => '500_after' },
]);
cancel('c-stored');
wait_for($node, q{SELECT status || ',' || attempts || ',' || http_status FROM stripe_meter.adjustments WHERE identifier = 'c-stored'},
	'failed,2,500', 'c-stored: failed when Stripe replays the 500 it stored');
like(adjustment('c-stored')->{last_error},
	qr/^cancellation state unknown: Stripe replays the HTTP 500 it stored for this idempotency key/,
	'c-stored: the reason says the cancellation may or may not have taken effect');
is(scalar @{ adj_requests('c-stored') }, 2, 'c-stored: not resent after the replay');

# 5. Someone cancelled it in Stripe already: done, nothing to do.
enqueue('c-dup');
delivered('c-dup');
$mock->http->post($mock->url . $ADJ, {
	headers => { 'Authorization' => "Bearer $StripeMeterTest::API_KEY",
				 'Content-Type' => 'application/x-www-form-urlencoded' },
	content => 'event_name=ai_search_api&type=cancel&cancel%5Bidentifier%5D=c-dup' });
cancel('c-dup');
wait_for($node, q{SELECT status || ',' || outcome FROM stripe_meter.adjustments WHERE identifier = 'c-dup'},
	'done,already_cancelled', 'c-dup: Stripe already had it cancelled');

# 6. Stripe refuses (its 24-hour window, shortened here): parked as failed.
enqueue('c-late');
delivered('c-late');
$mock->config({ cancel_window_s => 0 });
cancel('c-late');
wait_for($node, q{SELECT status FROM stripe_meter.adjustments WHERE identifier = 'c-late'},
	'failed', 'c-late: failed');
like(adjustment('c-late')->{last_error}, qr/24 hours/, 'c-late: Stripe\'s reason kept');
is($node->safe_psql('postgres', 'SELECT cancels_failed FROM stripe_meter.status'), '2',
	'status counts the failed cancellations (c-stored, c-late)');
$mock->config({ cancel_window_s => 86400 });

# Older than 24 hours here: refused before anything is queued.
$node->safe_psql('postgres', q{
	UPDATE stripe_meter.meter_events
	   SET meter_event = jsonb_set(meter_event, '{created}', to_jsonb(extract(epoch FROM now() - interval '25 hours')::bigint))
	 WHERE identifier = 'c-after'});
($rc, $out, $err) = $node->psql('postgres', "SELECT stripe_meter_event_cancel('ai_search_api', 'c-after')",
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/55000.*can no longer be cancelled/s, 'c-after: too late (55000)');

# 7. In flight when cancelled: the cancellation waits for the delivery.
$mock->script([ { match => { identifier => 'c-flight' }, times => 1, delay_ms => 1500 } ]);
enqueue('c-flight');
wait_for($node, q{SELECT in_flight_since IS NOT NULL FROM stripe_meter.outbox WHERE identifier = 'c-flight'},
	't', 'c-flight: in flight');
is(cancel('c-flight'), 'awaiting_delivery', 'c-flight: cancellation waits for the delivery');
wait_for($node, q{SELECT status FROM stripe_meter.adjustments WHERE identifier = 'c-flight'},
	'done', 'c-flight: delivered, then cancelled');
is(scalar @{ mock_events_for($mock, 'c-flight') }, 1, 'c-flight: billed once');
is(cancelled_at_stripe('c-flight'), 1, 'c-flight: and cancelled');

is($node->safe_psql('postgres', 'SELECT cancels_pending FROM stripe_meter.status'), '0',
	'nothing left to cancel');
is($mock->stats->{identifiers_billed_multiple_times}, 0, 'no identifier billed twice');

$node->stop;
$mock->stop;
done_testing();
