# A request's body and Idempotency-Key depend only on the queued row
# (issue 12, item 8).
#
# Stripe answers a resend under the same Idempotency-Key with an
# idempotency error when its parameters differ from the first request's, so:
# (a) a meter whose value key changes between two attempts of an event does
#     not change the resend: byte-identical, replayed, billed once;
# (b) events and cancellations never share a key: an event's key is
#     "meter_event:<identifier>" and a cancellation's
#     "meter_event_adjustment:<identifier>", so an event named "cancel-x"
#     and the cancellation of event "x" are both processed;
# (c) an event attempted before the update to 0.2.0 keeps its bare
#     identifier as its key, and its resend is replayed, not billed again;
#     one queued but never attempted takes the new key.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

my $mock = start_mock();
# Retries wait an hour unless a test makes the event due itself, so that
# the meter can be changed between two attempts.
my $node = new_node('frozen', mock => $mock,
	conf => {
		'stripe_meter.retry_min_delay' => 3600000,
		'stripe_meter.retry_max_delay' => 3600000,
	});

my $ADJ = '/v1/billing/meter_event_adjustments';

sub key_of { return $_[0]->{headers}{'idempotency-key'} // '' }

# ---- (a) the value key changes between two attempts ----

# The first attempt is executed (and billed) by Stripe, but its answer is
# lost: the outcome is unknown, so the event must be resent as it was.
$mock->script([ { match => { identifier => 'frozen-1' }, fault => 'reset_after', times => 1 } ]);
$node->safe_psql('postgres', q{
	SELECT stripe_meter_event_create('frozen_api',
		'{"stripe_customer_id": "cus_F", "value": "0025", "units": "007"}', 'frozen-1')});
wait_for($node, q{SELECT attempts = 1 AND in_flight_since IS NULL AND unknown_outcome_since IS NOT NULL
	FROM stripe_meter.outbox WHERE identifier = 'frozen-1'},
	't', 'the first attempt ends with its outcome unknown');
is($node->safe_psql('postgres', q{SELECT value_payload_key || ' ' || canonical_value || ' ' || legacy_idempotency_key
	FROM stripe_meter.outbox WHERE identifier = 'frozen-1'}),
	'value 25 false', 'the value key and the canonical value are frozen in the row at enqueue');

# A meter sync or an operator now says the meter reads its value from
# "units".  Before 0.2.0 the resend would have sent value=0025&units=7.
$node->safe_psql('postgres', q{
	INSERT INTO stripe_meter.meters (event_name, customer_payload_key, value_payload_key)
	VALUES ('frozen_api', 'stripe_customer_id', 'units');
	UPDATE stripe_meter.outbox SET next_attempt_at = clock_timestamp() WHERE identifier = 'frozen-1'});
wait_for($node, q{SELECT outcome FROM stripe_meter.meter_events WHERE identifier = 'frozen-1'},
	'replayed', 'the resend is answered with Stripe\'s stored answer');

my $reqs = requests_for($mock, 'frozen-1');
is(scalar @$reqs, 2, 'two requests for the event');
is($reqs->[1]{body}, $reqs->[0]{body}, 'the resend\'s body is byte-identical to the first');
is(form_value($reqs->[1]{body}, 'payload[value]'), '25', 'the frozen value key\'s entry is the canonical value');
is(form_value($reqs->[1]{body}, 'payload[units]'), '007', 'the other entry is sent as given');
is_deeply([ map { key_of($_) } @$reqs ], [ 'meter_event:frozen-1', 'meter_event:frozen-1' ],
	'both attempts carry the event\'s prefixed key');
ok($reqs->[1]{replayed}, 'the mock replayed the second request');
is(scalar @{ mock_events_for($mock, 'frozen-1') }, 1, 'the event is billed once');
is($mock->stats->{idempotency_mismatches}, 0, 'no idempotency error');

# An event queued after the change freezes the meter's new key.
is($node->safe_psql('postgres', q{
	BEGIN;
	SELECT FROM stripe_meter_event_create('frozen_api',
		'{"stripe_customer_id": "cus_F", "value": "0025", "units": "007"}', 'frozen-2');
	SELECT value_payload_key || ' ' || canonical_value
	  FROM stripe_meter.outbox WHERE identifier = 'frozen-2';
	COMMIT}),
	'units 7', 'a later event freezes the meter\'s current value key');
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier = 'frozen-2'},
	'1', 'and is delivered');
is(form_value(requests_for($mock, 'frozen-2')->[0]{body}, 'payload[units]'), '7',
	'with its value under the new key in canonical form');

# The premise: Stripe, and the mock, refuse a different body under a key
# already used.
my $changed = $mock->post_meter_event(
	{ event_name => 'frozen_api', identifier => 'frozen-1',
	  payload => { stripe_customer_id => 'cus_F', value => '0025', units => '7' },
	  timestamp => form_value($reqs->[0]{body}, 'timestamp') },
	'Authorization' => "Bearer $StripeMeterTest::API_KEY",
	'Idempotency-Key' => 'meter_event:frozen-1');
