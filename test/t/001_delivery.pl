# End to end: events queued through stripe_meter_event_create(), the row
# trigger on a user table and a direct INSERT into the outbox are delivered
# once each, the delivered row keeps what Stripe returned, and the request
# the mock received is exactly the documented form body and headers.
use strict;
use warnings;

use JSON::PP ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

my $mock = start_mock();
my $node = new_node('delivery', mock => $mock);

# A user table billed by a row trigger.
$node->safe_psql('postgres', q{
	CREATE TABLE search_usage (id serial PRIMARY KEY, customer_id text NOT NULL,
		tokens integer NOT NULL);
	CREATE TRIGGER bill_search AFTER INSERT ON search_usage FOR EACH ROW
		EXECUTE FUNCTION stripe_meter_event_trigger('ai_search_api', 'customer_id', 'tokens');
});

# The value of the extra payload key, as UTF-8 bytes (psql sends bytes) and
# as characters (what the mock decodes).
my $odd_bytes = "a b&c=d/\xc3\xa9";
my $odd_chars = "a b&c=d/\x{e9}";

# 1. The function, with a fractional timestamp, the odd value in an extra
#    key and a numeric value.
$node->safe_psql('postgres', qq{
	SELECT stripe_meter_event_create('ai_search_api',
		jsonb_build_object('stripe_customer_id', 'cus_Fn1', 'value', 25, 'note', '$odd_bytes'),
		'evt-fn-1', date_trunc('second', now()) - interval '1 hour' + interval '0.75 second');
});
# 2. The function with a Connect account.
$node->safe_psql('postgres', q{
	SELECT stripe_meter_event_create('ai_search_api',
		'{"stripe_customer_id": "cus_Acct1", "value": "7"}', 'evt-acct-1', NULL,
		'acct_1TapConnect01');
});
# 3. The trigger.
$node->safe_psql('postgres',
	q{INSERT INTO search_usage (customer_id, tokens) VALUES ('cus_Trig1', 42)});
# 4. A direct INSERT into the outbox.
$node->safe_psql('postgres', q{
	INSERT INTO stripe_meter.outbox (event_name, payload, identifier)
	VALUES ('ai_search_api', '{"stripe_customer_id": "cus_Direct1", "value": 3}', 'evt-direct-1');
});

wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events}, '4',
	'all four events delivered');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.outbox'), '0',
	'outbox is empty');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.failed_events'), '0',
	'nothing failed');

my $trig_id = $node->safe_psql('postgres',
	q{SELECT identifier FROM stripe_meter.meter_events WHERE customer = 'cus_Trig1'});
like($trig_id, qr/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/,
	'the trigger event got a UUID identifier');

my %expected_payload = (
	'evt-fn-1' => { stripe_customer_id => 'cus_Fn1', value => '25', note => $odd_chars },
	'evt-acct-1' => { stripe_customer_id => 'cus_Acct1', value => '7' },
	$trig_id => { stripe_customer_id => 'cus_Trig1', value => '42' },
	'evt-direct-1' => { stripe_customer_id => 'cus_Direct1', value => '3' },
);

my %label = ('evt-fn-1' => 'function', 'evt-acct-1' => 'function with account',
	$trig_id => 'trigger', 'evt-direct-1' => 'direct INSERT');

for my $id (sort keys %expected_payload)
{
	my $l = $label{$id};
	my $row = query_json($node, 'postgres', qq{
		SELECT jsonb_build_object(
			'outcome', outcome, 'attempts', attempts, 'request_id', request_id,
			'meter_event', meter_event,
			'created_epoch', extract(epoch FROM created)::bigint,
			'livemode', livemode,
			'ts_floor', floor(extract(epoch FROM ts))::bigint,
			'value_is_string', jsonb_typeof(meter_event->'payload'->'value') = 'string')
		  FROM stripe_meter.meter_events WHERE identifier = '$id'});
	my $billed = mock_events_for($mock, $id);
	is(scalar @$billed, 1, "$l: billed exactly once");
	my $ev = $billed->[0];
	is($row->{outcome}, 'created', "$l: outcome created");
	is($row->{attempts}, 1, "$l: one attempt");
	is($row->{request_id}, $ev->{request_id}, "$l: request_id is the mock's");

	is_deeply($ev->{payload}, $expected_payload{$id},
		"$l: the mock billed the payload values as strings");
	is($ev->{timestamp}, $row->{ts_floor}, "$l: timestamp is the floor of ts");

	# What the mock answered is what is stored.
	is_deeply(
		$row->{meter_event},
		{
			object => 'billing.meter_event',
			created => int($ev->{billed_at} / 1000),
			event_name => 'ai_search_api',
			identifier => $id,
			livemode => JSON::PP::false,
			payload => $expected_payload{$id},
			timestamp => $ev->{timestamp},
		},
		"$l: stored meter_event equals what the mock billed");
	ok($row->{value_is_string}, "$l: stored payload value is a string");
	is($row->{created_epoch}, int($ev->{billed_at} / 1000), "$l: created column set");
	ok(defined $row->{livemode} && !$row->{livemode}, "$l: livemode column is false");
}

