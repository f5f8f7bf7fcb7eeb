# A 5xx that Stripe stored for an idempotency key: Stripe began to execute
# the request (it may have billed the event) and then failed, and it replays
# that 500 (Idempotent-Replayed: true) to every resend with the same key
# until the key expires.  Resending cannot succeed, so the event fails at
# once, its billing state unknown, instead of being resent for 23 hours.
# Stripe may have billed it, so it is flagged maybe_billed:
# stripe_meter_retry_failed() leaves it alone unless forced, a forced retry
# keeps its history, and it can be cancelled.
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

# Stripe may have billed it: flagged, with when its outcome became unknown
is($node->safe_psql('postgres', q{
	SELECT maybe_billed, unknown_outcome_since IS NOT NULL,
		   unknown_outcome_since >= first_attempt_at
	  FROM stripe_meter.failed_events WHERE identifier = 'replayed-1'}),
	't|t|t', 'replayed-1: maybe_billed, with its unknown-outcome time');
my $first_attempt = $node->safe_psql('postgres',
	q{SELECT first_attempt_at FROM stripe_meter.failed_events WHERE identifier = 'replayed-1'});
my $unknown_since = $node->safe_psql('postgres',
	q{SELECT unknown_outcome_since FROM stripe_meter.failed_events WHERE identifier = 'replayed-1'});

# retrying all leaves it failed and says why
my ($rc, $out, $err) = $node->psql('postgres', 'SELECT stripe_meter_retry_failed()');
is($out, '0', 'stripe_meter_retry_failed() queues nothing');
like($err, qr/1 failed meter event that Stripe may have billed was not queued again/,
	'a NOTICE says one maybe-billed event was skipped');
is($node->safe_psql('postgres',
		q{SELECT count(*) FROM stripe_meter.failed_events WHERE identifier = 'replayed-1'}),
	'1', 'replayed-1: still failed');

# force queues it again, keeping its history: the resend window still
# counts from the first unknown outcome
is($node->safe_psql('postgres', qq{
	BEGIN;
	SELECT stripe_meter_retry_failed(force => true);
	SELECT first_attempt_at = '$first_attempt', unknown_outcome_since = '$unknown_since', attempts
	  FROM stripe_meter.outbox WHERE identifier = 'replayed-1';
	COMMIT;}), "1\nt|t|0", 'force => true queues it with its first_attempt_at and unknown_outcome_since');

# resent with the same key, Stripe replays the stored 500 again: failed
# again, maybe billed, still billed once, its first attempt unchanged
wait_for($node,
	q{SELECT maybe_billed FROM stripe_meter.failed_events WHERE identifier = 'replayed-1'},
	't', 'replayed-1: failed again after the forced retry');
is($node->safe_psql('postgres', qq{
	SELECT first_attempt_at = '$first_attempt', unknown_outcome_since = '$unknown_since'
	  FROM stripe_meter.failed_events WHERE identifier = 'replayed-1'}),
	't|t', 'replayed-1: its first attempt and unknown-outcome time survive the retry');
is(scalar @{ requests_for($mock, 'replayed-1') }, 3, 'one more request');
is(scalar @{ mock_events_for($mock, 'replayed-1') }, 1, 'still billed once');

# it can be cancelled: Stripe did bill it, so the cancellation is done
is($node->safe_psql('postgres', q{SELECT stripe_meter_event_cancel('api_requests', 'replayed-1')}),
	'queued', 'replayed-1: its cancellation is queued');
wait_for($node,
	q{SELECT status || ',' || outcome FROM stripe_meter.adjustments WHERE identifier = 'replayed-1'},
	'done,created', 'replayed-1: cancelled at Stripe');
is(scalar(grep { /\|replayed-1$/ } @{ $mock->lifecycle->{cancelled} }), 1,
	'replayed-1: the mock cancelled it');

# a maybe-billed event Stripe never received: Stripe answers that it has no
# such event, which is a harmless end, not a failed cancellation
$node->safe_psql('postgres', q{
	INSERT INTO stripe_meter.failed_events
		(identifier, event_name, payload, ts, customer, reason, enqueued_at,
		 first_attempt_at, attempts, maybe_billed, unknown_outcome_since)
	VALUES ('never-billed', 'api_requests', '{"stripe_customer_id": "cus_Never", "value": 1}',
			now(), 'cus_Never', 'not resent', now(), now(), 1, true, now())});
is($node->safe_psql('postgres', q{SELECT stripe_meter_event_cancel('api_requests', 'never-billed')}),
	'queued', 'never-billed: its cancellation is queued');
wait_for($node,
	q{SELECT status || ',' || outcome FROM stripe_meter.adjustments WHERE identifier = 'never-billed'},
	'done,not_received', 'never-billed: Stripe never had it; the cancellation is done');
is($node->safe_psql('postgres', 'SELECT cancels_failed FROM stripe_meter.status'), '0',
	'no failed cancellation');

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
