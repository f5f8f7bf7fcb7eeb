# Upkeep that keeps pace (issue 12, item 9): stripe_meter.status reads
# running counters instead of counting meter_events, and they stay exact
# across delivery, a crash (immediate stop) and restart, and the purge of
# old delivered rows, after which delivered still counts the purged ones.
# And per-account API v2 state is freed once the account has gone idle.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

my $mock = start_mock();
my $node = new_node('upkeep', mock => $mock);

sub enqueue
{
	my ($node, $prefix, $n, $account) = @_;
	my $acct = defined $account ? "'$account'" : 'NULL';
	$node->safe_psql('postgres', qq{
		SELECT stripe_meter_event_create('api_requests',
			jsonb_build_object('stripe_customer_id', 'cus_' || i, 'value', 1),
			'$prefix-' || i, NULL, $acct)
		  FROM generate_series(1, $n) i});
}

# 1. Delivery: the counters follow the rows moved.
enqueue($node, 'a', 200);
wait_for($node, 'SELECT count(*) FROM stripe_meter.meter_events', 200, 'first 200 delivered');
is($node->safe_psql('postgres',
	'SELECT delivered, delivered_last_minute, not_billed FROM stripe_meter.status'),
	'200|200|0', 'status counts the 200 delivered, all in the last minute');

# 2. Reading status touches meter_events in no way: no scan in its plan, and
# no scan counted in the reading transaction.
my $plan = $node->safe_psql('postgres', 'EXPLAIN (COSTS OFF) SELECT * FROM stripe_meter.status');
unlike($plan, qr/meter_events/, 'the plan of status does not read meter_events');
is($node->safe_psql('postgres', q{
	BEGIN;
	SELECT * FROM stripe_meter.status;
	SELECT COALESCE(sum(seq_scan + COALESCE(idx_scan, 0)), 0)
	  FROM pg_stat_xact_user_tables WHERE relid = 'stripe_meter.meter_events'::regclass;
	COMMIT;}) =~ s/.*\n//sr, '0', 'reading status scans meter_events zero times');

# 3. A crash while delivering: whatever recording was lost is sent again
# (and replayed by Stripe), and the counters match the rows exactly.
enqueue($node, 'b', 2000);
$node->poll_query_until('postgres',
	'SELECT count(*) > 200 FROM stripe_meter.meter_events');
$node->stop('immediate');
$node->start;
wait_for($node, 'SELECT count(*) FROM stripe_meter.meter_events', 2200,
	'all 2200 delivered after the crash');
is($node->safe_psql('postgres',
	'SELECT s.delivered = (SELECT count(*) FROM stripe_meter.meter_events) FROM stripe_meter.status s'),
	't', 'after a crash and restart, delivered equals the delivered rows');
is($node->safe_psql('postgres', 'SELECT delivered FROM stripe_meter.status'), '2200',
	'delivered counts each event once');

# 4. The purge: rows go, the total stays; the last minute forgets them
# only as time passes.
# (every row made older than stripe_meter.delivered_retention, 7 days; the
# worker purges at its start)
# Beside them, 20,000 old rows recorded directly (as a fast v2 day leaves
# them): the purge goes on while it finds full batches, instead of taking
# a bounded number a minute (10,000 before), so all are gone within well
# under the minute that separates two purge passes.
$node->safe_psql('postgres', q{
	UPDATE stripe_meter.meter_events SET delivered_at = delivered_at - interval '8 days';
	INSERT INTO stripe_meter.meter_events
		(identifier, event_name, payload, ts, customer, outcome, enqueued_at, attempts, delivered_at)
	SELECT 'old-' || i, 'api_requests', '{}', now(), 'cus_1', 'created', now(), 1,
		   now() - interval '8 days'
	  FROM generate_series(1, 20000) i});
$node->restart;
{
	# the old code needed two minutes and more: wait at most 40 seconds
	local $PostgreSQL::Test::Utils::timeout_default = 40;
	wait_for($node, 'SELECT count(*) FROM stripe_meter.meter_events', 0,
		'the purge removes all 22,200 delivered rows within 40 seconds of the start');
}
is($node->safe_psql('postgres', 'SELECT delivered FROM stripe_meter.status'), '2200',
	'after the purge, delivered still counts the purged events');
cmp_ok($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.counters'), '<=', 2,
	'the counters stay at a row or two');

# 5. An update from 0.1.0 starts the counters from the rows already there.
$node->safe_psql('postgres', 'CREATE DATABASE from_010');
$node->safe_psql('from_010', q{
	CREATE EXTENSION stripe_meter VERSION '0.1.0';
	INSERT INTO stripe_meter.meter_events
		(identifier, event_name, payload, ts, customer, outcome, enqueued_at, attempts, delivered_at)
	SELECT 'old-' || i, 'api_requests', '{}', now(), 'cus_1', 'created', now(), 1,
		   CASE WHEN i <= 3 THEN now() ELSE now() - interval '1 hour' END
	  FROM generate_series(1, 10) i;
	ALTER EXTENSION stripe_meter UPDATE;});
is($node->safe_psql('from_010',
	'SELECT delivered, delivered_last_minute, not_billed FROM stripe_meter.status'),
	'10|3|0', 'after the update from 0.1.0, the counters hold the rows already delivered');

# 6. The rate limiter forgets accounts idle for a minute; after a burst of
# more than a thousand it makes its table anew, and delivery goes on in
# the same worker.
my $pid = $node->safe_psql('postgres', 'SELECT worker_pid FROM stripe_meter.worker_state()');
$node->safe_psql('postgres', q{
	SELECT stripe_meter_event_create('api_requests',
		jsonb_build_object('stripe_customer_id', 'cus_1', 'value', 1),
		'burst-' || i, NULL, 'acct_1Burst' || i)
	  FROM generate_series(1, 1100) i});
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'burst-%'}, 1100,
	'v1: 1100 events of 1100 accounts delivered');
