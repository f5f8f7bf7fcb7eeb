# Faults: Stripe failing a fifth of the requests (500s, 503s, 429s,
# timeouts, connection resets, slow and truncated answers), a storm of
# nothing but 429s, Stripe unreachable for a long stretch, and a key Stripe
# refuses with 403.  Every event is delivered once, none twice; the rate
# limiter recovers after the 429s; delivery resumes by itself when Stripe is
# back, and after a key reload when the key was refused.  The 401 pause is
# covered by 003_pause.pl.
#
# Fast: 1,500 events under faults, 6 s unreachable.  Long
# (STRIPE_METER_SOAK=1): 100,000 events under faults, 3 minutes unreachable.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use StripeMeterTest;
use StripeMeterSoak;

my $fault_events = fast_or_long(1500, 100_000);
my $storm_events = fast_or_long(1200, 10_000);
my $down_events = fast_or_long(500, 5000);
my $down_seconds = fast_or_long(6, 180);

my $mock = start_mock(slow_ms => 500, timeout_hold_ms => 5000);
my $node = new_node('faults', mock => $mock,
	conf => {
		'stripe_meter.request_timeout' => 2000,
		'stripe_meter.max_in_flight' => 64,
	});
my @queued;

sub enqueue
{
	my ($prefix, $n) = @_;
	for (my $from = 1; $from <= $n; $from += 10000)
	{
		my $to = $from + 9999 < $n ? $from + 9999 : $n;
		$node->safe_psql('postgres', qq{
			SELECT stripe_meter_event_create('ai_search_api',
				jsonb_build_object('stripe_customer_id', 'cus_' || i % 997, 'value', i),
				'$prefix-' || i)
			  FROM generate_series($from, $to) i});
	}
	push @queued, map { "$prefix-$_" } 1 .. $n;
}

sub count_delivered
{
	my ($prefix) = @_;
	return $node->safe_psql('postgres',
		"SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE '$prefix-%'");
}

# --- 403: the key may not create meter events ----------------------------
$mock->config({ forbidden_keys => [$API_KEY] });
enqueue('forbidden', 5);
wait_for($node, q{SELECT paused LIKE '%403%' FROM stripe_meter.status}, 't',
	'a 403 pauses delivery, and status.paused says so');
unlike($node->safe_psql('postgres', 'SELECT paused FROM stripe_meter.status'),
	qr/\Q$API_KEY\E/, 'status.paused does not show the key');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.outbox'), '5',
	'403: every event stays queued');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.failed_events'), '0',
	'403: none failed');
is($mock->stats->{billed}, 0, '403: nothing billed');
set_conf($node, 'stripe_meter.api_key' => $API_KEY_2);
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'forbidden-%'},
	'5', '403: after a reload with a permitted key, delivered');
wait_for($node, 'SELECT paused IS NULL FROM stripe_meter.status', 't', '403: no longer paused');

# --- a fifth of the requests fail -------------------------------------------
# A steady few percent of 429s (Stripe also answers 429 to lock contention)
# must hold the sender's rate, not collapse it: only a quarter second with a
# tenth or more of 429s halves it (a storm, below).
my %faults = ('500' => 0.035, '503' => 0.02, '429' => 0.035, timeout => 0.02,
	reset => 0.04, slow => 0.02, truncated => 0.03);
$mock->config({ faults => \%faults, latency_ms => 5 });
my $start = time;
enqueue('fault', $fault_events);
wait_drained($node, "under 20% faults, all $fault_events events left the outbox");
my $fault_seconds = time - $start;
is(count_delivered('fault'), $fault_events, 'under faults: all delivered');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.failed_events'), '0',
	'under faults: none failed');
my $stats = $mock->stats;
my $injected = 0;
$injected += $_ for values %{ $stats->{faults_injected} };
my $share = $injected / $stats->{requests};
my %injected_by_fault = %{ $stats->{faults_injected} };
cmp_ok($injected, '>=', 0.1 * $fault_events, "faults were injected ($injected)");
my $resent = $node->safe_psql('postgres',
	q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'fault-%' AND attempts > 1});
my $replayed = $node->safe_psql('postgres',
	q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'fault-%' AND outcome = 'replayed'});
cmp_ok($replayed, '>', 0, "answers lost after billing were replayed ($replayed)");

