#!/usr/bin/env bash
# The whole test suite (scripts/test.sh: pg_regress and every TAP test), then
# the demo (scripts/demo.sh, which must show its events delivered), on
# PostgreSQL majors this machine's Debian does not carry, each as Debian's
# own postgresql-NN and postgresql-server-dev-NN in a throwaway root file
# system (scripts/pg-root.sh).  Roots run side by side; the majors sharing a
# root run one after the other.
#
#   bash scripts/test-versions.sh [MAJOR...]     default: 17 18 19
#
# Prints one summary line per major and, for a major that failed, the end of
# its log; every log is kept in $STRIPE_METER_VERSION_LOGS (default
# /tmp/stripe_meter_versions).  Exits non-zero when any major failed.
# Needs root (chroot); the tests themselves run as an unprivileged user.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
logs="${STRIPE_METER_VERSION_LOGS:-/tmp/stripe_meter_versions}"
majors=("$@")
[ ${#majors[@]} -gt 0 ] || majors=(17 18 19)
mkdir -p "$logs"

# The suite for one major, in a copy of this tree inside its root.
run_major() {
	local major="$1" root log start status=0 work
	log="$logs/$major.log"
	start=$(date +%s)
	{
		bash "$src/scripts/pg-root.sh" ensure "$major"
		root="$(bash "$src/scripts/pg-root.sh" dir "$major")"
		work="/tmp/stripe_meter_src_$major"
		rm -rf "$root$work"
		mkdir -p "$root$work"
		tar -C "$src" --exclude=.git --exclude='*.o' --exclude='*.so' --exclude='*.bc' \
			--exclude=tmp_check --exclude=tmp_regress --exclude=results --exclude=dist \
			--exclude=node_modules -cf - . | tar -C "$root$work" -xf -
		# the test command, then the run command as a new user would try it
		bash "$src/scripts/pg-root.sh" run "$major" \
			"set -e; cd '$work'; PG_MAJOR=$major bash scripts/test.sh;
			 PG_MAJOR=$major bash scripts/demo.sh; PG_MAJOR=$major bash scripts/demo.sh stop" &&
			rm -rf "${root:?}$work"
	} >"$log" 2>&1 || status=$?
	echo "$status $(($(date +%s) - start))" >"$logs/$major.status"
}

# One lane per root, so that roots run side by side.
declare -A lanes=()
for major in "${majors[@]}"; do
	root="$(bash "$src/scripts/pg-root.sh" dir "$major")"
	lanes[$root]+="$major "
done
pids=()
for root in "${!lanes[@]}"; do
	(for major in ${lanes[$root]}; do run_major "$major"; done) &
	pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || true; done

failed=0
for major in "${majors[@]}"; do
	log="$logs/$major.log"
	read -r status secs <"$logs/$major.status" || { status=1; secs=0; }
	if [ "$status" -eq 0 ] && summary="$(bash "$src/scripts/suite-summary.sh" "$log")"; then
		echo "PostgreSQL $major: passed: $summary; $((secs / 60)) min $((secs % 60)) s"
	else
		failed=1
		echo "PostgreSQL $major: FAILED (exit $status): $(bash "$src/scripts/suite-summary.sh" "$log" || true); after $((secs / 60)) min $((secs % 60)) s; what failed, from $log:"
		bash "$src/scripts/suite-failure.sh" "$log" | sed 's/^/    /'
	fi
done
exit $failed
