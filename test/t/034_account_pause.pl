# A Connect account that revokes the platform's access pauses that account
# alone (v1 and v2): Stripe answers 403 account_invalid for its requests,
# its events stay queued, and every other account and the platform itself
# keep delivering.  status lists the paused account with Stripe's reason.
# The worker tries it again every stripe_meter.account_retry_interval, and
# stripe_meter_resume_account() or a reload resumes it at once.  A 401 for
# the platform's own requests (the key revoked) still pauses everything.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

my $revoked = 'acct_1Revoked';
my $mock = start_mock(revoked_accounts => [$revoked]);
my $node = new_node('accountpause', mock => $mock,
	databases => [ 'postgres', 'v2db' ],
	conf => {
		'stripe_meter.stream_url' => $mock->url,
		'stripe_meter.account_retry_interval' => '3600s' });
$node->safe_psql('postgres', q{ALTER DATABASE v2db SET stripe_meter.api_version = 'v2'});
restart_workers($node, 'v2db');

sub enqueue
{
	my ($db, $prefix, $n, $account) = @_;
	my $acct = defined $account ? "'$account'" : 'NULL';
	$node->safe_psql($db, qq{
		SELECT stripe_meter_event_create('api_requests',
			jsonb_build_object('stripe_customer_id', 'cus_$prefix' || i, 'value', 1),
			'$prefix-' || i, NULL, $acct)
		  FROM generate_series(1, $n) i});
}

for my $db ('postgres', 'v2db')
{
	my $api = $db eq 'postgres' ? 'v1' : 'v2';
	enqueue($db, "$api-rev", 30, $revoked);
	enqueue($db, "$api-ok", 30, 'acct_1Granted');
	enqueue($db, "$api-plat", 30, undef);

	wait_for($node,
		q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE '%-ok-%' OR identifier LIKE '%-plat-%'},
		'60', "$api: the other account and the platform are delivered", $db);
	wait_for($node,
		qq{SELECT paused_accounts->0->>'stripe_account' = '$revoked'
		          AND paused_accounts->0->>'reason' LIKE '%does not have access to account%'
		          AND paused IS NULL
		     FROM stripe_meter.status},
		't', "$api: status lists the revoked account with Stripe's reason, and the database is not paused", $db);
	is( $node->safe_psql($db,
			q{SELECT count(*) FROM stripe_meter.outbox WHERE identifier LIKE '%-rev-%'}),
		'30', "$api: the revoked account's events stay queued");
	is($node->safe_psql($db, 'SELECT count(*) FROM stripe_meter.failed_events'),
		'0', "$api: none failed");
	ok( $node->safe_psql($db,
			q{SELECT bool_and(next_attempt_at > now() + interval '30 minutes') FROM stripe_meter.outbox}),
		"$api: its events wait for the next try, not for every claim");

	# while it is paused, new events for other accounts still flow
	enqueue($db, "$api-later", 10, 'acct_1Granted');
	wait_for($node,
		q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE '%-later-%'},
		'10', "$api: later events of other accounts are delivered too", $db);
}

# access granted again, and the operator resumes the account
$mock->config({ revoked_accounts => [] });
is($node->safe_psql('postgres', "SELECT stripe_meter_resume_account('$revoked')"),
	'1', 'stripe_meter_resume_account() resumes the account');
wait_for($node,
	q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'v1-rev-%'},
	'30', 'v1: the account\'s events are delivered after the resume');
wait_for($node, 'SELECT paused_accounts IS NULL FROM stripe_meter.status', 't',
	'v1: status lists no paused account');

# a reload resumes it too (v2 database)
$node->reload;
wait_for($node,
	q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'v2-rev-%'},
	'30', 'v2: the account\'s events are delivered after a reload', 'v2db');
is($mock->stats->{identifiers_billed_multiple_times}, 0, 'nothing billed twice');

# the account is tried again by itself, at the retry interval
$mock->config({ revoked_accounts => [$revoked] });
$node->append_conf('postgresql.conf',
	"stripe_meter.account_retry_interval = '2s'\nstripe_meter.resend_window = '1h'\n");
$node->reload;
enqueue('postgres', 'v1-again', 5, $revoked);
wait_for($node, 'SELECT paused_accounts IS NOT NULL FROM stripe_meter.status', 't',
	'paused again when access is revoked again');
$mock->config({ revoked_accounts => [] });
wait_for($node,
	q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'v1-again-%'},
	'5', 'tried again by itself, and delivered once access is back');

# v2 likewise, for an account that has no session yet: its trial first waits
# for the session to be created, and then still goes out as the account's
# one probe, without a reload
$mock->config({ revoked_accounts => ['acct_1Later'] });
enqueue('v2db', 'v2-nosession', 5, 'acct_1Later');
wait_for($node,
	q{SELECT paused_accounts->0->>'stripe_account' = 'acct_1Later' FROM stripe_meter.status},
	't', 'v2: an account without a session is paused when its session is refused', 'v2db');
$mock->config({ revoked_accounts => [] });
wait_for($node,
	q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'v2-nosession-%'},
	'5', 'v2: tried again by itself, and delivered once access is back', 'v2db');
wait_for($node, 'SELECT paused_accounts IS NULL FROM stripe_meter.status', 't',
	'v2: and the account is no longer paused', 'v2db');

# A probe dropped before it goes out gives the account's turn back: here the
# probe has waited past the resend window, so its batch fails it unsent
# when access is back; the account's next event is still tried, without a
# reload
$mock->config({ revoked_accounts => ['acct_1Drop'] });
$node->safe_psql('v2db', q{
	BEGIN;
	SELECT stripe_meter_event_create('api_requests',
		'{"stripe_customer_id": "cus_drop", "value": 1}', 'v2-drop-old', NULL, 'acct_1Drop');
	UPDATE stripe_meter.outbox SET unknown_outcome_since = now() - interval '2 hours'
	 WHERE identifier = 'v2-drop-old';
	COMMIT;});
wait_for($node,
	q{SELECT paused_accounts->0->>'stripe_account' = 'acct_1Drop' FROM stripe_meter.status},
	't', 'v2: the account is paused with an event too old to resend', 'v2db');
$mock->config({ revoked_accounts => [] });
wait_for($node,
	q{SELECT reason LIKE 'not resent:%' FROM stripe_meter.failed_events WHERE identifier = 'v2-drop-old'},
	't', 'v2: the probe is failed unsent when its batch goes', 'v2db');
enqueue('v2db', 'v2-drop-next', 1, 'acct_1Drop');
wait_for($node,
	q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier = 'v2-drop-next-1'},
	'1', 'v2: the account\'s next event is tried and delivered', 'v2db');

# the key itself revoked: the platform's requests answer 401 and the whole
# database pauses, as before
$mock->config({ revoked_keys => [$API_KEY] });
enqueue('postgres', 'v1-key', 3, undef);
wait_for($node,
	q{SELECT paused LIKE 'Stripe rejected the API key (HTTP 401)%' FROM stripe_meter.status},
	't', 'a 401 for the platform pauses the whole database');

$node->stop;
$mock->stop;
done_testing();
