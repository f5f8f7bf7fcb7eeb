# Over TLS the worker speaks HTTP/2 and multiplexes: several hundred
# requests in flight share a handful of connections, and another connection
# opens only when the open ones carry as many streams as the server allows.
# The mock speaks h2 and http/1.1 through ALPN over TLS, as Stripe does, with
# a CA this test makes.
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

# Stripe answering in 300 ms: the window of requests in flight fills up.
my $mock = StripeMock->new(%tls, config => { latency_ms => 300 });
my $node = new_node('h2', mock => $mock, conf => { 'stripe_meter.ca_file' => "$dir/ca.pem" });

# One event per customer, so that nothing but the window limits them.

# 1. The first requests wait for the first connection instead of opening
#    one each.
queue_events($node, 'first', 20);
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'first-%'},
	'20', 'the first 20 delivered');
my $s = $mock->stats;
is($s->{requests_http1}, 0, 'no request over HTTP/1.1');
is($s->{connections_with_requests}, 1, '20 requests at once shared one connection');

# 2. A burst: several hundred in flight at once, on a handful of connections.
$mock->reset;
$mock->config({ latency_ms => 300 });
queue_events($node, 'burst', 2000);
wait_for($node, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'burst-%'},
	'2000', 'the burst of 2000 delivered');
$s = $mock->stats;
cmp_ok($s->{max_in_flight}, '>=', 300, "several hundred requests in flight at once ($s->{max_in_flight})");
cmp_ok($s->{connections_with_requests}, '<=', 8, "on at most 8 connections ($s->{connections_with_requests})");
cmp_ok($s->{max_streams_per_connection}, '>', 1, "many streams on one connection ($s->{max_streams_per_connection})");
cmp_ok($s->{max_streams_per_connection}, '<=', 100, 'never more than the server allows');
is($s->{requests_http1}, 0, 'every request over HTTP/2');
is($s->{identifiers_billed_multiple_times}, 0, 'nothing billed twice');
$node->stop;

# 3. A server allowing 10 streams per connection: more connections open when
#    the open ones are full, up to stripe_meter.max_connections.
my $narrow = StripeMock->new(%tls, h2_max_streams => 10, config => { latency_ms => 300 });
my $node2 = new_node('h2narrow', mock => $narrow,
	conf => { 'stripe_meter.ca_file' => "$dir/ca.pem", 'stripe_meter.max_connections' => 3 });
queue_events($node2, 'narrow', 200);
wait_for($node2, q{SELECT count(*) FROM stripe_meter.meter_events WHERE identifier LIKE 'narrow-%'},
	'200', 'all 200 delivered through a server allowing 10 streams');
$s = $narrow->stats;
cmp_ok($s->{max_streams_per_connection}, '<=', 10, 'each connection within the server\'s limit');
# more than 20 at once on connections of 10 streams: three in use together,
# and never a fourth (at most 30)
cmp_ok($s->{max_in_flight}, '>', 20, "three connections in use at once ($s->{max_in_flight} in flight)");
cmp_ok($s->{max_in_flight}, '<=', 30, 'never more than stripe_meter.max_connections x 10 in flight');
is($s->{identifiers_billed_multiple_times}, 0, 'nothing billed twice');
$node2->stop;

done_testing();