# --- a storm of 429s ----------------------------------------------------------
$mock->config({ faults => { '429' => 1.0 }, latency_ms => 0 });
my $rl_before = $mock->stats->{by_status}{429} // 0;
enqueue('storm', $storm_events);
my $storm_length = fast_or_long(50, 250);
wait_mock($mock, sub { ($_[0]{by_status}{429} // 0) >= $rl_before + $storm_length },
	"429 storm: $storm_length requests refused");
wait_for($node, q{SELECT last_error LIKE '%429%' FROM stripe_meter.status}, 't',
	'429 storm: status.last_error shows the 429');
is($node->safe_psql('postgres', 'SELECT paused IS NULL FROM stripe_meter.status'), 't',
	'429 storm: delivery is not paused');
is(count_delivered('storm'), '0', '429 storm: nothing delivered during the storm');
$mock->config({ faults => {} });
wait_drained($node, 'after the storm, the queue drained');
# The limiter halves its rate on each 429 down to 2 calls/s; had it not
# grown back, a minute could deliver at most 120 of the storm's events.
my $want = $storm_events < 1200 ? $storm_events : 1200;
wait_for($node, qq{SELECT count(*) >= $want FROM stripe_meter.meter_events
	 WHERE identifier LIKE 'storm-%' AND delivered_at > now() - interval '1 minute'}, 't',
	"after the storm, the delivery rate returned ($want+ of its events in a minute)");
my $rate_after = $node->safe_psql('postgres', 'SELECT delivered_last_minute FROM stripe_meter.status');
is(count_delivered('storm'), $storm_events, '429 storm: all delivered');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.failed_events'), '0',
	'429 storm: none failed');

# --- Stripe unreachable for a long stretch ---------------------------------
set_conf($node, 'stripe_meter.retry_max_delay' => 5000);
$mock->config({ down => 1 });
my $down_at = time;
my $dropped_before = $mock->stats->{dropped_while_down};
my $down_log = -s $node->logfile;
enqueue('down', $down_events);
# A window of requests fails, then one request at a time tries again
# (044_unreachable.pl), rather than every queued event in turn.
$node->wait_for_log(qr/no answer from Stripe to \d+ requests in a row/, $down_log);
pass('unreachable: the worker tried, then went on with one request at a time');
my $dropped_noticed = $mock->stats->{dropped_while_down};
# The outage lasts its length; the worker keeps the events meanwhile.
sleep 1 while time - $down_at < $down_seconds;
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.failed_events'), '0',
	'unreachable: none failed');
my $max_attempts = $node->safe_psql('postgres', 'SELECT max(attempts) FROM stripe_meter.outbox');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.outbox'), $down_events,
	'unreachable: every event still queued');
like($node->safe_psql('postgres', 'SELECT last_error FROM stripe_meter.status'),
	qr/could not get an answer from Stripe/, 'unreachable: status.last_error says so');
my $dropped = $mock->stats->{dropped_while_down} - $dropped_before;
my $probes = $mock->stats->{dropped_while_down} - $dropped_noticed;
# one request at a time, from 500 ms apart up to 5 s apart
cmp_ok($probes, '<=', 10 + $down_seconds / 5,
	"unreachable: $probes requests after the worker noticed, not the queue again and again");
$mock->config({ down => 0 });
my $up_at = time;
wait_drained($node, 'Stripe back: delivery resumed by itself and drained the queue');
my $resume_seconds = time - $up_at;
is(count_delivered('down'), $down_events, 'unreachable: all delivered once Stripe was back');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.failed_events'), '0',
	'none failed at all');

my $r = check_exactly_once($mock, \@queued, 'faults');
$stats = $mock->stats;
figures('faults',
	events => scalar @queued,
	fault_events => $fault_events,
	faults_injected => $injected,
	fault_share => sprintf('%.1f%%', 100 * $share),
	(map { ("fault_$_" => $injected_by_fault{$_} // 0) } sort keys %faults),
	fault_phase_s => sprintf('%.0f', $fault_seconds),
	resent => $resent,
	replayed => $replayed,
	storm_429s => ($stats->{by_status}{429} // 0) - $rl_before,
	delivered_last_minute_after_storm => $rate_after,
	down_s => $down_seconds,
	max_attempts_while_down => $max_attempts,
	dropped_while_down => $dropped,
	drain_after_down_s => sprintf('%.1f', $resume_seconds),
	duplicates => $r->{duplicates},
	lost => $r->{lost});

$node->stop;
$mock->stop;
done_testing();
