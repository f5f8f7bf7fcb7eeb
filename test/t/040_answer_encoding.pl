# Stripe's answers read in a database whose encoding is not UTF8.  A \u
# escape in an answer may name a character that encoding cannot hold, and
# PostgreSQL 15's JSON parser raises an ERROR for one, which the worker
# (no error handler) must never meet.  Such an answer is left unread: not
# Stripe's form, so retried with its outcome unknown, never failed; the
# same worker delivers throughout.  An escape of an ASCII character is
# read, and Stripe's refusal is kept with its decoded message.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;

my $mock = start_mock();
my $node = new_node('latin1', mock => $mock, databases => []);
$node->safe_psql('postgres',
	q{CREATE DATABASE latin TEMPLATE template0 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'});
$node->safe_psql('latin', 'CREATE EXTENSION stripe_meter');

# identifier => [script entry, last_error pattern]: retried, outcome unknown
my %retried = (
	'l-han-400' => [
		{ status => 400, body => '{"error":{"type":"invalid_request_error","message":"\u4e2d"}}' },
		qr/^unexpected answer \(HTTP 400\)/ ],
	'l-han-200' => [
		{ status => 200, body => '{"object":"billing.meter_event","identifier":"l-han-200","note":"\u4e2d"}' },
		qr/^Stripe answered HTTP 200 without a billing\.meter_event/ ],
);
my @ids = sort keys %retried;
$mock->script([
	(map { { match => { identifier => $_ }, times => -1, %{ $retried{$_}[0] } } } @ids),
	{ match => { identifier => 'l-ascii-400' }, times => -1, status => 400,
	  body => '{"error":{"type":"invalid_request_error","message":"Invalid \u0041 value"}}' },
]);

wait_for($node, 'SELECT count(*) FROM stripe_meter.status WHERE worker_pid IS NOT NULL', '1',
	'a worker delivers in the LATIN1 database', 'latin');
my $worker = worker_pids($node, 'latin');
is(scalar @$worker, 1, 'one worker');

my $i = 0;
for my $id (@ids, 'l-ascii-400')
{
	$i++;
	$node->safe_psql('latin', qq{
		SELECT stripe_meter_event_create('ai_search_api',
			jsonb_build_object('stripe_customer_id', 'cus_L$i', 'value', $i), '$id')});
}

# (each row on its own: a row claimed for its next attempt already counts it)
wait_for($node, q{SELECT count(*) FROM stripe_meter.outbox
	 WHERE attempts >= 3 OR (attempts >= 2 AND in_flight_since IS NULL)}, scalar @ids,
	'each unreadable answer retried', 'latin');
for my $id (@ids)
{
	my $row = query_json($node, 'latin', qq{
		SELECT to_jsonb(o) FROM stripe_meter.outbox o WHERE identifier = '$id'});
	like($row->{last_error} // '', $retried{$id}[1], "$id: last_error classifies it");
	ok(defined $row->{unknown_outcome_since}, "$id: its outcome is unknown");
}
wait_for($node, q{SELECT reason FROM stripe_meter.failed_events WHERE identifier = 'l-ascii-400'},
	'Stripe refused the event (HTTP 400): Invalid A value',
	'l-ascii-400: refused, with the escape decoded', 'latin');
is_deeply(worker_pids($node, 'latin'), $worker, 'the same worker survived every answer');

# A body that is not JSON (a proxy's page) is kept as an excerpt of its
# first 200 bytes in the reason: cut there, a UTF-8 character must not be
# stored half (a UTF8 database), and in LATIN1 its bytes show as '?'.
$node->safe_psql('postgres', 'CREATE EXTENSION stripe_meter');
my $page = ('x' x 199) . "\x{e9}t\x{e9}";
$mock->script([ map { { match => { identifier => $_ }, times => -1, status => 502, body => $page } }
	  qw(u-cut l-cut) ]);
$node->safe_psql('postgres', q{
	SELECT stripe_meter_event_create('ai_search_api', '{"stripe_customer_id": "cus_U", "value": 1}', 'u-cut')});
$node->safe_psql('latin', q{
	SELECT stripe_meter_event_create('ai_search_api', '{"stripe_customer_id": "cus_U", "value": 1}', 'l-cut')});
wait_for($node, q{SELECT count(*) FROM stripe_meter.outbox WHERE last_http_status = 502}, '1',
	'UTF8: the page is answered', 'postgres');
wait_for($node, q{SELECT count(*) FROM stripe_meter.outbox WHERE last_http_status = 502}, '1',
	'LATIN1: the page is answered', 'latin');
is($node->safe_psql('postgres', q{
	SELECT convert_from(textsend(last_error), 'UTF8') = last_error AND last_error LIKE '%' || repeat('x', 199)
	  FROM stripe_meter.outbox WHERE identifier = 'u-cut'}), 't',
	'UTF8: the excerpt is valid UTF-8, cut before the character 200 bytes would split');
is($node->safe_psql('latin', q{
	SELECT last_error LIKE '%' || repeat('x', 199) || '?' FROM stripe_meter.outbox WHERE identifier = 'l-cut'}), 't',
	'LATIN1: a byte of the page outside ASCII shows as ?');

# Normal answers again: delivered once.
$mock->script([]);
wait_for($node, 'SELECT count(*) FROM stripe_meter.outbox', '0', 'all delivered once answers are normal',
	'latin');
for my $id (@ids)
{
	is(scalar @{ mock_events_for($mock, $id) }, 1, "$id: billed once");
}
wait_for($node, 'SELECT count(*) FROM stripe_meter.outbox', '0', 'UTF8: delivered once answers are normal');
is_deeply(worker_pids($node, 'latin'), $worker, 'still the same worker');

$node->stop;
$mock->stop;
done_testing();
