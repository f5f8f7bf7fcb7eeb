# StripeMeterSoak.pm: what the "under fire" tests (011-015) share.
#
# Each of those tests has one code path and two sizes: the fast variant in
# the default suite, and the long one when STRIPE_METER_SOAK is set (make
# soak).  They end with one "figures" line that make soak prints.
#
#   use StripeMeterSoak;
#   my $events = fast_or_long(3000, 100_000);
#   my $rss = worker_memory($pid);            # {rss_kb, anon_kb}
#   my $r = check_exactly_once($mock, \@identifiers, 'label');
#   figures('crashes', events => ..., duplicates => $r->{duplicates}, ...);

package StripeMeterSoak;

use strict;
use warnings;

use Exporter 'import';
use Test::More;

our @EXPORT = qw(soak fast_or_long worker_memory memory_bound_applies check_exactly_once figures
  wait_drained);

=head2 soak()

True when the long variants are asked for (STRIPE_METER_SOAK set, not 0).

=cut

sub soak
{
	my $v = $ENV{STRIPE_METER_SOAK} // '';
	return $v ne '' && $v ne '0';
}

=head2 fast_or_long($fast, $long)

The fast value in the default suite, the long one under make soak.

=cut

sub fast_or_long
{
	my ($fast, $long) = @_;
	return soak() ? $long : $fast;
}

=head2 worker_memory($pid)

The process's resident memory from /proc: rss_kb (VmRSS, which includes
the shared buffers it touched) and anon_kb (RssAnon, its private memory:
what a leak grows).

=cut

sub worker_memory
{
	my ($pid) = @_;
	open my $fh, '<', "/proc/$pid/status" or return undef;
	my %m;
	while (<$fh>)
	{
		$m{rss_kb} = $1 if /^VmRSS:\s+(\d+)/;
		$m{anon_kb} = $1 if /^RssAnon:\s+(\d+)/;
	}
	close $fh;
	return defined $m{rss_kb} ? \%m : undef;
}

=head2 memory_bound_applies()

False under make check-asan (STRIPE_METER_ASAN set): AddressSanitizer's
quarantine and redzones grow a process's memory by design, so the bounds
on the worker's memory are checked by the ordinary runs only.

=cut

sub memory_bound_applies
{
	return !$ENV{STRIPE_METER_ASAN};
}

=head2 check_exactly_once($mock, \@identifiers, $label)

Checks, by the mock's record of billed events, that each identifier was
billed exactly once, that nothing else was billed, and that no identifier
was ever sent under two Idempotency-Keys.  Records the tests and returns
{billed, lost, duplicates, extra}.

=cut

sub check_exactly_once
{
	my ($mock, $ids, $label) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my %billed;
	my %keys;
	my $offset = 0;
	while (1)
	{
		my $page = $mock->events(offset => $offset, limit => 50000);
		for my $e (@$page)
		{
			$billed{ $e->{identifier} }++;
			$keys{ $e->{identifier} }{ $e->{idempotency_key} // '' } = 1;
		}
		last if @$page < 50000;
		$offset += @$page;
	}
	my %want = map { $_ => 1 } @$ids;
	my @lost = grep { !$billed{$_} } @$ids;
	my @dup = grep { $billed{$_} > 1 } keys %billed;
	my @extra = grep { !$want{$_} } keys %billed;
	my @two_keys = grep { keys %{ $keys{$_} } > 1 } keys %keys;

	is(scalar @lost, 0, "$label: every queued identifier billed (lost = 0)")
	  or diag('lost: ' . join(' ', (sort @lost)[ 0 .. ($#lost < 9 ? $#lost : 9) ]));
	is(scalar @dup, 0, "$label: no identifier billed twice (duplicates = 0)")
	  or diag('duplicates: ' . join(' ', (sort @dup)[ 0 .. ($#dup < 9 ? $#dup : 9) ]));
	is(scalar @extra, 0, "$label: nothing billed that was not queued");
	is(scalar @two_keys, 0, "$label: no identifier billed under two Idempotency-Keys");

	my $stats = $mock->stats;
	is($stats->{identifiers_billed_under_multiple_keys}, 0,
		"$label: mock: identifiers_billed_under_multiple_keys = 0");
	cmp_ok($stats->{distinct_idempotency_keys_per_identifier_max}, '<=', 1,
		"$label: mock: every identifier was only ever sent with one Idempotency-Key");
	return {
		billed => scalar(keys %billed),
		lost => scalar @lost,
		duplicates => scalar @dup,
		extra => scalar @extra,
	};
}

=head2 wait_drained($node, $name, $sql)

Polls until $sql (default: the outbox's row count) prints 0, and records
that as a test.  Gives up only when the count has not gone down for
PostgreSQL::Test's default timeout, so long runs may take as long as they
make progress.

=cut

sub wait_drained
{
	my ($node, $name, $sql) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	$sql //= 'SELECT count(*) FROM stripe_meter.outbox';
	my $limit = $PostgreSQL::Test::Utils::timeout_default;
	my $best;
	my $best_at = time;
	while (1)
	{
		my $left = $node->safe_psql('postgres', $sql);
		return ok(1, $name) if $left == 0;
		if (!defined $best || $left < $best)
		{
			($best, $best_at) = ($left, time);
		}
		elsif (time - $best_at > $limit)
		{
			diag("$left left, no progress for $limit s");
			return ok(0, $name);
		}
		select(undef, undef, undef, 0.5);
	}
}

=head2 figures($name, key => value, ...)

Prints the run's figures as one diagnostic line, in the order given, so
that make soak (and a verbose prove) shows them.

=cut

sub figures
{
	my ($name, @kv) = @_;
	my @parts;
	while (my ($k, $v) = splice(@kv, 0, 2))
	{
		push @parts, "$k=" . ($v // 'n/a');
	}
	diag(sprintf('figures %s (%s): %s', $name, soak() ? 'long' : 'fast', join(', ', @parts)));
	return;
}

1;
