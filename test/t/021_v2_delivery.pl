# API v2 end to end: with stripe_meter.api_version = v2 the worker opens a
# meter event session with the API key and delivers batches of up to 100
# events as JSON to the meter event stream with the session's token; each
# event is recorded as accepted, with the session and request ids.  Faults
# are retried without billing twice (Stripe dedupes by identifier), a
# request refused as a whole is split to find the event at fault, and
# events Stripe refuses only later are still recorded as accepted.
use strict;
use warnings;

use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

my $stream = '/v2/billing/meter_event_stream';
my $session_path = '/v2/billing/meter_event_session';
my $mock = start_mock();
my $node = new_node('v2', mock => $mock,
	conf => {
		'stripe_meter.api_version' => 'v2',
		'stripe_meter.stream_url' => $mock->url,
	});

is($node->safe_psql('postgres', 'SHOW stripe_meter.api_version'), 'v2', 'api_version is v2');

sub requests_to
{
	my ($path) = @_;
	return [ grep { $_->{path} eq $path } @{ $mock->requests(limit => 1000000) } ];
}

# 1. 1000 events for 50 customers, plus one sent with a decimal-form value.
$node->safe_psql('postgres', q{
	SELECT stripe_meter_event_create('ai_search_api',
		jsonb_build_object('stripe_customer_id', 'cus_' || i % 50, 'value', i),
		'a-' || i, now() - interval '1 hour')
	  FROM generate_series(1, 1000) i;
	SELECT stripe_meter_event_create('ai_search_api',
		'{"stripe_customer_id": "cus_Dec", "value": 25.0, "region": "eu"}', 'a-dec',
		date_trunc('hour', now()) - interval '1 hour' + interval '4.678912 seconds');
});
wait_for($node, 'SELECT count(*) FROM stripe_meter.meter_events', '1001',
	'1001 events delivered through the stream');
is($node->safe_psql('postgres',
	'SELECT count(*) FROM stripe_meter.outbox UNION ALL SELECT count(*) FROM stripe_meter.failed_events'),
	"0\n0", 'outbox empty, none failed');

my $stats = $mock->stats;
is($stats->{billed}, 1001, 'the mock billed 1001 events');
is($stats->{identifiers_billed_multiple_times}, 0, 'no identifier billed twice');
is($stats->{concurrency_violations}, 0,
	'never two events for one customer and meter at once, within or across requests');
cmp_ok($stats->{stream_max_batch}, '<=', 100, 'at most 100 events per request');
cmp_ok($stats->{stream_max_batch}, '>', 1, 'events are batched');
cmp_ok($stats->{stream_requests}, '<', 1001, 'fewer requests than events');
is(scalar @{ meter_requests($mock) }, 0, 'nothing went to /v1/billing/meter_events');

# What is recorded: accepted, the session's id, the request id, no object.
my $sessions = $mock->sessions;
my %session_ids = map { $_->{id} => 1 } @$sessions;
is($node->safe_psql('postgres', q{
	SELECT outcome, count(*), count(session_id), count(request_id), count(meter_event),
		   count(created), count(livemode)
	  FROM stripe_meter.meter_events GROUP BY 1}),
	'accepted|1001|1001|1001|0|0|0',
	'every event recorded as accepted, with session and request ids and no object');
my @recorded = split /\n/, $node->safe_psql('postgres',
	'SELECT DISTINCT session_id FROM stripe_meter.meter_events');
ok(@recorded && !grep({ !$session_ids{$_} } @recorded),
	'the recorded session ids are the mock\'s sessions');
my $ev = mock_events_for($mock, 'a-7')->[0];
is($node->safe_psql('postgres',
	"SELECT request_id || ' ' || session_id FROM stripe_meter.meter_events WHERE identifier = 'a-7'"),
	"$ev->{request_id} $ev->{session_id}", 'request and session ids match the billing request');

