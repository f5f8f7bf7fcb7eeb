# Rollups: a sum or last meter with a rollup window sends one event per
# Stripe account, customer, dimension values and window, once the window has
# closed.  What Stripe bills equals what the events add up to; each event
# stays in meter_events as rolled_up, naming its rollup; a window's late
# events go into a second generation; a sum over 15 digits is split; count
# meters and meters of unknown formula are refused.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

my $mock = start_mock();
my $node = new_node('rollups', mock => $mock,
	conf => { 'stripe_meter.rollup_settle_delay' => 200, 'stripe_meter.stream_url' => $mock->url });

sub psql_fails
{
	my ($sql, $re, $name, @params) = @_;
	my ($rc, $out, $err) = $node->psql('postgres', $sql, extra_params => \@params);
	isnt($rc, 0, "$name: refused");
	like($err, $re, "$name: says why");
}

$node->safe_psql('postgres', q{
	INSERT INTO stripe_meter.meters (event_name, aggregation) VALUES
		('tokens', 'sum'), ('seats', 'last'), ('calls', 'count'), ('storage', 'sum');
	INSERT INTO stripe_meter.meters (event_name) VALUES ('by_hand');
});

# Only where rolling up keeps the bill.
psql_fails(q{SELECT stripe_meter_set_rollup_window('calls')},
	qr/cannot roll up events of meter "calls": it counts events/, 'a count meter');
psql_fails(q{SELECT stripe_meter_set_rollup_window('by_hand')},
	qr/its aggregation formula is not known/, 'a meter of unknown formula');
psql_fails(q{SELECT stripe_meter_set_rollup_window('nothing')},
	qr/meter for event name "nothing" does not exist/, 'an unknown meter');
psql_fails(q{SELECT stripe_meter_set_rollup_window('tokens', interval '1.5 seconds')},
	qr/whole number of seconds from 1 second to 1 day/, 'a fractional window');
psql_fails(q{UPDATE stripe_meter.meters SET rollup_window = interval '1 minute' WHERE event_name = 'calls'},
	qr/meters_rollup_window_check/, 'a window set on a count meter by hand');
# A rollup's identifier can be computed from its group: a role that may
# queue events but not write stripe_meter.rollups cannot take one.
$node->safe_psql('postgres', q{
	CREATE ROLE app LOGIN;
	GRANT USAGE ON SCHEMA stripe_meter TO app;
	GRANT INSERT (event_name, payload, identifier, ts, stripe_account) ON stripe_meter.outbox TO app;
	GRANT EXECUTE ON FUNCTION stripe_meter_event_create(text, jsonb, text, timestamptz, text) TO app;
});
psql_fails(q{SELECT stripe_meter_event_create('tokens', '{"stripe_customer_id": "cus_x", "value": 1}',
		'stripe_meter_rollup_0_0_1_1')},
	qr/is reserved for rollups/, 'an identifier of the rollups\' form', '-U', 'app');
psql_fails(q{INSERT INTO stripe_meter.outbox (event_name, payload, identifier)
		VALUES ('tokens', '{"stripe_customer_id": "cus_x", "value": 1}', 'stripe_meter_rollup_0_0_1_2')},
	qr/is reserved for rollups/, 'an identifier of the rollups\' form, by INSERT', '-U', 'app');

$node->safe_psql('postgres', q{
	SELECT stripe_meter_set_rollup_window('tokens', interval '1 minute');
	SELECT stripe_meter_set_rollup_window('seats', interval '1 minute');
	SELECT stripe_meter_set_rollup_window('storage', interval '1 day');
});
is($node->safe_psql('postgres',
		q{SELECT string_agg(event_name || '=' || coalesce(rollup_window::text, '-'), ' ' ORDER BY event_name)
		    FROM stripe_meter.meters}),
	'by_hand=- calls=- seats=00:01:00 storage=1 day tokens=00:01:00', 'windows set');

# 600 token events, 10 minutes ago and spread over two whole minutes, for 3
# customers and 2 models: 3 x 2 x 2 groups.  A count meter's events and a
# sum meter's without a window go one by one.
# Fixed once: evaluated in each statement, a minute that turns between
# two of them would move later events into another window.
my $base = 'to_timestamp(' . $node->safe_psql('postgres',
	q{SELECT extract(epoch FROM date_trunc('minute', now()) - interval '10 minutes')::bigint}) . ')';
