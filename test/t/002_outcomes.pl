# What each kind of answer from Stripe does to an event: retried with the
# same idempotency key, delivered, or failed with Stripe's reason, and never
# billed twice.  The mock answers per identifier from a script.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

my $mock = start_mock();
# A short request timeout for the timeout cases.
my $node = new_node('outcomes', mock => $mock,
	conf => { 'stripe_meter.request_timeout' => 1000 });

sub enqueue
{
	my ($id, $customer) = @_;
	$node->safe_psql('postgres', qq{
		SELECT stripe_meter_event_create('ai_search_api',
			jsonb_build_object('stripe_customer_id', '$customer', 'value', 5), '$id')});
}

# What a stalled retry looked like: the rows, the requests the mock saw and
# what the worker waited for.
sub diag_retries
{
	diag($node->safe_psql('postgres', q{
		SELECT identifier, attempts, next_attempt_at - now() AS due_in,
			   in_flight_since, last_http_status, last_error
		  FROM stripe_meter.outbox ORDER BY identifier}));
	diag($node->safe_psql('postgres', q{
		SELECT wait_event_type, wait_event, state FROM pg_stat_activity
		 WHERE backend_type LIKE 'stripe_meter worker%'}));
	diag($node->safe_psql('postgres', 'SELECT to_jsonb(s) FROM stripe_meter.status s'));
	for my $id ('o-malformed-2', 'o-429', 'o-400-rate')
	{
		my $reqs = requests_for($mock, $id);
		diag("$id: " . scalar(@$reqs) . ' requests, the last at '
			  . ($reqs->[-1]{time} // 'none') . ' answered ' . ($reqs->[-1]{status} // 'none'));
	}
}

sub row
{
	my ($table, $id) = @_;
	return query_json($node, 'postgres',
		"SELECT to_jsonb(t) FROM stripe_meter.$table t WHERE identifier = '$id'");
}

my $error_400 = {
	error => {
		type => 'invalid_request_error',
		code => 'parameter_invalid',
		doc_url => 'https://stripe.com/docs/error-codes/parameter-invalid',
		message => 'Invalid value for payload[value]: must be a whole number.',
		param => 'payload[value]',
	}
};
my $error_500 = {
	error => { type => 'api_error', message => 'Something broke; do not retry this request.' } };

$mock->script([
	{ match => { identifier => 'o-500' }, fault => '500', times => 1 },
	{ match => { identifier => 'o-409' }, fault => '409', times => 1 },
	{ match => { identifier => 'o-500-noretry' }, status => 500,
		headers => { 'Stripe-Should-Retry' => 'false' }, body => $error_500, times => -1 },
	{ match => { identifier => 'o-400' }, status => 400, body => $error_400, times => -1 },
	{ match => { identifier => 'o-reset' }, fault => 'reset', times => 1 },
	{ match => { identifier => 'o-reset-after' }, fault => 'reset_after', times => 1 },
	{ match => { identifier => 'o-timeout' }, fault => 'timeout', times => 1 },
	{ match => { identifier => 'o-timeout-after' }, fault => 'timeout_after', times => 1 },
	{ match => { identifier => 'o-malformed' }, fault => 'malformed_json', times => 1 },
	{ match => { identifier => 'o-html' }, fault => 'html', times => 1 },
	{ match => { identifier => 'o-huge' }, fault => 'huge', times => 1 },
	{ match => { identifier => 'o-truncated' }, fault => 'truncated', times => 1 },
	{ match => { identifier => "o space \x{e9}" }, fault => '500', times => 1 },
]);
$mock->config({ huge_bytes => 1024 * 1024 });

# Stripe already has o-exists, billed earlier by a request without an
# idempotency key.
my $pre = $mock->post_meter_event({ event_name => 'ai_search_api', identifier => 'o-exists',
		payload => { stripe_customer_id => 'cus_Exists', value => '5' } });
is($pre->{status}, 200, 'o-exists billed beforehand');

my %customer = (
	'o-500' => 'cus_A', 'o-409' => 'cus_B', 'o-500-noretry' => 'cus_C', 'o-400' => 'cus_D',
	'o-exists' => 'cus_Exists', 'o-reset' => 'cus_E', 'o-reset-after' => 'cus_F',
	'o-timeout' => 'cus_G', 'o-timeout-after' => 'cus_H', 'o-malformed' => 'cus_I',
	'o-html' => 'cus_L', 'o-huge' => 'cus_M', 'o-truncated' => 'cus_N',
	"o space \xc3\xa9" => 'cus_O');
enqueue($_, $customer{$_}) for sort keys %customer;

wait_for($node, 'SELECT count(*) FROM stripe_meter.outbox', '0',
	'every event left the outbox');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.meter_events'), '12',
	'12 delivered');
is( $node->safe_psql('postgres',
		'SELECT string_agg(identifier, \',\' ORDER BY identifier) FROM stripe_meter.failed_events'),
	'o-400,o-500-noretry', 'the 400 and the 500 marked not to retry failed');

# Retried after a definite "not processed": delivered on the second attempt.
for my $case (['o-500', 'a 500'], ['o-409', 'a 409 (key in use)'], ['o-reset', 'a reset before execution'],
	['o-timeout', 'a timeout before execution'], ['o-malformed', 'a 200 with malformed JSON'],
	['o-html', "a proxy's HTML 502"], ['o-huge', 'an oversized answer'])
{
	my ($id, $what) = @$case;
	my $r = row('meter_events', $id);
	# libcurl itself resends once, at once, when a reused keep-alive
	# connection turns out dead: then the second request is the same attempt
	if ($id eq 'o-reset')
	{
		ok($r->{attempts} == 1 || $r->{attempts} == 2, "$id: retried after $what");
	}
	else
	{
		is($r->{attempts}, 2, "$id: retried after $what, delivered on attempt 2");
	}
	is($r->{outcome}, 'created', "$id: outcome created");
	is(scalar @{ requests_for($mock, $id) }, 2, "$id: mock saw two requests");
	is(scalar @{ mock_events_for($mock, $id) }, 1, "$id: billed once");
}
ok(defined row('meter_events', 'o-malformed')->{meter_event}, 'o-malformed: the good answer is stored');

# Answer lost after Stripe billed: the resend is replayed, not billed again.
for my $case (['o-reset-after', 'a reset'], ['o-timeout-after', 'a timeout'],
	['o-truncated', 'a truncated body'])
{
	my ($id, $what) = @$case;
	my $r = row('meter_events', $id);
	if ($id eq 'o-reset-after')
	{
		# see o-reset above: libcurl may resend on a fresh connection itself
		ok($r->{attempts} == 1 || $r->{attempts} == 2, "$id: resent after $what");
	}
	else
	{
		is($r->{attempts}, 2, "$id: resent after $what");
	}
	is($r->{outcome}, 'replayed', "$id: outcome replayed");
	is(scalar @{ mock_events_for($mock, $id) }, 1, "$id: billed once");
	my $reqs = requests_for($mock, $id);
	is(scalar @$reqs, 2, "$id: mock saw two requests");
	is($reqs->[1]{headers}{'idempotency-key'}, "meter_event:$id", "$id: the resend carries the same key");
	is($r->{meter_event}{identifier}, $id, "$id: the replayed object is stored");
}

# An identifier that cannot be a header value gets a key derived from it,
# the same on every attempt.
{
	my $id = "o space \x{e9}";
	my $reqs = requests_for($mock, $id);
	is(scalar @$reqs, 2, 'identifier with a space: two requests (a 500, then success)');
	my @keys = map { $_->{headers}{'idempotency-key'} // '' } @$reqs;
	like($keys[0], qr/^meter_event_sha256:[0-9a-f]{64}$/,
		'identifier with a space: Idempotency-Key derived from it');
	is($keys[1], $keys[0], 'identifier with a space: the same key on the retry');
	is(scalar @{ mock_events_for($mock, $id) }, 1, 'identifier with a space: billed once');
	like($reqs->[0]{body}, qr/&identifier=o%20space%20%C3%A9&/,
		'identifier with a space: percent-encoded in the body');
}

# Stripe already had the identifier.
{
	my $r = row('meter_events', 'o-exists');
	is($r->{outcome}, 'already_existed', 'o-exists: outcome already_existed');
	ok(!defined $r->{meter_event}, 'o-exists: meter_event is NULL');
	is($r->{attempts}, 1, 'o-exists: one attempt');
	is(scalar @{ requests_for($mock, 'o-exists') }, 2, 'o-exists: one request besides ours');
	is(scalar @{ mock_events_for($mock, 'o-exists') }, 1, 'o-exists: still billed once');
}

# Failed for good: kept with Stripe's answer, and sent once.
{
	my $r = row('failed_events', 'o-400');
	my $reqs = requests_for($mock, 'o-400');
	is(scalar @$reqs, 1, 'o-400: not retried (one request)');
	is($r->{http_status}, 400, 'o-400: http_status 400');
	is_deeply($r->{stripe_error}, $error_400, 'o-400: stripe_error is the body Stripe sent');
	is($r->{request_id}, $reqs->[0]{request_id}, "o-400: request_id is the mock's");
	like($r->{reason}, qr/HTTP 400/, 'o-400: reason names the status');
	like($r->{reason}, qr/Invalid value for payload\[value\]/, "o-400: reason has Stripe's message");
	is($r->{attempts}, 1, 'o-400: one attempt');
	ok(!$r->{maybe_billed}, 'o-400: not maybe_billed (Stripe refused it)');

	$r = row('failed_events', 'o-500-noretry');
	is(scalar @{ requests_for($mock, 'o-500-noretry') }, 1, 'o-500-noretry: not retried');
	is($r->{http_status}, 500, 'o-500-noretry: http_status 500');
	is_deeply($r->{stripe_error}, $error_500, 'o-500-noretry: stripe_error kept');
	like($r->{reason}, qr/not to retry/, 'o-500-noretry: reason says Stripe said not to retry');
	ok($r->{maybe_billed}, 'o-500-noretry: maybe_billed (the request may have run)');
}
isnt($node->safe_psql('postgres', 'SELECT last_error FROM stripe_meter.status'), '',
	'status.last_error shows a delivery error');

# While retrying: a 200 without a meter event leaves the outcome unknown (it
# may have been created), a 429 does not (Stripe refused it before its
# idempotency layer), and a 429 is retried however often it comes.  So is
# the older form of Stripe's rate limiting, a 400 with code rate_limit,
# which Stripe's own libraries treat as a 429.
$mock->script([
	{ match => { identifier => 'o-malformed-2' }, fault => 'malformed_json', times => -1 },
	{ match => { identifier => 'o-429' }, fault => '429', times => -1 },
	{ match => { identifier => 'o-400-rate' }, status => 400, times => -1,
	  body => '{"error":{"type":"invalid_request_error","code":"rate_limit","message":"Request rate limit exceeded."}}' },
]);
enqueue('o-malformed-2', 'cus_K');
enqueue('o-429', 'cus_J');
enqueue('o-400-rate', 'cus_JJ');
# Two of them slow the account down to a few requests a second, so one of
# the three is nearly always claimed, waiting for its turn (the claim counts
# its attempt at once): each row needs three attempts recorded, not all
# three rows at rest at once.
wait_for($node,
	q{SELECT count(*) FROM stripe_meter.outbox
	   WHERE attempts >= 4 OR (attempts >= 3 AND in_flight_since IS NULL)},
	'3', 'o-malformed-2, o-429 and o-400-rate retried at least twice')
  or diag_retries();
is( $node->safe_psql('postgres', q{
		SELECT last_http_status || ',' || (unknown_outcome_since IS NOT NULL)
		  FROM stripe_meter.outbox WHERE identifier = 'o-malformed-2'}),
	'200,true', 'o-malformed-2: retried with its outcome unknown');
like($node->safe_psql('postgres',
		q{SELECT last_error FROM stripe_meter.outbox WHERE identifier = 'o-malformed-2'}),
	qr/200/, 'o-malformed-2: last_error says what came back');
is( $node->safe_psql('postgres', q{
		SELECT last_http_status || ',' || (unknown_outcome_since IS NOT NULL)
		  FROM stripe_meter.outbox WHERE identifier = 'o-429'}),
	'429,false', 'o-429: retried with its outcome known (not processed)');
like($node->safe_psql('postgres', q{
		SELECT last_http_status || ',' || (unknown_outcome_since IS NOT NULL) || ',' || last_error
		  FROM stripe_meter.outbox WHERE identifier = 'o-400-rate'}),
	qr/^400,false,rate limited by Stripe/, 'o-400-rate: retried as rate limited, its outcome known');
$mock->script([]);
wait_for($node,
	q{SELECT string_agg(identifier || ':' || outcome, ',' ORDER BY identifier)
	    FROM stripe_meter.meter_events WHERE identifier IN ('o-400-rate', 'o-429', 'o-malformed-2')},
	'o-400-rate:created,o-429:created,o-malformed-2:created', 'all delivered once the mock answers normally');
is($node->safe_psql('postgres',
		q{SELECT count(*) FROM stripe_meter.failed_events WHERE identifier IN ('o-429', 'o-400-rate')}),
	'0', 'o-429 and o-400-rate: never failed');
is(scalar @{ mock_events_for($mock, 'o-malformed-2') }, 1, 'o-malformed-2: billed once');
cmp_ok(scalar @{ requests_for($mock, 'o-429') }, '>=', 3, 'o-429: mock saw the retries');

# A failed event is delivered once queued again, after the cause is fixed
# (the mock no longer answers o-400 with an error).
is($node->safe_psql('postgres', q{SELECT stripe_meter_retry_failed('o-400')}), '1',
	'stripe_meter_retry_failed queues one event');
wait_for($node,
	q{SELECT outcome FROM stripe_meter.meter_events WHERE identifier = 'o-400'},
	'created', 'o-400: delivered after stripe_meter_retry_failed');
is($node->safe_psql('postgres',
		q{SELECT count(*) FROM stripe_meter.failed_events WHERE identifier = 'o-400'}),
	'0', 'o-400: no longer failed');
is(scalar @{ mock_events_for($mock, 'o-400') }, 1, 'o-400: billed once');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.failed_events'), '1',
	'only o-500-noretry is still failed');

my $stats = $mock->stats;
is($stats->{identifiers_billed_multiple_times}, 0, 'no identifier billed twice');
is($stats->{identifiers_billed_under_multiple_keys}, 0, 'no identifier billed under two keys');

$node->stop;
$mock->stop;
done_testing();
