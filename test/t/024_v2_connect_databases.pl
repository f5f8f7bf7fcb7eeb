# API v2 per Connect account and per database.  Events for two connected
# accounts and the platform account go out with three separate meter event
# sessions, each created with its account's Stripe-Account header; and one
# database delivers through v1 while another, set with ALTER DATABASE,
# delivers through v2 at the same time.  Switching a database to v2 takes
# a new worker.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

my $mock = start_mock(latency_ms => 20);
my $node = new_node('v2connect', mock => $mock,
	conf => { 'stripe_meter.stream_url' => $mock->url });

is($node->safe_psql('postgres', 'SHOW stripe_meter.api_version'), 'v1', 'v1 is the default');

$node->safe_psql('postgres', q{
	CREATE DATABASE db_v1;
	CREATE DATABASE db_v2;
	ALTER DATABASE db_v2 SET stripe_meter.api_version = 'v2';
});
$node->safe_psql($_, 'CREATE EXTENSION stripe_meter') for qw(db_v1 db_v2);
is($node->safe_psql('db_v2', 'SHOW stripe_meter.api_version'), 'v2', 'db_v2 is set to v2');

# Each database bills its own customers: two databases' workers do not
# coordinate, so they must not share a customer of one account.
sub enqueue
{
	my ($db, $prefix, $n, $account) = @_;
	my $acct = defined $account ? "'$account'" : 'NULL';
	$node->safe_psql($db, qq{
		SELECT stripe_meter_event_create('ai_search_api',
			jsonb_build_object('stripe_customer_id', 'cus_$db' || i % 40, 'value', 1),
			'$prefix-' || i, NULL, $acct)
		  FROM generate_series(1, $n) i});
}

# Both databases at once; db_v2 with two connected accounts too.
enqueue('db_v1', 'one', 300);
enqueue('db_v2', 'two', 300);
enqueue('db_v2', 'acA', 300, 'acct_1ConnectA');
enqueue('db_v2', 'acB', 300, 'acct_1ConnectB');

wait_for($node, 'SELECT count(*) FROM stripe_meter.meter_events', '300',
	'db_v1: 300 delivered', 'db_v1');
wait_for($node, 'SELECT count(*) FROM stripe_meter.meter_events', '900',
	'db_v2: 900 delivered', 'db_v2');

is($node->safe_psql('db_v1', 'SELECT DISTINCT outcome FROM stripe_meter.meter_events'),
	'created', 'db_v1: delivered through v1 (billing.meter_event objects)');
is($node->safe_psql('db_v2', 'SELECT DISTINCT outcome FROM stripe_meter.meter_events'),
	'accepted', 'db_v2: delivered through the stream');
my $v1_requests = meter_requests($mock);
is(scalar(grep { form_value($_->{body}, 'identifier') =~ /^one-/ } @$v1_requests), 300,
	'db_v1 events went to /v1/billing/meter_events');
is(scalar(grep { form_value($_->{body}, 'identifier') !~ /^one-/ } @$v1_requests), 0,
	'no db_v2 event went to v1');

# One session per account, created with its Stripe-Account header.
my $sessions = $mock->sessions;
my %account_of = map { $_->{id} => $_->{account} } @$sessions;
is_deeply([ sort map { $_->{account} } @$sessions ],
	[ sort 'acct_1ConnectA', 'acct_1ConnectB', 'acct_1MockPlatform00000' ],
	'three sessions: one per connected account and one for the platform');
my @session_requests = grep { $_->{path} eq '/v2/billing/meter_event_session' }
  @{ $mock->requests(limit => 1000000) };
is_deeply([ sort map { $_->{headers}{'stripe-account'} // 'none' } @session_requests ],
	[ sort 'acct_1ConnectA', 'acct_1ConnectB', 'none' ],
	'each session was created with its account\'s Stripe-Account header');

my %wrong;
for my $ev (@{ $mock->events })
{
	next if $ev->{identifier} =~ /^one-/;
	my $want = $ev->{identifier} =~ /^acA-/ ? 'acct_1ConnectA'
	  : $ev->{identifier} =~ /^acB-/ ? 'acct_1ConnectB' : 'acct_1MockPlatform00000';
	$wrong{ $ev->{identifier} } = 1
	  if $ev->{account} ne $want || ($account_of{ $ev->{session_id} } // '') ne $want;
}
is(scalar(keys %wrong), 0, 'every stream event was billed to its account, with its account\'s session');
is($node->safe_psql('db_v2', q{
	SELECT count(DISTINCT session_id) FROM stripe_meter.meter_events
	 GROUP BY coalesce(stripe_account, '') ORDER BY 1 LIMIT 1}), '1',
	'db_v2 recorded one session per account');
is($node->safe_psql('db_v2', q{
	SELECT count(DISTINCT session_id) FROM stripe_meter.meter_events}), '3',
	'db_v2 recorded three sessions in all');

my $stats = $mock->stats;
is($stats->{billed}, 1200, 'each event billed once');
is($stats->{identifiers_billed_multiple_times}, 0, 'no identifier billed twice');
is($stats->{concurrency_violations}, 0, 'no concurrent events for one customer and meter');

# Switching db_v1 to v2: ALTER DATABASE, then a new worker reads it.
$node->safe_psql('postgres', q{ALTER DATABASE db_v1 SET stripe_meter.api_version = 'v2'});
my $old = worker_pids($node, 'db_v1')->[0];
$node->safe_psql('postgres', "SELECT pg_terminate_backend($old)");
wait_for($node, qq{SELECT count(*) FROM pg_stat_activity
	WHERE backend_type = 'stripe_meter worker' AND datname = 'db_v1' AND pid <> $old}, '1',
	'db_v1: a new worker started');
enqueue('db_v1', 'later', 50);
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'later-%'},
	'50', 'db_v1: 50 more delivered', 'db_v1');
is($node->safe_psql('db_v1',
	q{SELECT DISTINCT outcome FROM stripe_meter.meter_events WHERE identifier LIKE 'later-%'}),
	'accepted', 'db_v1 now delivers through the stream');

# Set in postgresql.conf and reloaded: the worker of a database without a
# database-level setting (postgres) finishes what it holds and is replaced
# by one on v2; db_v2's ALTER DATABASE setting still wins over the file.
$node->safe_psql('postgres', q{ALTER DATABASE db_v2 SET stripe_meter.api_version = 'v1'});
$old = worker_pids($node, 'postgres')->[0];
my $log_offset = -s $node->logfile;
set_conf($node, 'stripe_meter.api_version' => 'v2');
$node->wait_for_log(qr/stripe_meter worker restarts to apply stripe_meter.api_version = v2/, $log_offset);
pass('postgres: the worker noticed the reload');
wait_for($node, qq{SELECT count(*) FROM pg_stat_activity
	WHERE backend_type = 'stripe_meter worker' AND datname = 'postgres' AND pid <> $old}, '1',
	'postgres: a new worker started');
enqueue('postgres', 'conf', 20);
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'conf-%'},
	'20', 'postgres: 20 delivered');
is($node->safe_psql('postgres',
	q{SELECT DISTINCT outcome FROM stripe_meter.meter_events WHERE identifier LIKE 'conf-%'}),
	'accepted', 'postgres now delivers through the stream');
is($node->safe_psql('db_v2', 'SHOW stripe_meter.api_version'), 'v1',
	'a database-level setting wins over postgresql.conf');

$node->stop;
$mock->stop;
done_testing();
