# The API key stays secret from every non-superuser, and out of the server
# log, at the default log level and at debug5, through key rotation,
# delivery and every error path; and a monitoring role can do exactly what
# the Privileges section of doc/security.md grants, nothing more.
#
# (test/t/003 checks the pause line and status.paused; sql/privileges.sql
# checks SHOW and current_setting for an application role and its GRANTs.)
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

# The part of each key that is never shown, not even masked to superusers
# (who see the prefix and the last four characters).
my @SECRETS = map { substr($_, 8, length($_) - 12) } $API_KEY, $API_KEY_2;
my $API_KEY_3 = 'sk_test_' . 'ThirdKeyDebug5zz';
push @SECRETS, substr($API_KEY_3, 8, 8);
my $MALFORMED = 'sk_test_Has Space' . 'Secret99';
push @SECRETS, 'Space' . 'Secret99';

sub leaks
{
	my ($text) = @_;
	return grep { index($text, $_) >= 0 } @SECRETS;
}

my $mock = start_mock();
my $node = new_node('secrets', mock => $mock);
my $log_start = 0;

# Roles: doc/security.md's application and monitoring roles, and a role with
# PostgreSQL's own monitoring privileges, which may read every setting and
# every session's query.
$node->safe_psql('postgres', q{
	CREATE ROLE app LOGIN;
	GRANT USAGE ON SCHEMA stripe_meter TO app;
	GRANT INSERT (event_name, payload, identifier, ts, stripe_account) ON stripe_meter.outbox TO app;
	GRANT EXECUTE ON FUNCTION stripe_meter_event_create(text, jsonb, text, timestamptz, text) TO app;
	GRANT EXECUTE ON FUNCTION stripe_meter_event_trigger() TO app;
	CREATE ROLE monitor LOGIN;
	GRANT USAGE ON SCHEMA stripe_meter TO monitor;
	GRANT SELECT ON stripe_meter.status TO monitor;
	GRANT EXECUTE ON FUNCTION stripe_meter.worker_state() TO monitor;
	CREATE ROLE dba_reader LOGIN IN ROLE pg_monitor, pg_read_all_settings, pg_read_all_stats;
});

# Runs $sql as $role; returns stdout and stderr together, errors with their
# SQLSTATE.
sub as_role
{
	my ($role, $sql) = @_;
	my ($out, $err) = ('', '');
	$node->psql('postgres', "\\set VERBOSITY verbose\n$sql",
		extra_params => [ '-U', $role ], stdout => \$out, stderr => \$err);
	return "$out\n$err";
}


queue_events($node, 'first', 3, value => 'i');
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events}, '3', 'delivery works with the key');

# --- what each role can see ----------------------------------------------------
my %probe = (
	'SHOW' => 'SHOW stripe_meter.api_key;',
	'current_setting' => q{SELECT current_setting('stripe_meter.api_key');},
	'current_setting missing_ok' => q{SELECT current_setting('stripe_meter.api_key', true);},
	'SHOW ALL' => 'SHOW ALL;',
	'pg_settings' => q{SELECT s::text FROM pg_settings s WHERE name LIKE 'stripe%';},
	'pg_show_all_settings' => q{SELECT s::text FROM pg_show_all_settings() s WHERE name LIKE 'stripe%';},
	'pg_file_settings' => q{SELECT f::text FROM pg_file_settings f;},
	'pg_stat_activity' => q{SELECT a::text FROM pg_stat_activity a;},
	'pg_db_role_setting' => q{SELECT s::text FROM pg_db_role_setting s;},
	'status' => q{SELECT s::text FROM stripe_meter.status s;},
	'worker_state' => q{SELECT w::text FROM stripe_meter.worker_state() w;},
);
for my $role ('app', 'monitor', 'dba_reader')
{
	for my $name (sort keys %probe)
	{
		my $out = as_role($role, $probe{$name});
		ok(!leaks($out), "$role: $name does not show the key");
	}
}
like(as_role('app', $probe{SHOW}), qr/42501/, 'app: SHOW of the key is refused');
like(as_role('app', $probe{current_setting}), qr/42501/, 'app: current_setting of the key is refused');
like(as_role('monitor', $probe{SHOW}), qr/42501/, 'monitor: SHOW of the key is refused');
like(as_role('app', $probe{pg_file_settings}), qr/42501/, 'app: pg_file_settings is refused');
like(as_role('dba_reader', $probe{pg_file_settings}), qr/42501/,
	'even a pg_read_all_settings member cannot read pg_file_settings');
my $dba_show = as_role('dba_reader', $probe{SHOW});
like($dba_show, qr/^\*{8}$/m, 'a pg_read_all_settings member sees only ********');
like($node->safe_psql('postgres', 'SHOW stripe_meter.api_key'), qr/^sk_test_\*{8}abcd$/,
	'a superuser sees the prefix and the last four characters');
ok(!leaks($node->safe_psql('postgres', q{SELECT s::text FROM pg_settings s WHERE name LIKE 'stripe%'})),
	'not even a superuser sees the key in pg_settings');

