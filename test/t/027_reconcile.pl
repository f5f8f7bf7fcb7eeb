# Reconciliation: stripe_meter_reconcile() puts what this database delivered
# for a customer and meter next to Stripe's event summaries for the same
# windows.  Cancelled events leave both sides; an event Stripe does not have
# shows up as a difference; a connected account is asked with its header.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

my $mock = start_mock(meters => { api_calls => {}, logins => { formula => 'count' } });
my $node = new_node('reconcile', mock => $mock);
$node->safe_psql('postgres', 'SELECT stripe_meter_sync_meters()');

# Three whole hours before the current one.
$node->safe_psql('postgres', q{
	CREATE TABLE w AS SELECT date_trunc('hour', now()) - interval '3 hours' AS t0;
	SELECT stripe_meter_event_create(e.name, jsonb_build_object('stripe_customer_id', e.cust, 'value', e.v),
									 e.id, (SELECT t0 FROM w) + e.off, e.acct)
	  FROM (VALUES ('api_calls', 'r-1', 'cus_R', 5, interval '10 minutes', NULL),
				   ('api_calls', 'r-2', 'cus_R', 7, interval '20 minutes', NULL),
				   ('api_calls', 'r-3', 'cus_R', 11, interval '70 minutes', NULL),
				   ('api_calls', 'r-4', 'cus_R', 13, interval '125 minutes', NULL),
				   ('api_calls', 'o-1', 'cus_O', 17, interval '15 minutes', NULL),
				   ('api_calls', 'a-1', 'cus_R', 19, interval '15 minutes', 'acct_C1'),
				   ('logins', 'l-1', 'cus_R', 1, interval '5 minutes', NULL),
				   ('logins', 'l-2', 'cus_R', 1, interval '6 minutes', NULL))
		   AS e(name, id, cust, v, off, acct)});
wait_for($node, 'SELECT count(*) FROM stripe_meter.meter_events', '8', 'all delivered');

sub reconcile
{
	my ($args) = @_;
	return $node->safe_psql('postgres', qq{
		SELECT (extract(epoch FROM window_start - (SELECT t0 FROM w)) / 3600)::int || ':' || local_events || ':'
			   || local_value || ':' || stripe_value || ':' || difference
		  FROM stripe_meter_reconcile($args) ORDER BY window_start});
}

my $hourly = q{'api_calls', 'cus_R', (SELECT t0 FROM w), (SELECT t0 FROM w) + interval '3 hours', 'hour'};
is(reconcile($hourly), "0:2:12:12:0\n1:1:11:11:0\n2:1:13:13:0", 'hourly: both sides agree');
my @sq = grep { $_->{path} =~ m{/event_summaries$} } @{ $mock->requests(limit => 100000) };
like($sq[-1]{query}, qr/customer=cus_R&start_time=\d+&end_time=\d+&value_grouping_window=hour/,
	'summaries asked for the customer, window and grouping');
is(reconcile(q{'api_calls', 'cus_R', (SELECT t0 FROM w), (SELECT t0 FROM w) + interval '3 hours'}),
	'0:4:36:36:0', 'no grouping: one window');
is(reconcile(q{'logins', 'cus_R', (SELECT t0 FROM w), (SELECT t0 FROM w) + interval '1 hour'}),
	'0:2:2:2:0', 'count meter: events counted on both sides');

# A cancellation leaves both sides.
$node->safe_psql('postgres', q{SELECT stripe_meter_event_cancel('api_calls', 'r-2')});
wait_for($node, q{SELECT status FROM stripe_meter.adjustments WHERE identifier = 'r-2'}, 'done', 'r-2 cancelled');
is(reconcile($hourly), "0:1:5:5:0\n1:1:11:11:0\n2:1:13:13:0", 'cancelled event left out on both sides');

# Recorded here but unknown to Stripe: a difference in its window.
$node->safe_psql('postgres', q{
	INSERT INTO stripe_meter.meter_events (identifier, event_name, payload, ts, customer, outcome,
										   enqueued_at, attempts)
	VALUES ('ghost', 'api_calls', '{"stripe_customer_id": "cus_R", "value": 100}',
			(SELECT t0 FROM w) + interval '80 minutes', 'cus_R', 'already_existed', now(), 1)});
is(reconcile($hourly), "0:1:5:5:0\n1:2:111:11:100\n2:1:13:13:0", 'the missing event shows as a difference');

# Connect: the meter and the summaries come from the connected account.
is(reconcile(q{'api_calls', 'cus_R', (SELECT t0 FROM w), (SELECT t0 FROM w) + interval '1 hour', NULL, 'acct_C1'}),
	'0:1:19:19:0', 'connected account: only its events, on both sides');
my @acct = grep { $_->{method} eq 'GET' && ($_->{headers}{'stripe-account'} // '') eq 'acct_C1' }
  @{ $mock->requests(limit => 100000) };
ok(scalar(grep { $_->{path} eq '/v1/billing/meters' } @acct) >= 1, 'its meter looked up with Stripe-Account');
ok(scalar(grep { $_->{path} =~ m{/event_summaries$} } @acct) >= 1, 'its summaries read with Stripe-Account');

my ($rc, $out, $err) = $node->psql('postgres',
	q{SELECT * FROM stripe_meter_reconcile('no_such', 'cus_R', (SELECT t0 FROM w), (SELECT t0 FROM w) + interval '1 hour')},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/42704.*no meter for event name "no_such"/s, 'unknown meter: 42704');

$node->stop;
$mock->stop;
done_testing();