# The wire format.
my $sess_req = requests_to($session_path)->[0];
is($sess_req->{headers}{authorization}, "Bearer $API_KEY", 'the session is created with the API key');
like($sess_req->{headers}{'content-type'}, qr{^application/json}, 'session request is JSON');
my ($req) = grep { $_->{body} =~ /"a-dec"/ } @{ requests_to($stream) };
ok($req, 'found the request carrying a-dec');
like($req->{headers}{authorization}, qr/^Bearer bmest_/, 'the stream is called with the session token');
unlike($req->{headers}{authorization} // '', qr/\Q$API_KEY\E/, 'the API key never goes to the stream');
like($req->{headers}{'content-type'}, qr{^application/json}, 'stream request is JSON');
ok(!exists $req->{headers}{'idempotency-key'}, 'no Idempotency-Key: identifiers dedupe');
my $want_ts = $node->safe_psql('postgres', q{
	SELECT to_char(date_trunc('milliseconds', ts) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
	  FROM stripe_meter.meter_events WHERE identifier = 'a-dec'});
like($want_ts, qr/:04\.678Z$/, 'expected timestamp truncated to milliseconds');
my $body = decode_json($req->{body});
my ($dec) = grep { $_->{identifier} eq 'a-dec' } @{ $body->{events} };
is_deeply($dec, {
		event_name => 'ai_search_api', identifier => 'a-dec',
		payload => { stripe_customer_id => 'cus_Dec', value => '25', region => 'eu' },
		timestamp => $want_ts },
	'an event as JSON: string payload values, canonical value, RFC 3339 timestamp');

# 2. Faults: 5xx before and after execution, resets, 429s: everything is
# delivered, and what Stripe had already billed is deduped on resend.
$mock->reset;
# the mock forgot the worker's session: the worker gets a new one
$node->safe_psql('postgres', q{
	SELECT stripe_meter_event_create('ai_search_api',
		'{"stripe_customer_id": "cus_W", "value": 1}', 'warm-1')});
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier = 'warm-1'},
	'1', 'after the mock forgot the session, a new one delivers');
$mock->config({ faults => { '500' => 0.1, '500_after' => 0.1, 'reset_after' => 0.05, '429' => 0.1 } });
# the first two requests surely lose answers to events Stripe bills
$mock->script([ { match => { path => $stream }, fault => '500_after', times => 1 },
	{ match => { path => $stream }, fault => 'reset_after', times => 1 } ]);
$node->safe_psql('postgres', q{
	SELECT stripe_meter_event_create('ai_search_api',
		jsonb_build_object('stripe_customer_id', 'cus_' || i % 200, 'value', 1), 'f-' || i)
	  FROM generate_series(1, 2000) i});
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'f-%'},
	'2000', 'faults: all 2000 delivered');
$stats = $mock->stats;
is($stats->{billed}, 2001, 'faults: each billed once');
is($stats->{identifiers_billed_multiple_times}, 0, 'faults: no identifier billed twice');
cmp_ok($stats->{stream_duplicates_dropped}, '>', 0,
	'faults: events Stripe had accepted before a lost answer were resent and deduped');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.failed_events'), '0',
	'faults: none failed');
cmp_ok($node->safe_psql('postgres',
	q{SELECT max(attempts) FROM stripe_meter.meter_events WHERE identifier LIKE 'f-%'}), '>', 1,
	'faults: some events needed several attempts');
$mock->config({ faults => {} });

# 3. A request refused as a whole once: its events go again one by one and
# are delivered.  Refused every time: each event fails on its own, with
# Stripe's error.
my $refusal = { error => { type => 'invalid_request_error', code => 'parameter_invalid',
		message => 'Invalid events[0].payload: refused by the test.' } };
$mock->script([ { match => { path => $stream }, status => 400, body => $refusal, times => 1 } ]);
$node->safe_psql('postgres', q{
	SELECT stripe_meter_event_create('ai_search_api',
		jsonb_build_object('stripe_customer_id', 'cus_s' || i, 'value', 1), 's-' || i)
	  FROM generate_series(1, 5) i});
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 's-%'},
	'5', 'refused once: all 5 delivered after being sent one by one');