my $fn_ts = $node->safe_psql('postgres',
	q{SELECT floor(extract(epoch FROM ts))::bigint FROM stripe_meter.meter_events WHERE identifier = 'evt-fn-1'});
my $trunc = $node->safe_psql('postgres',
	q{SELECT extract(epoch FROM ts - interval '0.75 second')::bigint FROM stripe_meter.meter_events WHERE identifier = 'evt-fn-1'});
is($fn_ts, $trunc, 'a fractional timestamp is rounded down, not to nearest');

# The exact requests.
my %req;
for my $id (keys %expected_payload)
{
	my $r = requests_for($mock, $id);
	is(scalar @$r, 1, "$label{$id}: exactly one request");
	$req{$id} = $r->[0];
}

is($req{'evt-fn-1'}{body},
	'event_name=ai_search_api'
	  . '&payload[note]=a%20b%26c%3Dd%2F%C3%A9'
	  . '&payload[value]=25'
	  . '&payload[stripe_customer_id]=cus_Fn1'
	  . '&identifier=evt-fn-1'
	  . "&timestamp=$fn_ts",
	'function event: exact form body, values percent-encoded');
is($req{'evt-acct-1'}{body},
	'event_name=ai_search_api&payload[value]=7&payload[stripe_customer_id]=cus_Acct1'
	  . '&identifier=evt-acct-1&timestamp='
	  . $node->safe_psql('postgres',
		q{SELECT floor(extract(epoch FROM ts))::bigint FROM stripe_meter.meter_events WHERE identifier = 'evt-acct-1'}),
	'account event: exact form body');
is($req{$trig_id}{body},
	'event_name=ai_search_api&payload[value]=42&payload[stripe_customer_id]=cus_Trig1'
	  . "&identifier=$trig_id&timestamp="
	  . $node->safe_psql('postgres',
		qq{SELECT floor(extract(epoch FROM ts))::bigint FROM stripe_meter.meter_events WHERE identifier = '$trig_id'}),
	'trigger event: exact form body');
is($req{'evt-direct-1'}{body},
	'event_name=ai_search_api&payload[value]=3&payload[stripe_customer_id]=cus_Direct1'
	  . '&identifier=evt-direct-1&timestamp='
	  . $node->safe_psql('postgres',
		q{SELECT floor(extract(epoch FROM ts))::bigint FROM stripe_meter.meter_events WHERE identifier = 'evt-direct-1'}),
	'direct insert event: exact form body');

is(mock_events_for($mock, 'evt-fn-1')->[0]{payload}{note}, $odd_chars,
	'the mock decoded the odd value back exactly');

for my $id (sort keys %req)
{
	my $h = $req{$id}{headers};
	# This test is about the Authorization header: compare it in full, but
	# do not print the key if it differs.
	ok(defined $h->{authorization} && $h->{authorization} eq "Bearer $API_KEY",
		"$label{$id}: Authorization: Bearer <the configured key>");
	is($h->{'stripe-version'}, '2026-09-30.endive', "$label{$id}: default Stripe-Version");
	is($h->{'idempotency-key'}, "meter_event:$id", "$label{$id}: Idempotency-Key is meter_event: and the identifier");
	like($h->{'user-agent'} // '', qr{^stripe_meter/}, "$label{$id}: User-Agent names stripe_meter");
	is($h->{'content-type'}, 'application/x-www-form-urlencoded', "$label{$id}: Content-Type");
	if ($id eq 'evt-acct-1')
	{
		is($h->{'stripe-account'}, 'acct_1TapConnect01', "$label{$id}: Stripe-Account sent");
		is(mock_events_for($mock, $id)->[0]{account}, 'acct_1TapConnect01',
			"$label{$id}: billed to the connected account");
	}
	else
	{
		ok(!exists $h->{'stripe-account'}, "$label{$id}: no Stripe-Account header");
	}
}

# What users look at.
is( $node->safe_psql('postgres',
		q{SELECT pending || ',' || in_flight || ',' || delivered || ',' || failed || ',' ||
				 delivered_last_minute || ',' || (paused IS NULL) || ',' || (worker_pid IS NOT NULL)
			FROM stripe_meter.status}),
	'0,0,4,0,4,true,true',
	'status: nothing pending or in flight, 4 delivered, not paused, a worker');
is( $node->safe_psql('postgres',
		q{SELECT count(*) FROM pg_stat_activity
		   WHERE backend_type = 'stripe_meter worker' AND datname = current_database()}),
	'1', 'pg_stat_activity has one stripe_meter worker for the database');
is( $node->safe_psql('postgres',
		q{SELECT s.worker_pid = a.pid FROM stripe_meter.status s, pg_stat_activity a
		   WHERE a.backend_type = 'stripe_meter worker' AND a.datname = current_database()}),
	't', 'status.worker_pid is that backend');

my $stats = $mock->stats;
is($stats->{billed}, 4, 'mock billed 4 events');
is($stats->{identifiers_billed_multiple_times}, 0, 'no identifier billed twice');

$node->stop;
$mock->stop;
done_testing();
