# The lifecycle calls never hold up delivery: while a cancellation
# (POST /v1/billing/meter_event_adjustments), a meter sync
# (GET /v1/billing/meters) or an error-report read (GET /v2/core/events, for
# the platform and 20 Connect accounts) waits on a slow Stripe, a few hundred
# new events are all delivered, and the slow call is still waiting when they
# are.  Once Stripe answers, the lifecycle work completes all the same.
#
# Each kind gets its own round: the mock delays every request of that kind
# (a script entry) until it holds one, the test queues the events, and polls
# until they are delivered or the held request's delay is over.  Delivered
# while the mock still holds it (its request-log entry is open) is the pass;
# the delay's end is only when the poll gives up, never an assertion.
use strict;
use warnings;

use List::Util qw(max);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);

use StripeMeterTest;

my $DELAY_MS = 12000;		# a slow call: many times what delivering a round takes
my $ROUND = 300;			# events queued while one is out
my @ACCOUNTS = map { sprintf('acct_1Slow%02d', $_) } 1 .. 20;

# cus_gone is accepted, then reported by Stripe's error reports
my $mock = start_mock(meters => { api_calls => {} }, missing_customers => ['cus_gone']);
# Scheduled syncs and error reads start in their rounds; a slow call is
# never cut short by the timeout.
my $node = new_node('lifecycle', mock => $mock, conf => {
	'stripe_meter.request_timeout' => 120000,
	'stripe_meter.meter_sync_interval' => 0,
	'stripe_meter.error_poll_interval' => 0 });

sub enqueue
{
	my ($prefix, $n, $customer, $account) = @_;
	my $acct = defined $account ? "'$account'" : 'NULL';
	my $cust = defined $customer ? "'$customer'" : "'cus_$prefix' || i";
	$node->safe_psql('postgres', qq{
		SELECT count(stripe_meter_event_create('api_calls',
			jsonb_build_object('stripe_customer_id', $cust, 'value', 1),
			'$prefix-' || i, NULL, $acct))
		  FROM generate_series(1, $n) i});
}

sub delivered
{
	my ($prefix) = @_;
	return $node->safe_psql('postgres',
		"SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE '$prefix-%'");
}

# requests of this kind the mock holds now because a script entry delays them
sub held
{
	my ($method, $path, $limit) = @_;
	return grep { $_->{method} eq $method && $_->{path} eq $path && $_->{open} && $_->{script_delay_ms} > 0 }
	  @{ $mock->requests(limit => $limit) };
}

# One round: make every $method $path slow, start the lifecycle work
# ($start), and once the mock holds such a request, queue $ROUND events for
# distinct customers: all must be delivered (in meter_events and billed by
# the mock) while the mock still holds it.
sub round
{
	my ($kind, $method, $path, $prefix, $start) = @_;

	$mock->script([ { match => { method => $method, path => $path }, times => -1, delay_ms => $DELAY_MS } ]);
	$start->();
	my @held;
	my $deadline = time + $PostgreSQL::Test::Utils::timeout_default;
	until ((@held = held($method, $path, 1000)) || time > $deadline)
	{
		sleep 0.1;
	}
	# the requests held keep their delay; the next ones are answered at once,
	# so that a worker that waits for these waits for nothing more
	$mock->script([]);
	ok(scalar @held, "$kind: the mock holds a slow $method $path") or return;
	my %held_ids = map { $_->{request_id} => 1 } @held;
	# when the mock answers the last of them
	my $answered_at = max(map { $_->{time} + $_->{script_delay_ms} } @held) / 1000;

	enqueue($prefix, $ROUND);
	my $n;
	while (1)
	{
		$n = delivered($prefix);
		last if $n == $ROUND || time > $answered_at;
		sleep 0.1;
	}
	# read after the count: held now means held when the count was reached
	my $billed = grep { $_->{identifier} =~ /^\Q$prefix\E-/ } @{ $mock->events };
	my @still = grep { $held_ids{ $_->{request_id} } && $_->{open} } @{ $mock->requests(limit => 5000) };
	ok($n == $ROUND && $billed == $ROUND && @still,
		"$kind: $ROUND events delivered while the slow $method $path is still out")
	  or diag("$kind: $n of $ROUND delivered when the poll ended; just after, the mock had billed "
		  . "$billed and still held " . scalar(@still) . ' of the ' . scalar(@held)
		  . ' slow request(s) it held when they were queued');
	note("$kind: the mock held " . scalar(@held) . ' such request(s)');
}

# Setup: one event billed in each connected account, so that the error
# reads cover them all (cus_gone: each account gets a report), and ten
# platform events to cancel.
enqueue("acct$_", 1, 'cus_gone', $ACCOUNTS[ $_ - 1 ]) for 1 .. @ACCOUNTS;
enqueue('cx', 10);
wait_for($node, 'SELECT count(*) FROM stripe_meter.meter_events', scalar(@ACCOUNTS) + 10,
	'setup: the connected accounts\' events and those to cancel are delivered');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.meters'), '0', 'setup: no meters synced yet');

round('cancellations', 'POST', '/v1/billing/meter_event_adjustments', 'r1', sub {
	is($node->safe_psql('postgres', q{
		SELECT string_agg(DISTINCT stripe_meter_event_cancel('api_calls', 'cx-' || i), ',')
		  FROM generate_series(1, 10) i}), 'queued', 'cancellations: ten queued');
});
round('meter sync', 'GET', '/v1/billing/meters', 'r2', sub {
	set_conf($node, 'stripe_meter.meter_sync_interval' => 1);
});
round('error reports', 'GET', '/v2/core/events', 'r3', sub {
	set_conf($node, 'stripe_meter.error_poll_interval' => 1);
});

# The slow calls are answered (or, with the script gone, made again fast):
# the lifecycle work is done.
wait_for($node, q{SELECT count(*) FROM stripe_meter.adjustments WHERE status = 'done' AND outcome = 'created'},
	'10', 'cancellations: all ten done');
is($node->safe_psql('postgres', 'SELECT max(attempts) FROM stripe_meter.adjustments'), '1',
	'cancellations: each sent once (the slow answer was waited for)');
is(scalar(grep { /\|cx-\d+$/ } @{ $mock->lifecycle->{cancelled} }), 10, 'cancellations: the mock cancelled all ten');
wait_for($node, q{SELECT string_agg(event_name, ',') FROM stripe_meter.meters}, 'api_calls',
	'meter sync: the meters are synced');
is($node->safe_psql('postgres', 'SELECT meters_sync_error IS NULL FROM stripe_meter.sync_state'), 't',
	'meter sync: no error recorded');
wait_for($node, q{SELECT count(DISTINCT r.stripe_account) FROM stripe_meter.meter_events m
				   JOIN stripe_meter.error_reports r ON r.id = m.async_error_report
				  WHERE m.identifier LIKE 'acct%' AND m.async_error_code = 'meter_event_customer_not_found'},
	scalar(@ACCOUNTS), 'error reports: read for every connected account, and their events marked');
is($node->safe_psql('postgres', 'SELECT error_reports_error IS NULL FROM stripe_meter.sync_state'), 't',
	'error reports: no error recorded');

wait_for($node, 'SELECT count(*) FROM stripe_meter.meter_events', scalar(@ACCOUNTS) + 10 + 3 * $ROUND,
	'every event delivered');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.outbox'), '0', 'nothing left queued');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.failed_events'), '0', 'nothing failed');
is($mock->stats->{identifiers_billed_multiple_times}, 0, 'no identifier billed twice');

$node->stop;
$mock->stop;
done_testing();