is($changed->{status}, 400, 'a changed body under the same key is refused');
is($changed->{json}{error}{type}, 'idempotency_error', 'with an idempotency error');

# ---- (b) events and cancellations never share a key ----

for my $id ('cancel-x', 'x')
{
	$node->safe_psql('postgres', qq{
		SELECT stripe_meter_event_create('ai_search_api',
			'{"stripe_customer_id": "cus_X", "value": 1}', '$id')});
	wait_for($node, "SELECT outcome FROM stripe_meter.meter_events WHERE identifier = '$id'",
		'created', "event $id is delivered");
}
is($node->safe_psql('postgres', q{SELECT stripe_meter_event_cancel('ai_search_api', 'x')}),
	'queued', 'the cancellation of x is queued');
wait_for($node, q{SELECT status || ' ' || coalesce(outcome, '') FROM stripe_meter.adjustments WHERE identifier = 'x'},
	'done created', 'the cancellation of x is done, not refused for a key already used');

my @adj = grep { $_->{path} eq $ADJ } @{ $mock->requests(limit => 1000000) };
is_deeply([ map { key_of($_) } @adj ], ['meter_event_adjustment:x'],
	'the cancellation carries the adjustment prefix');
is_deeply([ map { key_of($_) } @{ requests_for($mock, 'cancel-x') } ], ['meter_event:cancel-x'],
	'the event "cancel-x" carries the event prefix');
my $cancelled = join ',', sort map { (split /\|/)[-1] } @{ $mock->lifecycle->{cancelled} };
is($cancelled, 'x', 'Stripe cancelled x and nothing else');
is(scalar @{ mock_events_for($mock, 'cancel-x') }, 1, 'the event "cancel-x" is billed once');
is($mock->stats->{idempotency_mismatches}, 1, 'no idempotency error besides the premise check');

# ---- (c) an event attempted before the update keeps its key ----

# The database "old" is at the released 0.1.0; the worker delivers nothing
# there until the update.
$node->safe_psql('postgres', 'CREATE DATABASE old');
$node->safe_psql('old', q{
	CREATE EXTENSION stripe_meter VERSION '0.1.0';
	SELECT stripe_meter_event_create('ai_search_api',
		'{"stripe_customer_id": "cus_O", "value": 3}', 'old-attempted');
	SELECT stripe_meter_event_create('ai_search_api',
		'{"stripe_customer_id": "cus_O", "value": 4}', 'old-queued')});

# A 0.1.0 worker sent old-attempted under its bare identifier, and Stripe
# executed it, but the answer was lost.
my $ts = $node->safe_psql('old',
	q{SELECT floor(extract(epoch FROM ts))::bigint FROM stripe_meter.outbox WHERE identifier = 'old-attempted'});
my $first = $mock->post_meter_event(
	{ event_name => 'ai_search_api', identifier => 'old-attempted',
	  payload => { stripe_customer_id => 'cus_O', value => '3' }, timestamp => $ts },
	'Authorization' => "Bearer $StripeMeterTest::API_KEY",
	'Idempotency-Key' => 'old-attempted');
is($first->{status}, 200, 'old-attempted reached Stripe before the update');
$node->safe_psql('old', q{
	UPDATE stripe_meter.outbox
	   SET attempts = 1, first_attempt_at = now(), unknown_outcome_since = now()
	 WHERE identifier = 'old-attempted'});

# (in the update's transaction: the worker delivers once it commits)
is($node->safe_psql('old', q{
	BEGIN;
	ALTER EXTENSION stripe_meter UPDATE;
	SELECT identifier || ' ' || legacy_idempotency_key || ' '
		|| coalesce(value_payload_key, '<null>') || ' ' || coalesce(canonical_value, '<null>')
	  FROM stripe_meter.outbox ORDER BY identifier;
	COMMIT}),
	"old-attempted true <null> <null>\nold-queued false <null> <null>",
	'the update marks only the attempted event as keeping its old key');

wait_for($node, q{SELECT string_agg(identifier || ' ' || outcome, ',' ORDER BY identifier)
	FROM stripe_meter.meter_events},
	'old-attempted replayed,old-queued created',
	'after the update both events are delivered, the attempted one by a replay', 'old');
is_deeply([ map { key_of($_) } @{ requests_for($mock, 'old-attempted') } ],
	[ 'old-attempted', 'old-attempted' ], 'the attempted event is resent under its bare identifier');
is_deeply([ map { key_of($_) } @{ requests_for($mock, 'old-queued') } ],
	['meter_event:old-queued'], 'the event never attempted takes the new key');
is(scalar @{ mock_events_for($mock, 'old-attempted') }, 1, 'the attempted event is billed once');

$node->stop;
$mock->stop;
done_testing();
