# pg_upgrade from an older major: the outbox survives, and the worker starts
# on the new cluster with nothing lost and nothing billed twice.
#
# Needs an older PostgreSQL with the same stripe_meter installed beside the
# one under test (Debian's layout: /usr/lib/postgresql/NN); CI's unstable
# root has 18 and 19, so 18 -> 19 runs there.  Skipped otherwise.
use strict;
use warnings;

use File::Basename qw(dirname);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

my $mock = start_mock();

# The new major: the node's binaries; the old: the newest older sibling
# installation that has this same version of stripe_meter.
# delivery starts turned off on the new cluster: pg_upgrade copies no
# settings, and the queued rows are counted first
my $new = new_node('new', mock => $mock, start => 0,
	conf => { 'stripe_meter.enabled' => 'off' });
my $new_bin = $new->config_data('--bindir');
my ($new_major) = $new->config_data('--version') =~ /(\d+)/;
my $extversion = (slurp_file('stripe_meter.control') =~ /^default_version = '([^']+)'/m)[0];

my ($old_path, $old_major);
for my $dir (glob(dirname(dirname($new_bin)) . '/*'))
{
	next unless $dir =~ m{/(\d+)$} && $1 < $new_major && -x "$dir/bin/pg_upgrade";
	my $major = $1;
	my $sharedir = `"$dir/bin/pg_config" --sharedir`;
	my $pkglibdir = `"$dir/bin/pg_config" --pkglibdir`;
	chomp($sharedir, $pkglibdir);
	next unless -f "$pkglibdir/stripe_meter.so"
	  && -f "$sharedir/extension/stripe_meter--$extversion.sql";
	($old_path, $old_major) = ($dir, $major) if !defined $old_major || $major > $old_major;
}
plan skip_all => "no older PostgreSQL with stripe_meter $extversion installed beside $new_bin"
  unless defined $old_path;
note "pg_upgrade from $old_major ($old_path) to $new_major";

my $old = new_node('old', mock => $mock, install_path => $old_path,
	databases => ['postgres', 'billing']);

sub enqueue
{
	my ($node, $from, $to) = @_;
	$node->safe_psql('billing', join(";\n", map {
		"SELECT stripe_meter_event_create('api_requests', "
		  . "'{\"stripe_customer_id\": \"cus_Upgrade$_\", \"value\": $_}', identifier => 'upgrade-$_')"
	} $from .. $to));
}

# Five delivered on the old cluster, five still queued when it stops.
enqueue($old, 1, 5);
wait_for($old, 'SELECT count(*) FROM stripe_meter.meter_events', '5',
	"old ($old_major): five events delivered", 'billing');
set_conf($old, 'stripe_meter.enabled' => 'off');
wait_for($old, "SELECT paused IS NOT NULL FROM stripe_meter.status", 't',
	'old: delivery turned off', 'billing');
enqueue($old, 6, 10);
is($old->safe_psql('billing', 'SELECT count(*) FROM stripe_meter.outbox'),
	'5', 'old: five events queued');
$old->stop;

# pg_upgrade keeps the outbox, the delivered rows and the extension.
command_ok(
	[
		"$new_bin/pg_upgrade", '--no-sync',
		'-d', $old->data_dir, '-D', $new->data_dir,
		'-b', "$old_path/bin", '-B', $new_bin,
		'-p', $old->port, '-P', $new->port,
		'-s', $new->host
	],
	"pg_upgrade $old_major -> $new_major");

$new->start;
is($new->safe_psql('billing', 'SELECT count(*) FROM stripe_meter.outbox'),
	'5', 'new: the five queued events survived');
is($new->safe_psql('billing', 'SELECT count(*) FROM stripe_meter.meter_events'),
	'5', 'new: the five delivered events are still recorded');
set_conf($new, 'stripe_meter.enabled' => 'on');
wait_for($new, 'SELECT count(*) FROM stripe_meter.outbox', '0',
	"new ($new_major): the queued events are delivered", 'billing');

my $stats = $mock->stats;
is($stats->{billed}, 10, 'the mock billed ten events');
is($stats->{identifiers_billed_multiple_times}, 0, 'none of them twice');
is( $new->safe_psql('billing',
		q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'upgrade-%'}),
	'10', 'all ten recorded as delivered');

$new->stop;
$mock->stop;
done_testing();
