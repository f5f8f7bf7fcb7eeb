# Hostile and broken answers: what a proxy, a captive portal or a broken
# server may send instead of Stripe's JSON.  The worker survives each (the
# same process delivers throughout), bounds memory (a 20 MiB body is cut at
# 256 kB) and time (request_timeout for a server that accepts and never
# answers, or trickles), and classifies each case: retried with its outcome
# unknown and the reason in outbox.last_error, never failed and never
# billed twice.  Once the answers are normal again every event is
# delivered.  002_outcomes.pl covers that malformed JSON, HTML 502s, 1 MiB
# bodies, resets, truncation and timeouts are retried and delivered; this
# test adds what each one is classified as, and the cases 002 lacks.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;
use StripeMeterSoak;

my $mock = start_mock(trickle_interval_ms => 100, timeout_hold_ms => 10000);
my $node = new_node('hostile', mock => $mock,
	conf => { 'stripe_meter.request_timeout' => 1500 });

my $deep = ('{"a":' x 40000) . '1' . ('}' x 40000);
my $html = '<html><head><title>502 Bad Gateway</title></head><body>bad gateway</body></html>';

# identifier => [script entry, last_error pattern, last_http_status or undef]
my %case = (
	'h-huge' => [ { fault => 'huge' }, qr/larger than 256 kB/, undef ],
	'h-html-502' => [ { fault => 'html' }, qr/Stripe answered HTTP 502: <html>/, 502 ],
	'h-html-200' => [ { status => 200, headers => { 'Content-Type' => 'text/html' }, body => $html },
		qr/HTTP 200 without a billing\.meter_event: <html>/, 200 ],
	'h-proxy-400' => [ { status => 400, headers => { 'Content-Type' => 'text/html' }, body => $html },
		qr/unexpected answer \(HTTP 400\): <html>/, 400 ],
	'h-redirect' => [ { status => 302, headers => { Location => 'http://127.0.0.1:1/' }, body => '' },
		qr/unexpected answer \(HTTP 302\)/, 302 ],
	'h-empty-200' => [ { status => 200, body => '' }, qr/HTTP 200 without a billing\.meter_event/, 200 ],
	'h-json-array' => [ { status => 200, body => '[{"object":"billing.meter_event"}]' },
		qr/HTTP 200 without a billing\.meter_event/, 200 ],
	'h-deep' => [ { status => 200, body => $deep }, qr/HTTP 200 without a billing\.meter_event/, 200 ],
	'h-bignum' => [ { status => 200, body => '{"object":"billing.meter_event","n":1e999999}' },
		qr/HTTP 200 without a billing\.meter_event/, 200 ],
	'h-nul' => [ { status => 200, body => '{"object":"billing.meter_event","s":"a\u0000b"}' },
		qr/HTTP 200 without a billing\.meter_event/, 200 ],
	'h-never' => [ { fault => 'timeout' }, qr/timed out/i, undef ],
	'h-trickle' => [ { fault => 'trickle' }, qr/timed out/i, undef ],
	'h-truncated' => [ { fault => 'truncated' }, qr/could not get an answer from Stripe/, undef ],
);
my @ids = sort keys %case;

$mock->script([ map { { match => { identifier => $_ }, times => -1, %{ $case{$_}[0] } } } @ids ]);

my $pids = worker_pids($node, 'postgres');
is(scalar @$pids, 1, 'one worker');
my $worker = $pids->[0];
my $mem_start = worker_memory($worker);

my $i = 0;
for my $id (@ids)
{
	$i++;
	$node->safe_psql('postgres', qq{
		SELECT stripe_meter_event_create('ai_search_api',
			jsonb_build_object('stripe_customer_id', 'cus_H$i', 'value', $i), '$id')});
}
# wrong_content_type: Stripe's object labelled text/plain is still Stripe's
# object: delivered at once.
$node->safe_psql('postgres', q{
	SELECT stripe_meter_event_create('ai_search_api',
		jsonb_build_object('stripe_customer_id', 'cus_Hct', 'value', 1), 'h-wrong-ct')});
$mock->append_script([ { match => { identifier => 'h-wrong-ct' }, times => -1, fault => 'wrong_content_type' } ]);

# (each row on its own: a row claimed for its next attempt already counts it)
wait_for($node, q{SELECT count(*) FROM stripe_meter.outbox
	 WHERE attempts >= 4 OR (attempts >= 3 AND in_flight_since IS NULL)}, scalar @ids,
	'every hostile answer was retried, and no request hangs (each attempted 3 times)');

for my $id (@ids)
{
	my ($script, $pattern, $status) = @{ $case{$id} };
	my $row = query_json($node, 'postgres', qq{
		SELECT to_jsonb(o) FROM stripe_meter.outbox o WHERE identifier = '$id'});
	like($row->{last_error} // '', $pattern, "$id: last_error classifies it");
	is($row->{last_http_status}, $status, "$id: last_http_status") if defined $status;
	ok(defined $row->{unknown_outcome_since}, "$id: its outcome is unknown (resent with the same key)");
}
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.failed_events'), '0',
	'no hostile answer failed an event');
is( $node->safe_psql('postgres', q{
		SELECT outcome || ',' || attempts FROM stripe_meter.meter_events WHERE identifier = 'h-wrong-ct'}),
	'created,1', 'h-wrong-ct: a valid object labelled text/plain is delivered');
is_deeply(worker_pids($node, 'postgres'), [$worker], 'the same worker survived every case');

my $mem_end = worker_memory($worker);
my $growth_kb = $mem_end->{anon_kb} - $mem_start->{anon_kb};
my $huge_requests = scalar @{ requests_for($mock, 'h-huge') };
SKIP:
{
	skip 'memory bounds do not apply under AddressSanitizer', 1 unless memory_bound_applies();
	cmp_ok($growth_kb, '<', 16 * 1024,
		"the worker's private memory grew by less than 16 MiB after $huge_requests 20 MiB answers");
}

# Normal answers again: everything is delivered, once.
$mock->script([]);
wait_for($node, 'SELECT count(*) FROM stripe_meter.outbox', '0', 'all delivered once answers are normal');
is($node->safe_psql('postgres',
		q{SELECT count(*) FROM stripe_meter.meter_events WHERE outcome IN ('created', 'replayed')}),
	scalar(@ids) + 1, 'each delivered');
my $r = check_exactly_once($mock, [ @ids, 'h-wrong-ct' ], 'hostile');
is_deeply(worker_pids($node, 'postgres'), [$worker], 'still the same worker');

figures('hostile',
	cases => scalar(@ids) + 1,
	requests => $mock->stats->{requests},
	rss_kb_start => $mem_start->{rss_kb},
	rss_kb_end => $mem_end->{rss_kb},
	anon_kb_start => $mem_start->{anon_kb},
	anon_kb_end => $mem_end->{anon_kb},
	duplicates => $r->{duplicates},
	lost => $r->{lost});

$node->stop;
$mock->stop;
done_testing();
