# TLS is always verified, and plain http never leaves the machine:
#  - https to a loopback server with a self-signed CA is refused until that
#    CA is configured (stripe_meter.ca_file), then works;
#  - no setting turns verification off, and a certificate for another host
#    is refused even when its CA is trusted;
#  - stripe_meter.api_url refuses plain http to any non-loopback host;
#  - plain http to loopback never goes through a proxy from the server's
#    environment (http_proxy), which would carry the key off the machine.
# The CA and the certificates are made with openssl in the test's tmp dir.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;
use StripeMock;

my $dir = PostgreSQL::Test::Utils::tempdir;

# A CA, a server certificate for localhost/127.0.0.1 and one for another
# host, both signed by the CA.
make_certificates($dir, [ 'server', 'localhost', 'DNS:localhost,IP:127.0.0.1' ],
	[ 'wrong', 'wrong.example', 'DNS:wrong.example' ]);

# A proxy named in the server's environment: a second mock that must never
# see a request.  Only http_proxy (libcurl ignores HTTP_PROXY); no proxy for
# https, so the TLS part talks to the server directly.
my $proxy = start_mock();
delete @ENV{qw(https_proxy HTTPS_PROXY all_proxy ALL_PROXY no_proxy NO_PROXY)};

my $tls = StripeMock->new(tls_cert => "$dir/server.pem", tls_key => "$dir/server.key");
like($tls->url, qr{^https://localhost:\d+$}, 'the mock serves https');
my $node;
{
	# only the server gets the proxy (the test's own HTTP client would use it too)
	local $ENV{http_proxy} = $proxy->url;
	$node = new_node('tls', mock => $tls);
}


# --- without the CA: refused ------------------------------------------------------
queue_events($node, 'noca', 3, value => 'i');
wait_for($node, q{SELECT count(*) FROM stripe_meter.outbox
	WHERE identifier LIKE 'noca-%' AND attempts > 0 AND last_error ILIKE '%certificate%'}, '3',
	'without its CA the self-signed server is refused, for a certificate reason');
# the server learns of the broken-off handshake when it reads the client's
# alert, which can come after the worker has recorded its error
my $stats = wait_mock($tls, sub { $_[0]{tls_handshake_failures} >= 1 },
	'the client broke off the handshake');
is($stats->{requests}, 0, 'not one HTTP request reached the server');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.meter_events'), '0', 'nothing delivered');

# --- with the CA: delivered -------------------------------------------------------
set_conf($node, 'stripe_meter.ca_file' => "$dir/ca.pem");
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'noca-%'}, '3',
	'with stripe_meter.ca_file naming the CA, the events are delivered');
is($tls->stats->{billed}, 3, 'the https server billed each once');

# --- verification cannot be switched off ----------------------------------------
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM pg_settings
	 WHERE name LIKE 'stripe\_meter.%' AND name <> 'stripe_meter.ca_file'
	   AND name ~* '(verif|insecure|ssl|tls|cert|peer|skip|trust|ca_)'}),
	'0', 'no setting besides ca_file touches certificate checking');
for my $name (qw(ssl_verify verify_peer tls_verify insecure ssl_verifypeer verify_host))
{
	my ($rc, $out, $err) = $node->psql('postgres',
		"\\set VERBOSITY verbose\nALTER SYSTEM SET stripe_meter.$name = off");
	like($err, qr/ERROR:  42602|ERROR:  42704/, "stripe_meter.$name cannot be set");
}
like($node->safe_psql('postgres', q{SELECT extra_desc FROM pg_settings WHERE name = 'stripe_meter.ca_file'}),
	qr/cannot be turned off/, 'ca_file says verification cannot be turned off');

# A certificate for another host, from the trusted CA: refused.
my $wrong = StripeMock->new(tls_cert => "$dir/wrong.pem", tls_key => "$dir/wrong.key");
set_conf($node, 'stripe_meter.api_url' => $wrong->url);
queue_events($node, 'wronghost', 2, value => 'i');
wait_for($node, q{SELECT count(*) FROM stripe_meter.outbox
	WHERE identifier LIKE 'wronghost-%' AND attempts > 0
	  AND (last_error ILIKE '%certificate%' OR last_error ILIKE '%subject%name%')}, '2',
	'a certificate for another host is refused, though its CA is trusted');
is($wrong->stats->{requests}, 0, 'not one HTTP request reached the wrong host');
$wrong->stop;

# --- plain http: loopback only ------------------------------------------------------
for my $url ('http://example.com', 'http://api.stripe.invalid/', 'http://10.0.0.1:8080', 'http://192.0.2.1',
	'http://0.0.0.0:80', 'http://2130706433/', 'http://127.0.0.1.nip.io/', 'http://127.1.2.3.example/',
	'http://localhost.evil.example', 'http://localhostevil.example', 'http://127.0.0.1@evil.example/',
	'http://localhost:80@evil.example', 'http://user@127.0.0.1/', 'http://[::ffff:c000:201]/',
	'http://[fe80::1]/', 'HTTP://EXAMPLE.COM', 'ftp://127.0.0.1/', 'file:///etc/passwd', '//127.0.0.1',
	'127.0.0.1:8080', 'http://', 'http:///v1', 'gopher://localhost/')
{
	my ($rc, $out, $err) = $node->psql('postgres',
		"\\set VERBOSITY verbose\nALTER SYSTEM SET stripe_meter.api_url = '$url'");
	like($err, qr/ERROR:  22023: invalid value for parameter "stripe_meter.api_url"/, "refused: $url");
}
for my $url ('http://127.0.0.1:8080', 'http://127.255.0.9/', 'http://localhost:1/', 'http://LOCALHOST',
	'http://[::1]:99', 'https://example.com', 'https://10.0.0.1:8443/')
{
	my ($rc, $out, $err) = $node->psql('postgres',
		"\\set VERBOSITY verbose\nALTER SYSTEM SET stripe_meter.api_url = '$url'");
	is($err, '', "accepted: $url");
}

# --- plain http to loopback bypasses the environment's proxy ------------------------------
my $plain = start_mock();
set_conf($node, 'stripe_meter.api_url' => $plain->url);
queue_events($node, 'plain', 2, value => 'i');
wait_for($node, 'SELECT count(*) FROM stripe_meter.outbox', '0',
	'plain http to loopback delivers (the wrong host\'s two events too)');
is($plain->stats->{billed}, 4, 'straight to the server');
my $before = $plain->stats->{requests};
$node->safe_psql('postgres', 'SELECT stripe_meter_sync_meters()');
cmp_ok($plain->stats->{requests}, '>', $before,
	'a backend\'s own request (the meter sync) goes straight to the server too');
is($proxy->stats->{requests}, 0, 'the proxy in http_proxy saw nothing');

$node->stop;
$_->stop for $tls, $plain, $proxy;
done_testing();