$node->safe_psql('postgres', qq{
	SELECT stripe_meter_event_create('tokens',
		jsonb_build_object('stripe_customer_id', 'cus_' || i % 3, 'model', 'm' || i % 2, 'value', i),
		'tok-' || i, $base + (i % 120) * interval '1 second')
	  FROM generate_series(1, 600) i;
	SELECT stripe_meter_event_create('calls', '{"stripe_customer_id": "cus_0", "value": 1}', 'call-' || i)
	  FROM generate_series(1, 3) i;
	SELECT stripe_meter_event_create('seats', jsonb_build_object('stripe_customer_id', 'cus_0', 'value', v),
		'seat-' || v, $base + (10 - v) * interval '1 second')
	  FROM unnest(ARRAY[5, 9, 7]) v;
});

wait_for($node, q{SELECT count(*) FROM stripe_meter.outbox WHERE rollup_window_end IS NOT NULL
	OR identifier LIKE 'stripe_meter_rollup_%'}, '0', 'every closed window rolled up and delivered');
wait_for($node, q{SELECT count(*) FROM stripe_meter.outbox}, '0', 'the outbox is empty');

my $ev = $mock->events;
my @rollups = grep { $_->{identifier} =~ /^stripe_meter_rollup_/ } @$ev;
is(scalar(grep { $_->{event_name} eq 'tokens' } @rollups), 12, 'tokens: one event per customer, model and minute');
is(scalar(grep { $_->{event_name} eq 'calls' } @$ev), 3, 'a count meter\'s events go one by one');
is(scalar(grep { $_->{path} eq '/v1/billing/meter_events' && $_->{body} =~ /(?:^|&)event_name=tokens(?:&|$)/ }
		@{ $mock->requests(limit => 100000) }), 12,
	'tokens: 12 calls to Stripe for 600 events, one per group, window and generation');
is(scalar(grep { $_->{identifier} =~ /^tok-/ } @$ev), 0, 'no rolled-up event reaches Stripe by itself');

my %billed;
$billed{"$_->{payload}{stripe_customer_id}/$_->{payload}{model}"} += $_->{payload}{value}
  for grep { $_->{event_name} eq 'tokens' } @rollups;
my %expected;
$expected{'cus_' . $_ % 3 . '/m' . $_ % 2} += $_ for 1 .. 600;
is_deeply(\%billed, \%expected, 'tokens: Stripe bills each customer and model exactly the events\' sum');
ok(!(grep { keys %{ $_->{payload} } != 3 } grep { $_->{event_name} eq 'tokens' } @rollups),
	'a rollup carries the customer, the dimension and the value');

my ($seat) = grep { $_->{event_name} eq 'seats' } @rollups;
# queued 5, 9, 7, but timestamped 9, 7, 5: the last by timestamp is 5
is($seat->{payload}{value}, '5', 'last: the value of the event with the latest timestamp');
is($node->safe_psql('postgres', qq{SELECT extract(epoch FROM $base + interval '5 seconds')::bigint}),
	$seat->{timestamp}, 'last: with the latest event\'s timestamp');

is($node->safe_psql('postgres', q{
	SELECT count(*) FILTER (WHERE outcome = 'rolled_up' AND rollup_identifier IS NOT NULL AND meter_event IS NULL)
	  FROM stripe_meter.meter_events WHERE identifier LIKE 'tok-%'}), '600',
	'every token event is kept as rolled_up, naming its rollup');
is($node->safe_psql('postgres', q{
	SELECT count(DISTINCT e.rollup_identifier)
	  FROM stripe_meter.meter_events e
	  JOIN stripe_meter.meter_events r ON r.identifier = e.rollup_identifier
	 WHERE e.identifier LIKE 'tok-%' AND r.outcome = 'created' AND r.meter_event IS NOT NULL}), '12',
	'each rollup is recorded once, with Stripe\'s object');
is($node->safe_psql('postgres', q{
	SELECT bool_and(r.events = (SELECT count(*) FROM stripe_meter.meter_events e WHERE e.rollup_identifier = r.identifier))
	  FROM stripe_meter.rollups r}), 't', 'stripe_meter.rollups counts the events of each');
is($node->safe_psql('postgres', q{
	SELECT bool_and(r.ts = (SELECT max(e.ts) FROM stripe_meter.meter_events e WHERE e.rollup_identifier = r.identifier))
	  FROM stripe_meter.meter_events r WHERE r.identifier LIKE 'stripe_meter_rollup_%'}), 't',
	'each rollup carries the timestamp of its latest event');

# Late events for a window already rolled up: a second generation.
$node->safe_psql('postgres', qq{
	SELECT stripe_meter_event_create('tokens',
		'{"stripe_customer_id": "cus_0", "model": "m0", "value": 1000}', 'late-1', $base + interval '3 seconds')});
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events r
	JOIN stripe_meter.meter_events e ON e.rollup_identifier = r.identifier
	WHERE e.identifier = 'late-1' AND r.outcome = 'created'}, '1', 'a late event is delivered in a new rollup');
