#!/usr/bin/perl
# Self-test of the mock's lifecycle endpoints (test/mock/lib/meters.js,
# event-summaries.js, adjustments.js, error-reports.js):
# the errors Stripe gives that the extension's TAP tests do not provoke.
#   perl -I test/perl test/mock/selftest_lifecycle.pl
use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/../perl";

use HTTP::Tiny;
use JSON::PP;
use Test::More;

use StripeMock;

my $KEY = 'sk_test_selftest0003';
my $mock = StripeMock->new(config => {
	meters => { m_a => {}, m_b => { status => 'inactive' }, m_c => { formula => 'count' } } });
my $http = HTTP::Tiny->new;

sub call
{
	my ($method, $path, $body, %h) = @_;
	my $r = $http->request($method, $mock->url . $path, {
		headers => { Authorization => "Bearer $KEY",
					 ($body ? ('Content-Type' => 'application/x-www-form-urlencoded') : ()), %h },
		($body ? (content => $body) : ()) });
	my $json = eval { decode_json($r->{content}) };
	return ($r->{status}, $json);
}

# meters list: pagination and its errors
my ($s, $j) = call('GET', '/v1/billing/meters?limit=2');
is($s, 200, 'list: 200');
is(scalar @{ $j->{data} }, 2, 'list: limit honoured');
ok($j->{has_more}, 'list: has_more');
is_deeply([ map { $_->{event_name} } @{ $j->{data} } ], [ 'm_c', 'm_b' ], 'list: newest first');
my ($s2, $j2) = call('GET', "/v1/billing/meters?limit=2&starting_after=$j->{data}[1]{id}");
is_deeply([ map { $_->{event_name} } @{ $j2->{data} } ], ['m_a'], 'list: starting_after continues');
ok(!$j2->{has_more}, 'list: last page');
($s, $j) = call('GET', '/v1/billing/meters?status=inactive');
is_deeply([ map { $_->{event_name} } @{ $j->{data} } ], ['m_b'], 'list: status filter');
($s, $j) = call('GET', '/v1/billing/meters?limit=101');
is($j->{error}{code}, 'parameter_invalid_integer', 'list: limit over 100 refused');
($s, $j) = call('GET', '/v1/billing/meters?starting_after=mtr_nope');
is($s, 404, 'list: unknown cursor 404');
($s, $j) = call('GET', '/v1/billing/meters?colour=red');
is($j->{error}{code}, 'parameter_unknown', 'list: unknown parameter');
my $id = $j2->{data}[0]{id};
($s, $j) = call('GET', "/v1/billing/meters/$id");
is($j->{event_name}, 'm_a', 'retrieve one meter');
($s, $j) = call('GET', '/v1/billing/meters/mtr_nope');
is($s, 404, 'retrieve unknown meter: 404');
is($j->{error}{code}, 'resource_missing', 'retrieve unknown meter: resource_missing');
($s, $j) = call('GET', '/v1/billing/meters', undef, Authorization => 'Bearer sk_test_bad');
is($s, 401, 'list: bad key 401');

# adjustments: parameters
($s, $j) = call('POST', '/v1/billing/meter_event_adjustments', 'type=cancel&cancel%5Bidentifier%5D=x');
is($j->{error}{code}, 'parameter_missing', 'adjustment: event_name required');
($s, $j) = call('POST', '/v1/billing/meter_event_adjustments', 'event_name=m_a&type=void&cancel%5Bidentifier%5D=x');
is($j->{error}{param}, 'type', 'adjustment: only type=cancel');
($s, $j) = call('POST', '/v1/billing/meter_event_adjustments', 'event_name=m_a&type=cancel');
is($j->{error}{param}, 'cancel[identifier]', 'adjustment: cancel[identifier] required');
($s, $j) = call('POST', '/v1/billing/meter_event_adjustments', 'event_name=m_a&type=cancel&cancel%5Bidentifier%5D=x&extra=1');
is($j->{error}{code}, 'parameter_unknown', 'adjustment: unknown parameter');
($s, $j) = call('POST', '/v1/billing/meter_event_adjustments', 'event_name=m_a&type=cancel&cancel%5Bidentifier%5D=nope');
is($j->{error}{code}, 'resource_missing', 'adjustment: unknown identifier');

# an event in a connected account is cancelled only there
my $now = time;
call('POST', '/v1/billing/meter_events', "event_name=m_a&payload%5Bstripe_customer_id%5D=cus_1&payload%5Bvalue%5D=4&identifier=ev-1&timestamp=$now",
	'Stripe-Account' => 'acct_S1');
($s, $j) = call('POST', '/v1/billing/meter_event_adjustments', 'event_name=m_a&type=cancel&cancel%5Bidentifier%5D=ev-1');
is($j->{error}{code}, 'resource_missing', 'adjustment: not found in the platform account');
($s, $j) = call('POST', '/v1/billing/meter_event_adjustments', 'event_name=m_c&type=cancel&cancel%5Bidentifier%5D=ev-1',
	'Stripe-Account' => 'acct_S1');
