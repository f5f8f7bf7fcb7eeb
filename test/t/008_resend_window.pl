# Resends stay inside the window in which Stripe recognises them: an event
# whose earlier attempt's outcome is unknown is failed, not resent, once
# stripe_meter.resend_window has passed since; an event with only definite
# answers is retried past it; and an event whose timestamp left Stripe's
# 35-day window before it was claimed is failed without a request.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

my $mock = start_mock();
my $node = new_node('resend', mock => $mock,
	conf => {
		'stripe_meter.resend_window' => 1,
		'stripe_meter.request_timeout' => 1000,
	});

# Stripe bills rw-timeout, but its answer never comes back (the client times
# out), on every attempt.  rw-429 is refused with 429 four times, 400 ms
# each, so its retries span more than the window.
$mock->script([
	{ match => { identifier => 'rw-timeout' }, fault => 'timeout_after', times => -1 },
	{ match => { identifier => 'rw-429' }, status => 429, delay_ms => 400, times => 4,
		body => { error => { type => 'invalid_request_error', code => 'rate_limit',
				message => 'Request rate limit exceeded.' } } },
]);
$node->safe_psql('postgres', q{
	SELECT stripe_meter_event_create('ai_search_api',
		'{"stripe_customer_id": "cus_T", "value": 1}', 'rw-timeout');
	SELECT stripe_meter_event_create('ai_search_api',
		'{"stripe_customer_id": "cus_R", "value": 1}', 'rw-429');
});

wait_for($node, q{SELECT count(*) FROM stripe_meter.failed_events WHERE identifier = 'rw-timeout'},
	'1', 'rw-timeout: failed');
my $reason = $node->safe_psql('postgres',
	q{SELECT reason FROM stripe_meter.failed_events WHERE identifier = 'rw-timeout'});
note("rw-timeout: $reason");
like($reason, qr/not resent/, 'rw-timeout: reason says it was not resent');
like($reason, qr/resend_window|more than 1 seconds? ago/,
	'rw-timeout: reason points at the resend window');
like($reason, qr/billed twice/, 'rw-timeout: reason says why');
is(scalar @{ mock_events_for($mock, 'rw-timeout') }, 1, 'rw-timeout: billed exactly once');
is(scalar @{ requests_for($mock, 'rw-timeout') }, 1, 'rw-timeout: sent once, never resent');
is($node->safe_psql('postgres', q{
		SELECT maybe_billed, unknown_outcome_since IS NOT NULL
		  FROM stripe_meter.failed_events WHERE identifier = 'rw-timeout'}),
	't|t', 'rw-timeout: maybe_billed, keeping when its outcome became unknown');

wait_for($node, q{SELECT outcome || ',' || attempts FROM stripe_meter.meter_events WHERE identifier = 'rw-429'},
	'created,5', 'rw-429: retried past the window (answers were definite) and delivered');
cmp_ok($node->safe_psql('postgres', q{
		SELECT extract(epoch FROM delivered_at - first_attempt_at)
		  FROM stripe_meter.meter_events WHERE identifier = 'rw-429'}),
	'>', 1, 'rw-429: its attempts spanned more than the window');

# An event older than 35 days when claimed (queued long ago, for example
# restored from a dump): failed before any request.
$node->safe_psql('postgres', q{
	INSERT INTO stripe_meter.outbox (event_name, payload, identifier, ts, enqueued_at, next_attempt_at)
	VALUES ('ai_search_api', '{"stripe_customer_id": "cus_O", "value": 1}', 'rw-old',
			now() - interval '36 days', now() - interval '36 days', now())});
wait_for($node, q{SELECT count(*) FROM stripe_meter.failed_events WHERE identifier = 'rw-old'},
	'1', 'rw-old: failed');
like($node->safe_psql('postgres',
		q{SELECT reason FROM stripe_meter.failed_events WHERE identifier = 'rw-old'}),
	qr/35 days/, 'rw-old: reason names the 35-day limit');
is($node->safe_psql('postgres',
		q{SELECT http_status IS NULL FROM stripe_meter.failed_events WHERE identifier = 'rw-old'}),
	't', 'rw-old: no HTTP status, as nothing was sent');
is(scalar @{ requests_for($mock, 'rw-old') }, 0, 'rw-old: the mock saw no request for it');
is($node->safe_psql('postgres',
		q{SELECT maybe_billed FROM stripe_meter.failed_events WHERE identifier = 'rw-old'}),
	'f', 'rw-old: not maybe_billed, as it was never sent');

note('failed attempts: ' . $node->safe_psql('postgres',
		q{SELECT string_agg(identifier || '=' || attempts, ' ') FROM stripe_meter.failed_events}));
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.outbox'), '0', 'outbox empty');
is($mock->stats->{identifiers_billed_multiple_times}, 0, 'no identifier billed twice');

$node->stop;
$mock->stop;
done_testing();
