#!/usr/bin/perl
# Self-test of the Stripe mock (test/mock/stripe-mock.js) and StripeMock.pm.
#   perl -I test/perl test/mock/selftest.pl
use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/../perl";

use HTTP::Tiny;
use IO::Select;
use IO::Socket::INET;
use JSON::PP;
use POSIX qw(floor);
use Test::More;
use Time::HiRes qw(time sleep);

use StripeMock;

my $JSON = JSON::PP->new->utf8->canonical;
my $KEY = 'sk_test_selftest0001';
# A fake live-mode key for the mock (never a real one); assembled so that
# secret scanners looking for committed live keys are not set off.
my $LIVE_KEY = 'sk_' . 'live_' . 'selftest0001';
my $RK = 'rk_test_selftest0002';

my $t_start = time;
my $mock = StripeMock->new();
like($mock->url, qr{^http://127\.0\.0\.1:\d+$}, 'mock started, url ' . $mock->url);
is($mock->health->{ok}, JSON::PP::true, 'health');

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

sub enc
{
	my ($s) = @_;
	$s =~ s/([^A-Za-z0-9\-._~\[\]])/sprintf('%%%02X', ord $1)/ge;
	return $s;
}

# form body from a list of pairs (order kept)
sub form { my @p = @_; my @o; while (@p) { my ($k, $v) = splice(@p, 0, 2); push @o, enc($k) . '=' . enc($v) } join '&', @o }

my $seq = 0;
sub uid { return 'st-' . $$ . '-' . (++$seq) }

# a valid event body; %o overrides
sub ev
{
	my (%o) = @_;
	my $id = exists $o{identifier} ? $o{identifier} : uid();
	my @p = (event_name => $o{event_name} // 'api_tokens',
		'payload[stripe_customer_id]' => $o{customer} // 'cus_selftest1',
		'payload[value]' => $o{value} // '25');
	push @p, identifier => $id if defined $id;
	push @p, timestamp => $o{timestamp} if defined $o{timestamp};
	return (form(@p), $id);
}

# POST to the mock. %o: body, headers, key (undef = no auth), path, timeout, method
sub post
{
	my (%o) = @_;
	my %h = %{ $o{headers} // {} };
	$h{'Content-Type'} //= 'application/x-www-form-urlencoded';
	my $key = exists $o{key} ? $o{key} : $KEY;
	$h{Authorization} //= "Bearer $key" if defined $key;
	my $ht = HTTP::Tiny->new(keep_alive => 0, timeout => $o{timeout} // 10);
	my $t0 = time;
	my $r = $ht->request($o{method} // 'POST', $mock->url . ($o{path} // '/v1/billing/meter_events'),
		{ headers => \%h, content => $o{body} // '' });
	$r->{elapsed} = time - $t0;
	$r->{json} = eval { $JSON->decode($r->{content}) };
	return $r;
}

sub hdr { my ($r, $n) = @_; return $r->{headers}{ lc $n } }

sub nevents { my (%f) = @_; return scalar @{ $mock->events(%f) } }

# Send a request on a raw socket and return it without reading the answer.
sub raw_send
{
	my ($body, %h) = @_;
	my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $mock->port, Proto => 'tcp')
	  or die "connect: $!";
	$h{'Content-Type'} //= 'application/x-www-form-urlencoded';
	$h{Authorization} //= "Bearer $KEY";
	my $req = "POST /v1/billing/meter_events HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
	  . 'Content-Length: ' . length($body) . "\r\n";
	$req .= "$_: $h{$_}\r\n" for sort keys %h;
	$req .= "\r\n" . $body;
	syswrite($s, $req) == length($req) or die "short write";
	return $s;
}

# Read a Connection: close response to EOF.
sub raw_read
{
	my ($s, $timeout) = @_;
	my $sel = IO::Select->new($s);
	my $buf = '';
	my $deadline = time + ($timeout // 10);
	while (time < $deadline)
	{
		last unless $sel->can_read($deadline - time);
		my $n = sysread($s, $buf, 65536, length $buf);
		last unless $n;
	}
	close $s;
	my ($head, $body) = split /\r\n\r\n/, $buf, 2;
	my ($status) = ($head // '') =~ m{^HTTP/1\.1 (\d+)};
	my %h;
	for (split /\r\n/, $head // '') { $h{ lc $1 } = $2 if /^([^:]+):\s*(.*)$/ }
	return { status => $status // 0, headers => \%h, content => $body // '',
		json => eval { $JSON->decode($body // '') } };
}

sub check_error
{
	my ($r, $status, $param, $code, $msg_re, $name) = @_;
	my $e = $r->{json} && $r->{json}{error};
	my $ok = $r->{status} == $status && $e && $e->{type} eq 'invalid_request_error'
	  && (!defined $param || ($e->{param} // '') eq $param)
	  && (!defined $code || (($e->{code} // '') eq $code && ($e->{doc_url} // '') =~ m{^https://stripe\.com/docs/error-codes/}))
	  && (!defined $msg_re || ($e->{message} // '') =~ $msg_re)
	  && (hdr($r, 'request-id') // '') =~ /^req_[A-Za-z0-9]{14}$/;
	ok($ok, $name) or diag("got $r->{status}: $r->{content}");
}

# ---------------------------------------------------------------------------
# success shape and headers
# ---------------------------------------------------------------------------

my $now = time;
my ($body, $id) = ev(timestamp => int($now) - 60);
my $r = post(body => $body, headers => { 'Stripe-Version' => '2026-07-29.dahlia', 'User-Agent' => 'selftest/1', 'Idempotency-Key' => 'ik-' . $id });
is($r->{status}, 200, 'success: 200');
like(hdr($r, 'content-type'), qr{^application/json}, 'success: content-type json');
like(hdr($r, 'request-id'), qr/^req_[A-Za-z0-9]{14}$/, 'success: Request-Id');
is(hdr($r, 'stripe-version'), '2026-07-29.dahlia', 'success: Stripe-Version echoed');
is_deeply([ sort keys %{ $r->{json} } ], [qw(created event_name identifier livemode object payload timestamp)], 'success: exact field set');
is($r->{json}{object}, 'billing.meter_event', 'success: object');
is($r->{json}{identifier}, $id, 'success: identifier');
is($r->{json}{event_name}, 'api_tokens', 'success: event_name');
ok(!$r->{json}{livemode}, 'success: livemode false for test key');
is_deeply($r->{json}{payload}, { stripe_customer_id => 'cus_selftest1', value => '25' }, 'success: payload strings');
is($r->{json}{timestamp}, int($now) - 60, 'success: timestamp');
ok(abs($r->{json}{created} - $now) < 5, 'success: created is now');
like($r->{content}, qr/"timestamp":\d+/, 'success: timestamp is a JSON integer');

my $evs = $mock->events(identifier => $id);
is(scalar @$evs, 1, 'events: recorded once');
my $e = $evs->[0];
is_deeply([ map { defined $e->{$_} ? 1 : 0 } qw(identifier event_name payload timestamp account idempotency_key stripe_version user_agent billed_at) ],
	[ (1) x 9 ], 'events: all fields present');
is($e->{idempotency_key}, "ik-$id", 'events: idempotency key');
is($e->{stripe_version}, '2026-07-29.dahlia', 'events: stripe version');
is($e->{user_agent}, 'selftest/1', 'events: user agent');
is($e->{account}, 'acct_1MockPlatform00000', 'events: platform account');

($body) = ev();
$r = post(body => $body);
is(hdr($r, 'stripe-version'), '2026-09-30.endive', 'default Stripe-Version');

($body, $id) = ev();
$r = post(body => $body, key => $LIVE_KEY);
ok($r->{status} == 200 && $r->{json}{livemode}, 'live key: livemode true');

($body, $id) = ev();
$r = post(body => $body, key => undef, headers => { Authorization => 'Basic ' . MIME_b64("$KEY:") });
is($r->{status}, 200, 'HTTP Basic auth with key as username');

sub MIME_b64 { require MIME::Base64; return MIME::Base64::encode_base64($_[0], '') }

$r = post(body => form(event_name => 'api_tokens', 'payload[stripe_customer_id]' => 'cus_x', 'payload[value]' => '3'));
like($r->{json}{identifier} // '', qr/^[0-9a-f-]{36}$/, 'identifier generated when absent');
ok(abs($r->{json}{timestamp} - time) < 5, 'timestamp defaults to now');

($body, $id) = ev();
$r = post(body => $body, headers => { 'Stripe-Account' => 'acct_1Connected' });
is($r->{status}, 200, 'Stripe-Account accepted');
is($mock->events(identifier => $id)->[0]{account}, 'acct_1Connected', 'event account = Stripe-Account');

$r = post(body => 'event_name=api+tokens&payload%5Bstripe_customer_id%5D=cus_enc&payload%5Bvalue%5D=7&identifier=' . uid() . '&expand[]=foo&expand[]=bar');
ok($r->{status} == 200 && $r->{json}{event_name} eq 'api tokens' && $r->{json}{payload}{value} eq '7',
	'%5B/%5D brackets and + as space decoded, expand accepted') or diag($r->{content});

$r = post(body => form(event_name => 'x', 'payload[stripe_customer_id]' => 'cus_a', 'payload[value]' => '000123456789012345', identifier => uid()));
is($r->{status}, 200, 'value: 15 significant digits with leading zeros ok');
$r = post(body => form(event_name => 'x', 'payload[stripe_customer_id]' => 'cus_a', 'payload[value]' => '0', identifier => uid()));
is($r->{status}, 200, 'value: 0 ok');
$r = post(body => form(event_name => 'x', 'payload[stripe_customer_id]' => 'cus_a', 'payload[value]' => '1', identifier => 'i' x 100));
is($r->{status}, 200, 'identifier of 100 characters ok');
$r = post(body => (ev())[0], headers => { 'Idempotency-Key' => 'k' x 255 });
is($r->{status}, 200, 'Idempotency-Key of 255 characters ok');
$r = post(body => (ev(timestamp => int(time) + 200))[0]);
is($r->{status}, 200, 'timestamp 200 s in future ok');
$r = post(body => (ev())[0], headers => { 'Content-Type' => 'application/x-www-form-urlencoded; charset=utf-8' });
is($r->{status}, 200, 'Content-Type with charset ok');
is(post(body => (ev())[0] . '&expand%5B0%5D=a&expand%5B1%5D=b')->{status}, 200, 'expand[0]/expand[1] accepted');
$r = post(body => (ev())[0] . '&payload[region]=eu-west&payload[tier]=');
ok($r->{status} == 200 && $r->{json}{payload}{region} eq 'eu-west', 'extra payload keys echoed');

# ---------------------------------------------------------------------------
# validation errors
# ---------------------------------------------------------------------------

my $before = $mock->stats->{billed};
my $C = 'payload[stripe_customer_id]';
my $V = 'payload[value]';
my $past_min = floor(time) - 35 * 86400;
my @cases = (
	[ form(event_name => 'a', $C => 'cus_1', $V => '1', foo => 'x'), 'foo', 'parameter_unknown', qr/^Received unknown parameter: foo$/, 'unknown parameter' ],
	[ form($C => 'cus_1', $V => '1'), 'event_name', 'parameter_missing', qr/Missing required param: event_name/, 'missing event_name' ],
	[ form(event_name => '', $C => 'cus_1', $V => '1'), 'event_name', 'parameter_invalid_empty', qr/empty string/, 'empty event_name' ],
	[ form(event_name => 'e' x 101, $C => 'cus_1', $V => '1'), 'event_name', 'string_too_long', qr/at most 100 characters/, 'event_name > 100' ],
	[ form(event_name => 'a'), 'payload', 'parameter_missing', qr/Missing required param: payload/, 'missing payload' ],
	[ form(event_name => 'a', payload => 'x'), 'payload', undef, undef, 'payload not a hash' ],
	[ form(event_name => 'a', $V => '1'), $C, 'parameter_missing', undef, 'missing customer key' ],
	[ form(event_name => 'a', $C => 'cus_1'), $V, 'parameter_missing', undef, 'missing value key' ],
	[ form(event_name => 'a', $C => 'cus_1', $V => '-5'), $V, 'parameter_invalid_integer', qr/whole number/, 'negative value' ],
	[ form(event_name => 'a', $C => 'cus_1', $V => '1.5'), $V, 'parameter_invalid_integer', undef, 'decimal value' ],
	[ form(event_name => 'a', $C => 'cus_1', $V => '1e3'), $V, 'parameter_invalid_integer', undef, 'exponent value' ],
	[ form(event_name => 'a', $C => 'cus_1', $V => '+5'), $V, 'parameter_invalid_integer', undef, 'signed value' ],
	[ form(event_name => 'a', $C => 'cus_1', $V => ''), $V, 'parameter_invalid_empty', undef, 'empty value' ],
	[ form(event_name => 'a', $C => 'cus_1', $V => '1234567890123456'), $V, undef,
		qr/^The value in the event payload can have at most 15 digits\. Received 1234567890123456\.$/, '16 significant digits' ],
	[ form(event_name => 'a', $C => 'cus_1', $V => '1', 'payload[note]' => 'n' x 101), 'payload[note]', 'string_too_long', undef, 'payload value > 100' ],
	[ form(event_name => 'a', $C => 'cus_1', $V => '1', identifier => 'i' x 101), 'identifier', 'string_too_long', undef, 'identifier > 100' ],
	[ form(event_name => 'a', $C => 'cus_1', $V => '1', identifier => ''), 'identifier', 'parameter_invalid_empty', undef, 'empty identifier' ],
	[ form(event_name => 'a', $C => 'cus_1', $V => '1', timestamp => $past_min - 100), 'timestamp', undef,
		qr/^The event timestamp cannot be more than 35 days in past\. Expected a timestamp greater than or equal to \d+\.$/, 'timestamp > 35 days old' ],
	[ form(event_name => 'a', $C => 'cus_1', $V => '1', timestamp => floor(time) + 600), 'timestamp', undef,
		qr/cannot be more than 5 minutes in the future\. Expected a timestamp less than or equal to \d+\./, 'timestamp > 5 min in future' ],
	[ form(event_name => 'a', $C => 'cus_1', $V => '1', timestamp => 'soon'), 'timestamp', 'parameter_invalid_integer', undef, 'timestamp not an integer' ],
	[ form(event_name => 'a', event_name => 'b', $C => 'cus_1', $V => '1'), 'event_name', undef, qr/more than once/, 'parameter given twice' ],
	[ 'event_name=a&payload[stripe_customer_id]=cus_1&payload[value]=%zz', undef, undef, undef, 'malformed percent-encoding' ],
);
for my $c (@cases)
{
	my ($b, $param, $code, $re, $name) = @$c;
	check_error(post(body => $b), 400, $param, $code, $re, "validation: $name");
}
{
	my $r = post(body => form(event_name => 'a', $C => 'cus_1', $V => '1', timestamp => $past_min - 100));
	my ($min) = $r->{json}{error}{message} =~ /equal to (\d+)/;
	ok(abs($min - (floor(time) - 35 * 86400)) <= 2, 'validation: past-limit in message is now - 35 days');
}
check_error(post(body => $JSON->encode({ event_name => 'a' }), headers => { 'Content-Type' => 'application/json' }),
	400, undef, undef, qr/Content-Type/, 'validation: JSON body rejected');
check_error(post(body => (ev())[0], headers => { 'Idempotency-Key' => 'k' x 256 }), 400, undef, undef, qr/255/, 'validation: Idempotency-Key > 255');
check_error(post(body => (ev())[0], headers => { 'Stripe-Account' => 'bogus' }), 403, undef, 'account_invalid', undef, 'Stripe-Account malformed → 403');
is($mock->stats->{billed}, $before, 'validation failures bill nothing');
ok($mock->stats->{validation_errors} >= scalar(@cases), 'validation_errors counted');

# validation failures are not stored for idempotency
{
	my ($b, $i) = ev();
	my $bad = post(body => $b . '&bogus=1', headers => { 'Idempotency-Key' => "vk-$i" });
	my $good = post(body => $b, headers => { 'Idempotency-Key' => "vk-$i" });
	ok($bad->{status} == 400 && $good->{status} == 200 && !hdr($good, 'idempotent-replayed'),
		'idempotency: a 400 validation failure is not stored');
}

# meters table, strict_meters, inactive meters, any_customer
$mock->config({ meters => { api_calls => { customer_key => 'customer', value_key => 'qty' },
		old_meter => { status => 'inactive' } } });
$r = post(body => form(event_name => 'api_calls', 'payload[customer]' => 'cus_m', 'payload[qty]' => '5', identifier => uid()));
is($r->{status}, 200, 'meters: custom payload keys accepted');
check_error(post(body => form(event_name => 'api_calls', 'payload[customer]' => 'cus_m', 'payload[value]' => '5')),
	400, 'payload[qty]', 'parameter_missing', undef, 'meters: custom value key required');
check_error(post(body => form(event_name => 'old_meter', $C => 'cus_m', $V => '5')), 400, undef, 'archived_meter', undef, 'meters: inactive meter');
$r = post(body => (ev(event_name => 'unlisted'))[0]);
is($r->{status}, 200, 'meters: unknown event_name accepted when strict_meters is false');
$mock->config({ strict_meters => JSON::PP::true, any_customer => JSON::PP::false });
check_error(post(body => (ev(event_name => 'unlisted'))[0]), 400, 'event_name', 'no_meter', qr/No active meter/, 'meters: strict_meters rejects unknown event_name');
check_error(post(body => form(event_name => 'api_calls', 'payload[customer]' => 'bob', 'payload[qty]' => '1')),
	400, 'payload[customer]', 'resource_missing', undef, 'any_customer false: non-cus_ id rejected');
$mock->config({ strict_meters => JSON::PP::false, any_customer => JSON::PP::true, meters => {} });

# ---------------------------------------------------------------------------
# auth
# ---------------------------------------------------------------------------

check_error(post(body => (ev())[0], key => undef), 401, undef, undef, qr/^You did not provide an API key\./, 'auth: missing key → 401');
check_error(post(body => (ev())[0], key => 'sk_test_short'), 401, undef, undef, qr/^Invalid API Key provided: sk_test_\*\*\*\*hort$/, 'auth: malformed key → 401 masked');
check_error(post(body => (ev())[0], key => 'whatever_xyz_1234'), 401, undef, undef, qr/^Invalid API Key provided: \*\*\*\*1234$/, 'auth: garbage key → 401 masked');
$mock->config({ revoked_keys => ['sk_test_revoked0001'] });
check_error(post(body => (ev())[0], key => 'sk_test_revoked0001'), 401, undef, undef, qr/Invalid API Key provided: sk_test_\*\*\*\*0001/, 'auth: revoked key → 401');
is(post(body => (ev())[0])->{status}, 200, 'auth: other keys still fine');
$mock->config({ auth_phase => '401' });
check_error(post(body => (ev())[0]), 401, undef, undef, qr/Invalid API Key/, 'auth_phase 401');
$mock->config({ auth_phase => '403' });
check_error(post(body => (ev())[0]), 403, undef, 'secret_key_required', undef, 'auth_phase 403 (secret key)');
check_error(post(body => (ev())[0], key => $RK), 403, undef, undef, qr/does not have the required permissions/, 'auth_phase 403 (restricted key)');
$mock->config({ auth_phase => undef, revoked_keys => [], forbidden_keys => [$RK] });
check_error(post(body => (ev())[0], key => $RK), 403, undef, undef, qr/rk_test_\*\*\*\*0002/, 'forbidden_keys → 403');
$mock->config({ forbidden_keys => [] });
{
	my ($b, $i) = ev();
	my $a = post(body => $b, key => 'sk_test_bad', headers => { 'Idempotency-Key' => "ak-$i" });
	my $g = post(body => $b, headers => { 'Idempotency-Key' => "ak-$i" });
	ok($a->{status} == 401 && $g->{status} == 200 && !hdr($g, 'idempotent-replayed'), 'auth: a 401 is not stored for idempotency');
}

# ---------------------------------------------------------------------------
# idempotency
# ---------------------------------------------------------------------------

{
	my ($b, $i) = ev();
	my $r1 = post(body => $b, headers => { 'Idempotency-Key' => "idem-$i" });
	my $r2 = post(body => $b, headers => { 'Idempotency-Key' => "idem-$i" });
	is($r1->{status}, 200, 'idempotency: first 200');
	ok(!hdr($r1, 'idempotent-replayed'), 'idempotency: first not replayed');
	is($r2->{status}, 200, 'idempotency: replay 200');
	is(hdr($r2, 'idempotent-replayed'), 'true', 'idempotency: Idempotent-Replayed: true');
	is($r2->{content}, $r1->{content}, 'idempotency: identical body');
	isnt(hdr($r2, 'request-id'), hdr($r1, 'request-id'), 'idempotency: new Request-Id on replay');
	is(hdr($r2, 'original-request'), hdr($r1, 'request-id'), 'idempotency: Original-Request names the first request');
	# same params in another order still replays
	my @pairs = map { [ split /=/, $_, 2 ] } split /&/, $b;
	my $reordered = join '&', map { "$_->[0]=$_->[1]" } reverse @pairs;
	my $r3 = post(body => $reordered, headers => { 'Idempotency-Key' => "idem-$i" });
	is(hdr($r3, 'idempotent-replayed'), 'true', 'idempotency: parameter order does not matter');
	is(nevents(identifier => $i), 1, 'idempotency: billed once');
	my $r4 = post(body => $b . '&payload[extra]=1', headers => { 'Idempotency-Key' => "idem-$i" });
	ok($r4->{status} == 400 && $r4->{json}{error}{type} eq 'idempotency_error'
		  && $r4->{json}{error}{message} =~ /^Keys for idempotent requests can only be used with the same parameters they were first used with\./,
		'idempotency: reuse with different params → idempotency_error') or diag($r4->{content});
	ok($mock->stats->{replays} >= 2, 'idempotency: replays counted');
}

# concurrent same key → 409, not stored
{
	$mock->config({ latency_ms => 600 });
	my ($b, $i) = ev();
	my $s = raw_send($b, 'Idempotency-Key' => "cc-$i");
	sleep 0.2;
	my $r2 = post(body => $b, headers => { 'Idempotency-Key' => "cc-$i" });
	my $r1 = raw_read($s);
	$mock->config({ latency_ms => 0 });
	is($r1->{status}, 200, 'concurrent same key: first 200');
	ok($r2->{status} == 409 && $r2->{json}{error}{type} eq 'idempotency_error' && $r2->{json}{error}{code} eq 'idempotency_key_in_use',
		'concurrent same key: 409 idempotency_key_in_use') or diag($r2->{content});
	my $r3 = post(body => $b, headers => { 'Idempotency-Key' => "cc-$i" });
	ok($r3->{status} == 200 && hdr($r3, 'idempotent-replayed') && $r3->{content} eq $r1->{content},
		'concurrent same key: later retry replays the first answer');
	is(nevents(identifier => $i), 1, 'concurrent same key: billed once');
	is($mock->stats->{idempotency_conflicts}, 1, 'idempotency_conflicts counted');
}

# identifier duplicate under a different key
{
	my ($b, $i) = ev();
	my $s0 = $mock->stats;
	post(body => $b, headers => { 'Idempotency-Key' => "d1-$i" });
	my $r = post(body => $b, headers => { 'Idempotency-Key' => "d2-$i" });
	check_error($r, 400, undef, undef, qr/^An event already exists with identifier \Q$i\E\.$/, 'duplicate identifier → 400');
	is(hdr($r, 'stripe-should-retry'), 'false', 'duplicate identifier: Stripe-Should-Retry: false');
	my $rr = post(body => $b, headers => { 'Idempotency-Key' => "d2-$i" });
	ok($rr->{status} == 400 && hdr($rr, 'idempotent-replayed') && hdr($rr, 'stripe-should-retry') eq 'false',
		'duplicate identifier 400 is stored and replayed with its headers');
	my $s1 = $mock->stats;
	is($s1->{duplicate_identifier_attempts} - $s0->{duplicate_identifier_attempts}, 1, 'duplicate_identifier_attempts counted');
	ok($s1->{distinct_idempotency_keys_per_identifier_max} >= 2, 'distinct_idempotency_keys_per_identifier_max sees 2 keys');
	is(nevents(identifier => $i), 1, 'duplicate identifier: billed once');
	is($s1->{identifiers_billed_under_multiple_keys}, 0, 'identifiers_billed_under_multiple_keys still 0');
}

# pruning: idempotency_ttl_s / identifier_ttl_s
{
	my ($b, $i) = ev();
	post(body => $b, headers => { 'Idempotency-Key' => "tt-$i" });
	$mock->config({ idempotency_ttl_s => 0 });
	my $r = post(body => $b, headers => { 'Idempotency-Key' => "tt-$i" });
	ok($r->{status} == 400 && !hdr($r, 'idempotent-replayed') && $r->{json}{error}{message} =~ /already exists/,
		'idempotency_ttl_s 0: key pruned, request runs again and hits the identifier check');
	$mock->config({ identifier_ttl_s => 0 });
	$r = post(body => $b, headers => { 'Idempotency-Key' => "tt2-$i" });
	is($r->{status}, 200, 'identifier_ttl_s 0: identifier pruned, billed again');
	is(nevents(identifier => $i), 2, 'pruned identifier: two billed events');
	my $s = $mock->stats;
	is($s->{identifiers_billed_multiple_times}, 1, 'identifiers_billed_multiple_times counted');
	is($s->{identifiers_billed_under_multiple_keys}, 1, 'identifiers_billed_under_multiple_keys counted');
	$mock->config({ idempotency_ttl_s => 86400, identifier_ttl_s => 86400 });
}

# ---------------------------------------------------------------------------
# one concurrent call per customer and meter
# ---------------------------------------------------------------------------

{
	$mock->config({ latency_ms => 600 });
	my $s0 = $mock->stats;
	my ($b1) = ev(customer => 'cus_conc');
	my ($b2, $i2) = ev(customer => 'cus_conc');
	my $s = raw_send($b1);
	sleep 0.2;
	my $t0 = time;
	my $r2 = post(body => $b2, headers => { 'Idempotency-Key' => "ck-$i2" });
	my $other_cust = post(body => (ev(customer => 'cus_other'))[0]);
	my $other_meter = post(body => (ev(customer => 'cus_conc', event_name => 'other_meter'))[0]);
	my $r1 = raw_read($s);
	$mock->config({ latency_ms => 0 });
	is($r1->{status}, 200, 'concurrency: first request 200');
	ok($r2->{status} == 429 && $r2->{json}{error}{code} eq 'rate_limit'
		  && $r2->{json}{error}{message} eq 'Cannot create multiple usage events for the same customer, meter concurrently.',
		'concurrency: same customer+meter → 429') or diag($r2->{content});
	is($other_cust->{status}, 200, 'concurrency: other customer in parallel ok');
	is($other_meter->{status}, 200, 'concurrency: same customer, other meter ok');
	my $s1 = $mock->stats;
	is($s1->{concurrency_violations} - $s0->{concurrency_violations}, 1, 'concurrency_violations counted');
	ok($s1->{max_in_flight} >= 2, "max_in_flight tracked ($s1->{max_in_flight})");
	my $r3 = post(body => $b2, headers => { 'Idempotency-Key' => "ck-$i2" });
	ok($r3->{status} == 200 && !hdr($r3, 'idempotent-replayed'), 'concurrency: 429 not stored; retry with same key bills');
}

# ---------------------------------------------------------------------------
# rate limit
# ---------------------------------------------------------------------------

{
	$mock->config({ rate_limit_per_s => 5 });
	my %st;
	$st{ post(body => (ev())[0])->{status} }++ for 1 .. 10;
	my $r = post(body => (ev())[0]);
	$mock->config({ rate_limit_per_s => undef });
	ok(($st{429} // 0) >= 4 && ($st{200} // 0) >= 1, "rate_limit_per_s 5: 10 quick requests → " . ($st{200} // 0) . " ok, " . ($st{429} // 0) . " limited");
	ok($r->{status} == 429 && $r->{json}{error}{code} eq 'rate_limit' && $r->{json}{error}{message} =~ /^Request rate limit exceeded/,
		'rate limit body');
	ok($mock->stats->{rate_limited} >= 4, 'rate_limited counted');
}

# ---------------------------------------------------------------------------
# faults at rate 1.0
# ---------------------------------------------------------------------------

sub with_fault
{
	my ($fault, $extra, $code) = @_;
	$mock->config({ faults => { $fault => 1 }, %{ $extra // {} } });
	my @res = eval { $code->() };
	my $err = $@;
	$mock->config({ faults => {} });
	die $err if $err;
	return @res;
}

sub billed_delta
{
	my ($code) = @_;
	my $b0 = $mock->stats->{billed};
	my @r = $code->();
	return ($mock->stats->{billed} - $b0, @r);
}

{
	my ($d, $r) = billed_delta(sub { with_fault('500', {}, sub { post(body => (ev())[0]) }) });
	ok($r->{status} == 500 && $r->{json}{error}{type} eq 'api_error' && hdr($r, 'stripe-should-retry') eq 'true' && $d == 0,
		'fault 500: api_error, Stripe-Should-Retry true, not billed');

	my ($b, $i) = ev();
	($d, $r) = billed_delta(sub { with_fault('500_after', {}, sub { post(body => $b, headers => { 'Idempotency-Key' => "fa-$i" }) }) });
	ok($r->{status} == 500 && $d == 1, 'fault 500_after: 500 but billed');
	my $rr = post(body => $b, headers => { 'Idempotency-Key' => "fa-$i" });
	ok($rr->{status} == 500 && hdr($rr, 'idempotent-replayed') eq 'true', 'fault 500_after: stored, replayed as 500');

	($d, $r) = billed_delta(sub { with_fault('503', {}, sub { post(body => (ev())[0]) }) });
	ok($r->{status} == 503 && $r->{json}{error}{type} eq 'api_error' && hdr($r, 'stripe-should-retry') eq 'true' && $d == 0, 'fault 503');

	($d, $r) = billed_delta(sub { with_fault('429', {}, sub { post(body => (ev())[0]) }) });
	ok($r->{status} == 429 && $r->{json}{error}{code} eq 'rate_limit' && $d == 0, 'fault 429');

	($d, $r) = billed_delta(sub { with_fault('409', {}, sub { post(body => (ev())[0], headers => { 'Idempotency-Key' => 'x409' }) }) });
	ok($r->{status} == 409 && $r->{json}{error}{type} eq 'idempotency_error' && $d == 0, 'fault 409');

	($d, $r) = billed_delta(sub { with_fault('timeout', {}, sub { post(body => (ev())[0], timeout => 1) }) });
	ok($r->{status} == 599 && $r->{elapsed} >= 0.9 && $d == 0, 'fault timeout: client times out, not billed') or diag("$r->{status} $r->{content}");
	($d, $r) = billed_delta(sub { with_fault('timeout', { timeout_hold_ms => 300 }, sub { post(body => (ev())[0], timeout => 5) }) });
	ok($r->{status} == 599 && $r->{elapsed} < 3, 'fault timeout: socket destroyed after timeout_hold_ms');
	($d, $r) = billed_delta(sub { with_fault('timeout_after', {}, sub { post(body => (ev())[0], timeout => 1) }) });
	ok($r->{status} == 599 && $d == 1, 'fault timeout_after: client times out, billed');
	$mock->config({ timeout_hold_ms => 120000 });

	($d, $r) = billed_delta(sub { with_fault('reset', {}, sub { post(body => (ev())[0]) }) });
	ok($r->{status} == 599 && $d == 0, 'fault reset: connection error, not billed') or diag($r->{content});

	($b, $i) = ev();
	($d, $r) = billed_delta(sub { with_fault('reset_after', {}, sub { post(body => $b, headers => { 'Idempotency-Key' => "ra-$i" }) }) });
	ok($r->{status} == 599 && $d == 1, 'fault reset_after: connection error, billed');
	$rr = post(body => $b, headers => { 'Idempotency-Key' => "ra-$i" });
	ok($rr->{status} == 200 && hdr($rr, 'idempotent-replayed') eq 'true' && $rr->{json}{identifier} eq $i,
		'fault reset_after: retry with same key replays the 200');

	($d, $r) = billed_delta(sub { with_fault('truncated', {}, sub { post(body => (ev())[0]) }) });
	ok($r->{status} == 599 && $d == 1, 'fault truncated: short body detected, billed') or diag("$r->{status} $r->{content}");

	($d, $r) = billed_delta(sub { with_fault('slow', { slow_ms => 400 }, sub { post(body => (ev())[0]) }) });
	ok($r->{status} == 200 && $r->{elapsed} >= 0.38 && $d == 1, sprintf('fault slow: 200 after %.2fs', $r->{elapsed}));

	($d, $r) = billed_delta(sub { with_fault('html', {}, sub { post(body => (ev())[0]) }) });
	ok($r->{status} == 502 && hdr($r, 'content-type') =~ m{^text/html} && $r->{content} =~ /<html>/ && $d == 0, 'fault html: 502 text/html');

	($d, $r) = billed_delta(sub { with_fault('malformed_json', {}, sub { post(body => (ev())[0]) }) });
	ok($r->{status} == 200 && !$r->{json} && hdr($r, 'content-type') =~ m{^application/json} && $d == 0,
		'fault malformed_json: 200 with unparseable body, not billed');

	($d, $r) = billed_delta(sub { with_fault('huge', { huge_bytes => 300000 }, sub { post(body => (ev())[0]) }) });
	ok($r->{status} == 200 && length($r->{content}) == 300000 && $r->{json} && $d == 0, 'fault huge: 200 with huge_bytes body');
	($d, $r) = billed_delta(sub { with_fault('huge', { huge_bytes => 100000, huge_status => 500 }, sub { post(body => (ev())[0]) }) });
	ok($r->{status} == 500 && length($r->{content}) == 100000, 'fault huge: huge_status 500');
	$mock->config({ huge_bytes => 20 * 1024 * 1024, huge_status => 200 });

	($d, $r) = billed_delta(sub { with_fault('trickle', { trickle_interval_ms => 5 }, sub { post(body => (ev())[0]) }) });
	my $min = length($r->{content}) * 0.004;
	ok($r->{status} == 200 && $r->{json} && $r->{json}{object} eq 'billing.meter_event' && $r->{elapsed} >= $min && $d == 1,
		sprintf('fault trickle: valid body of %d bytes in %.2fs', length $r->{content}, $r->{elapsed}));
	$mock->config({ trickle_interval_ms => 200 });
	with_fault('trickle', {}, sub {
		my $s = raw_send((ev())[0]);
		my $sel = IO::Select->new($s);
		my $buf = '';
		my $deadline = time + 1.1;
		while ((my $left = $deadline - time) > 0) { last unless $sel->can_read($left); sysread($s, $buf, 4096, length $buf) or last }
		close $s;
		my (undef, $got) = split /\r\n\r\n/, $buf, 2;
		$got //= '';
		ok($buf =~ m{^HTTP/1\.1 200} && length($got) >= 2 && length($got) <= 8,
			'fault trickle: default pace is one byte per 200 ms (' . length($got) . ' body bytes in 1.1 s)');
	});

	($d, $r) = billed_delta(sub { with_fault('wrong_content_type', {}, sub { post(body => (ev())[0]) }) });
	ok($r->{status} == 200 && hdr($r, 'content-type') eq 'text/plain' && $r->{json} && $d == 1, 'fault wrong_content_type: text/plain, billed');

	my $fi = $mock->stats->{faults_injected};
	is_deeply([ grep { !$fi->{$_} } qw(500 500_after 503 429 409 timeout timeout_after reset reset_after truncated slow html malformed_json huge trickle wrong_content_type) ],
		[], 'faults_injected counts every fault');

	# mixed rates
	$mock->config({ faults => { '500' => 0.5 } });
	my %st;
	$st{ post(body => (ev())[0])->{status} }++ for 1 .. 40;
	$mock->config({ faults => {} });
	ok($st{500} && $st{200}, "fault rate 0.5: mix of 500 (" . ($st{500} // 0) . ") and 200 (" . ($st{200} // 0) . ')');
	eval { $mock->config({ faults => { nosuch => 1 } }) };
	like($@, qr/unknown fault/, 'config rejects unknown fault names');
	eval { $mock->config({ latencyms => 1 }) };
	like($@, qr/unknown config key/, 'config rejects unknown keys');
}

# latency
{
	$mock->config({ latency_ms => 250, latency_jitter_ms => 50 });
	my $r = post(body => (ev())[0]);
	my $r4 = post(body => (ev())[0], key => undef);
	$mock->config({ latency_ms => 0, latency_jitter_ms => 0 });
	ok($r->{status} == 200 && $r->{elapsed} >= 0.24 && $r->{elapsed} < 2, sprintf('latency_ms: %.2fs', $r->{elapsed}));
	ok($r4->{status} == 401 && $r4->{elapsed} >= 0.24, 'latency applies to error responses too');
}

# ---------------------------------------------------------------------------
# down
# ---------------------------------------------------------------------------

{
	# an idle keep-alive socket is closed when down is switched on
	my $ka = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $mock->port) or die;
	my $b = (ev())[0];
	print $ka "POST /v1/billing/meter_events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer $KEY\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: "
	  . length($b) . "\r\n\r\n$b";
	my $buf = '';
	my $sel = IO::Select->new($ka);
	while ($buf !~ /\r\n\r\n.*"timestamp":\d+\}$/s && $sel->can_read(5)) { sysread($ka, $buf, 4096, length $buf) or last }
	like($buf, qr{^HTTP/1\.1 200}, 'down: keep-alive connection works before');
	$mock->config({ down => JSON::PP::true });
	my $eof = $sel->can_read(3) && !sysread($ka, my $x, 10);
	ok($eof, 'down: idle keep-alive socket closed');
	my $r = post(body => (ev())[0]);
	is($r->{status}, 599, 'down: requests fail at the connection level');
	ok($mock->stats->{dropped_while_down} >= 1, 'down: control API still works, drops counted');
	$mock->config({ down => JSON::PP::false });
	is(post(body => (ev())[0])->{status}, 200, 'down off: requests succeed again');
}

# ---------------------------------------------------------------------------
# scripted responses
# ---------------------------------------------------------------------------

{
	my $i = uid();
	my $b0 = $mock->stats->{billed};
	$mock->script([
		{ match => { identifier => $i }, times => 2, status => 500,
			headers => { 'Stripe-Should-Retry' => 'false' }, body => { error => { type => 'api_error', message => 'scripted' } } },
		{ match => { event_name => 'script_ev' }, times => 1, fault => 'reset' },
		{ match => { event_name => 'script_txt' }, times => 1, status => 200, headers => { 'Content-Type' => 'text/plain' }, body => 'hello' },
	]);
	my ($b) = ev(identifier => $i);
	my $r1 = post(body => $b);
	my $r2 = post(body => $b);
	my $r3 = post(body => $b);
	ok($r1->{status} == 500 && $r1->{json}{error}{message} eq 'scripted' && hdr($r1, 'stripe-should-retry') eq 'false',
		'script: custom status, headers, body');
	is($r2->{status}, 500, 'script: times 2 → second also scripted');
	is($r3->{status}, 200, 'script: then the real endpoint');
	is($mock->stats->{billed} - $b0, 1, 'script: scripted responses are not billed');
	is(post(body => (ev(event_name => 'script_ev'))[0])->{status}, 599, 'script: fault entry');
	is(post(body => (ev(event_name => 'script_ev'))[0])->{status}, 200, 'script: fault consumed');
	my $t = post(body => (ev(event_name => 'script_txt'))[0]);
	ok($t->{content} eq 'hello' && hdr($t, 'content-type') eq 'text/plain', 'script: string body and Content-Type override');
	is($mock->stats->{scripts_remaining}, 0, 'script: all entries consumed');

	# {} matches everything; first match wins; store:true is replayed
	my ($sb, $si) = ev();
	$mock->script([
		{ match => {}, times => 1, status => 402, body => { error => { type => 'card_error', message => 'first' } }, store => JSON::PP::true },
		{ match => {}, times => 1, status => 500, body => { error => { type => 'api_error', message => 'second' } } },
	]);
	my $s1 = post(body => $sb, headers => { 'Idempotency-Key' => "sk-$si" });
	my $s2 = post(body => $sb, headers => { 'Idempotency-Key' => "sk-$si" });
	my $s3 = post(body => $sb, headers => { 'Idempotency-Key' => "sk-$si" });
	ok($s1->{status} == 402 && $s1->{json}{error}{message} eq 'first', 'script: first match wins');
	is($s2->{json}{error}{message}, 'second', 'script: entries consumed in order');
	ok($s3->{status} == 402 && hdr($s3, 'idempotent-replayed') eq 'true', 'script: store:true response replayed for its key');
	eval { $mock->script([{ match => {}, fault => 'bogus' }]) };
	like($@, qr/unknown fault/, 'script: bad entries rejected');
	eval { $mock->script([{ match => { customer => 'x' }, status => 500 }]) };
	like($@, qr/unknown match key/, 'script: unknown match keys rejected');
	$mock->script([{ match => { 'payload[stripe_customer_id]' => 'cus_scripted', stripe_account => 'acct_1Scripted' }, times => -1,
		status => 503, body => { error => { type => 'api_error', message => 'by payload' } } }]);
	my $p1 = post(body => (ev(customer => 'cus_scripted'))[0], headers => { 'Stripe-Account' => 'acct_1Scripted' });
	my $p2 = post(body => (ev(customer => 'cus_scripted'))[0], headers => { 'Stripe-Account' => 'acct_1Scripted' });
	my $p3 = post(body => (ev(customer => 'cus_scripted'))[0]);
	ok($p1->{status} == 503 && $p2->{status} == 503 && $p3->{status} == 200,
		'script: match on payload[KEY] and stripe_account; times -1 = unlimited');
	$mock->script([]);
}

# ---------------------------------------------------------------------------
# 404s, request log
# ---------------------------------------------------------------------------

check_error(post(path => '/v1/customers', body => 'email=x'), 404, undef, undef, qr{^Unrecognized request URL \(POST: /v1/customers\)}, '404 for other /v1 paths');
check_error(post(method => 'GET', path => '/v1/billing/meter_events', body => ''), 404, undef, undef, qr{\(GET: /v1/billing/meter_events\)}, '404 for GET on meter_events');

{
	my ($b, $i) = ev();
	post(body => $b, headers => { 'Idempotency-Key' => "log-$i" });
	post(body => $b, headers => { 'Idempotency-Key' => "log-$i" });
	my $rq = $mock->requests(limit => 2);
	is(scalar @$rq, 2, 'requests: limit');
	my ($a, $z) = @$rq;
	ok($a->{method} eq 'POST' && $a->{path} eq '/v1/billing/meter_events' && $a->{body} eq $b && $a->{status} == 200
		  && !$a->{replayed} && $z->{replayed} && $a->{headers}{authorization} eq "Bearer $KEY"
		  && $a->{headers}{'idempotency-key'} eq "log-$i" && $a->{time} > 0,
		'requests: method, path, body, status, replayed, lower-case headers with Authorization kept');
	$mock->config({ request_log_size => 3 });
	post(body => (ev())[0]) for 1 .. 5;
	is(scalar @{ $mock->requests(limit => 100) }, 3, 'requests: ring buffer bounded by request_log_size');
	$mock->config({ request_log_size => 10000 });
}

# a request the mock holds: open and its scripted delay in the log, until answered
{
	$mock->script([ { match => { identifier => 'log-held' }, times => 1, delay_ms => 800 } ]);
	my $s = raw_send((ev(identifier => 'log-held'))[0]);
	my $held;
	for (1 .. 50)
	{
		($held) = grep { ($_->{body} // '') =~ /identifier=log-held/ } @{ $mock->requests(limit => 5) };
		last if $held;
		sleep 0.05;
	}
	ok($held && $held->{open} && $held->{script_delay_ms} == 800 && !defined $held->{status},
		'requests: a delayed request is open, with its script_delay_ms');
	is(raw_read($s)->{status}, 200, 'requests: the delayed request is answered');
	($held) = grep { ($_->{body} // '') =~ /identifier=log-held/ } @{ $mock->requests(limit => 5) };
	ok(!$held->{open} && $held->{status} == 200, 'requests: no longer open once answered');
	post(body => (ev())[0]);
	my $plain = $mock->requests(limit => 1)->[0];
	ok(!$plain->{open} && $plain->{script_delay_ms} == 0, 'requests: an unscripted request: closed, no delay');
}

# fault recorded in request log
with_fault('500', {}, sub { post(body => (ev())[0]) });
is($mock->requests(limit => 1)->[0]{fault}, '500', 'requests: fault recorded');

# ---------------------------------------------------------------------------
# stats shape, reset
# ---------------------------------------------------------------------------

{
	my $s = $mock->stats;
	my @keys = qw(requests by_status billed duplicate_identifier_attempts concurrency_violations replays faults_injected
	  max_in_flight in_flight distinct_idempotency_keys_per_identifier_max identifiers_billed_under_multiple_keys);
	is_deeply([ grep { !exists $s->{$_} } @keys ], [], 'stats: all documented keys present');
	ok($s->{requests} > 100 && $s->{by_status}{200} > 10 && $s->{billed} == nevents(), 'stats: counts consistent with events');
	is($s->{in_flight}, 0, 'stats: nothing in flight');
	$mock->config({ latency_ms => 10 });
	$mock->reset;
	$s = $mock->stats;
	ok($s->{requests} == 0 && $s->{billed} == 0 && nevents() == 0 && !%{ $s->{by_status} }, 'reset: records cleared');
	is($mock->get_config->{latency_ms}, 0, 'reset: config restored');
	is(scalar @{ $mock->requests }, 0, 'reset: request log cleared');
}

# ---------------------------------------------------------------------------
# CLI checks
# ---------------------------------------------------------------------------

{
	my $js = "$FindBin::Bin/stripe-mock.js";
	my $node = $mock->{node};
	my $out = `"$node" "$js" --host 0.0.0.0 2>&1`;
	ok($? >> 8 == 2 && $out =~ /refusing/, 'CLI: refuses non-loopback host');
}

{
	my $pr = $mock->post_meter_event({ event_name => 'pm', identifier => 'pm-1',
			payload => { stripe_customer_id => 'cus_pm', value => 4 } }, 'Idempotency-Key' => 'pm-k1');
	ok($pr->{status} == 200 && $pr->{json}{payload}{value} eq '4', 'StripeMock::post_meter_event');
	ok($mock->wait_for(sub { $_[0]{billed} >= 1 }, timeout => 5), 'StripeMock::wait_for');
	$mock->script([{ match => { identifier => 'never' }, status => 500 }]);
	is(scalar @{ $mock->append_script([{ match => { identifier => 'never2' }, fault => 'reset' }]) }, 2, 'StripeMock::append_script');
	$mock->script([]);
}

{
	my $ok = eval { StripeMock->new(node => '/bin/false', timeout => 5); 1 };
	ok(!$ok && $@ =~ /exited .*before listening; stderr in \S+/, 'StripeMock->new dies with the stderr file when the mock cannot start');
}

# ---------------------------------------------------------------------------
# throughput (informational only)
# ---------------------------------------------------------------------------

my $BENCH_JS = <<'JS';
const http = require('http');
const port = +process.env.PORT, N = +process.env.N, C = +process.env.C, tag = process.env.TAG;
const agent = new http.Agent({ keepAlive: true, maxSockets: C });
let next = 0, ok = 0, bad = 0;
const t0 = process.hrtime.bigint();
function worker() {
  return new Promise((resolve) => {
    const go = () => {
      if (next >= N) return resolve();
      const i = next++;
      const body = 'event_name=bench&payload[stripe_customer_id]=cus_b' + i + '&payload[value]=1&identifier=' + tag + '-' + i;
      const req = http.request({ host: '127.0.0.1', port, method: 'POST', path: '/v1/billing/meter_events', agent,
        headers: { Authorization: 'Bearer sk_test_benchbench01', 'Content-Type': 'application/x-www-form-urlencoded',
          'Content-Length': Buffer.byteLength(body), 'Idempotency-Key': tag + '-k' + i } }, (res) => {
        res.resume();
        res.on('end', () => { if (res.statusCode === 200) ok++; else bad++; go(); });
      });
      req.on('error', () => { bad++; go(); });
      req.end(body);
    };
    go();
  });
}
Promise.all(Array.from({ length: C }, worker)).then(() => {
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  console.log(JSON.stringify({ n: N, c: C, ok, bad, secs, rps: Math.round(N / secs) }));
  agent.destroy();
});
JS

my $billed_before_bench = $mock->stats->{billed};
for my $run ([ 2000, 50 ], [ 20000, 256 ])
{
	my ($n, $c) = @$run;
	local $ENV{PORT} = $mock->port;
	local $ENV{N} = $n;
	local $ENV{C} = $c;
	local $ENV{TAG} = "bench$n";
	open(my $fh, '-|', $mock->{node}, '-e', $BENCH_JS) or die "bench: $!";
	my $out = do { local $/; <$fh> };
	close $fh;
	my $res = eval { $JSON->decode($out) } || {};
	is($res->{ok}, $n, "throughput run: $n requests over $c keep-alive connections all 200");
	note(sprintf('throughput: %d requests, %d connections: %.2fs, %d req/s', $n, $c, $res->{secs} // 0, $res->{rps} // 0));
	diag(sprintf('throughput: %d requests over %d keep-alive connections: %d req/s', $n, $c, $res->{rps} // 0))
	  if $ENV{STRIPE_MOCK_BENCH_DIAG};
}
is($mock->stats->{billed} - $billed_before_bench, 22000, 'throughput: every bench event billed once');

# ---------------------------------------------------------------------------
# stop
# ---------------------------------------------------------------------------

my $pid = $mock->pid;
$mock->stop;
ok(!kill(0, $pid), 'stop: mock process gone');
note(sprintf('selftest took %.1fs', time - $t_start));

done_testing();
