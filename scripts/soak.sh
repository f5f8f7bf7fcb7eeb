#!/usr/bin/env bash
# make soak: the long variants of the "under fire" tests (test/README.md),
# through the same test script as the default suite, then their figures.
# Takes tens of minutes; PRIVATE_PG works as for scripts/test.sh.
set -uo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
log="$(mktemp /tmp/stripe_meter_soak.XXXXXX.log)"
tests="${SOAK_TESTS:-test/t/011_crash_storm.pl test/t/012_failover_in_flight.pl test/t/013_faults.pl test/t/014_hostile.pl test/t/015_memory.pl}"
STRIPE_METER_SOAK=1 PROVE_TESTS="$tests" bash "$src/scripts/test.sh" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
echo
echo "=== soak figures (full output in $log) ==="
grep -h '^# figures ' "$log" | sed 's/^# //'
exit "$status"