# the limiter forgets an account a minute after its last use: poll until
# the last of them was delivered more than that ago
$node->poll_query_until('postgres', q{
	SELECT now() - max(delivered_at) > interval '65 seconds'
	  FROM stripe_meter.meter_events WHERE identifier LIKE 'burst-%'})
  or die 'the burst accounts never went idle';
$node->safe_psql('postgres', q{
	SELECT stripe_meter_event_create('api_requests',
		'{"stripe_customer_id": "cus_1", "value": 1}', 'after-burst', NULL, 'acct_1Burst1')});
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier = 'after-burst'}, 1,
	'v1: an account forgotten by the rate limiter delivers again');
is($node->safe_psql('postgres', 'SELECT worker_pid FROM stripe_meter.worker_state()'), $pid,
	'v1: the same worker, through the rate limiter\'s shrink');
$node->stop;

# 7. API v2 with many Connect accounts: each gets a session, and once the
# accounts are idle and their sessions expired their state is freed.
my $mock2 = start_mock(session_ttl_s => 10);
my $v2 = new_node('upkeep_v2', mock => $mock2,
	conf => {
		'stripe_meter.api_version' => 'v2',
		'stripe_meter.stream_url' => $mock2->url,
	});
my $accounts = 40;
$v2->safe_psql('postgres', qq{
	SELECT stripe_meter_event_create('api_requests',
		jsonb_build_object('stripe_customer_id', 'cus_1', 'value', 1),
		'v2-' || i, NULL, 'acct_1Idle' || i)
	  FROM generate_series(1, $accounts) i});
wait_for($v2, 'SELECT count(*) FROM stripe_meter.meter_events', $accounts,
	"v2: $accounts events of $accounts accounts delivered");
wait_for($v2, "SELECT stream_accounts >= $accounts FROM stripe_meter.worker_state()", 't',
	'v2: the worker holds state for every account that sent');
wait_for($v2, 'SELECT stream_accounts FROM stripe_meter.worker_state()', 0,
	'v2: idle accounts whose sessions expired are freed');
is($v2->safe_psql('postgres', 'SELECT delivered FROM stripe_meter.status'), $accounts,
	'v2: delivered counts the stream\'s events');

# An account that sends again after being freed gets a new session.
$v2->safe_psql('postgres', q{
	SELECT stripe_meter_event_create('api_requests',
		'{"stripe_customer_id": "cus_1", "value": 1}', 'v2-again', NULL, 'acct_1Idle1')});
wait_for($v2, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier = 'v2-again'}, 1,
	'v2: a freed account delivers again');
$v2->stop;

done_testing();
