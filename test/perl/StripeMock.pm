# StripeMock.pm: start and drive test/mock/stripe-mock.js from TAP tests.
#
#   use StripeMock;
#   my $mock = StripeMock->new();
#   $node->append_conf('postgresql.conf', "stripe_meter.api_base = '" . $mock->url . "'");
#   $mock->config({latency_ms => 50, faults => {'500' => 0.1}});
#   ... run the test ...
#   is($mock->stats->{billed}, 10, 'billed once each');
#   $mock->stop;
#
# Core Perl modules only.

package StripeMock;

use strict;
use warnings;

use Carp qw(croak);
use Cwd ();
use File::Basename qw(dirname);
use File::Spec;
use File::Temp ();
use HTTP::Tiny;
use IO::Handle;
use IO::Select;
use JSON::PP ();
use POSIX qw(WNOHANG);
use Scalar::Util qw(weaken);
use Time::HiRes qw(time sleep);

our $VERSION = '1.00';

# Absolute path of the mock server, relative to this file.
my $MOCK_JS = File::Spec->rel2abs(
	File::Spec->catfile(dirname(__FILE__), File::Spec->updir, 'mock', 'stripe-mock.js'));

my $JSON = JSON::PP->new->utf8->canonical->allow_nonref;

# Live instances, so END can stop them.
my %LIVE;

sub _find_node
{
	return $ENV{NODE} if $ENV{NODE};
	for my $dir (File::Spec->path)
	{
		for my $name ('node', 'nodejs')
		{
			my $p = File::Spec->catfile($dir, $name);
			return $p if -f $p && -x $p;
		}
	}
	return undef;
}

=head2 StripeMock->new(%opts)

Starts the mock on an OS-chosen port (C<port> to override) and waits for it
to listen (C<timeout>, default 30 s). C<tls_cert> and C<tls_key> (PEM files)
serve the API over https: url is then https://localhost:PORT (C<tls_host>
to name another host) and the control API uses a second, plain http port.
Over TLS the mock offers h2 and http/1.1 through ALPN, as Stripe does;
C<< http1_only => 1 >> offers http/1.1 alone, and C<< h2_max_streams => N >>
sets HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS (default 100); both need
C<tls_cert>. C<config> (hashref) is applied right
after start. C<node> overrides the node binary (default: $ENV{NODE}, then
node / nodejs on PATH). Dies with the mock's stderr on failure.

=cut