is($j->{error}{code}, 'resource_missing', 'adjustment: the event name must match');
($s, $j) = call('POST', '/v1/billing/meter_event_adjustments', 'event_name=m_a&type=cancel&cancel%5Bidentifier%5D=ev-1',
	'Stripe-Account' => 'acct_S1', 'Idempotency-Key' => 'k-1');
is($j->{object}, 'billing.meter_event_adjustment', 'adjustment: cancelled in its account');
my $r = $http->request('POST', $mock->url . '/v1/billing/meter_event_adjustments', {
	headers => { Authorization => "Bearer $KEY", 'Content-Type' => 'application/x-www-form-urlencoded',
				 'Stripe-Account' => 'acct_S1', 'Idempotency-Key' => 'k-1' },
	content => 'event_name=m_a&type=cancel&cancel%5Bidentifier%5D=ev-1' });
is($r->{headers}{'idempotent-replayed'}, 'true', 'adjustment: same key replays');
($s, $j) = call('POST', '/v1/billing/meter_event_adjustments', 'event_name=m_a&type=cancel&cancel%5Bidentifier%5D=ev-1',
	'Stripe-Account' => 'acct_S1');
like($j->{error}{message}, qr/already been cancelled/, 'adjustment: a new key gets "already cancelled"');

# summaries: required parameters, alignment, cancelled events left out
my $h0 = int($now / 3600) * 3600;
call('POST', '/v1/billing/meter_events', "event_name=m_a&payload%5Bstripe_customer_id%5D=cus_1&payload%5Bvalue%5D=6&identifier=ev-2&timestamp=$now",
	'Stripe-Account' => 'acct_S1');
($s, $j) = call('GET', "/v1/billing/meters/$id/event_summaries?customer=cus_1&start_time=$h0&end_time=" . ($h0 + 3600),
	undef, 'Stripe-Account' => 'acct_S1');
is($j->{data}[0]{aggregated_value}, 6, 'summaries: the cancelled event is left out');
($s, $j) = call('GET', "/v1/billing/meters/$id/event_summaries?customer=cus_1&start_time=$h0&end_time=" . ($h0 + 3600));
is($j->{data}[0]{aggregated_value}, 0, 'summaries: other accounts\' events are not counted');
($s, $j) = call('GET', "/v1/billing/meters/$id/event_summaries?start_time=$h0&end_time=" . ($h0 + 3600));
is($j->{error}{param}, 'customer', 'summaries: customer required');
($s, $j) = call('GET', "/v1/billing/meters/$id/event_summaries?customer=c&start_time=" . ($h0 + 30) . "&end_time=" . ($h0 + 3600));
is($s, 400, 'summaries: times must be minute-aligned');
($s, $j) = call('GET', "/v1/billing/meters/$id/event_summaries?customer=c&start_time=" . ($h0 + 60) . "&end_time=" . ($h0 + 3660) . '&value_grouping_window=hour');
is($s, 400, 'summaries: hourly windows need hour-aligned times');
($s, $j) = call('GET', "/v1/billing/meters/$id/event_summaries?customer=c&start_time=" . ($h0 + 3600) . "&end_time=$h0");
is($s, 400, 'summaries: start before end');
($s, $j) = call('GET', "/v1/billing/meters/$id/event_summaries?customer=c&start_time=$h0&end_time=" . ($h0 + 36000) . '&value_grouping_window=hour&limit=3');
is(scalar @{ $j->{data} }, 3, 'summaries: paginated');
ok($j->{has_more}, 'summaries: has_more');

# v2 events: errors and pagination
$mock->config({ missing_customers => ['cus_gone'], report_no_meter => JSON::PP::true });
for my $i (1 .. 3)
{
	call('POST', '/v1/billing/meter_events', "event_name=nomtr_$i&payload%5Bstripe_customer_id%5D=cus_1&payload%5Bvalue%5D=1&identifier=nm-$i");
}
($s, $j) = call('GET', '/v2/core/events?types=v1.billing.meter.no_meter_found&limit=2');
is($s, 200, 'v2 events: 200');
is(scalar @{ $j->{data} }, 2, 'v2 events: limit');
like($j->{next_page_url} // '', qr{^/v2/core/events\?page=}, 'v2 events: next_page_url');
my ($s3, $j3) = call('GET', $j->{next_page_url});
is(scalar @{ $j3->{data} }, 1, 'v2 events: the next page has the rest');
ok(!defined $j3->{next_page_url}, 'v2 events: no page after the last');
($s, $j) = call('GET', '/v2/core/events?created%5Bgt%5D=yesterday');
is($j->{error}{code}, 'invalid_timestamp', 'v2 events: created must be RFC 3339');
($s, $j) = call('GET', '/v2/core/events?types=v1.billing.meter.no_meter_found', undef, 'Stripe-Context' => 'acct_S1');
is(scalar @{ $j->{data} }, 0, 'v2 events: another account\'s reports are not listed');

$mock->stop;
done_testing();
