# Delivery pauses, keeping every event queued, when Stripe refuses the key
# (401) or when stripe_meter.enabled is off; it resumes after a reload that
# fixes the cause.  The key never reaches the server log.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use StripeMeterTest;

my $mock = start_mock();
my $node = new_node('pause', mock => $mock);
my $log_start = -s $node->logfile;

sub enqueue_n
{
	my ($prefix, $n) = @_;
	$node->safe_psql('postgres', qq{
		SELECT stripe_meter_event_create('ai_search_api',
			jsonb_build_object('stripe_customer_id', 'cus_' || i, 'value', i), '$prefix-' || i)
		  FROM generate_series(1, $n) i});
}

# --- Stripe refuses the key -------------------------------------------------
$mock->config({ auth_phase => '401' });
enqueue_n('k', 5);

wait_for($node, q{SELECT paused LIKE '%401%' FROM stripe_meter.status}, 't',
	'status.paused mentions the 401');
my $paused = $node->safe_psql('postgres', 'SELECT paused FROM stripe_meter.status');
ok($paused !~ /\Q$API_KEY\E/, 'status.paused does not show the key');
cmp_ok($mock->stats->{by_status}{401} // 0, '>=', 1, 'the mock answered 401');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.outbox'), '5',
	'all events stay in the outbox');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.failed_events'), '0',
	'none failed');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.meter_events'), '0',
	'none delivered');

# Events queued while paused are not sent either: once the reload resumes
# delivery, each of them is sent exactly once (checked below).
enqueue_n('k-late', 2);

my $log = slurp_file($node->logfile, $log_start);
my @pause_lines = ($log =~ /^.*stripe_meter worker paused delivery.*$/mg);
is(scalar @pause_lines, 1, 'one pause LOG line');
like($pause_lines[0] // '', qr/LOG:.*401/, 'the pause line is a LOG naming the 401');

# Fix it: the mock accepts keys again, and a new key is loaded.
my $requests_before = scalar @{ meter_requests($mock) };
$mock->config({ auth_phase => undef });
set_conf($node, 'stripe_meter.api_key' => $API_KEY_2);
wait_for($node, 'SELECT count(*) FROM stripe_meter.meter_events', '7',
	'after a reload with a new key, everything is delivered');
wait_for($node, 'SELECT paused IS NULL FROM stripe_meter.status', 't', 'no longer paused');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.outbox'), '0', 'outbox empty');
{
	# pauses.c PauseDelivery(NULL) logs the resume only when pause_reason is
	# set, but the reload path clears pause_reason just before calling it.
	ok(slurp_file($node->logfile, $log_start) =~ /stripe_meter worker resumed delivery/,
		'a LOG line says delivery resumed');
}

my @new = @{ meter_requests($mock) }[ $requests_before .. $#{ meter_requests($mock) } ];
ok((@new && !grep { ($_->{headers}{authorization} // '') ne "Bearer $API_KEY_2" } @new),
	'every request after the reload carries the new key');
for my $id (map { ("k-$_") } 1 .. 5)
{
	is(scalar @{ mock_events_for($mock, $id) }, 1, "$id: billed once");
}
for my $id ('k-late-1', 'k-late-2')
{
	is(scalar @{ requests_for($mock, $id) }, 1, "$id (queued while paused): sent once, after the fix");
}
is($mock->stats->{identifiers_billed_multiple_times}, 0, 'no identifier billed twice');

# --- stripe_meter.enabled = off ------------------------------------------------
set_conf($node, 'stripe_meter.enabled' => 'off');
wait_for($node, q{SELECT paused LIKE '%stripe_meter.enabled%' FROM stripe_meter.status}, 't',
	'status.paused says delivery is turned off');
my $requests_off = scalar @{ meter_requests($mock) };

# A paused worker sleeps: it wakes for what it has to do (a reload, upkeep,
# new events), not every millisecond.  Each wait it sleeps in is a voluntary
# context switch; a loop that spins on a short timeout makes hundreds a
# second.  Counted over what the test does while it is off anyway.
sub sleeps_of
{
	my ($pid) = @_;
	my $status = slurp_file("/proc/$pid/status");
	return $status =~ /^voluntary_ctxt_switches:\s+(\d+)/m ? $1 : undef;
}
my ($paused_pid) = @{ worker_pids($node, 'postgres') };
my $sleeps_before = sleeps_of($paused_pid);
my $span_start = time;

enqueue_n('off', 3);
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.outbox WHERE attempts = 0'),
	'3', 'events queued while off are not attempted');
# (before PostgreSQL 17 every extension waits on "Extension")
my $major = int($node->safe_psql('postgres', 'SHOW server_version_num') / 10000);
my $wait_name = $major >= 17 ? 'StripeMeterPaused' : 'Extension';
wait_for($node, qq{SELECT wait_event = '$wait_name' FROM pg_stat_activity WHERE pid = $paused_pid},
	't', "the paused worker sleeps ($wait_name)");

my $sleeps = sleeps_of($paused_pid) - $sleeps_before;
my $span = time - $span_start;
# a few wake-ups for the new events and upkeep; a spinning loop makes
# hundreds a second, so even a short span shows it
cmp_ok($sleeps, '<', 10 + 20 * $span,
	sprintf('the paused worker woke %d times in %.2f seconds', $sleeps, $span));

my $on_at = time;
set_conf($node, 'stripe_meter.enabled' => 'on');
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'off-%'},
	'3', 'turned on again: delivered');
wait_for($node, 'SELECT paused IS NULL FROM stripe_meter.status', 't', 'no longer paused');
my @off_requests = @{ meter_requests($mock) }[ $requests_off .. $#{ meter_requests($mock) } ];
is(scalar @off_requests, 3, 'one request per event, no more');
ok(!grep({ $_->{time} < int($on_at * 1000) } @off_requests),
	'nothing was sent before delivery was turned on again');
is($node->safe_psql('postgres',
		q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'off-%' AND attempts = 1}),
	'3', 'each was attempted once');

# --- the URL is wrong: Stripe's 404 ------------------------------------------
set_conf($node, 'stripe_meter.api_url' => $mock->url . '/wrong-prefix');
enqueue_n('url', 2);
wait_for($node, q{SELECT paused LIKE '%404%' FROM stripe_meter.status}, 't',
	'a 404 pauses delivery, and status.paused says so');
like($node->safe_psql('postgres', 'SELECT paused FROM stripe_meter.status'),
	qr/stripe_meter\.api_url/, 'status.paused points at stripe_meter.api_url');
is($node->safe_psql('postgres', q{SELECT count(*) FROM stripe_meter.outbox WHERE identifier LIKE 'url-%'}),
	'2', 'the events stay queued');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.failed_events'), '0',
	'none failed');
set_conf($node, 'stripe_meter.api_url' => $mock->url);
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'url-%'},
	'2', 'with the URL fixed, delivered');
wait_for($node, 'SELECT paused IS NULL FROM stripe_meter.status', 't', 'no longer paused');

# The keys never reach the log (the pause line shows only a masked key).
$log = slurp_file($node->logfile, 0);
ok($log !~ /\Q$API_KEY\E/, 'the server log does not contain the first key');
ok($log !~ /\Q$API_KEY_2\E/, 'the server log does not contain the new key');
is($mock->stats->{identifiers_billed_multiple_times}, 0, 'no identifier billed twice');

$node->stop;
$mock->stop;
done_testing();