is($node->safe_psql('postgres', q{
	SELECT r.generation || ':' || r.events FROM stripe_meter.rollups r
	  JOIN stripe_meter.meter_events e ON e.rollup_identifier = r.identifier WHERE e.identifier = 'late-1'}),
	'2:1', 'generation 2 of that window, with the late event alone');

# A sum past Stripe's 15 digits is split.
$node->safe_psql('postgres', qq{
	SELECT stripe_meter_event_create('tokens',
		'{"stripe_customer_id": "cus_big", "value": 999999999999999}', 'big-' || i, $base)
	  FROM generate_series(1, 3) i});
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events r
	WHERE r.identifier IN (SELECT rollup_identifier FROM stripe_meter.meter_events WHERE identifier LIKE 'big-%')
	  AND r.outcome = 'created'}, '3', 'a sum over 15 digits goes as three parts');
my @big = grep { ($_->{payload}{stripe_customer_id} // '') eq 'cus_big' } @{ $mock->events };
is(join(',', map { $_->{payload}{value} } @big), '999999999999999,999999999999999,999999999999999',
	'each part within 15 digits');

# A queued rollup restored from a dump (the owner inserting it) is queued
# again as it is: sent by itself, not rolled up once more.
$node->safe_psql('postgres', q{
	INSERT INTO stripe_meter.outbox (event_name, payload, identifier)
	VALUES ('tokens', '{"stripe_customer_id": "cus_r", "value": 77}', 'stripe_meter_rollup_restored_1_1_1')});
wait_for($node, q{SELECT outcome FROM stripe_meter.meter_events WHERE identifier = 'stripe_meter_rollup_restored_1_1_1'},
	'created', 'a restored rollup is delivered by itself');

# Stripe's 35-day limit applies to the rollup's own timestamp: an event
# that aged past it while it waited (aged here by hand) goes into a rollup
# that fails, never sent.
$node->safe_psql('postgres', q{
	BEGIN;
	SELECT stripe_meter_event_create('tokens', '{"stripe_customer_id": "cus_old", "value": 3}', 'old-1');
	UPDATE stripe_meter.outbox SET ts = now() - interval '36 days',
		rollup_window_end = date_trunc('minute', now() - interval '36 days') + interval '1 minute'
	 WHERE identifier = 'old-1';
	COMMIT;
});
wait_for($node, q{SELECT f.reason FROM stripe_meter.failed_events f
	JOIN stripe_meter.meter_events e ON e.rollup_identifier = f.identifier WHERE e.identifier = 'old-1'},
	'not sent: its timestamp is more than 35 days old, outside the window Stripe accepts',
	'a rollup older than 35 days fails unsent');
is(scalar(grep { ($_->{payload}{stripe_customer_id} // '') eq 'cus_old' } @{ $mock->events }), 0,
	'and Stripe never got it');
# A failed rollup is queued again like any failed event, by a role allowed
# to retry but not to write stripe_meter.rollups: its identifier does not
# stop it (this one is then refused as too old, as any event would be).
$node->safe_psql('postgres',
	q{GRANT EXECUTE ON FUNCTION stripe_meter_retry_failed(text, boolean) TO app});
my $old_rollup = $node->safe_psql('postgres',
	q{SELECT rollup_identifier FROM stripe_meter.meter_events WHERE identifier = 'old-1'});
my ($retry_rc, $retry_out, $retry_err) = $node->psql('postgres',
	qq{SELECT stripe_meter_retry_failed('$old_rollup')}, extra_params => [ '-U', 'app' ]);
like($retry_err, qr/is more than 35 days in the past/, 'retrying a failed rollup checks it as any event');
unlike($retry_err, qr/reserved for rollups/, 'its identifier is not refused');

# An open window: counted apart, not sent.
$node->safe_psql('postgres', q{
	SELECT stripe_meter_event_create('storage', '{"stripe_customer_id": "cus_0", "value": 5}', 'open-1')});
is($node->safe_psql('postgres', q{
	SELECT pending || ',' || rollup_waiting || ',' ||
	       (rollup_oldest_window_end = date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' + interval '1 day')
	  FROM stripe_meter.status}), '0,1,true', 'status: one event waits in a window that ends at midnight UTC');

# A rolled-up event cannot be cancelled by itself.
psql_fails(q{SELECT stripe_meter_event_cancel('tokens', 'tok-1')},
	qr/meter event "tok-1" cannot be cancelled by itself/, 'cancelling a rolled-up event');

my $stats = $mock->stats;
is($stats->{identifiers_billed_multiple_times}, 0, 'no identifier billed twice');
is($stats->{concurrency_violations}, 0, 'one call at a time per customer and meter');

# A crash with rollups in flight, under faults that lose answers: every
# rollup billed once, and each customer's sum exact.
$mock->config({ latency_ms => 400,
	faults => { '500' => 0.05, '503' => 0.05, reset => 0.05, reset_after => 0.05 } });
$node->safe_psql('postgres', qq{
	SELECT stripe_meter_event_create('tokens',
		jsonb_build_object('stripe_customer_id', 'cc_' || i % 200, 'value', i),
		'crash-' || i, $base - interval '20 minutes' + (i % 180) * interval '1 second')
	  FROM generate_series(1, 3000) i});
wait_for($node, q{SELECT count(*) > 0 FROM stripe_meter.outbox
	WHERE identifier LIKE 'stripe_meter_rollup_%' AND sent_at IS NOT NULL}, 't', 'crash: rollups in flight');
$node->stop('immediate');
$node->start;
wait_for($node, q{SELECT count(*) FROM stripe_meter.outbox WHERE identifier LIKE 'stripe_meter_rollup_%'
	OR identifier LIKE 'crash-%'}, '0', 'crash: every rollup delivered after the restart');
$mock->config({ latency_ms => 0, faults => {} });
my (%crash_billed, %crash_expected);
for my $e (grep { ($_->{payload}{stripe_customer_id} // '') =~ /^cc_/ } @{ $mock->events })
{
	$crash_billed{ $e->{payload}{stripe_customer_id} } += $e->{payload}{value};
}
$crash_expected{ 'cc_' . $_ % 200 } += $_ for 1 .. 3000;
is_deeply(\%crash_billed, \%crash_expected, 'crash and faults: each customer billed exactly the events\' sum');
is($node->safe_psql('postgres', q{SELECT count(*) FROM stripe_meter.meter_events
	WHERE identifier LIKE 'crash-%' AND outcome = 'rolled_up'}), '3000', 'crash: every event kept as rolled_up');
is($node->safe_psql('postgres', q{SELECT count(*) FROM stripe_meter.failed_events WHERE customer <> 'cus_old'}),
	'0', 'crash: none failed');
$stats = $mock->stats;
is($stats->{identifiers_billed_multiple_times}, 0, 'crash and faults: no identifier billed twice');

# Reconciling compares Stripe's figures with the rollups, not with the
# events they carry: cus_0's 200 token events (two models, two minutes) and
# the late one went as 5 rollups, 60,300 + 1,000 in all.
$mock->config({ meters => { tokens => { formula => 'sum' } } });
$node->safe_psql('postgres', 'SELECT stripe_meter_sync_meters()');
is($node->safe_psql('postgres', q{SELECT rollup_window FROM stripe_meter.meters WHERE event_name = 'tokens'}),
	'00:01:00', 'a meter sync keeps the rollup window');
is($node->safe_psql('postgres', qq{
	SELECT local_events || ':' || local_value || ':' || stripe_value || ':' || difference
	  FROM stripe_meter_reconcile('tokens', 'cus_0', $base, $base + interval '2 minutes')}),
	'5:61300:61300:0', 'reconcile: the rollups, and Stripe\'s sum, agree');

# API v2: a rollup goes through the meter event stream like any event.
$node->safe_psql('postgres', 'CREATE DATABASE v2db');
$node->safe_psql('v2db', 'CREATE EXTENSION stripe_meter');
$node->safe_psql('postgres', q{ALTER DATABASE v2db SET stripe_meter.api_version = 'v2'});
restart_workers($node, 'v2db');
$node->safe_psql('v2db', qq{
	INSERT INTO stripe_meter.meters (event_name, aggregation) VALUES ('v2tokens', 'sum');
	SELECT stripe_meter_set_rollup_window('v2tokens');
	SELECT stripe_meter_event_create('v2tokens',
		jsonb_build_object('stripe_customer_id', 'cus_v2_' || i % 2, 'value', i), 'v2-' || i,
		$base + (i % 50) * interval '1 second')
	  FROM generate_series(1, 100) i});
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events
	WHERE outcome = 'accepted' AND identifier LIKE 'stripe_meter_rollup_%'}, '2',
	'v2: one rollup per customer, accepted by the stream', 'v2db');
my %v2;
$v2{ $_->{payload}{stripe_customer_id} } += $_->{payload}{value}
  for grep { $_->{event_name} eq 'v2tokens' } @{ $mock->events };
is_deeply(\%v2, { cus_v2_0 => 2550, cus_v2_1 => 2500 }, 'v2: each customer billed the sum of its events');

$node->stop;
$mock->stop;
done_testing();