is($mock->stats->{scripts_remaining}, 0, 'refused once: the refusal was used');

$mock->script([ { match => { path => $stream }, status => 400, body => $refusal, times => -1 } ]);
$node->safe_psql('postgres', q{
	SELECT stripe_meter_event_create('ai_search_api',
		jsonb_build_object('stripe_customer_id', 'cus_r' || i, 'value', 1), 'r-' || i)
	  FROM generate_series(1, 3) i});
wait_for($node, q{SELECT count(*) FROM stripe_meter.failed_events WHERE identifier LIKE 'r-%'},
	'3', 'always refused: all 3 failed');
is($node->safe_psql('postgres', q{
	SELECT DISTINCT http_status || ' ' || (stripe_error->'error'->>'code') || ' '
		   || (reason LIKE '%refused by the test%')
	  FROM stripe_meter.failed_events WHERE identifier LIKE 'r-%'}),
	'400 parameter_invalid true', 'always refused: Stripe\'s status, error and message kept');
$mock->script([]);

# 4. The stream refuses the token (not as expired): the session is dropped
# and the events retried with a new one.  It answers 403: delivery pauses,
# events stay queued, and a reload resumes it.
my $sessions_before = $mock->stats->{sessions_created};
$mock->script([ { match => { path => $stream }, status => 401, times => 1,
	body => { error => { type => 'invalid_request_error', code => 'invalid_authentication_token',
			message => 'Invalid token.' } } } ]);
$node->safe_psql('postgres', q{
	SELECT stripe_meter_event_create('ai_search_api',
		'{"stripe_customer_id": "cus_Tok", "value": 1}', 'tok-1')});
wait_for($node, q{SELECT outcome || ' ' || attempts FROM stripe_meter.meter_events WHERE identifier = 'tok-1'},
	'accepted 2', 'token refused: delivered on the next attempt');
cmp_ok($mock->stats->{sessions_created}, '>', $sessions_before, 'token refused: a new session');

$mock->script([ { match => { path => $stream }, status => 403, times => -1,
	body => { error => { type => 'invalid_request_error', code => 'forbidden', message => 'Not allowed.' } } } ]);
$node->safe_psql('postgres', q{
	SELECT stripe_meter_event_create('ai_search_api',
		'{"stripe_customer_id": "cus_Forbid", "value": 1}', 'p-1')});
wait_for($node, q{SELECT paused LIKE '%HTTP 403%' FROM stripe_meter.status}, 't',
	'403: delivery paused, with the reason');
is($node->safe_psql('postgres', q{SELECT count(*) FROM stripe_meter.outbox WHERE identifier = 'p-1'}),
	'1', '403: the event stays queued');
$mock->script([]);
$node->safe_psql('postgres', 'SELECT pg_reload_conf()');
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier = 'p-1'}, '1',
	'403: delivered after a reload');

# 5. Stripe validates stream events later: an event for a meter Stripe
# does not have is accepted now and reported asynchronously.
$mock->config({ strict_meters => JSON::PP::true, meters => { ai_search_api => {} } });
$node->safe_psql('postgres', q{
	SELECT stripe_meter_event_create('no_such_meter',
		'{"stripe_customer_id": "cus_X", "value": 1}', 'async-1')});
wait_for($node, q{SELECT outcome FROM stripe_meter.meter_events WHERE identifier = 'async-1'},
	'accepted', 'an event Stripe will refuse later is recorded as accepted');
my ($async) = grep { ($_->{identifier} // '') eq 'async-1' } @{ $mock->async_errors };
is($async && $async->{code}, 'no_meter', 'the mock reports it asynchronously (no_meter)');
# ... and the worker's read of Stripe's error reports marks it not billed.
set_conf($node, 'stripe_meter.error_poll_interval' => 1);
wait_for($node, q{SELECT async_error_code FROM stripe_meter.meter_events WHERE identifier = 'async-1'},
	'no_meter', 'the error report marks the accepted event as not billed');

$node->stop;
$mock->stop;
done_testing();
