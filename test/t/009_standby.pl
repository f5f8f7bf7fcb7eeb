# A streaming standby runs no delivery worker and sends nothing; once
# promoted, its worker delivers the queue it replayed, once each, including
# events the old primary had already tried to send.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use StripeMeterTest;

my $events = 50;
my $mock = start_mock();
my $primary = new_node('primary', mock => $mock, init => { allows_streaming => 1 });
$primary->backup('b');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'b', has_streaming => 1);
$standby->start;

# Stripe is unreachable: the primary tries, and keeps everything queued.
$mock->config({ down => 1 });
$primary->safe_psql('postgres', qq{
	SELECT stripe_meter_event_create('ai_search_api',
		jsonb_build_object('stripe_customer_id', 'cus_' || i % 7, 'value', i), 'sb-' || i)
	  FROM generate_series(1, $events) i});
my $before = $mock->stats->{dropped_while_down};
wait_mock($mock, sub { $_[0]{dropped_while_down} > $before }, 'the primary tried to send');
wait_for($primary, q{SELECT count(*) FROM stripe_meter.outbox WHERE attempts > 0}, $events,
	'the primary attempted every event');

$primary->wait_for_catchup($standby, 'replay', $primary->lsn('insert'));
is($standby->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.outbox'), $events,
	'the standby replayed the queue');
is( $standby->safe_psql('postgres', q{
		SELECT count(*) FROM pg_stat_activity
		 WHERE backend_type IN ('stripe_meter worker', 'stripe_meter launcher')}),
	'0', 'the standby runs no stripe_meter launcher or worker');
is($standby->safe_psql('postgres', 'SELECT worker_pid IS NULL FROM stripe_meter.status'), 't',
	'the standby has no worker for the database');

# The primary dies with the events undelivered.
$primary->stop('immediate');

# Stripe is back; nothing may reach it until the standby is promoted.
$mock->config({ down => 0 });
my $requests_before = $mock->stats->{requests};
is($standby->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.outbox'), $events,
	'the events are still queued on the standby');
is($mock->stats->{requests}, $requests_before, 'the standby sent nothing');

my $promote_at = time;
$standby->promote;
wait_for($standby, 'SELECT count(*) FROM stripe_meter.meter_events', $events,
	'the promoted standby delivered every event');
is($standby->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.outbox'), '0',
	'its outbox is empty');
is($standby->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.failed_events'), '0',
	'none failed');
is( $standby->safe_psql('postgres', q{
		SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'stripe_meter worker'}),
	'1', 'the promoted standby runs a worker');

my $stats = $mock->stats;
is($stats->{billed}, $events, 'billed once each');
is($stats->{identifiers_billed_multiple_times}, 0, 'no identifier billed twice');
my @early = grep { $_->{time} < int($promote_at * 1000) } @{ meter_requests($mock) };
is(scalar @early, 0, 'no request reached Stripe before the promotion');
# (not every event: once Stripe gave no answer the primary went on with one
# request at a time, and an event claimed but never sent goes back clean)
is($standby->safe_psql('postgres', q{SELECT max(attempts) > 1 FROM stripe_meter.meter_events}), 't',
	"the primary's attempts carried over to the promoted standby");

$standby->stop;
$mock->stop;
done_testing();
