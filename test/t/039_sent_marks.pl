# The resend clock starts only when a request may have reached Stripe.
#
# A claimed event is marked sent, durably, just before it goes on the wire.
# After a crash, the repair step marks only the events that were sent as
# outcome-unknown (their resend window runs from the send); events claimed
# but never sent (here: held back by the rate limit) go back to the queue
# as if never claimed.  Before, every claimed event came back
# outcome-unknown, and a long outage could fail events Stripe never saw.
#
# With API v2 an event may wait in a batch (here: while its meter event
# session is being created); the resend window is checked when the batch
# is sent, not only when the event joins it.  Once the session is ready,
# the claim marks an event that goes at once, as with v1.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

# answered long after the crash; then the resends are replayed
my $mock = start_mock(latency_ms => 15_000);
my $node = new_node('sentmarks', mock => $mock,
	databases => [ 'postgres', 'v2db' ],
	conf => {
		'stripe_meter.stream_url' => $mock->url,
		'stripe_meter.rate_limit' => 1 });
$node->safe_psql('postgres', q{ALTER DATABASE v2db SET stripe_meter.api_version = 'v2'});

# v1: one request a second, answered never; the others wait claimed
$node->safe_psql('postgres', q{
	SELECT stripe_meter_event_create('api_requests',
		jsonb_build_object('stripe_customer_id', 'cus_' || i, 'value', 1), 'sm-' || i)
	  FROM generate_series(1, 20) i});
wait_for($node,
	q{SELECT count(*) = 20 FROM stripe_meter.outbox WHERE in_flight_since IS NOT NULL},
	't', 'v1: the worker claims every event');
ok($mock->wait_for(sub { scalar(@{ meter_requests($mock) }) >= 2 }),
	'v1: the first requests are out');
$node->stop('immediate');

my %sent = map { form_value($_->{body}, 'identifier') => 1 } @{ meter_requests($mock) };
my $nsent = scalar(keys %sent);
cmp_ok($nsent, '<', 20, "v1: the crash came with $nsent of 20 events sent");

# after the restart, with delivery off: only the repair runs
$node->append_conf('postgresql.conf', "stripe_meter.enabled = off\n");
$node->start;
wait_for($node, q{SELECT count(*) FROM stripe_meter.outbox WHERE in_flight_since IS NOT NULL},
	'0', 'v1: the restarted worker repairs the claims');
my $unknown = $node->safe_psql('postgres', q{
	SELECT string_agg(identifier, ',' ORDER BY identifier) FROM stripe_meter.outbox
	 WHERE unknown_outcome_since IS NOT NULL});
is($unknown, join(',', sort keys %sent),
	'v1: exactly the events that were sent are outcome-unknown');
is( $node->safe_psql('postgres', q{
		SELECT count(*) FROM stripe_meter.outbox
		 WHERE unknown_outcome_since IS NULL AND attempts = 0 AND first_attempt_at IS NULL}),
	20 - $nsent, 'v1: the others are queued again as if never claimed');
like(slurp_file($node->logfile),
	qr/found 20 meter events claimed before a restart.*\n.*DETAIL:\s+$nsent of them had been sent/,
	'v1: the log says how many were sent');

# v1 delivers the rest once answers come at once: the sent ones are
# resent (the mock replays them), each billed once
$mock->config({ latency_ms => 0 });
$node->append_conf('postgresql.conf', "stripe_meter.enabled = on\n");
$node->reload;
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events}, '20', 'v1: every event is delivered');
my %billed;
$billed{ $_->{identifier} }++ for @{ $mock->events };
is(scalar(grep { /^sm-\d+$/ } keys %billed), 20, 'v1: the mock billed all 20');
is(scalar(grep { $_ > 1 } values %billed), 0, 'and none twice');

# v2: an event two seconds short of its resend window waits for a session
# that takes six to create; when its batch goes, the window is past
$mock->script([ { match => { path => '/v2/billing/meter_event_session' }, times => 1, delay_ms => 6000 } ]);
$node->append_conf('postgresql.conf', "stripe_meter.resend_window = 4\n");
$node->reload;
$node->safe_psql('v2db', q{
	BEGIN;
	SELECT stripe_meter_event_create('api_requests',
		'{"stripe_customer_id": "cus_v2", "value": 1}', 'sm-v2-late');
	UPDATE stripe_meter.outbox SET unknown_outcome_since = clock_timestamp() - interval '2 seconds';
	COMMIT;});
wait_for($node,
	q{SELECT reason LIKE 'not resent:%' FROM stripe_meter.failed_events WHERE identifier = 'sm-v2-late'},
	't', 'v2: the event is failed when its batch goes, past the resend window', 'v2db');
is(scalar(@{ $mock->events(identifier => 'sm-v2-late') }), 0, 'v2: and Stripe never received it');

# v2, its session ready: an event that goes as soon as it is claimed is
# marked sent by the claim itself (sent_at is the claim's time); the next
# of the same customer and meter waits behind it, unmarked, and is marked
# when it goes
# (no rate limit here: a token is one of the things the claim asks for)
$mock->config({ latency_ms => 3000 });
$node->append_conf('postgresql.conf', "stripe_meter.rate_limit = 0\n");
$node->reload;
# a new session sees it once the postmaster has passed the reload on
wait_for($node, 'SHOW stripe_meter.rate_limit', '0', 'the rate limit is lifted');
$node->safe_psql('v2db', q{
	SELECT stripe_meter_event_create('api_requests',
		'{"stripe_customer_id": "cus_v2b", "value": 1}', 'sm-v2-' || x)
	  FROM unnest(ARRAY['first', 'second']) x});
wait_for($node, q{
	SELECT string_agg(identifier || ':' || CASE WHEN sent_at IS NULL THEN 'unmarked'
	                                              WHEN sent_at = in_flight_since THEN 'marked by the claim'
	                                              ELSE 'marked later' END, ',' ORDER BY id)
	  FROM stripe_meter.outbox WHERE in_flight_since IS NOT NULL},
	'sm-v2-first:marked by the claim,sm-v2-second:unmarked',
	'v2: the claim marks the event that goes at once, not the one behind it', 'v2db');
$mock->config({ latency_ms => 0 });
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'sm-v2-%'},
	'2', 'v2: both are delivered', 'v2db');
is(scalar(@{ $mock->events(identifier => 'sm-v2-first') }) + scalar(@{ $mock->events(identifier => 'sm-v2-second') }),
	2, 'v2: each billed once');

done_testing();