sub new
{
	my ($class, %opts) = @_;
	my $node = $opts{node} || _find_node()
	  or croak "StripeMock: cannot find node (or nodejs) in PATH; set \$ENV{NODE}";
	croak "StripeMock: mock server not found at $MOCK_JS" unless -f $MOCK_JS;
	croak 'StripeMock: http1_only and h2_max_streams need tls_cert and tls_key'
	  if ($opts{http1_only} || defined $opts{h2_max_streams}) && !$opts{tls_cert};
	croak 'StripeMock: h2_max_streams is for HTTP/2, not with http1_only'
	  if $opts{http1_only} && defined $opts{h2_max_streams};
	my $port = $opts{port} // 0;
	my $timeout = $opts{timeout} // 30;

	my $stderr_file;
	if ($ENV{TESTDATADIR} && -d $ENV{TESTDATADIR})
	{
		my $n = 0;
		$n++ while -e File::Spec->catfile($ENV{TESTDATADIR}, "stripe-mock-$n.log");
		$stderr_file = File::Spec->catfile($ENV{TESTDATADIR}, "stripe-mock-$n.log");
	}
	else
	{
		my $tmp = File::Temp->new(TEMPLATE => 'stripe-mock-XXXXXX', SUFFIX => '.log',
			TMPDIR => 1, UNLINK => 0);
		$stderr_file = $tmp->filename;
		close $tmp;
	}

	pipe(my $out_r, my $out_w) or croak "StripeMock: pipe: $!";
	pipe(my $in_r, my $in_w) or croak "StripeMock: pipe: $!";
	my $pid = fork();
	croak "StripeMock: fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		# Child: stdin = pipe from parent (EOF when the parent dies), stdout
		# = pipe to parent, stderr = log file.
		close $out_r;
		close $in_w;
		open(STDIN, '<&', $in_r) or POSIX::_exit(126);
		open(STDOUT, '>&', $out_w) or POSIX::_exit(126);
		open(STDERR, '>>', $stderr_file) or POSIX::_exit(126);
		my @tls = $opts{tls_cert} ? ('--tls-cert', $opts{tls_cert}, '--tls-key', $opts{tls_key}) : ();
		push @tls, '--http1-only' if $opts{http1_only};
		push @tls, '--h2-max-streams', $opts{h2_max_streams} if defined $opts{h2_max_streams};
		exec($node, $MOCK_JS, '--host', '127.0.0.1', '--port', $port, '--parent-watch', @tls)
		  or do { print STDERR "exec $node failed: $!\n"; POSIX::_exit(127); };
	}
	close $out_w;
	close $in_r;
	$in_w->autoflush(1);

	my $self = bless {
		pid => $pid,
		owner => $$,
		node => $node,
		stderr_file => $stderr_file,
		stdout => $out_r,
		stdin => $in_w,
		http => HTTP::Tiny->new(keep_alive => 0, timeout => $opts{http_timeout} // 30,
			agent => 'StripeMock.pm/' . $VERSION),
	}, $class;

	# Wait for {"listening":PORT}.
	my $sel = IO::Select->new($out_r);
	my $deadline = time + $timeout;
	my $buf = '';
	while ($buf !~ /\n/)
	{
		my $left = $deadline - time;
		if ($left <= 0)
		{
			$self->_kill;
			croak "StripeMock: timed out after ${timeout}s waiting for the mock to listen; stderr in $stderr_file:\n"
			  . _slurp($stderr_file);
		}
		if ($sel->can_read($left > 0.2 ? 0.2 : $left))
		{
			my $n = sysread($out_r, $buf, 4096, length $buf);
			if (!$n)
			{
				waitpid($pid, 0);
				my $rc = $?;
				delete $self->{pid};
				croak "StripeMock: mock exited (status $rc) before listening; stderr in $stderr_file:\n"
				  . _slurp($stderr_file);
			}
		}
		elsif (waitpid($pid, WNOHANG) == $pid)
		{
			my $rc = $?;
			delete $self->{pid};
			croak "StripeMock: mock exited (status $rc) before listening; stderr in $stderr_file:\n"
			  . _slurp($stderr_file);
		}
	}
	my ($line) = split /\n/, $buf;
	my $msg = eval { $JSON->decode($line) };
	unless ($msg && $msg->{listening})
	{
		$self->_kill;
		croak "StripeMock: unexpected first line from mock: $line; stderr in $stderr_file:\n"
		  . _slurp($stderr_file);
	}
	$self->{port} = $msg->{listening};
	$self->{url} = "http://127.0.0.1:$self->{port}";
	$self->{control_url} = $self->{url};
	if ($opts{tls_cert})
	{
		# https mode: the API over TLS, named as the certificate names it;
		# the control API on a second, plain http port
		$self->{url} = 'https://' . ($opts{tls_host} // 'localhost') . ":$self->{port}";
		$self->{control_url} = "http://127.0.0.1:$msg->{control}";
	}
	$LIVE{"$self"} = $self;
	weaken($LIVE{"$self"});

	$self->config($opts{config}) if $opts{config};
	return $self;
}

sub _slurp
{
	my ($f) = @_;
	open(my $fh, '<', $f) or return "(cannot read $f: $!)";
	local $/;
	my $s = <$fh>;
	close $fh;
	return $s // '';
}

sub url { $_[0]{url} }
sub port { $_[0]{port} }
sub pid { $_[0]{pid} }
sub stderr_file { $_[0]{stderr_file} }
sub http { $_[0]{http} }
sub stderr { _slurp($_[0]{stderr_file}) }

