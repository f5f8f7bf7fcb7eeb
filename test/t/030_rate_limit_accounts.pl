# Stripe's rate limits are per account.  The worker keeps one limit per
# Stripe account (the platform's own and each connected account): three
# accounts each get stripe_meter.rate_limit calls per second, so together
# they go faster than one account may, and no account ever goes over it
# (the mock, limiting each account a little above the setting, answers no
# 429).
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

my $limit = 8;           # the worker's per-account setting
my $per_account = 40;    # events per account: 5 s at the limit
my $mock = start_mock();
$mock->config({ rate_limit_per_s => $limit + 2 });
my $node = new_node('ratelimit', mock => $mock,
	conf => { 'stripe_meter.rate_limit' => $limit });

$node->safe_psql('postgres', qq{
	SELECT stripe_meter_event_create('api_requests',
		jsonb_build_object('stripe_customer_id', 'cus_rl' || i, 'value', 1),
		'rl-' || a || '-' || i, NULL, nullif(a, 'platform'))
	  FROM generate_series(1, $per_account) i,
		   unnest(ARRAY['platform', 'acct_1RateA', 'acct_1RateB']) a});

wait_for($node, 'SELECT count(*) FROM stripe_meter.meter_events', 3 * $per_account,
	'every account\'s events delivered');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.failed_events'), '0',
	'none failed');
is($mock->stats->{by_status}{429} // 0, 0,
	'no account went over its limit: the mock answered no 429');

# The busiest second, per account and in all: with one limiter for all
# accounts together, no second could hold more than one account's share.
my @events = @{ $mock->events };
is(scalar @events, 3 * $per_account, 'the mock billed each event');
sub busiest_window
{
	my ($ms, @events) = @_;
	my @t = sort { $a <=> $b } map { $_->{billed_at} } @events;
	my ($best, $j) = (0, 0);
	for my $i (0 .. $#t)
	{
		$j++ while $t[$i] - $t[$j] >= $ms;
		$best = $i - $j + 1 if $i - $j + 1 > $best;
	}
	return $best;
}
my %by_account;
push @{ $by_account{ $_->{account} } }, $_ for @events;
is(scalar keys %by_account, 3, 'three accounts billed');
# Counted where they arrive, so over two seconds: loopback delays vary on a
# loaded machine, and a window of one second could catch one request more
# than the worker sent in any second.  At the limit two seconds hold
# 2 * limit requests and the burst of 1; one more for that jitter.
for my $account (sort keys %by_account)
{
	cmp_ok(busiest_window(2000, @{ $by_account{$account} }), '<=', 2 * $limit + 2,
		"$account: never more than its limit (+1 burst) over two seconds");
}
my $all = busiest_window(1000, @events);
cmp_ok($all, '>', $limit + 1,
	"together the accounts went faster than one may ($all in the busiest second)");

$node->stop;
$mock->stop;
done_testing();
