# A server that does not offer HTTP/2 gets HTTP/1.1 with keep-alive: the
# worker notices, says so once in the log, and opens a connection per
# request in flight instead of the few it keeps for HTTP/2.  With
# stripe_meter.http2 off, an h2 server is spoken to in HTTP/1.1 too.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use StripeMeterTest;
use StripeMock;

my $dir = PostgreSQL::Test::Utils::tempdir;
make_certificates($dir, [ 'server', 'localhost', 'DNS:localhost,IP:127.0.0.1' ]);
delete @ENV{qw(https_proxy HTTPS_PROXY all_proxy ALL_PROXY http_proxy no_proxy NO_PROXY)};
my %tls = (tls_cert => "$dir/server.pem", tls_key => "$dir/server.key");

# 1. An https server offering http/1.1 alone.
my $h1 = StripeMock->new(%tls, http1_only => 1, config => { latency_ms => 300 });
my $node = new_node('h1', mock => $h1, conf => { 'stripe_meter.ca_file' => "$dir/ca.pem" });
queue_events($node, 'one', 400);
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'one-%'},
	'400', 'all 400 delivered over HTTP/1.1');
my $s = $h1->stats;
is($s->{requests_h2}, 0, 'no request over HTTP/2');
is($s->{requests_http1}, 400, 'every request over HTTP/1.1');
cmp_ok($s->{connections_with_requests}, '>', 8,
	"more connections than HTTP/2 would use ($s->{connections_with_requests})");
cmp_ok($s->{max_in_flight}, '>', 8, "requests in flight on as many connections ($s->{max_in_flight})");
is($s->{identifiers_billed_multiple_times}, 0, 'nothing billed twice');
ok($node->log_contains(qr/does not offer HTTP\/2, so each connection carries one request at a time/),
	'the worker says why it opens more connections');
$node->stop;

# 2. stripe_meter.http2 = off: HTTP/1.1 even where h2 is offered.
my $h2 = StripeMock->new(%tls, config => { latency_ms => 100 });
my $node2 = new_node('h2off', mock => $h2,
	conf => { 'stripe_meter.ca_file' => "$dir/ca.pem", 'stripe_meter.http2' => 'off' });
queue_events($node2, 'off', 50);
wait_for($node2, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'off-%'},
	'50', 'all 50 delivered with http2 off');
$s = $h2->stats;
is($s->{requests_h2}, 0, 'http2 = off: no request over HTTP/2');
is($s->{requests_http1}, 50, 'http2 = off: all over HTTP/1.1');
$node2->stop;

done_testing();
