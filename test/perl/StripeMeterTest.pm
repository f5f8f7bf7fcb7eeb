# StripeMeterTest.pm: shared setup for stripe_meter's TAP tests.
#
#   use StripeMeterTest;
#   my $mock = start_mock();
#   my $node = new_node('main', mock => $mock,
#       conf => { 'stripe_meter.max_in_flight' => 64 });
#   $node->safe_psql('postgres', "SELECT stripe_meter_event_create(...)");
#   wait_for($node, 'SELECT count(*) FROM stripe_meter.outbox', '0', 'delivered');
#   ...
#   $mock->stop;
#   done_testing();
#
# Every wait polls for a state, with PostgreSQL::Test's default timeout as
# the deadline; nothing sleeps for a fixed time.

package StripeMeterTest;

use strict;
use warnings;

use Carp qw(croak);
use Exporter 'import';
use IPC::Run ();
use JSON::PP ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);

use StripeMock;

our @EXPORT = qw(
  $API_KEY $API_KEY_2
  start_mock new_node set_conf
  queue_events wait_for wait_mock query_json
  meter_requests requests_for form_pairs form_value
  worker_pids restart_workers mock_events_for
  make_certificates
);

# Test keys: the mock accepts sk_test_ + 8 or more letters and digits.  Tests
# never print them, except the one about the Authorization header.
our $API_KEY = 'sk_test_' . 'TapSuite0123abcd';
our $API_KEY_2 = 'sk_test_' . 'TapRotated456xyz';

my $JSON = JSON::PP->new->utf8->canonical->allow_nonref;

=head2 start_mock(%config)

Starts the Stripe mock on a free loopback port, with the given config.

=cut

sub start_mock
{
	my (%config) = @_;
	return StripeMock->new(%config ? (config => \%config) : ());
}

=head2 new_node($name, mock => $mock, conf => {...}, databases => [...], start => 1, init => {...}, install_path => $dir)

A node that preloads stripe_meter and delivers to the mock quickly: no rate
limit, retries after 50..500 ms, a 1 s naptime.  conf adds or overrides
postgresql.conf settings (values are quoted).  The extension is created in
each of databases (default: postgres; databases other than postgres are
created first).  init passes extra arguments to init (allows_streaming).
install_path runs another installation of PostgreSQL (default: the one in
PATH).

=cut

