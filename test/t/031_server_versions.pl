# What each PostgreSQL major adds for stripe_meter's users:
#  - 17 and later: pg_stat_activity names what the launcher and the worker
#    wait on (Stripe's answers, events to claim); before 17, "Extension"
#  - 18 and later: pg_get_loaded_modules() shows stripe_meter's name and
#    version
#  - 19: DROP DATABASE, ALTER DATABASE ... RENAME and CREATE DATABASE ...
#    TEMPLATE stop a connected worker instead of failing, and the worker
#    comes back afterwards; before 19 they fail while it is connected
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

my $mock = start_mock();
my $node = new_node('versions', mock => $mock, databases => ['postgres', 'billing']);
my $major = int($node->safe_psql('postgres', 'SHOW server_version_num') / 10000);
note "PostgreSQL $major";

my $control = slurp_file('stripe_meter.control');
my ($version) = $control =~ /^default_version = '([^']+)'/m;

wait_for($node,
	"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'stripe_meter worker' AND datname = 'billing'",
	'1', 'the worker for billing runs');

sub wait_event_of
{
	my ($type, $want, $name) = @_;
	my $where = "backend_type = '$type'";
	$where .= " AND datname = 'billing'" if $type eq 'stripe_meter worker';
	wait_for($node,
		"SELECT string_agg(wait_event_type || '/' || wait_event, ',') FROM pg_stat_activity WHERE $where",
		$want, $name);
}

# --- wait events
if ($major >= 17)
{
	wait_event_of('stripe_meter launcher', 'Extension/StripeMeterLauncher',
		'the launcher waits on StripeMeterLauncher between scans');
	wait_event_of('stripe_meter worker', 'Extension/StripeMeterClaim',
		'an idle worker waits on StripeMeterClaim');

	# answers that take a while: the worker waits on Stripe
	$mock->config({ latency_ms => 4000 });
	$node->safe_psql('billing',
		q{SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_Wait1", "value": 1}')});
	wait_event_of('stripe_meter worker', 'Extension/StripeMeterStripe',
		'with a request in flight, the worker waits on StripeMeterStripe');
	$mock->config({ latency_ms => 0 });
	wait_for($node, 'SELECT count(*) FROM stripe_meter.outbox', '0', 'the slow event is delivered', 'billing');

	is( $node->safe_psql('postgres',
			q{SELECT string_agg(name, ',' ORDER BY name) FROM pg_wait_events WHERE name LIKE 'StripeMeter%' AND type = 'Extension'}
		),
		'StripeMeterClaim,StripeMeterLauncher,StripeMeterStripe',
		'pg_wait_events lists the wait events the processes used');
}
else
{
	wait_event_of('stripe_meter worker', 'Extension/Extension',
		'before 17 the worker waits on the one Extension wait event');
}

# --- the module's name and version
if ($major >= 18)
{
	is( $node->safe_psql('postgres',
			q{SELECT module_name || ' ' || version FROM pg_get_loaded_modules() WHERE file_name LIKE 'stripe_meter%'}
		),
		"stripe_meter $version",
		'pg_get_loaded_modules() shows stripe_meter and its version');
}

# --- database commands and the connected worker
my ($ok, $stdout, $stderr);
if ($major >= 19)
{
	$node->safe_psql('postgres', 'CREATE DATABASE billing_copy TEMPLATE billing');
	pass('CREATE DATABASE ... TEMPLATE copies a database whose worker is connected');
	wait_for($node,
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'stripe_meter worker' AND datname IN ('billing', 'billing_copy')",
		'2', 'the worker comes back for billing, and the copy gets its own');

	$node->safe_psql('billing',
		q{SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_AfterCopy", "value": 2}')});
	wait_for($node, 'SELECT count(*) FROM stripe_meter.meter_events',
		'2', 'billing delivers again after the copy', 'billing');

	$node->safe_psql('postgres', 'ALTER DATABASE billing_copy RENAME TO billing_renamed');
	pass('ALTER DATABASE ... RENAME renames a database whose worker is connected');
	wait_for($node,
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'stripe_meter worker' AND datname = 'billing_renamed'",
		'1', 'the renamed database gets its worker back');

	($ok, $stdout, $stderr) = (0, '', '');
	my $ret = $node->psql('postgres', 'DROP DATABASE billing_renamed', stderr => \$stderr);
	is($ret, 0, 'DROP DATABASE drops a database whose worker is connected');
	wait_for($node,
		"SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_stat_activity WHERE backend_type = 'stripe_meter worker'",
		'billing,postgres', 'the workers for billing and postgres are left');
}
else
{
	my $ret = $node->psql('postgres', 'CREATE DATABASE billing_copy TEMPLATE billing',
		stderr => \$stderr);
	isnt($ret, 0, "before 19, CREATE DATABASE ... TEMPLATE fails while the worker is connected");
	like($stderr, qr/is being accessed by other users/, '... saying the database is in use');
}

$node->stop;
$mock->stop;
done_testing();
