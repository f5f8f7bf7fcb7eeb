# Meter event sessions expire (Stripe: after 15 minutes).  The worker asks
# for the next session before the current one expires, so a steady stream
# never meets an expired token; and when Stripe answers 401
# billing_meter_event_session_expired anyway (here: sessions expired on
# demand, also with many batches in flight), the events are sent again
# with a new session, nothing lost, nothing billed twice, and no attempt
# counted for the refused request.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);

use StripeMeterTest;

# Sessions of 8 s: the worker renews 2 s (a quarter) before expiry.
my $mock = start_mock(session_ttl_s => 8);
my $node = new_node('v2sess', mock => $mock,
	conf => {
		'stripe_meter.api_version' => 'v2',
		'stripe_meter.stream_url' => $mock->url,
	});

sub enqueue
{
	my ($prefix, $n, $customers) = @_;
	$node->safe_psql('postgres', qq{
		SELECT stripe_meter_event_create('ai_search_api',
			jsonb_build_object('stripe_customer_id', 'cus_' || i % $customers, 'value', 1),
			'$prefix-' || i)
		  FROM generate_series(1, $n) i});
}

# 1. Proactive renewal: keep a trickle of events flowing until the worker
# has opened a second session.
my $deadline = time + $PostgreSQL::Test::Utils::timeout_default;
my $sent = 0;
while ($mock->stats->{sessions_created} < 2 && time < $deadline)
{
	$sent++;
	$node->safe_psql('postgres', qq{
		SELECT stripe_meter_event_create('ai_search_api',
			'{"stripe_customer_id": "cus_T", "value": 1}', 'trickle-$sent')});
	sleep 0.25;
}
cmp_ok($mock->stats->{sessions_created}, '>=', 2, 'a second session was opened');
# one more, sent with the new session
$sent++;
$node->safe_psql('postgres', qq{
	SELECT stripe_meter_event_create('ai_search_api',
		'{"stripe_customer_id": "cus_T", "value": 1}', 'trickle-$sent')});
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'trickle-%'},
	$sent, "proactive: all $sent trickled events delivered");
my $stats = $mock->stats;
is($stats->{session_expired_rejections}, 0, 'proactive: the stream never saw an expired token');
is($stats->{session_token_rejections}, 0, 'proactive: nor an unknown one');
cmp_ok($node->safe_psql('postgres',
	q{SELECT count(DISTINCT session_id) FROM stripe_meter.meter_events WHERE identifier LIKE 'trickle-%'}),
	'>=', 2, 'proactive: events were sent with more than one session');

# 2. The 401 path: expire every session on demand, then queue events.
$mock->config({ session_ttl_s => 900 });
my $before = $mock->stats->{sessions_created};
cmp_ok($mock->expire_sessions, '>=', 1, 'sessions expired on demand');
enqueue('exp', 50, 50);
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'exp-%'},
	'50', '401: all 50 delivered');
$stats = $mock->stats;
cmp_ok($stats->{session_expired_rejections}, '>=', 1,
	'401: the stream refused the expired token');
cmp_ok($stats->{sessions_created}, '>', $before, '401: a new session was opened');
is($node->safe_psql('postgres',
	q{SELECT max(attempts) FROM stripe_meter.meter_events WHERE identifier LIKE 'exp-%'}),
	'1', '401: the refused request counted no attempt');

# 3. Mid-stream: batches in flight when every session expires (500
# customers, so five batches of 100 at a time, 300 ms each).
$mock->config({ latency_ms => 300 });
enqueue('mid', 10000, 500);
wait_for($node, q{SELECT count(*) >= 500 FROM stripe_meter.meter_events WHERE identifier LIKE 'mid-%'},
	't', 'mid-stream: delivery under way');
my $rejections = $mock->stats->{session_expired_rejections};
cmp_ok($mock->expire_sessions, '>=', 1, 'mid-stream: sessions expired');
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'mid-%'},
	'10000', 'mid-stream: all 10000 delivered');
$stats = $mock->stats;
cmp_ok($stats->{session_expired_rejections}, '>', $rejections,
	'mid-stream: requests were refused with the expired token');
is($stats->{billed}, $sent + 50 + 10000, 'every event billed once');
is($stats->{identifiers_billed_multiple_times}, 0, 'no identifier billed twice');
is($stats->{concurrency_violations}, 0, 'no concurrent events for one customer and meter');
is($node->safe_psql('postgres',
	'SELECT count(*) FROM stripe_meter.failed_events UNION ALL SELECT count(*) FROM stripe_meter.outbox'),
	"0\n0", 'none failed, outbox empty');
unlike(slurp_file($node->logfile), qr/bmest_/, 'no session token in the server log');

$node->stop;
$mock->stop;
done_testing();
