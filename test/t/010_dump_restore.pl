# pg_dump keeps the queue: a database with queued events restores into a new
# database with the same events (identifiers, payloads, timestamps, queue
# state), and new events there get ids that do not collide with restored
# ones (the identity sequence is dumped with the data).
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

my $mock = start_mock();
# Delivery off, so the events stay queued.
my $node = new_node('dump', mock => $mock, conf => { 'stripe_meter.enabled' => 'off' });
wait_for($node, q{SELECT paused LIKE '%stripe_meter.enabled%' FROM stripe_meter.status}, 't',
	'delivery is paused');

$node->safe_psql('postgres', qq{
	INSERT INTO stripe_meter.meters (event_name, customer_payload_key, value_payload_key)
	VALUES ('gpu_seconds', 'customer', 'seconds');
	CREATE TABLE usage (customer_id text, tokens bigint);
	CREATE TRIGGER bill AFTER INSERT ON usage FOR EACH ROW
		EXECUTE FUNCTION stripe_meter_event_trigger('ai_search_api', 'customer_id', 'tokens');
	SELECT stripe_meter_event_create('ai_search_api',
		jsonb_build_object('stripe_customer_id', 'cus_' || i % 10, 'value', i), 'dump-' || i)
	  FROM generate_series(1, 100) i;
	SELECT stripe_meter_event_create('ai_search_api',
		jsonb_build_object('stripe_customer_id', 'cus_X', 'value', 1, 'note', 'a b&c=d/\xc3\xa9'),
		'dump-odd', now() - interval '2 days', 'acct_1DumpTest');
	SELECT stripe_meter_event_create('gpu_seconds', '{"customer": "cus_G", "seconds": 30}');
	INSERT INTO usage VALUES ('cus_T', 42);
	INSERT INTO stripe_meter.outbox (event_name, payload, identifier)
	VALUES ('ai_search_api', '{"stripe_customer_id": "cus_D", "value": 5}', 'dump-direct');
});
my $queue_sql = q{SELECT jsonb_agg(to_jsonb(o) ORDER BY id) FROM stripe_meter.outbox o};
my $queue = query_json($node, 'postgres', $queue_sql);
is(scalar @$queue, 104, '104 events queued');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.outbox WHERE attempts > 0'), '0',
	'none attempted');

my $tempdir = PostgreSQL::Test::Utils::tempdir;
$node->command_ok([ 'pg_dump', '-d', 'postgres', '-f', "$tempdir/plain.sql" ], 'pg_dump (plain)');
$node->command_ok([ 'pg_dump', '-Fc', '-d', 'postgres', '-f', "$tempdir/custom.dump" ],
	'pg_dump (custom)');

$node->safe_psql('postgres', 'CREATE DATABASE restored_plain');
$node->command_ok([ 'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', 'restored_plain',
		'-f', "$tempdir/plain.sql" ], 'restore the plain dump with psql');
$node->safe_psql('postgres', 'CREATE DATABASE restored_custom');
$node->command_ok([ 'pg_restore', '--exit-on-error', '-d', 'restored_custom',
		"$tempdir/custom.dump" ], 'restore the custom dump with pg_restore');

for my $db ('restored_plain', 'restored_custom')
{
	is_deeply(query_json($node, $db, $queue_sql), $queue,
		"$db: the queue is intact (ids, identifiers, payloads, timestamps, state)");
	is( $node->safe_psql($db, q{
			SELECT customer_payload_key || ',' || value_payload_key FROM stripe_meter.meters
			 WHERE event_name = 'gpu_seconds'}),
		'customer,seconds', "$db: the meters are restored");

	my $max_id = $node->safe_psql($db, 'SELECT max(id) FROM stripe_meter.outbox');
	$node->safe_psql($db, qq{
		SELECT stripe_meter_event_create('ai_search_api',
			jsonb_build_object('stripe_customer_id', 'cus_new', 'value', i), '$db-new-' || i)
		  FROM generate_series(1, 5) i;
		INSERT INTO stripe_meter.outbox (event_name, payload)
		VALUES ('ai_search_api', '{"stripe_customer_id": "cus_new", "value": 9}');
	});
	is( $node->safe_psql($db,
			"SELECT count(*) FROM stripe_meter.outbox WHERE id > $max_id"),
		'6', "$db: new events get ids above the restored ones");
	is($node->safe_psql($db, 'SELECT count(*) FROM stripe_meter.outbox'), '110',
		"$db: restored and new events side by side");

	# A restored identifier is still known: it cannot be queued again.
	my ($rc, $out, $err) = $node->psql($db, q{
		SELECT stripe_meter_event_create('ai_search_api',
			'{"stripe_customer_id": "cus_1", "value": 1}', 'dump-1')});
	isnt($rc, 0, "$db: a restored identifier cannot be queued twice");
	like($err, qr/already queued/, "$db: ... because it is queued");
}

is($mock->stats->{requests}, 0, 'nothing was sent while delivery was off');

$node->stop;
$mock->stop;
done_testing();
