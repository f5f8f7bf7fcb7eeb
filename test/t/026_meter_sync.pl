# Meters from Stripe: stripe_meter_sync_meters() pages through the account's
# meters into stripe_meter.meters (keys, formula, status, id); after that,
# events for an unknown or inactive meter are refused (or only warned about
# with stripe_meter.unknown_meter = warning), and events use the meter's
# real payload keys.  The worker can sync on a schedule.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

# 105 meters: more than one page of 100.
my %meters = map { sprintf('bulk_%03d', $_) => {} } 1 .. 102;
$meters{storage_gb} = { customer_key => 'customer', value_key => 'gigabytes' };
$meters{retired} = { status => 'inactive' };
$meters{seats} = { formula => 'last' };
my $mock = start_mock(meters => \%meters, strict_meters => JSON::PP::true);
my $node = new_node('meters', mock => $mock);

# A hand-entered row, replaced by what Stripe has.
$node->safe_psql('postgres',
	q{INSERT INTO stripe_meter.meters VALUES ('storage_gb', 'cust', 'gb'), ('local_only', 'c', 'v')});
# Not synced yet: any event name is accepted.
$node->safe_psql('postgres', q{
	SELECT stripe_meter_event_create('made_up', '{"stripe_customer_id": "cus_M", "value": 1}', 'pre-sync')});

is($node->safe_psql('postgres', 'SELECT stripe_meter_sync_meters()'), '105', 'sync returns the number of meters');
my @lists = grep { $_->{method} eq 'GET' && $_->{path} eq '/v1/billing/meters' } @{ $mock->requests(limit => 100000) };
is(scalar @lists, 2, 'two pages read');
my $list = $mock->http->get($mock->url . '/v1/billing/meters?limit=100',
	{ headers => { Authorization => "Bearer $StripeMeterTest::API_KEY" } });
my $first_page = JSON::PP::decode_json($list->{content});
like($lists[1]{headers}{'stripe-version'} // '', qr/^\d{4}-\d\d-\d\d\./, 'Stripe-Version sent');
is($lists[0]{query}, 'limit=100', 'first page: 100 at a time');
my $last_id = $first_page->{data}[-1]{id};
is($lists[1]{query}, "limit=100&starting_after=$last_id", 'second page starts after the first page\'s last meter');

is($node->safe_psql('postgres', q{
	SELECT customer_payload_key || ',' || value_payload_key || ',' || aggregation || ',' || status || ',' || (meter_id LIKE 'mtr_%')
	  FROM stripe_meter.meters WHERE event_name = 'storage_gb'}),
	'customer,gigabytes,sum,active,true', 'storage_gb: Stripe\'s keys, formula, status, id');
is($node->safe_psql('postgres', q{SELECT status FROM stripe_meter.meters WHERE event_name = 'retired'}),
	'inactive', 'retired: inactive');
is($node->safe_psql('postgres', q{SELECT aggregation FROM stripe_meter.meters WHERE event_name = 'seats'}),
	'last', 'seats: last');
is($node->safe_psql('postgres', q{SELECT count(*) FROM stripe_meter.meters WHERE event_name = 'local_only'}),
	'0', 'rows Stripe does not have are removed');
is($node->safe_psql('postgres', q{SELECT meter_id FROM stripe_meter.meters WHERE event_name = 'storage_gb'}),
	(grep { $_->{event_name} eq 'storage_gb' } @{ $first_page->{data} })[0]{id}, 'storage_gb: the meter id Stripe lists');

# Validation now follows Stripe's configuration.
my ($rc, $out, $err) = $node->psql('postgres', q{
	SELECT stripe_meter_event_create('made_up', '{"stripe_customer_id": "cus_M", "value": 1}', 'unknown-1')},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/42704.*no meter for event name "made_up"/s, 'unknown meter refused (42704)');
($rc, $out, $err) = $node->psql('postgres', q{
	SELECT stripe_meter_event_create('retired', '{"stripe_customer_id": "cus_M", "value": 1}', 'retired-1')},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/55000.*inactive/s, 'inactive meter refused (55000)');
($rc, $out, $err) = $node->psql('postgres', q{
	SELECT stripe_meter_event_create('storage_gb', '{"stripe_customer_id": "cus_M", "value": 1}', 'wrong-keys')});
isnt($rc, 0, 'payload without the meter\'s customer key refused');
$node->safe_psql('postgres', q{
	SELECT stripe_meter_event_create('storage_gb', '{"customer": "cus_M", "gigabytes": 7}', 'gb-1')});
wait_for($node, q{SELECT outcome FROM stripe_meter.meter_events WHERE identifier = 'gb-1'},
	'created', 'gb-1: delivered with the meter\'s keys (the mock checks them)');
wait_for($node, q{SELECT count(*) FROM stripe_meter.failed_events WHERE identifier = 'pre-sync'},
	'1', 'pre-sync: the event queued before the sync is refused by Stripe (no meter)');

# warning instead of error
set_conf($node, 'stripe_meter.unknown_meter' => 'warning');
($rc, $out, $err) = $node->psql('postgres', q{
	SELECT stripe_meter_event_create('made_up', '{"stripe_customer_id": "cus_M", "value": 1}', 'warned-1')});
is($rc, 0, 'with unknown_meter = warning the event is queued');
like($err, qr/WARNING:  no meter for event name "made_up"/, 'and a warning says why');
set_conf($node, 'stripe_meter.unknown_meter' => 'error');

# A failed sync changes nothing.
$mock->config({ down => JSON::PP::true });
($rc, $out, $err) = $node->psql('postgres', 'SELECT stripe_meter_sync_meters()',
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/08006.*could not get an answer from Stripe/s, 'Stripe unreachable: 08006');
$mock->config({ down => JSON::PP::false });
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.meters'), '105', 'meters unchanged');

# The worker syncs on a schedule.
my %changed = %meters;
delete $changed{retired};
$changed{new_meter} = { customer_key => 'org' };
$mock->config({ meters => \%changed });
set_conf($node, 'stripe_meter.meter_sync_interval' => 1);
wait_for($node, q{SELECT customer_payload_key FROM stripe_meter.meters WHERE event_name = 'new_meter'},
	'org', 'scheduled sync picked up a new meter');
wait_for($node, q{SELECT count(*) FROM stripe_meter.meters WHERE event_name = 'retired'},
	'0', 'and dropped the deleted one');
is($node->safe_psql('postgres', 'SELECT meters_sync_error IS NULL AND meters_synced_at > now() - interval \'1 minute\' FROM stripe_meter.sync_state'),
	't', 'sync_state records the sync');
set_conf($node, 'stripe_meter.meter_sync_interval' => 0);

$node->stop;
unlike(slurp_file($node->logfile), qr/\Q$StripeMeterTest::API_KEY\E/, 'the key never reaches the log');
$mock->stop;
done_testing();