# Setting it, from any role, fails without echoing the value.
# (log_statement = all logs these statements as typed: that is the
# session's own text, so this value is not one of the secrets above)
my $typed = 'sk_test_' . 'TypedByAttacker77';
for my $role ('app', 'monitor', 'dba_reader')
{
	for my $sql ("SET stripe_meter.api_key = '$typed';",
		"SELECT set_config('stripe_meter.api_key', '$typed', false);",
		"ALTER SYSTEM SET stripe_meter.api_key = '$typed';",
		"ALTER ROLE $role SET stripe_meter.api_key = '$typed';",
		"SET stripe_meter.api_url = 'https://attacker.example';",
		"ALTER SYSTEM SET stripe_meter.ca_file = '/tmp/attacker.pem';")
	{
		my $out = as_role($role, $sql);
		like($out, qr/ERROR:  (42501|55P02)/, "$role: refused: $sql");
		my @l = grep { index($out, $_) >= 0 } 'TypedByAttacker77';
		ok(!@l, "$role: the error does not repeat the value");
	}
}
# A superuser cannot store it in a catalog either: it is a reload setting.
my ($rc, $out, $err) = $node->psql('postgres',
	"\\set VERBOSITY verbose\nALTER DATABASE postgres SET stripe_meter.api_key = '$typed'");
like($err, qr/ERROR:  55P02/, 'ALTER DATABASE SET of the key is refused');
unlike($err, qr/TypedByAttacker77/, '... without repeating it');
is($node->safe_psql('postgres', 'SELECT count(*) FROM pg_db_role_setting'), '0',
	'no key stored in pg_db_role_setting');

# --- the monitoring role can do what doc/security.md grants, and nothing else ----
like(as_role('monitor', 'SELECT delivered FROM stripe_meter.status;'), qr/^3$/m,
	'monitor reads stripe_meter.status');
like(as_role('monitor', 'SELECT worker_pid IS NOT NULL FROM stripe_meter.worker_state();'), qr/^t$/m,
	'monitor calls worker_state()');
for my $sql ('SELECT count(*) FROM stripe_meter.outbox;',
	'SELECT count(*) FROM stripe_meter.meter_events;',
	'SELECT count(*) FROM stripe_meter.failed_events;',
	'SELECT count(*) FROM stripe_meter.meters;',
	q{SELECT stripe_meter_event_create('api_requests', '{"stripe_customer_id": "cus_M", "value": 1}');},
	q{INSERT INTO stripe_meter.outbox (event_name, payload) VALUES ('api_requests', '{"stripe_customer_id": "cus_M", "value": 1}');},
	'SELECT stripe_meter_retry_failed();',
	q{INSERT INTO stripe_meter.meters VALUES ('x', 'a', 'b');},
	'SELECT stripe_meter.launcher_notify();',
	'SELECT pg_reload_conf();')
{
	like(as_role('monitor', $sql), qr/ERROR:  42501/, "monitor is refused: $sql");
}

# --- the server log, at the default level, then at debug5 --------------------
sub exercise
{
	my ($phase, $new_key) = @_;
	# rotate through the configuration file, as an operator would
	$node->append_conf('postgresql.conf', "stripe_meter.api_key = '$new_key'\n");
	$node->reload;
	queue_events($node, "$phase-ok", 3, value => 'i');
	wait_for($node, qq{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE '$phase-ok-%'},
		'3', "$phase: delivered with the rotated key");

	# Stripe refuses the key: delivery pauses, the worker logs why
	$mock->config({ auth_phase => '401' });
	queue_events($node, "$phase-401", 2, value => 'i');
	wait_for($node, q{SELECT paused LIKE '%401%' FROM stripe_meter.status}, 't', "$phase: paused on 401");
	$mock->config({ auth_phase => undef });

	# a malformed key: the worker says what is wrong, without the key
	$node->append_conf('postgresql.conf', "stripe_meter.api_key = '$MALFORMED'\n");
	$node->reload;
	wait_for($node, q{SELECT paused LIKE '%spaces%' FROM stripe_meter.status}, 't',
		"$phase: a malformed key pauses delivery");
	ok(!leaks($node->safe_psql('postgres', 'SELECT s::text FROM stripe_meter.status s')),
		"$phase: status does not show the malformed key");

	# an invalid URL is refused at reload; the old settings stay
	my $offset = -s $node->logfile;
	$node->append_conf('postgresql.conf', "stripe_meter.api_url = 'http://192.0.2.1/'\n");
	$node->reload;
	$node->wait_for_log(qr/invalid value for parameter "stripe_meter.api_url"/, $offset);

	# back to a good key and URL: what was queued is delivered
	$node->append_conf('postgresql.conf',
		"stripe_meter.api_key = '$new_key'\nstripe_meter.api_url = '" . $mock->url . "'\n");
	$node->reload;
	wait_for($node, qq{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE '$phase-401-%'},
		'2', "$phase: delivered after the key is fixed");
}

exercise('default', $API_KEY_2);
my $log = slurp_file($node->logfile, $log_start);
like($log, qr/stripe_meter worker paused delivery/, 'default level: the pause was logged');
like($log, qr/invalid value for parameter "stripe_meter.api_url"/, 'default level: the bad URL was logged');
ok(!leaks($log), 'default level: no key in the server log');

$log_start = -s $node->logfile;
$node->append_conf('postgresql.conf', "log_min_messages = debug5\nlog_min_error_statement = debug5\n");
$node->reload;
exercise('debug5', $API_KEY_3);
$log = slurp_file($node->logfile, $log_start);
like($log, qr/DEBUG:/, 'debug5: debug messages were logged');
ok(!leaks($log), 'debug5: no key in the server log');

# the whole log, once more, and pg_stat_activity while the worker runs
ok(!leaks(slurp_file($node->logfile)), 'the whole server log holds no key');
ok(!leaks(as_role('dba_reader', $probe{pg_stat_activity})),
	'pg_stat_activity, read by a pg_read_all_stats member, holds no key');

$node->stop;
$mock->stop;
done_testing();
