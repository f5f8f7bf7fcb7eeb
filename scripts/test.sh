#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds with -Werror,
# installs the extension, and runs pg_regress and the TAP tests.
#
# PostgreSQL refuses to run as root, so when run as root the tests run as an
# unprivileged user (stripe_meter_test) in a copy of the source tree.
#
# Which PostgreSQL: PG_CONFIG=/path/to/pg_config or PG_MAJOR=NN; by default
# the newest installed (scripts/pg-select.sh).
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
bash "$src/scripts/install-deps.sh"
. "$src/scripts/pg-select.sh"
pg_select

run_as() { if [ "$(id -u)" -eq 0 ]; then su "$test_user" -s /bin/bash -c "$1"; else bash -c "$1"; fi; }

if [ "$(id -u)" -eq 0 ]; then
	test_user=stripe_meter_test
	id -u "$test_user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$test_user"
	work="$(mktemp -d /tmp/stripe_meter_test.XXXXXX)"
	tar -C "$src" --exclude=.git --exclude='*.o' --exclude='*.so' --exclude=tmp_check \
		--exclude=tmp_regress --exclude=results -cf - . | tar -C "$work" -xf -
	chown -R "$test_user": "$work"
	SUDO=
else
	work="$src"
	SUDO=sudo
fi
cd "$work"

# PRIVATE_PG=/some/dir tests against a private, relocated copy of the server
# installation instead of installing into the system one, so several
# checkouts can be tested side by side without overwriting each other.
pgc="PG_CONFIG=$PG_CONFIG"
if [ -n "${PRIVATE_PG:-}" ]; then
	bash "$src/scripts/private-pg.sh" "$PRIVATE_PG"
	[ "$(id -u)" -eq 0 ] && chown -R "$test_user": "$PRIVATE_PG"
	pgc="PG_CONFIG=$PRIVATE_PG/usr/lib/postgresql/$PG_MAJOR/bin/pg_config"
fi

run_as "cd '$work' && make -s $pgc clean >/dev/null && make -s $pgc"
if [ -n "${PRIVATE_PG:-}" ]; then
	run_as "cd '$work' && make -s $pgc install >/dev/null"
else
	$SUDO make -s $pgc install >/dev/null
fi

status=0
run_as "cd '$work' && make $pgc installcheck ${PROVE_TESTS:+PROVE_TESTS=\"$PROVE_TESTS\"}" || status=$?
if [ $status -ne 0 ]; then
	echo "=== tests failed ($status) ==="
	[ -f regression.diffs ] && { echo "--- regression.diffs"; cat regression.diffs; }
	if [ -d tmp_check/log ]; then
		for f in tmp_check/log/*; do
			echo "--- $f (last 80 lines)"
			tail -n 80 "$f"
		done
	fi
	echo "(work tree kept in $work)"
	exit $status
fi
echo "all tests passed on PostgreSQL $("$PG_CONFIG" --version | sed 's/^PostgreSQL //')"
[ "$work" != "$src" ] && rm -rf "$work"
exit 0