# Control API call: returns the decoded JSON reply, dies on non-2xx.
sub _control
{
	my ($self, $method, $path, $body) = @_;
	croak 'StripeMock: not running' unless $self->{pid};
	my %o = (headers => { 'Content-Type' => 'application/json' });
	$o{content} = $JSON->encode($body) if defined $body;
	my $r = $self->{http}->request($method, $self->{control_url} . $path, \%o);
	croak "StripeMock: $method $path failed: $r->{status} $r->{reason}: "
	  . ($r->{content} // '') . "\nmock stderr in $self->{stderr_file}"
	  unless $r->{success};
	return $JSON->decode($r->{content});
}

sub _query
{
	my (%q) = @_;
	return '' unless %q;
	return '?' . join('&', map {
		my ($k, $v) = ($_, $q{$_});
		utf8::encode($v) if utf8::is_utf8($v);    # percent-encode UTF-8 bytes
		$v =~ s/([^A-Za-z0-9\-._~])/sprintf('%%%02X', ord $1)/ge;
		"$k=$v"
	} sort keys %q);
}

=head2 Control methods

config(\%patch) merges and returns the new config (top-level keys replace);
get_config; script(\@entries) replaces the script (append_script adds);
reset; stats; events(%filter) (identifier, event_name, offset, limit);
requests(limit => N); health.

=cut

sub config
{
	my ($self, $patch) = @_;
	return $self->_control('GET', '/__mock/config') unless defined $patch;
	return $self->_control('POST', '/__mock/config', $patch);
}

sub get_config { $_[0]->_control('GET', '/__mock/config') }

sub script
{
	my ($self, $entries) = @_;
	return $self->_control('POST', '/__mock/script', $entries // [])->{data};
}

sub append_script
{
	my ($self, $entries) = @_;
	return $self->_control('POST', '/__mock/script?append=1', $entries // [])->{data};
}

sub reset { $_[0]->_control('POST', '/__mock/reset', {}); return 1 }

sub stats { $_[0]->_control('GET', '/__mock/stats') }

sub health { $_[0]->_control('GET', '/__mock/health') }

# cancellations the mock accepted and the error reports it generated
sub lifecycle { $_[0]->_control('GET', '/__mock/lifecycle') }

sub events
{
	my ($self, %filter) = @_;
	return $self->_control('GET', '/__mock/events' . _query(%filter))->{data};
}

sub requests
{
	my ($self, %opts) = @_;
	$opts{limit} //= 100;
	return $self->_control('GET', '/__mock/requests' . _query(%opts))->{data};
}

=head2 API v2 control methods

sessions (arrayref of meter event sessions: id, account, livemode, created,
expires_at, expired); expire_sessions($account) expires every session now,
or only those of $account, and returns how many; async_errors (arrayref of
stream events refused after acceptance).

=cut

sub sessions { $_[0]->_control('GET', '/__mock/sessions')->{data} }

sub expire_sessions
{
	my ($self, $account) = @_;
	return $self->_control('POST', '/__mock/expire_sessions',
		defined $account ? { account => $account } : {})->{expired};
}

sub async_errors { $_[0]->_control('GET', '/__mock/async_errors')->{data} }

=head2 wait_for($code, timeout => 30, interval => 0.1)

Polls stats until $code->($stats) returns true; returns the final stats, or
undef on timeout.

=cut

sub wait_for
{
	my ($self, $code, %opts) = @_;
	my $deadline = time + ($opts{timeout} // 30);
	while (1)
	{
		my $s = $self->stats;
		return $s if $code->($s);
		return undef if time > $deadline;
		sleep($opts{interval} // 0.1);
	}
}

=head2 post_meter_event(\%params, %headers)

Convenience: POST /v1/billing/meter_events form-encoded. %params may hold a
payload hashref. Default Authorization is Bearer sk_test_mockmockmock0000
unless an Authorization header is given (use undef to send none). Returns the
HTTP::Tiny response; $res->{json} holds the decoded body when it parses.

=cut

sub post_meter_event
{
	my ($self, $params, %headers) = @_;
	my @pairs;
	for my $k (sort keys %$params)
	{
		my $v = $params->{$k};
		if (ref $v eq 'HASH')
		{
			push @pairs, ["${k}[$_]", $v->{$_}] for sort keys %$v;
		}
		elsif (ref $v eq 'ARRAY')
		{
			push @pairs, ["${k}[]", $_] for @$v;
		}
		else
		{
			push @pairs, [$k, $v];
		}
	}
	my $body = join '&', map { _form_enc($_->[0]) . '=' . _form_enc($_->[1]) } @pairs;
	$headers{'Authorization'} = 'Bearer sk_test_mockmockmock0000'
	  unless exists $headers{'Authorization'};
	delete $headers{'Authorization'} unless defined $headers{'Authorization'};
	$headers{'Content-Type'} //= 'application/x-www-form-urlencoded';
	my $r = $self->{http}->request('POST', $self->{url} . '/v1/billing/meter_events',
		{ headers => \%headers, content => $body });
	$r->{json} = eval { $JSON->decode($r->{content}) } if defined $r->{content};
	return $r;
}

sub _form_enc
{
	my ($s) = @_;
	$s = '' unless defined $s;
	utf8::encode($s) if utf8::is_utf8($s);
	$s =~ s/([^A-Za-z0-9\-._~\[\]])/sprintf('%%%02X', ord $1)/ge;
	return $s;
}

sub _kill
{
	my ($self) = @_;
	my $pid = delete $self->{pid} or return;
	kill 'TERM', $pid;
	my $deadline = time + 10;
	while (time < $deadline)
	{
		my $r = waitpid($pid, WNOHANG);
		last if $r == $pid || $r == -1;
		sleep 0.05;
	}
	if (waitpid($pid, WNOHANG) == 0)
	{
		kill 'KILL', $pid;
		waitpid($pid, 0);
	}
	close $self->{stdin} if $self->{stdin};
	close $self->{stdout} if $self->{stdout};
	delete @{$self}{qw(stdin stdout)};
}

=head2 stop

SIGTERM the mock and reap it. Safe to call twice; also called from DESTROY
and END (only in the process that started the mock, not in forked children).

=cut

sub stop
{
	my ($self) = @_;
	return unless $self->{owner} && $self->{owner} == $$;
	$self->_kill;
	delete $LIVE{"$self"};
	return 1;
}

sub DESTROY
{
	my ($self) = @_;
	local ($., $@, $!, $^E, $?);
	$self->stop;
}

END
{
	local $?;
	for my $m (values %LIVE)
	{
		$m->stop if $m;
	}
}

1;
