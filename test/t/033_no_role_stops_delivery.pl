# Nothing a role can do in SQL stops or stalls delivery:
#  - a login role with no privileges holds every advisory lock stripe_meter
#    once used as a guard (the worker's single-instance guard, the meter
#    sync's): a new worker still starts and delivers, and the scheduled
#    meter sync still runs;
#  - an application role cancels an event that is in flight and leaves its
#    transaction open, holding that event's row: the worker records every
#    other answer meanwhile, says in status why one waits, and records it
#    once the transaction ends;
#  - a claim's durability does not depend on synchronous_commit: with it
#    off for the database and the WAL writer asleep, a crash right after a
#    request was sent still finds the claim, so its outcome is unknown.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

# the scheduled sync reads the mock's meters: api_requests must be one
my $mock = start_mock(meters => { api_requests => {} });
my $node = new_node('nostop', mock => $mock,
	conf => { 'stripe_meter.meter_sync_interval' => '1s', 'wal_writer_delay' => '10s' });
$node->safe_psql('postgres', q{
	CREATE ROLE mallory LOGIN;
	CREATE ROLE app LOGIN;
	GRANT USAGE ON SCHEMA stripe_meter TO app;
	GRANT EXECUTE ON FUNCTION stripe_meter_event_cancel(text, text) TO app;
});

sub enqueue
{
	my ($identifier, $customer) = @_;
	$node->safe_psql('postgres',
		"SELECT stripe_meter_event_create('api_requests', "
		  . "'{\"stripe_customer_id\": \"$customer\", \"value\": 1}', '$identifier')");
}

sub delivered
{
	return $node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.meter_events');
}

# --- 1. advisory locks held by a role with no privileges at all
my $mallory = $node->background_psql('postgres', extra_params => [ '-U', 'mallory' ]);
# every key with stripe_meter's prefix, in both advisory forms; the old
# worker guard is (1398033751, 0), which waits while a worker holds it
$mallory->query_until(qr/asking/, q{
\echo asking
SELECT pg_advisory_lock(1398033751, k) FROM generate_series(1, 9) k;
SELECT pg_advisory_lock(1398033751::bigint << 32 | k) FROM generate_series(0, 9) k;
SELECT pg_advisory_lock(1398033751, 0);
\echo locked
});
$node->safe_psql('postgres',
	"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'stripe_meter worker'");
wait_for($node,
	q{SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
	   WHERE a.usename = 'mallory' AND l.locktype = 'advisory' AND l.granted},
	'20', 'mallory holds every advisory key with the prefix');
enqueue('adv-1', 'cus_Adv1');
wait_for($node, 'SELECT count(*) FROM stripe_meter.meter_events', '1',
	'a new worker starts and delivers while a role holds those locks');
my $syncs = sub { scalar grep { $_->{path} =~ m{^/v1/billing/meters} } @{ $mock->requests(limit => 100000) } };
my $before = $syncs->();
ok($mock->wait_for(sub { $syncs->() > $before }, timeout => 30),
	'the scheduled meter sync still runs');
wait_for($node, q{SELECT meters_synced_at > now() - interval '30 seconds' FROM stripe_meter.sync_state},
	't', 'and stores what it read');
enqueue('adv-2', 'cus_Adv2');
wait_for($node, 'SELECT count(*) FROM stripe_meter.meter_events', '2',
	'and delivery goes on after it');
$mallory->quit;

# --- 2. a cancellation left open on an event in flight
$mock->config({ latency_ms => 3000 });
enqueue('held-1', 'cus_Held');
wait_for($node,
	q{SELECT in_flight_since IS NOT NULL FROM stripe_meter.outbox WHERE identifier = 'held-1'},
	't', 'held-1 is in flight');
my $app = $node->background_psql('postgres', extra_params => [ '-U', 'app' ]);
$app->query_safe('BEGIN');
is($app->query_safe(q{SELECT stripe_meter_event_cancel('api_requests', 'held-1')}),
	'awaiting_delivery', 'app cancels held-1 and keeps its transaction open');
$mock->config({ latency_ms => 0 });
enqueue("other-$_", "cus_Other$_") for 1 .. 20;
wait_for($node,
	q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'other-%'},
	'20', 'every other event is delivered and recorded meanwhile');
wait_for($node,
	q{SELECT last_error LIKE '%wait to be recorded: another transaction holds their outbox rows%' FROM stripe_meter.status},
	't', 'status says an answer waits for another transaction');
$app->query_safe('COMMIT');
$app->quit;
wait_for($node,
	q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier = 'held-1'},
	'1', 'held-1 is recorded once the transaction ends');
is($mock->stats->{identifiers_billed_multiple_times}, 0, 'nothing billed twice');

# --- 3. the claim is durable whatever synchronous_commit says
$node->safe_psql('postgres', 'ALTER DATABASE postgres SET synchronous_commit = off');
restart_workers($node, 'postgres');
wait_for($node,
	q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'stripe_meter worker'},
	'1', 'a worker with synchronous_commit off for its database');
$mock->config({ latency_ms => 8000 });
# the enqueue itself commits durably: what is tested is the claim
$node->safe_psql('postgres', q{SET synchronous_commit = on;
	SELECT stripe_meter_event_create('api_requests',
		'{"stripe_customer_id": "cus_Durable", "value": 1}', 'durable-1')});
# the request itself, not another one in flight (the meter sync's)
ok($mock->wait_for(sub { scalar @{ requests_for($mock, 'durable-1') } > 0 }, timeout => 30),
	'durable-1 reached the mock');
$node->stop('immediate');
$node->start;
$mock->config({ latency_ms => 0 });
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier = 'durable-1'},
	'1', 'durable-1 is delivered after the crash');
is( $node->safe_psql('postgres',
		q{SELECT attempts >= 2 AND first_attempt_at IS NOT NULL FROM stripe_meter.meter_events WHERE identifier = 'durable-1'}),
	't', 'the claim before the crash survived it: its attempt is counted');
is($mock->stats->{identifiers_billed_multiple_times}, 0, 'still nothing billed twice');

$node->stop;
$mock->stop;
done_testing();
