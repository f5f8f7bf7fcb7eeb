#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds with -Werror,
# installs the extension, and runs pg_regress and the TAP tests.
#
# PostgreSQL refuses to run as root, so when run as root the tests run as an
# unprivileged user (stripe_meter_test) in a copy of the source tree.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
bash "$src/scripts/install-deps.sh"

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

run_as "cd '$work' && make -s clean >/dev/null && make -s"
$SUDO make -s install >/dev/null

status=0
run_as "cd '$work' && make installcheck ${PROVE_TESTS:+PROVE_TESTS=\"$PROVE_TESTS\"}" || status=$?
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
echo "all tests passed"
[ "$work" != "$src" ] && rm -rf "$work"
exit 0