sub new_node
{
	my ($name, %o) = @_;
	my $mock = $o{mock} or croak 'new_node: mock => $mock is required';
	my $node = PostgreSQL::Test::Cluster->new($name,
		$o{install_path} ? (install_path => $o{install_path}) : ());
	$node->init(extra => [ '--encoding=UTF8', '--locale=C' ], %{ $o{init} // {} });

	my %conf = (
		'shared_preload_libraries' => 'stripe_meter',
		'stripe_meter.api_url' => $mock->url,
		'stripe_meter.api_key' => $API_KEY,
		'stripe_meter.rate_limit' => 0,
		'stripe_meter.retry_min_delay' => 50,
		'stripe_meter.retry_max_delay' => 500,
		'stripe_meter.naptime' => 1000,
		'stripe_meter.launcher_naptime' => 1000,
		%{ $o{conf} // {} });
	$node->append_conf('postgresql.conf',
		join('', map { "$_ = " . _quote($conf{$_}) . "\n" } sort keys %conf));

	return $node if defined $o{start} && !$o{start};
	$node->start;
	for my $db (@{ $o{databases} // ['postgres'] })
	{
		$node->safe_psql('postgres', "CREATE DATABASE $db") if $db ne 'postgres';
		$node->safe_psql($db, 'CREATE EXTENSION stripe_meter');
	}
	return $node;
}

sub _quote
{
	my ($v) = @_;
	$v =~ s/'/''/g;
	return "'$v'";
}

=head2 set_conf($node, name => value, ...)

ALTER SYSTEM SET each setting and reload.  Statement logging is turned off
for the session, so a key set this way does not reach the server log.

=cut

sub set_conf
{
	my ($node, %set) = @_;
	my $sql = "SET log_statement = 'none';\n";
	$sql .= "ALTER SYSTEM SET $_ = " . _quote($set{$_}) . ";\n" for sort keys %set;
	$sql .= "SELECT pg_reload_conf();\n";
	$node->safe_psql('postgres', $sql);
	return;
}

=head2 queue_events($node, $prefix, $n, %options)

Records $n events through stripe_meter_event_create(), identified
"$prefix-1" .. "$prefix-$n", each for its own customer ("cus_${prefix}1"
...) unless customers => K spreads them over K customers.  Options: db
(default postgres), event_name (default api_requests), value (an SQL
expression of i, default 1), account (a Connect account for all of them).

=cut

sub queue_events
{
	my ($node, $prefix, $n, %o) = @_;
	my $customer = defined $o{customers} ? "i % $o{customers}" : 'i';
	my $event = $o{event_name} // 'api_requests';
	my $value = $o{value} // '1';
	my $account = defined $o{account} ? "'$o{account}'" : 'NULL';
	$node->safe_psql($o{db} // 'postgres', qq{
		SELECT stripe_meter_event_create('$event',
			jsonb_build_object('stripe_customer_id', 'cus_$prefix' || $customer, 'value', $value),
			'$prefix-' || i, NULL, $account)
		  FROM generate_series(1, $n) i});
	return;
}

=head2 wait_for($node, $sql, $expected, $test_name, $db)

Polls $sql (in $db, default postgres) until it prints $expected (default
't'), and records that as a test.  Returns true on success.

=cut

sub wait_for
{
	my ($node, $sql, $expected, $name, $db) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	$expected //= 't';
	my $ok = $node->poll_query_until($db // 'postgres', $sql, $expected);
	ok($ok, $name // "wait for: $sql");
	return $ok;
}

=head2 wait_mock($mock, sub { my $stats = shift; ... }, $test_name)

Polls the mock's stats until the code returns true, and records that as a
test.  Returns the final stats, or undef on timeout.

=cut

sub wait_mock
{
	my ($mock, $code, $name) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $deadline = time + $PostgreSQL::Test::Utils::timeout_default;
	my $stats;
	while (1)
	{
		$stats = $mock->stats;
		last if $code->($stats);
		if (time > $deadline)
		{
			diag('mock stats at timeout: ' . $JSON->encode($stats));
			$stats = undef;
			last;
		}
		sleep 0.1;
	}
	ok(defined $stats, $name) if defined $name;
	return $stats;
}

=head2 query_json($node, $db, $sql)

Runs a query returning one json value and decodes it (undef for NULL or no
row).

=cut

sub query_json
{
	my ($node, $db, $sql) = @_;
	my $out = $node->safe_psql($db, $sql);
	return undef if $out eq '';
	return $JSON->decode($out);
}

=head2 Requests the mock received

meter_requests($mock): every POST /v1/billing/meter_events in the mock's
request log, oldest first.  requests_for($mock, $identifier): those whose
form body names that identifier.  form_pairs($body): the body's decoded
[name, value] pairs in order (values as Perl character strings).
form_value($body, $name): the first value of a field.

=cut

sub meter_requests
{
	my ($mock) = @_;
	return [ grep { $_->{method} eq 'POST' && $_->{path} eq '/v1/billing/meter_events' }
		  @{ $mock->requests(limit => 1000000) } ];
}

sub requests_for
{
	my ($mock, $identifier) = @_;
	return [ grep { (form_value($_->{body}, 'identifier') // '') eq $identifier }
		  @{ meter_requests($mock) } ];
}

sub form_pairs
{
	my ($body) = @_;
	my @pairs;
	for my $part (split /&/, $body // '')
	{
		my ($k, $v) = split /=/, $part, 2;
		push @pairs, [ _form_decode($k), _form_decode($v // '') ];
	}
	return \@pairs;
}

sub form_value
{
	my ($body, $name) = @_;
	for my $p (@{ form_pairs($body) })
	{
		return $p->[1] if $p->[0] eq $name;
	}
	return undef;
}

sub _form_decode
{
	my ($s) = @_;
	$s =~ tr/+/ /;
	$s =~ s/%([0-9A-Fa-f]{2})/chr(hex $1)/ge;
	utf8::decode($s);
	return $s;
}

=head2 mock_events_for($mock, $identifier)

The events the mock billed for an identifier (one per billing); the
identifier is a Perl character string.

=cut

sub mock_events_for
{
	my ($mock, $identifier) = @_;
	# StripeMock's query encoding percent-encodes characters, not UTF-8
	# bytes: hand it the bytes.
	utf8::encode($identifier);
	return $mock->events(identifier => $identifier);
}

=head2 worker_pids($node, $db)

The pids of the stripe_meter workers connected to $db (all databases when
undef), read from pg_stat_activity through the postgres database.  Every
caller expects a worker, and the launcher starts one up to its naptime
after CREATE EXTENSION or a restart, so this first waits until at least
one is connected.

=cut

sub worker_pids
{
	my ($node, $db) = @_;
	my $where = "backend_type = 'stripe_meter worker'";
	$where .= " AND datname = '$db'" if defined $db;
	$node->poll_query_until('postgres',
		"SELECT count(*) > 0 FROM pg_stat_activity WHERE $where")
	  or croak "worker_pids: no stripe_meter worker connected" . (defined $db ? " to $db" : '');
	my $out = $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE $where ORDER BY pid");
	return [ grep { length } split /\n/, $out ];
}

=head2 restart_workers($node, $db)

After a setting of $db changed (ALTER DATABASE ... SET): ends the workers
of $db that may have read the old one, and waits until a worker started
since is connected.  A worker reads the database's settings once, as it
connects; one started before the change but not yet shown in
pg_stat_activity when a plain pg_terminate_backend() ran would keep the
old setting, so workers are told apart by when they started.

=cut

sub restart_workers
{
	my ($node, $db) = @_;
	my $since = $node->safe_psql('postgres', 'SELECT clock_timestamp()');
	my $workers = "FROM pg_stat_activity WHERE backend_type = 'stripe_meter worker'"
	  . " AND datname = '$db'";
	for (1 .. 1200)
	{
		$node->safe_psql('postgres',
			"SELECT pg_terminate_backend(pid) $workers AND backend_start < '$since'");
		return if $node->safe_psql('postgres',
			"SELECT count(*) > 0 $workers AND backend_start >= '$since'") eq 't';
		sleep 0.1;
	}
	croak "restart_workers: no new stripe_meter worker connected to $db";
}

=head2 make_certificates($dir, [$name, $cn, $san], ...)

Makes a test CA ($dir/ca.pem) and, for each [$name, $cn, $san], a server
certificate it signs ($dir/$name.pem, $dir/$name.key) for that common name
and subjectAltName (for example 'DNS:localhost,IP:127.0.0.1'), with openssl.

=cut

sub _openssl
{
	my @cmd = ('openssl', @_);
	my ($out, $err) = ('', '');
	IPC::Run::run(\@cmd, '>', \$out, '2>', \$err) or die "openssl @_ failed: $err";
	return;
}

sub make_certificates
{
	my ($dir, @certs) = @_;
	my @ec = ('-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes');
	_openssl('req', '-x509', @ec, '-keyout', "$dir/ca.key", '-out', "$dir/ca.pem", '-days', '2',
		'-subj', '/CN=stripe_meter test CA',
		'-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign');
	for my $cert (@certs)
	{
		my ($name, $cn, $san) = @$cert;
		open(my $fh, '>', "$dir/$name.ext") or die "cannot write $dir/$name.ext: $!";
		print $fh "subjectAltName=$san\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n";
		close $fh;
		_openssl('req', @ec, '-keyout', "$dir/$name.key", '-out', "$dir/$name.csr", '-subj', "/CN=$cn");
		_openssl('x509', '-req', '-in', "$dir/$name.csr", '-CA', "$dir/ca.pem", '-CAkey', "$dir/ca.key",
			'-CAcreateserial', '-out', "$dir/$name.pem", '-days', '2', '-extfile', "$dir/$name.ext");
	}
	chmod 0644, glob("$dir/*");
	return;
}

1;
