# When Stripe gives no answer at all (down, or a TLS handshake the worker
# must refuse), the worker tries one request at a time instead of sending
# and requeueing every queued event for as long as it lasts: that would
# burn a CPU and write each failed attempt to the outbox, so to WAL.  The
# first answer ends it, and a reload (which may fix a CA file or URL) sends
# the next try at once.  Nothing is lost or billed twice either way.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use StripeMeterTest;
use StripeMock;

my $events = 3000;

# --- 1. the server is down: connections accepted and dropped ----------------
my $mock = start_mock(latency_ms => 20);
my $node = new_node('down', mock => $mock,
	conf => { 'stripe_meter.retry_max_delay' => 2000 });
$mock->config({ down => 1 });
my $log_offset = -s $node->logfile;
queue_events($node, 'down', $events, customers => 1000);
$node->wait_for_log(qr/no answer from Stripe to \d+ requests in a row, so it sends one request at a time/,
	$log_offset);
pass('the worker noticed that Stripe does not answer, and said so');
# From now on one request at a time goes out, its delay doubling from 500 ms
# up to 2 s, where every queued event used to go out again at once.  Past
# the requests still on their way when it began, two requests in a row take
# at least 1.5 s, however loaded the machine: poll for that.
my $outbox_attempts = sub { $node->safe_psql('postgres', 'SELECT sum(attempts) FROM stripe_meter.outbox') };
my ($spaced, $attempts);
for my $try (1 .. 8)
{
	my ($t1, $d1, $a1) = (time, $mock->stats->{dropped_while_down}, $outbox_attempts->());
	wait_mock($mock, sub { $_[0]{dropped_while_down} >= $d1 + 2 }, "two more requests ($try)");
	($spaced, $attempts) = (time - $t1, $outbox_attempts->() - $a1);
	last if $spaced >= 1.0;
}
cmp_ok($spaced, '>=', 1.0, sprintf('two requests took %.1f s: one at a time, spaced out', $spaced));
cmp_ok($attempts, '<=', 10, "meanwhile $attempts attempts written to the outbox, not one per queued event");
# (before PostgreSQL 17 every extension waits on "Extension")
my $major = int($node->safe_psql('postgres', 'SHOW server_version_num') / 10000);
my $wait_name = $major >= 17 ? 'StripeMeterUnreachable' : 'Extension';
wait_for($node, qq{SELECT wait_event = '$wait_name' FROM pg_stat_activity
	WHERE backend_type = 'stripe_meter worker'}, 't', "the worker waits for its next probe ($wait_name)");
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.outbox'), $events,
	'every event still queued');
like($node->safe_psql('postgres', 'SELECT last_error FROM stripe_meter.status'),
	qr/could not get an answer from Stripe/, 'status.last_error says why');

# Stripe is back: the next probe is answered and delivery resumes at once.
$log_offset = -s $node->logfile;
$mock->config({ down => 0 });
my $up_at = time;
$node->wait_for_log(qr/Stripe answers again, delivery resumes/, $log_offset);
pass('the first answer ended it');
wait_for($node, 'SELECT count(*) FROM stripe_meter.outbox', '0', 'every event delivered once Stripe was back');
my $resume = time - $up_at;
cmp_ok($resume, '<', 30, sprintf('drained %.1f s after Stripe came back', $resume));
my $s = $mock->stats;
is($s->{billed}, $events, 'the mock billed each event');
is($s->{identifiers_billed_multiple_times}, 0, 'none twice');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.failed_events'), '0', 'none failed');

# A server that fails now and then is not "unreachable": answers in
# between keep the worker at full pace.
$log_offset = -s $node->logfile;
$mock->config({ faults => { reset => 0.2 } });
queue_events($node, 'flaky', 1000, customers => 1000);
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'flaky-%'},
	'1000', 'with one request in five reset, all delivered');
unlike(slurp_file($node->logfile, $log_offset), qr/no answer from Stripe to/,
	'occasional resets never made the worker slow down to a probe');
$node->stop;
$mock->stop;

# --- 2. a TLS handshake the worker refuses: its CA is not configured ---------
my $dir = PostgreSQL::Test::Utils::tempdir;
make_certificates($dir, [ 'server', 'localhost', 'DNS:localhost,IP:127.0.0.1' ]);
delete @ENV{qw(https_proxy HTTPS_PROXY all_proxy ALL_PROXY http_proxy no_proxy NO_PROXY)};
my $tls = StripeMock->new(tls_cert => "$dir/server.pem", tls_key => "$dir/server.key",
	config => { latency_ms => 20 });
my $node2 = new_node('badca', mock => $tls,
	conf => { 'stripe_meter.retry_max_delay' => 2000 });
$log_offset = -s $node2->logfile;
queue_events($node2, 'tls', $events, customers => 1000);
$node2->wait_for_log(qr/no answer from Stripe to \d+ requests in a row/, $log_offset);
pass('refused handshakes count as no answer');
my $pid = worker_pids($node2, 'postgres')->[0];
my $cpu = sub {
	open(my $f, '<', "/proc/$pid/stat") or return 0;
	my @f = split ' ', <$f>;
	close $f;
	return ($f[13] + $f[14]) / 100;
};
my ($hs_spaced, $busy);
for my $try (1 .. 8)
{
	my ($t2, $h1, $cpu1) = (time, $tls->stats->{tls_handshake_failures}, $cpu->());
	wait_mock($tls, sub { $_[0]{tls_handshake_failures} >= $h1 + 2 }, "two more handshakes ($try)");
	($hs_spaced, $busy) = (time - $t2, $cpu->() - $cpu1);
	last if $hs_spaced >= 1.0;
}
cmp_ok($hs_spaced, '>=', 1.0, sprintf('two handshakes took %.1f s: one at a time, spaced out', $hs_spaced));
cmp_ok($busy, '<', $hs_spaced / 2, sprintf('the worker used %.2f s of CPU in those %.1f s', $busy, $hs_spaced));

# The CA file set and reloaded: the next try goes at once, and succeeds.
$log_offset = -s $node2->logfile;
set_conf($node2, 'stripe_meter.ca_file' => "$dir/ca.pem");
$node2->wait_for_log(qr/Stripe answers again/, $log_offset);
wait_for($node2, 'SELECT count(*) FROM stripe_meter.outbox', '0', 'with its CA, every event delivered');
is($tls->stats->{identifiers_billed_multiple_times}, 0, 'none twice');
$node2->stop;

done_testing();
