# Bad input, generated: thousands of malformed (and valid) meter events thrown
# at every enqueue path -- stripe_meter_event_create(), a direct INSERT into
# stripe_meter.outbox and the row trigger stripe_meter_event_trigger -- by an
# application role holding exactly the GRANTs of doc/security.md (Privileges).
#
# Each case is a valid event plus at most one mutation (the trigger tables
# add faults of their own), and each mutation says which SQLSTATEs it may
# cause.  The test asserts that
#  - every case ends as the generator predicted: queued, or refused with
#    one of the predicted SQLSTATEs (never XX000, never a crash);
#  - an independent checker, written here from Stripe's rules in
#    api-facts.md and not from the C code, accepts every queued row;
#  - the mock, which validates like Stripe, accepts every queued event
#    when they are delivered: nothing invalid reaches the wire;
#  - the postmaster never restarted and the log shows no crash.
#
# STRIPE_METER_FUZZ_SEED (default 20261121, or "random") and
# STRIPE_METER_FUZZ_CASES (default 10000) override the seed and the count;
# `make fuzz` runs 200,000 cases with a random seed.  The seed is printed.
use strict;
use warnings;
no warnings qw(nonchar);    # the fuzzer writes U+FFFE and friends on purpose
use utf8;

use JSON::PP ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use StripeMeterTest;

my $seed = $ENV{STRIPE_METER_FUZZ_SEED} // 20261121;
$seed = (int(time * 1000) ^ ($$ << 16)) & 0x7fffffff if $seed eq 'random';
die "STRIPE_METER_FUZZ_SEED must be a number or \"random\"\n" unless $seed =~ /^\d+$/;
my $ncases = $ENV{STRIPE_METER_FUZZ_CASES} // 10000;
die "STRIPE_METER_FUZZ_CASES must be a number\n" unless $ncases =~ /^\d+$/;
diag("fuzz seed $seed, $ncases cases (rerun: STRIPE_METER_FUZZ_SEED=$seed STRIPE_METER_FUZZ_CASES=$ncases)");

my $JSON = JSON::PP->new->utf8->canonical->allow_nonref;
my $ASCII_JSON = JSON::PP->new->ascii->canonical->allow_nonref;

# --- a seeded PRNG: Perl's own drand48 (since 5.20 the same sequence on
# every platform).  It is seeded just before generating, because starting
# the node draws from it too (PostgreSQL::Test picks ports with rand). ------
sub rint { return int(rand($_[0])) }
sub chance { return rand() < $_[0] }
sub pick { return $_[ rand(@_) ] }

# --- characters of every class ------------------------------------------------
# Code point ranges; NUL is left out (text cannot hold it), so are the
# UTF-16 surrogates (not encodable); "surrogates as text" are spelled out.
my @CLASSES = (
	[ 'ascii', [ 0x20, 0x7e ] ],
	[ 'control', [ 0x01, 0x1f ], [ 0x7f, 0x9f ] ],
	[ 'latin', [ 0xc0, 0x24f ] ],
	[ 'combining', [ 0x300, 0x36f ], [ 0x1ab0, 0x1aff ], [ 0x20d0, 0x20ff ] ],
	[ 'rtl', [ 0x590, 0x5ff ], [ 0x600, 0x6ff ], [ 0x200f, 0x200f ], [ 0x202a, 0x202e ] ],
	[ 'zero-width', [ 0x200b, 0x200d ], [ 0x2060, 0x2064 ], [ 0xfeff, 0xfeff ] ],
	[ 'cjk', [ 0x4e00, 0x9fff ] ],
	[ 'astral', [ 0x1f300, 0x1faff ], [ 0x10000, 0x1007f ], [ 0xe0000, 0xe007f ], [ 0x10fff0, 0x10fffd ] ],
	[ 'nonchar', [ 0xfdd0, 0xfdef ], [ 0xfffe, 0xffff ] ],
	[ 'digits', [ 0x30, 0x39 ], [ 0x660, 0x669 ], [ 0xff10, 0xff19 ], [ 0x1d7ce, 0x1d7ff ] ],
);
my @SPECIAL = ("'", '"', '\\', ';', '--', '/*', '*/', '$$', '%', '_', '&', '=', '+',
	'?', '#', "\n", "\r", "\t", ' ', '\\u0000', '\\ud800', '\\uDFFF', '%00', '%ZZ', '%5B',
	"'; DROP TABLE stripe_meter.outbox; --", 'E\'\\x41\'', '${x}', '@', '\\N', '\\.');

