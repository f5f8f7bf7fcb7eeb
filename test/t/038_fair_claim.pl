# One customer's backlog never starves the others (v1 and v2).  Stripe
# allows one call per customer and meter at a time, so a backlog of one
# (account, meter, customer) drains at one event per round trip.  The
# worker holds at most a few of its events, claims the others' events
# around it, and delivers them while the backlog is still draining: before
# this, the backlog filled every claimed place and the other customers
# waited for all of it.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

use StripeMeterTest;

my $hot_events = 2000;
my $mock = start_mock(latency_ms => 50);
my $node = new_node('fairclaim', mock => $mock,
	databases => [ 'postgres', 'v2db' ],
	conf => {
		'stripe_meter.stream_url' => $mock->url,
		# a small window, so that the old claim filled it with the backlog
		'stripe_meter.max_in_flight' => 8,
		'stripe_meter.claim_batch_size' => 100 });
$node->safe_psql('postgres', q{ALTER DATABASE v2db SET stripe_meter.api_version = 'v2'});
restart_workers($node, 'v2db');

for my $db ('postgres', 'v2db')
{
	my $api = $db eq 'postgres' ? 'v1' : 'v2';

	# the backlog: one customer and meter, older than everyone else's events
	$node->safe_psql($db, qq{
		SELECT stripe_meter_event_create('api_requests',
			jsonb_build_object('stripe_customer_id', 'cus_hot', 'value', 1),
			'$api-hot-' || i, now() - interval '1 hour')
		  FROM generate_series(1, $hot_events) i});
	wait_for($node,
		q{SELECT count(*) > 0 FROM stripe_meter.meter_events WHERE customer = 'cus_hot'},
		't', "$api: the backlog is being delivered", $db);

	# then 50 other customers, two meters each
	$node->safe_psql($db, qq{
		SELECT stripe_meter_event_create(m,
			jsonb_build_object('stripe_customer_id', 'cus_cold' || i, 'value', 1),
			'$api-cold-' || m || '-' || i)
		  FROM generate_series(1, 50) i, unnest(ARRAY['api_requests', 'tokens']) m});
	wait_for($node,
		q{SELECT count(*) FROM stripe_meter.meter_events WHERE customer LIKE 'cus_cold%'},
		'100', "$api: the other customers' events are delivered", $db);
	my $left = $node->safe_psql($db,
		q{SELECT count(*) FROM stripe_meter.outbox WHERE customer = 'cus_hot'});
	cmp_ok($left, '>', $hot_events / 2,
		"$api: ... while most of the backlog is still queued ($left left)");

	# two held, plus answers that wait a few milliseconds to be recorded
	my $held = 0;
	for (1 .. 20)
	{
		my $n = $node->safe_psql($db,
			q{SELECT max(n) FROM (SELECT count(*) AS n FROM stripe_meter.outbox
			                       WHERE in_flight_since IS NOT NULL GROUP BY customer, event_name) c});
		$held = $n if ($n || 0) > $held;
		usleep(50_000);
	}
	cmp_ok($held, '<=', 4,
		"$api: the worker claims at most a few events of one customer and meter (at most $held seen)");
}

# The backlogs drain, each event billed once.
$mock->config({ latency_ms => 0 });
for my $db ('postgres', 'v2db')
{
	my $api = $db eq 'postgres' ? 'v1' : 'v2';
	wait_for($node, q{SELECT count(*) FROM stripe_meter.outbox}, '0',
		"$api: the backlog drains", $db);
	is($node->safe_psql($db, q{SELECT count(*) FROM stripe_meter.meter_events}),
		$hot_events + 100, "$api: every event is recorded delivered");
}
# Keys that hold every place the worker has still give them up.  A key
# whose event was answered is refilled by name, without waiting for the
# walk over all keys, but only so many times in a row: 8 backlogs hold the
# 16 places of max_in_flight = 8 (v1), and a new customer's event must not
# wait for one of them to drain.
my $per_key = 300;
$mock->config({ latency_ms => 50 });
$node->safe_psql('postgres', qq{
	SELECT stripe_meter_event_create('api_requests',
		jsonb_build_object('stripe_customer_id', 'cus_full' || k, 'value', 1),
		'full-' || k || '-' || i)
	  FROM generate_series(1, $per_key) i, generate_series(1, 8) k});
wait_for($node,
	q{SELECT count(DISTINCT customer) FROM stripe_meter.meter_events WHERE customer LIKE 'cus_full%'},
	'8', 'v1: eight backlogs hold every place');
$node->safe_psql('postgres', q{
	SELECT stripe_meter_event_create('api_requests',
		jsonb_build_object('stripe_customer_id', 'cus_late', 'value', 1), 'late-1')});
wait_for($node,
	q{SELECT count(*) FROM stripe_meter.meter_events WHERE customer = 'cus_late'},
	'1', 'v1: a new customer\'s event is delivered');
my $least_left = $node->safe_psql('postgres',
	q{SELECT min(n) FROM (SELECT count(*) AS n FROM stripe_meter.outbox
	                       WHERE customer LIKE 'cus_full%' GROUP BY customer) c});
cmp_ok($least_left, '>', $per_key / 2,
	"v1: ... while each backlog still has most of its events ($least_left left of $per_key)");
$mock->config({ latency_ms => 0 });
wait_for($node, q{SELECT count(*) FROM stripe_meter.outbox}, '0',
	'v1: the eight backlogs drain');

# A refill reads a key's events from where its last claim ended.  An event
# committed late, with an earlier time than the events claimed since, is
# behind that point: the walk, which reads every key from its start, must
# find it while the key's backlog still drains (about 10 s).
my $backlog = 200;
$mock->config({ latency_ms => 50 });
my $late = $node->background_psql('postgres');
$late->query_safe('BEGIN');
$late->query_safe(q{
	SELECT stripe_meter_event_create('api_requests',
		jsonb_build_object('stripe_customer_id', 'cus_straggler', 'value', 1), 'straggler-late')});
$node->safe_psql('postgres', qq{
	SELECT stripe_meter_event_create('api_requests',
		jsonb_build_object('stripe_customer_id', 'cus_straggler', 'value', 1), 'straggler-' || i)
	  FROM generate_series(1, $backlog) i});
wait_for($node,
	q{SELECT count(*) >= 20 FROM stripe_meter.meter_events WHERE customer = 'cus_straggler'},
	't', 'v1: a backlog is being refilled');
$late->query_safe('COMMIT');
$late->quit;
wait_for($node,
	q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier = 'straggler-late'},
	'1', 'v1: an event committed late with an earlier time is delivered');
my $backlog_left = $node->safe_psql('postgres',
	q{SELECT count(*) FROM stripe_meter.outbox WHERE customer = 'cus_straggler'});
cmp_ok($backlog_left, '>', $backlog / 2,
	"v1: ... while its key's backlog still drains ($backlog_left left of $backlog)");
$mock->config({ latency_ms => 0 });
wait_for($node, q{SELECT count(*) FROM stripe_meter.outbox}, '0',
	'v1: the backlog drains');

my %seen;
$seen{ $_->{identifier} }++ for @{ $mock->events };
is(scalar(keys %seen), 2 * ($hot_events + 100) + 8 * $per_key + 1 + $backlog + 1,
	'the mock billed every event');
is(scalar(grep { $_ > 1 } values %seen), 0, 'and none twice');

done_testing();
