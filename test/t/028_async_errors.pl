# Asynchronous errors: Stripe accepts some events and reports later that it
# will not bill them.  The worker reads those reports from the v2 Events API
# on a schedule, keeps them in stripe_meter.error_reports and marks the
# delivered events they name, so status.not_billed and a query on
# meter_events show them.  Reports are read once, and later ones are found.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

# cus_gone does not exist in Stripe; "mystery" has no meter.  Both are
# accepted by the synchronous API and reported afterwards.
my $mock = start_mock(meters => { api_calls => {} }, missing_customers => ['cus_gone'],
	report_no_meter => JSON::PP::true);
my $node = new_node('async', mock => $mock, conf => { 'stripe_meter.error_poll_interval' => 1 });

sub enqueue
{
	my ($name, $id, $cust, $acct) = @_;
	$acct = defined $acct ? "'$acct'" : 'NULL';
	$node->safe_psql('postgres', qq{
		SELECT stripe_meter_event_create('$name', '{"stripe_customer_id": "$cust", "value": 2}', '$id', NULL, $acct)});
}

enqueue('api_calls', 'e-ok', 'cus_ok');
enqueue('api_calls', 'e-gone-1', 'cus_gone');
enqueue('api_calls', 'e-gone-2', 'cus_gone');
enqueue('mystery', 'e-nometer', 'cus_ok');
wait_for($node, 'SELECT count(*) FROM stripe_meter.meter_events', '4', 'all four delivered (accepted by Stripe)');

wait_for($node, q{SELECT string_agg(identifier || '=' || coalesce(async_error_code, '-'), ' ' ORDER BY identifier)
				   FROM stripe_meter.meter_events},
	'e-gone-1=meter_event_customer_not_found e-gone-2=meter_event_customer_not_found e-nometer=no_meter e-ok=-',
	'the events Stripe reported are marked with the reported code');
like($node->safe_psql('postgres', q{SELECT async_error_message FROM stripe_meter.meter_events WHERE identifier = 'e-gone-1'}),
	qr/cus_gone/, 'and Stripe\'s message');
is($node->safe_psql('postgres', 'SELECT not_billed FROM stripe_meter.status'), '3', 'status.not_billed counts them');
is($node->safe_psql('postgres', q{
	SELECT string_agg(type || ':' || coalesce(error_count, 0) || ':' || (meter_id IS NOT NULL), ' ' ORDER BY type)
	  FROM stripe_meter.error_reports}),
	'v1.billing.meter.error_report_triggered:2:true v1.billing.meter.no_meter_found:1:false',
	'each report kept once, with its count and meter');
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM stripe_meter.meter_events m JOIN stripe_meter.error_reports r ON r.id = m.async_error_report}),
	'3', 'marked events point at their report');

my @reads = grep { $_->{path} eq '/v2/core/events' } @{ $mock->requests(limit => 100000) };
like($reads[0]{query}, qr/^types=v1\.billing\.meter\.error_report_triggered&types=v1\.billing\.meter\.no_meter_found&limit=100/,
	'asks for the two report types');
ok(!defined $reads[0]{headers}{'idempotency-key'}, 'a GET carries no Idempotency-Key');

# Read again: nothing duplicated; the cursor is used.
my $n = scalar @reads;
wait_mock($mock, sub {
	scalar(grep { $_->{path} eq '/v2/core/events' } @{ $mock->requests(limit => 100000) }) >= $n + 2 },
	'polled again on schedule');
@reads = grep { $_->{path} eq '/v2/core/events' } @{ $mock->requests(limit => 100000) };
like($reads[-1]{query}, qr/created%5Bgt%5D=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ/, 'later reads start from the cursor');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.error_reports'), '2', 'no report stored twice');

# A later error is found too.
enqueue('api_calls', 'e-gone-3', 'cus_gone');
wait_for($node, q{SELECT async_error_code FROM stripe_meter.meter_events WHERE identifier = 'e-gone-3'},
	'meter_event_customer_not_found', 'a later report marks the later event');
is($node->safe_psql('postgres', 'SELECT not_billed FROM stripe_meter.status'), '4', 'not_billed grows');

# Connect: a connected account's reports are read with its Stripe-Context.
enqueue('api_calls', 'e-acct', 'cus_gone', 'acct_C9');
wait_for($node, q{SELECT async_error_code FROM stripe_meter.meter_events WHERE identifier = 'e-acct'},
	'meter_event_customer_not_found', 'connected account: its event is marked');
is($node->safe_psql('postgres', q{
	SELECT r.stripe_account FROM stripe_meter.meter_events m JOIN stripe_meter.error_reports r ON r.id = m.async_error_report
	 WHERE m.identifier = 'e-acct'}), 'acct_C9', 'connected account: the report is kept with the account');
ok(scalar(grep { $_->{path} eq '/v2/core/events' && ($_->{headers}{'stripe-context'} // '') eq 'acct_C9' }
		  @{ $mock->requests(limit => 100000) }), 'connected account: read with Stripe-Context');

# Stripe unreachable: the error is kept, delivery goes on afterwards.
$mock->config({ down => JSON::PP::true });
wait_for($node, q{SELECT error_reports_error IS NOT NULL FROM stripe_meter.sync_state}, 't',
	'a failed read is recorded in sync_state');
$mock->config({ down => JSON::PP::false });
enqueue('api_calls', 'e-after', 'cus_ok');
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier = 'e-after'}, '1',
	'delivery goes on');
wait_for($node, q{SELECT error_reports_error IS NULL FROM stripe_meter.sync_state}, 't',
	'and the next read clears the error');

$node->stop;
unlike(slurp_file($node->logfile), qr/\Q$StripeMeterTest::API_KEY\E/, 'the key never reaches the log');
$mock->stop;
done_testing();