my @CLASS_RANGES = map { [ @{$_}[ 1 .. $#$_ ] ] } @CLASSES;

sub one_char
{
	my $r = $_[0][ rand(@{ $_[0] }) ];
	return chr($r->[0] + int(rand($r->[1] - $r->[0] + 1)));
}

# A string of exactly $len characters (code points), mixing a few classes.
sub gen_str
{
	my ($len, %o) = @_;
	my @use = map { pick(@CLASS_RANGES) } 1 .. 1 + rint(3);
	my $s = '';
	while (length($s) < $len)
	{
		if (!$o{plain} && chance(0.08))
		{
			my $sp = pick(@SPECIAL);
			$s .= $sp if length($s) + length($sp) <= $len;
			next;
		}
		my $c = one_char(pick(@use));
		$c = 'x' if $o{no_brackets} && ($c eq '[' || $c eq ']');
		$s .= $c;
	}
	return $s;
}

sub gen_len
{
	return pick(1, 1, 2, 5, 10, 20, 50, 99, 100, 1 + rint(100));
}

# JSON text for a string, with some non-ASCII characters written as \u
# escapes (surrogate pairs for the astral plane) to exercise jsonb's parser.
sub json_str
{
	my ($s) = @_;
	my $escape_some = chance(0.3);
	my $out = '"';
	for my $c (split //, $s)
	{
		my $o = ord $c;
		if ($c eq '"' || $c eq '\\') { $out .= "\\$c" }
		elsif ($o < 0x20) { $out .= sprintf('\\u%04x', $o) }
		elsif ($o > 0x7f && $escape_some && chance(0.5))
		{
			if ($o > 0xffff)
			{
				my $v = $o - 0x10000;
				$out .= sprintf('\\u%04x\\u%04x', 0xd800 + ($v >> 10), 0xdc00 + ($v & 0x3ff));
			}
			else { $out .= sprintf('\\u%04X', $o) }
		}
		else { $out .= $c }
	}
	return $out . '"';
}

sub json_obj
{
	my (@pairs) = @_;
	return '{' . join(', ', map { json_str($_->[0]) . ': ' . $_->[1] } @pairs) . '}';
}

# --- the meters: default keys, and two with odd keys ------------------------
my %METERS = (
	'api_requests' => [ 'stripe_customer_id', 'value' ],
	"m\x{e9}ter \x{1f4a1}'\"" => [ "c\x{fc}st'o\"mer", "v\x{e4}lue \x{2713}" ],
	'tokens;--' => [ 'customer', 'gigabytes' ],
);
my @METER_NAMES = sort keys %METERS;

sub keys_for
{
	my ($en) = @_;
	return @{ $METERS{$en} // [ 'stripe_customer_id', 'value' ] };
}

# --- value forms: [JSON text, expected outcomes] ------------------------------
my @VALID_VALUES = (qw(0 1 25 25.0 25.000 2.5e1 2.5E+1 1e2 100e-2 999999999999999
	  9.99999999999999e14 999999999999999.000 -0 0.0 0e5),
	'"0"', '"25"', '"0025"', '"999999999999999"', '"000999999999999999"',
	'"' . ('0' x 150) . '7"');
my @BAD_VALUES = (
	[ '-1', '22003' ], [ '-25.0', '22003' ], [ '-1e3', '22003' ], [ '-0.5', '22003' ],
	[ '-999999999999999999', '22003' ],
	[ '1000000000000000', '22003' ], [ '1e15', '22003' ], [ '1.5e300', '22003' ],
	[ '12345678901234567890', '22003' ], [ '1e1000', '22003' ],
	[ '0.5', '22023' ], [ '1e-1', '22023' ], [ '25.5', '22023' ], [ '1e-300', '22023' ],
	[ '0.000000000000000000001', '22023' ],
	[ '"-25"', '22023' ], [ '"+25"', '22023' ], [ '" 25"', '22023' ], [ '"25 "', '22023' ],
	[ '"25.0"', '22023' ], [ '"2.5e1"', '22023' ], [ '"1e3"', '22023' ], [ '""', '22023' ],
	[ '"NaN"', '22023' ], [ '"Infinity"', '22023' ], [ '"-Infinity"', '22023' ],
	[ '"0x19"', '22023' ], [ '"1_000"', '22023' ], [ '"1,000"', '22023' ],
	[ json_str("\x{661}\x{662}"), '22023' ], [ json_str("\x{ff12}\x{ff15}"), '22023' ],
	[ json_str("2\x{200b}5"), '22023' ], [ json_str("\x{1d7d0}"), '22023' ],
	[ '"\\u0032\\u0035\\n"', '22023' ], [ '"1000000000000000"', '22003' ],
	[ '"00001000000000000000"', '22003' ], [ '"' . ('9' x 120) . '"', '22003' ],
	[ 'true', '22023' ], [ 'false', '22023' ], [ 'null', '22023' ], [ '[]', '22023' ],
	[ '[25]', '22023' ], [ '{}', '22023' ], [ '{"value": 25}', '22023' ],
	# not JSON at all: refused by the jsonb cast
	[ 'NaN', '22P02' ], [ 'Infinity', '22P02' ], [ '-Infinity', '22P02' ], [ '025', '22P02' ],
	[ '+25', '22P02' ], [ '.5', '22P02' ], [ '25.', '22P02' ], [ '0x19', '22P02' ],
	[ '1e', '22P02' ], [ "'25'", '22P02' ],
);

my @VALID_ACCOUNTS = ('acct_1', 'acct_1MockPlatform00000', 'acct_' . ('Az9' x 83) . 'x');
my @BAD_ACCOUNTS = ('', 'acct_', 'acct', 'ACCT_1', ' acct_1', 'acct_1 ', "acct_1\n", 'acct_a-b',
	'acct_a_b', "acct_\x{e9}", "acct_1\x{200b}", 'acct_' . ('a' x 251), 'cus_123', 'acct_1;--',
	"acct_1'", 'acct_%41');

my $DAY = 86400;
my $PAST = 35 * $DAY;
my $FUTURE = 300;

# --- generating one case ------------------------------------------------------
my @valid_identifiers;    # identifiers of cases expected to be queued

sub valid_extra_value
{
	return pick(
		sub { json_str(gen_str(rint(101), no_brackets => 0)) },
		sub { pick(qw(0 1 -1 3.14 -2.5e-7 1e50 true false 123456789012345678901234567890)) },
		sub { json_str(gen_str(100)) })->();
}

sub new_case
{
	my ($i) = @_;
	my %c = (id => $i, path => pick('fn', 'fn', 'ins', 'ins', 'trg'), expect => []);
	return new_trigger_case(\%c) if $c{path} eq 'trg';

	$c{event_name} = chance(0.5) ? pick(@METER_NAMES) : gen_str(gen_len());
	my ($ck, $vk) = keys_for($c{event_name});
	$c{customer} = json_str(gen_str(gen_len()));
	$c{value} = pick(@VALID_VALUES);
	$c{extra} = [];
	for (1 .. rint(4))
	{
		my $k = gen_str(gen_len(), no_brackets => 1);
		next if $k eq $ck || $k eq $vk;
		push @{ $c{extra} }, [ $k, valid_extra_value() ];
	}
	$c{identifier} = chance(0.2) ? undef
	  : substr("$i~" . gen_str(gen_len()), 0, 100);
	$c{ts_off} = chance(0.3) ? undef
	  : sprintf('%.3f', -$PAST + 3600 + rand_frac() * ($PAST + $FUTURE - 3610));
	$c{account} = chance(0.7) ? undef
	  : chance(0.5) ? pick(@VALID_ACCOUNTS) : 'acct_' . join('', map { pick('a' .. 'z', 'A' .. 'Z', 0 .. 9) } 1 .. 1 + rint(40));

	# one mutation at most, so that its prediction holds (a second one could
	# undo the first); combined faults come from the trigger tables
	mutate(\%c) unless chance(0.3);
	return finish_case(\%c);
}

sub rand_frac { return rand() }

sub expect { my ($c, @states) = @_; push @{ $c->{expect} }, [@states] }

# Each mutation breaks (or stresses) one thing and says what it expects.
my @MUTATIONS = (
	# event_name
	sub { my $c = shift; $c->{event_name} = ''; expect($c, '22023') },
	sub { my $c = shift; $c->{event_name} = gen_str(101 + rint(pick(5, 300, 3000))); expect($c, '22001') },
	sub { my $c = shift; $c->{event_name} = gen_str(100); },
	sub { my $c = shift; $c->{event_name} = undef; expect($c, '22004') },
	# identifier
	sub { my $c = shift; $c->{identifier} = ''; expect($c, '22023') },
	sub { my $c = shift; $c->{identifier} = gen_str(101 + rint(pick(3, 200, 5000))); expect($c, '22001') },
	sub { my $c = shift; $c->{identifier} = substr("$c->{id}~" . gen_str(100), 0, 100); },
	sub {
		my $c = shift;
		return unless @valid_identifiers;
		$c->{identifier} = pick(@valid_identifiers);
		expect($c, '23505');
	},
	# payload shapes
	sub { my $c = shift; $c->{payload} = undef; expect($c, '22004') },
	sub {
		my $c = shift;
		$c->{payload} = pick('[]', '[1, 2]', '"cus_1"', '25', 'true', 'null', '[{"value": 1}]');
		expect($c, '22023');
	},
	sub {
		my $c = shift;
		$c->{payload} = pick('{', '{"value": 1,}', "{'value': 1}", '{"value": NaN}', '{value: 1}',
			'{"a": "\\ud800"}', '{"a": "\\udfff x"}', '{"a": "\\u0000"}', '', ' ', '{"a": "x"} {}',
			'{"a": "' . "\x{1}" . '"}');
		expect($c, '22P02', '22P05');
	},
	sub { my $c = shift; $c->{drop} = 'customer'; expect($c, '22023') },
	sub { my $c = shift; $c->{drop} = 'value'; expect($c, '22023') },
	# the customer
	sub { my $c = shift; $c->{customer} = pick('123', '0', 'true', 'false', 'null', '[]', '{}', '[""]', '""', '{"id": "cus_1"}'); expect($c, '22023') },
	sub { my $c = shift; $c->{customer} = json_str(gen_str(101 + rint(200))); expect($c, '22001') },
	sub { my $c = shift; $c->{customer} = json_str(gen_str(100)); },
	sub { my $c = shift; $c->{customer} = json_str(pick(@SPECIAL) . gen_str(5)); },
	# the value
	sub { my $c = shift; my $b = pick(@BAD_VALUES); $c->{value} = $b->[0]; expect($c, $b->[1]) },
	sub { my $c = shift; my $b = pick(@BAD_VALUES); $c->{value} = $b->[0]; expect($c, $b->[1]) },
	# duplicate keys: jsonb keeps the last
	sub {
		my $c = shift;
		my $b = pick(@BAD_VALUES);
		return if $b->[1] eq '22P02';
		$c->{dup_value} = [ pick(@VALID_VALUES), $b->[0] ];
		expect($c, $b->[1]);
	},
	sub {
		my $c = shift;
		my $b = pick(@BAD_VALUES);
		return if $b->[1] eq '22P02';
		$c->{dup_value} = [ $b->[0], pick(@VALID_VALUES) ];
	},
	# other payload keys and values
	sub { my $c = shift; push @{ $c->{extra} }, [ '', '"x"' ]; expect($c, '22023') },
	sub {
		my $c = shift;
		my $k = gen_str(1 + rint(20), no_brackets => 1);
		substr($k, rint(length $k), 0) = pick('[', ']', '[]', 'a[b]');
		push @{ $c->{extra} }, [ $k, '"x"' ];
		expect($c, '22023');
	},
	sub { my $c = shift; push @{ $c->{extra} }, [ gen_str(101 + rint(300), no_brackets => 1), '"x"' ]; expect($c, '22001') },
	sub { my $c = shift; push @{ $c->{extra} }, [ gen_str(100, no_brackets => 1), '"x"' ]; },
	sub {
		my $c = shift;
		push @{ $c->{extra} }, [ 'k' . rint(1000), pick('null', '[]', '{}', '[1, "a"]', '{"a": {"b": 1}}', '[null]') ];
		expect($c, '22023');
	},
	sub { my $c = shift; push @{ $c->{extra} }, [ 'note', json_str(gen_str(101 + rint(500))) ]; expect($c, '22001') },
	sub { my $c = shift; push @{ $c->{extra} }, [ 'note', pick('1e200', '-1e150', '1' x 101, '0.' . ('3' x 120)) ]; expect($c, '22001') },
	sub {
		my $c = shift;
		my $depth = pick(2, 10, 100, 1000, 5000);
		push @{ $c->{extra} }, [ 'deep', ('{"a": ' x $depth) . '1' . ('}' x $depth) ];
		expect($c, '22023', '54001');
	},
	sub {
		my $c = shift;
		my $depth = pick(2, 10, 1000, 5000);
		push @{ $c->{extra} }, [ 'deep', ('[' x $depth) . '1' . (']' x $depth) ];
		expect($c, '22023', '54001');
	},
	sub {
		my $c = shift;
		# a wide payload of valid values; sometimes one bad value in it
		my $n = pick(50, 200, 400);
		my $v = json_str(gen_str(100));    # one value, many keys: wide, and cheap to generate
		push @{ $c->{extra} }, map { [ "k$_\x{e9}", chance(0.1) ? valid_extra_value() : $v ] } 1 .. $n;
		if (chance(0.3))
		{
			push @{ $c->{extra} }, [ 'zz_bad', 'null' ];
			expect($c, '22023');
		}
	},
	# timestamps at the window's edges
	sub { my $c = shift; $c->{ts_off} = sprintf('%.3f', -$PAST - 1 - rint(3) - rand_frac()); expect($c, '22008') },
	sub { my $c = shift; $c->{ts_off} = -$PAST - pick(60, 3600, 86400, 365 * $DAY, 100 * 365 * $DAY); expect($c, '22008') },
	sub { my $c = shift; $c->{ts_off} = sprintf('%.3f', -$PAST + 5 + rand_frac()); },
	sub { my $c = shift; $c->{ts_off} = sprintf('%.3f', $FUTURE - 5 - rand_frac()); },
	sub { my $c = shift; $c->{ts_off} = sprintf('%.3f', $FUTURE + 5 + rint(3) + rand_frac()); expect($c, '22008') },
	sub { my $c = shift; $c->{ts_off} = $FUTURE + pick(60, 3600, 365 * $DAY, 1000 * 365 * $DAY); expect($c, '22008') },
	sub { my $c = shift; $c->{ts_off} = pick('infinity', '-infinity'); expect($c, '22008') },
	sub { my $c = shift; $c->{ts_off} = pick('0', '-0.000001', '0.999'); },
	# Connect accounts
	sub { my $c = shift; $c->{account} = pick(@BAD_ACCOUNTS); expect($c, '22023') },
	sub { my $c = shift; $c->{account} = pick(@VALID_ACCOUNTS); },
);

sub mutate
{
	my ($c) = @_;
	pick(@MUTATIONS)->($c);
}

sub finish_case
{
	my ($c) = @_;
	my ($ck, $vk) = keys_for($c->{event_name} // '');
	if (!exists $c->{payload})
	{
		my @pairs;
		push @pairs, [ $ck, $c->{customer} ] unless ($c->{drop} // '') eq 'customer';
		if (($c->{drop} // '') ne 'value')
		{
			if ($c->{dup_value}) { push @pairs, map { [ $vk, $_ ] } @{ $c->{dup_value} } }
			else { push @pairs, [ $vk, $c->{value} ] }
		}
		push @pairs, @{ $c->{extra} };
		# shuffle: key order must not matter
		for (my $j = $#pairs; $j > 0; $j--)
		{
			my $k = rint($j + 1);
			@pairs[ $j, $k ] = @pairs[ $k, $j ];
		}
		# ... except for duplicates, where the last one wins
		if ($c->{dup_value})
		{
			@pairs = ((grep { $_->[0] ne $vk } @pairs), map { [ $vk, $_ ] } @{ $c->{dup_value} });
		}
		$c->{payload} = json_obj(@pairs);
	}
	push @valid_identifiers, $c->{identifier}
	  if !@{ $c->{expect} } && defined $c->{identifier};
	return $c;
}

# --- the trigger path: tables billed by stripe_meter_event_trigger -----------
# [table, event name, value type, timestamp type or undef, expected problems]
my @TRIGGER_TABLES = (
	[ 'usage_numeric', 'api_requests', 'numeric', 'timestamptz' ],
	[ 'usage_text', "m\x{e9}ter \x{1f4a1}'\"", 'text', 'timestamp' ],
	[ 'usage_bigint', 'tokens;--', 'bigint', 'date' ],
	[ 'usage_float', 'api_requests', 'float8', undef ],
	[ 'usage_int', "\x{5d0}\x{5d1} \x{202e}rtl", 'integer', 'timestamptz' ],
	[ 'usage_badname', '', 'integer', undef, '22023' ],
	[ 'usage_longname', 'n' x 101, 'integer', undef, '22001' ],
);
my %TRIGGER_VALUES = (
	numeric => [ [ '0', 'ok' ], [ '25', 'ok' ], [ '25.000', 'ok' ], [ '1e3', 'ok' ], [ '-0', 'ok' ],
		[ '999999999999999', 'ok' ], [ '1e15', '22003' ], [ '-1', '22003' ], [ '-0.5', '22003' ],
		[ '0.0001', '22023' ], [ 'NaN', '22023' ], [ 'Infinity', '22023' ], [ '-Infinity', '22023' ],
		[ 'abc', '22P02' ], [ '', '22P02' ] ],
	text => [ [ '25', 'ok' ], [ '0025', 'ok' ], [ '0', 'ok' ], [ ' 25', '22023' ], [ '25.0', '22023' ],
		[ '-1', '22023' ], [ "\x{ff12}\x{ff15}", '22023' ], [ '', '22023' ], [ 'NaN', '22023' ],
		[ '1000000000000000', '22003' ], [ "'; DROP TABLE x; --", '22023' ] ],
	bigint => [ [ '0', 'ok' ], [ '1', 'ok' ], [ '999999999999999', 'ok' ], [ '1000000000000000', '22003' ],
		[ '9223372036854775807', '22003' ], [ '-1', '22003' ], [ '-9223372036854775808', '22003' ],
		[ '1.5', '22P02' ], [ '9223372036854775808', '22003' ] ],
	float8 => [ [ '25', 'ok' ], [ '0', 'ok' ], [ '123456', 'ok' ], [ '1e14', 'ok' ], [ '1e15', '22023' ],
		[ '-0', '22023' ], [ '-1', '22023' ], [ '0.5', '22023' ], [ 'NaN', '22023' ],
		[ 'Infinity', '22023' ], [ '-Infinity', '22023' ] ],
	integer => [ [ '0', 'ok' ], [ '7', 'ok' ], [ '2147483647', 'ok' ], [ '-2147483648', '22003' ],
		[ '-1', '22003' ], [ '2147483648', '22003' ], [ 'x', '22P02' ] ],
);

sub new_trigger_case
{
	my ($c) = @_;
	my $t = pick(@TRIGGER_TABLES);
	my %n = (id => $c->{id}, path => 'trg', table => $t->[0], expect => []);
	expect(\%n, $t->[4]) if $t->[4];
	my $v = pick(@{ $TRIGGER_VALUES{ $t->[2] } });
	$n{value} = $v->[0];
	expect(\%n, $v->[1]) if $v->[1] ne 'ok';
	my $r = rint(12);
	if ($r == 0) { $n{customer} = undef; expect(\%n, '22004') }
	elsif ($r == 1) { $n{customer} = ''; expect(\%n, '22023') }
	elsif ($r == 2) { $n{customer} = gen_str(101 + rint(100)); expect(\%n, '22001') }
	else { $n{customer} = gen_str(gen_len()) }
	$r = rint(10);
	if ($r == 0) { $n{identifier} = ''; expect(\%n, '22023') }
	elsif ($r == 1) { $n{identifier} = gen_str(101 + rint(50)); expect(\%n, '22001') }
	elsif ($r == 2 && @valid_identifiers) { $n{identifier} = pick(@valid_identifiers); expect(\%n, '23505') }
	elsif ($r == 3) { $n{identifier} = undef }
	else { $n{identifier} = substr("$c->{id}~" . gen_str(gen_len()), 0, 100) }
	if (!$t->[3]) { $n{ts_off} = undef }
	elsif ($t->[3] eq 'date')
	{
		my $d = pick(-1, 0, -34, -36, -400, 2, 30);
		$n{ts_off} = $d * $DAY;
		expect(\%n, '22008') if $d < -34 || $d > 1;
	}
	else
	{
		$r = rint(6);
		if ($r == 0) { $n{ts_off} = -$PAST - 2; expect(\%n, '22008') }
		elsif ($r == 1) { $n{ts_off} = $FUTURE + 5; expect(\%n, '22008') }
		elsif ($r == 2) { $n{ts_off} = undef }
		else { $n{ts_off} = sprintf('%.3f', -$PAST + 3600 + rand_frac() * ($PAST + $FUTURE - 3610)) }
	}
	push @valid_identifiers, $n{identifier}
	  if !@{ $n{expect} } && defined $n{identifier};
	return \%n;
}

# --- the node, the mock and the application role --------------------------------
my $mock = start_mock();
# The worker checks the window again when it sends (an event queued 5 s
# inside it has left it by then, and fails locally); the mock gets a minute
# of slack for the moment between that check and its own.
$mock->config({
	meters => { map { $_ => { customer_key => $METERS{$_}[0], value_key => $METERS{$_}[1], status => 'active' } } @METER_NAMES },
	timestamp_past_s => $PAST + 60,
	request_log_size => 100,
});
my $node = new_node('fuzz', mock => $mock,
	conf => { 'stripe_meter.enabled' => 'off', 'stripe_meter.max_in_flight' => 64 });
my $pm_pid = $node->safe_psql('postgres', 'SELECT pg_postmaster_start_time()');

my $setup = q{
	CREATE ROLE app LOGIN;
	GRANT USAGE ON SCHEMA stripe_meter TO app;
	GRANT INSERT (event_name, payload, identifier, ts, stripe_account) ON stripe_meter.outbox TO app;
	GRANT EXECUTE ON FUNCTION stripe_meter_event_create(text, jsonb, text, timestamptz, text) TO app;
	GRANT EXECUTE ON FUNCTION stripe_meter_event_trigger() TO app;
	CREATE SCHEMA fuzz AUTHORIZATION app;
	SET ROLE app;
	CREATE TABLE fuzz.cases (id int PRIMARY KEY, path text, event_name text, payload text,
		identifier text, ts_off text, account text, tbl text, customer text, value text);
	CREATE TABLE fuzz.results (id int, state text, message text);
	CREATE TABLE fuzz.tables (name text PRIMARY KEY, stmt text);
};
for my $m (@METER_NAMES)
{
	$setup .= "RESET ROLE; INSERT INTO stripe_meter.meters VALUES ("
	  . join(', ', map { sql_lit($_) } $m, @{ $METERS{$m} }) . "); SET ROLE app;\n";
}
for my $t (@TRIGGER_TABLES)
{
	my ($name, $en, $vtype, $tstype) = @$t;
	$setup .= "CREATE TABLE fuzz.$name (id text, customer text, v $vtype"
	  . ($tstype ? ", at $tstype" : '') . ");\n";
	$setup .= "INSERT INTO fuzz.tables VALUES ('$name', 'INSERT INTO fuzz.$name VALUES (\$1, \$2, \$3::$vtype"
	  . ($tstype ? ", \$4::$tstype" : '') . ")');\n";
	$setup .= "CREATE TRIGGER bill AFTER INSERT ON fuzz.$name FOR EACH ROW EXECUTE FUNCTION "
	  . "stripe_meter_event_trigger(" . join(', ', map { sql_lit($_) } $en, 'customer', 'v', 'id',
		$tstype ? ('at') : ()) . ");\n";
}
# One case per subtransaction; every error is caught and its SQLSTATE kept.
$setup .= q{
CREATE FUNCTION fuzz.run(lo int, hi int) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
	c record;
	t timestamptz;
BEGIN
	FOR c IN SELECT * FROM fuzz.cases WHERE id BETWEEN lo AND hi ORDER BY id LOOP
		BEGIN
			t := CASE WHEN c.ts_off IS NULL THEN NULL
					  WHEN c.ts_off IN ('infinity', '-infinity') THEN c.ts_off::timestamptz
					  ELSE clock_timestamp() + c.ts_off::double precision * interval '1 second' END;
			IF c.path = 'fn' THEN
				PERFORM stripe_meter_event_create(c.event_name, c.payload::jsonb, c.identifier, t, c.account);
			ELSIF c.path = 'ins' THEN
				INSERT INTO stripe_meter.outbox (event_name, payload, identifier, ts, stripe_account)
				VALUES (c.event_name, c.payload::jsonb, c.identifier, t, c.account);
			ELSE
				EXECUTE (SELECT stmt FROM fuzz.tables WHERE name = c.tbl)
					USING c.identifier, c.customer, c.value, t;
			END IF;
			INSERT INTO fuzz.results VALUES (c.id, 'ok', NULL);
		EXCEPTION WHEN OTHERS THEN
			INSERT INTO fuzz.results VALUES (c.id, SQLSTATE, SQLERRM);
		END;
	END LOOP;
END
$$;
};
$node->safe_psql('postgres', $setup);

sub sql_lit
{
	my ($s) = @_;
	$s =~ s/'/''/g;
	return "'$s'";
}

# --- generate, load, run ------------------------------------------------------------
sub copy_field
{
	my ($v) = @_;
	return '\N' unless defined $v;
	$v =~ s/\\/\\\\/g;
	$v =~ s/\t/\\t/g;
	$v =~ s/\n/\\n/g;
	$v =~ s/\r/\\r/g;
	return $v;
}

my @cases;
my $t_gen = time;
srand($seed);
my $file = $node->basedir . '/fuzz_cases.tsv';
# :utf8, not :encoding(UTF-8): noncharacters (U+FFFE...) must pass as they are
open(my $fh, '>:utf8', $file) or die "$file: $!";
for my $i (1 .. $ncases)
{
	my $c = new_case($i);
	my $line = join("\t", map { copy_field($_) } $i, $c->{path}, $c->{event_name}, $c->{payload},
		$c->{identifier}, $c->{ts_off}, $c->{account}, $c->{table}, $c->{customer}, $c->{value});
	print $fh $line, "\n";
	# keep only what the verdict needs (200,000 cases must fit in memory)
	push @cases, { id => $i, expect => $c->{expect}, shown => substr($line, 0, 600) };
}
close $fh;
chmod 0644, $file;

diag(sprintf('generated %d cases in %.1f s', $ncases, time - $t_gen));
my $t0 = time;
$node->safe_psql('postgres', "COPY fuzz.cases FROM '$file'");
my $batch = 2000;
for (my $lo = 1; $lo <= $ncases; $lo += $batch)
{
	my $hi = $lo + $batch - 1;
	$node->safe_psql('postgres', "SET ROLE app; SELECT fuzz.run($lo, $hi)");
}
my $elapsed = time - $t0;

# --- outcomes against the predictions ---------------------------------------------------
my %got;
for my $line (split /\n/, $node->safe_psql('postgres', 'SELECT id, state FROM fuzz.results'))
{
	my ($id, $st) = split /\|/, $line;
	$got{$id} = $st;
}
is(scalar keys %got, $ncases, 'every case has an outcome');

my (%by_state, @wrong, @internal);
for my $c (@cases)
{
	my $st = $got{ $c->{id} } // 'missing';
	$by_state{$st}++;
	push @internal, $c->{id} if $st =~ /^XX/ || $st eq 'missing';
	my %allowed = map { $_ => 1 } map { @$_ } @{ $c->{expect} };
	my $ok = @{ $c->{expect} } ? $allowed{$st} : $st eq 'ok';
	push @wrong, $c unless $ok;
}
diag(sprintf('fuzz outcomes (%d cases, seed %d, %.1f s): %s', $ncases, $seed, $elapsed,
	join(', ', map { "$_ $by_state{$_}" } sort keys %by_state)));
is(scalar @internal, 0, 'no case ended in an internal error (XX000) or without an outcome');
is(scalar @wrong, 0, 'every case was queued or refused as predicted');
for my $c (@wrong[ 0 .. ($#wrong < 9 ? $#wrong : 9) ])
{
	my $msg = $node->safe_psql('postgres', "SELECT message FROM fuzz.results WHERE id = $c->{id}");
	diag("case $c->{id}: got $got{$c->{id}} ($msg), expected "
		  . (@{ $c->{expect} } ? join(' or ', map { join('|', @$_) } @{ $c->{expect} }) : 'ok')
		  . ': ' . $ASCII_JSON->encode($c->{shown}));
}

# --- the independent checker: every queued row follows Stripe's rules -------------------
# Written from api-facts.md: event_name and identifier are 1..100
# characters; the payload is a flat object of strings (numbers and
# booleans are sent as their text), with non-empty keys without brackets
# of at most 100 characters (the mock's limit), values of at most 100, the meter's customer key holding a
# non-empty string, and the value key a whole number of at most 15
# significant digits, which is how it is sent; the timestamp lies within 35
# days before and 5 minutes after enqueueing; an account is acct_ + letters
# and digits.  Identifiers are unique.
my @rows = map { $JSON->decode($_) } split /\n/, $node->safe_psql('postgres', q{
	SELECT json_build_object('identifier', identifier, 'event_name', event_name,
		'ts', extract(epoch FROM ts), 'enqueued_at', extract(epoch FROM enqueued_at),
		'account', stripe_account, 'customer', customer,
		'payload', (SELECT json_agg(json_build_array(key, jsonb_typeof(value), value #>> '{}'))
					  FROM jsonb_each(payload)))
	  FROM stripe_meter.outbox});
my %meter_keys = %METERS;

sub stripe_problem
{
	my ($r) = @_;
	return 'event_name empty or too long'
	  unless defined $r->{event_name} && length $r->{event_name} >= 1 && length $r->{event_name} <= 100;
	return 'identifier empty or too long'
	  unless defined $r->{identifier} && length $r->{identifier} >= 1 && length $r->{identifier} <= 100;
	my ($ck, $vk) = @{ $meter_keys{ $r->{event_name} } // [ 'stripe_customer_id', 'value' ] };
	my ($cust, $val);
	for my $p (@{ $r->{payload} // [] })
	{
		my ($k, $type, $text) = @$p;
		return "payload key '$k' empty or bracketed" if $k eq '' || $k =~ /[\[\]]/;
		return "payload key too long" if length $k > 100;
		return "payload value under '$k' is a $type" unless $type =~ /^(string|number|boolean)$/;
		if ($k eq $vk)
		{
			my $digits;
			if ($type eq 'number' && $text =~ /^([0-9]+)(?:\.0*)?$/) { $digits = $1 }
			elsif ($type eq 'string' && $text =~ /^([0-9]+)$/) { $digits = $1 }
			else { return "value '$text' is not a whole number" }
			$digits =~ s/^0+(?=.)//;
			return "value '$text' has more than 15 digits" if length $digits > 15;
			$val = $digits;
			next;
		}
		return "payload value under '$k' longer than 100 characters" if length $text > 100;
		if ($k eq $ck)
		{
			return 'customer is not a non-empty string' unless $type eq 'string' && length $text;
			$cust = $text;
		}
	}
	return 'customer key missing' unless defined $cust;
	return 'value key missing' unless defined $val;
	return 'customer column differs from the payload' unless $r->{customer} eq $cust;
	return 'timestamp more than 35 days before enqueueing' if $r->{ts} < $r->{enqueued_at} - $PAST - 0.5;
	return 'timestamp more than 5 minutes after enqueueing' if $r->{ts} > $r->{enqueued_at} + $FUTURE + 0.5;
	return 'bad Connect account'
	  if defined $r->{account} && ($r->{account} !~ /^acct_[A-Za-z0-9]+\z/ || length $r->{account} > 255);
	return undef;
}

my (%seen, @invalid);
for my $r (@rows)
{
	my $why = stripe_problem($r);
	$why //= 'identifier queued twice' if $seen{ $r->{identifier} }++;
	push @invalid, [ $why, $r ] if defined $why;
}
my $queued = scalar @rows;
is($queued, $by_state{ok} // 0, 'the outbox holds one row per accepted case');
is(scalar @invalid, 0, "the independent checker accepts all $queued queued events");
diag("invalid queued row: $_->[0]: " . substr($ASCII_JSON->encode($_->[1]), 0, 600))
  for @invalid[ 0 .. ($#invalid < 9 ? $#invalid : 9) ];

# --- the wire: deliver everything; the mock must refuse nothing ------------------------
set_conf($node, 'stripe_meter.enabled' => 'on');
wait_for($node, 'SELECT count(*) FROM stripe_meter.outbox', '0', 'every queued event left the outbox')
  or diag('still queued: ' . $node->safe_psql('postgres', q{
	SELECT last_http_status, left(last_error, 300), count(*) FROM stripe_meter.outbox
	 GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 5}));
# Events queued at the very edge of the 35-day window have aged out of it
# by the time the worker sends them: it fails them without sending.
my $aged = $node->safe_psql('postgres', q{
	SELECT count(*) FROM stripe_meter.failed_events
	 WHERE http_status IS NULL AND reason LIKE '%more than 35 days old%'
	   AND ts < now() - interval '35 days' AND ts > enqueued_at - interval '35 days'});
my $delivered = $node->safe_psql('postgres', 'SELECT count(*) FROM stripe_meter.meter_events');
is($delivered + $aged, $queued, "every queued event was delivered ($delivered), or aged out of the window ($aged)");
my $failed = $node->safe_psql('postgres', q{
	SELECT count(*) || coalesce(': ' || min(reason), '') FROM stripe_meter.failed_events
	 WHERE http_status IS NOT NULL});
is($failed, '0', 'none failed at Stripe');
my $stats = $mock->stats;
is($stats->{validation_errors}, 0, 'the mock found no invalid request')
  or diag('mock answers by status: ' . $ASCII_JSON->encode($stats->{by_status}));
is($stats->{billed}, $delivered, 'the mock billed each delivered event');
is($stats->{identifiers_billed_multiple_times}, 0, 'none twice');
diag(sprintf('fuzz wire: %d queued, %d delivered, %d aged out of the window before sending, '
	  . '%d billed by the mock, %d refused by it', $queued, $delivered, $aged, $stats->{billed},
	$stats->{validation_errors}));

# --- the server never crashed ---------------------------------------------------------------
is($node->safe_psql('postgres', 'SELECT pg_postmaster_start_time()'), $pm_pid,
	'the postmaster never restarted');
my $log = slurp_file($node->logfile);
unlike($log, qr/terminated by signal|was terminated|PANIC:|TRAP:|server process .* exited with exit code [^0]/,
	'the log shows no crashed backend');

$node->stop;
$mock->stop;
done_testing();
