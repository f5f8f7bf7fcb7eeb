# The worker's memory stays flat while it delivers a long stream of events:
# its private memory (RssAnon) after the last batch is within a generous
# bound of what it was after a warm-up batch.  The figures line reports
# VmRSS (which also counts the shared buffers it touched) and RssAnon at
# the worker's start, after warm-up and at the end.
#
# Fast: 20,000 events.  Long (STRIPE_METER_SOAK=1): 1,000,000.  The mock is
# reset after each batch (once that batch is checked billed once each) so
# its own memory does not grow with the run.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use StripeMeterTest;
use StripeMeterSoak;

my $total = fast_or_long(20_000, 1_000_000);
my $batch = fast_or_long(5_000, 50_000);

my $mock = start_mock();
my $node = new_node('memory', mock => $mock);
my $pids = worker_pids($node, 'postgres');
is(scalar @$pids, 1, 'one worker');
my $worker = $pids->[0];
my $mem_start = worker_memory($worker);

my ($mem_warm, $delivered, $billed, $duplicates) = (undef, 0, 0, 0);
my $start = time;
for (my $from = 1; $from <= $total; $from += $batch)
{
	my $to = $from + $batch - 1;
	$to = $total if $to > $total;
	$node->safe_psql('postgres', qq{
		SELECT stripe_meter_event_create('ai_search_api',
			jsonb_build_object('stripe_customer_id', 'cus_' || i % 1000, 'value', i, 'note', 'memory test'),
			'mem-' || i)
		  FROM generate_series($from, $to) i});
	$node->poll_query_until('postgres', 'SELECT count(*) FROM stripe_meter.outbox', '0')
	  or BAIL_OUT("events $from..$to not delivered");

	my $stats = $mock->stats;
	$billed += $stats->{billed};
	$duplicates += $stats->{identifiers_billed_multiple_times};
	$mock->reset;
	$mem_warm //= worker_memory($worker);
	note(sprintf('%d delivered, anon %d kB', $to, worker_memory($worker)->{anon_kb}));
}
my $seconds = time - $start;
my $mem_end = worker_memory($worker);

is_deeply(worker_pids($node, 'postgres'), [$worker], 'one worker delivered everything');
$delivered = $node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.meter_events');
is($delivered, $total, "meter_events holds all $total events");
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.failed_events'), '0', 'none failed');
is($billed, $total, 'the mock billed each event (counted per batch)');
is($duplicates, 0, 'no identifier billed twice within a batch');

my $growth_kb = $mem_end->{anon_kb} - $mem_warm->{anon_kb};
SKIP:
{
	skip 'memory bounds do not apply under AddressSanitizer', 1 unless memory_bound_applies();
	cmp_ok($growth_kb, '<', 16 * 1024,
		"the worker's private memory after $total events is within 16 MiB of after warm-up ($growth_kb kB)");
}

figures('memory',
	events => $total,
	seconds => sprintf('%.0f', $seconds),
	rss_kb_start => $mem_start->{rss_kb},
	rss_kb_warm => $mem_warm->{rss_kb},
	rss_kb_end => $mem_end->{rss_kb},
	anon_kb_start => $mem_start->{anon_kb},
	anon_kb_warm => $mem_warm->{anon_kb},
	anon_kb_end => $mem_end->{anon_kb},
	duplicates => $duplicates,
	lost => $total - $delivered);

$node->stop;
$mock->stop;
done_testing();
