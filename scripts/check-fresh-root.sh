#!/usr/bin/env bash
# CI: the README's two commands on a machine as a new user has it.  A new
# Debian 12 root file system (scripts/pg-root.sh fresh) holds PostgreSQL 15's
# server and git and nothing else of the project's needs: no server headers,
# no libcurl headers, no compiler, no Node.js, no TAP modules.  This tree is
# cloned into it, and there, as root:
#
#   bash scripts/test.sh     must install what is missing and pass
#   bash scripts/demo.sh     must show the sample events delivered
#
#   bash scripts/check-fresh-root.sh [DIR]   # default DIR: /tmp/stripe_meter_fresh_root
#
# The root is removed afterwards unless the check failed.  Needs root.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
root="${1:-/tmp/stripe_meter_fresh_root}"
log="${STRIPE_METER_FRESH_LOG:-/tmp/stripe_meter_fresh_root.log}"
start=$(date +%s)

bash "$src/scripts/pg-root.sh" fresh "$root"
for tool in gcc node curl-config; do
	if chroot "$root" /bin/sh -c "command -v $tool" >/dev/null 2>&1; then
		echo "check-fresh-root: the fresh root already has $tool" >&2
		exit 1
	fi
done
[ ! -e "$root/usr/include/postgresql/15/server/postgres.h" ] || {
	echo "check-fresh-root: the fresh root already has the server headers" >&2
	exit 1
}

# the committed tree, as a clone; uncommitted files too, so that a local
# run checks what is in the work tree
git -c safe.directory='*' clone -q --no-local "$src" "$root/root/stripe_meter"
if git -c safe.directory='*' -C "$src" rev-parse --git-dir >/dev/null 2>&1; then
	git -c safe.directory='*' -C "$src" ls-files -z --modified --others --exclude-standard |
		tar -C "$src" --null --no-recursion --ignore-failed-read -T - -cf - |
		tar -C "$root/root/stripe_meter" -xf -
fi

status=0
bash "$src/scripts/pg-root.sh" run-in "$root" '
	set -e
	cd /root/stripe_meter
	echo "== bash scripts/test.sh"
	bash scripts/test.sh
	echo "== bash scripts/demo.sh"
	bash scripts/demo.sh
	bash scripts/demo.sh stop
' >"$log" 2>&1 || status=$?

secs=$(($(date +%s) - start))
if [ $status -eq 0 ] && summary="$(bash "$src/scripts/suite-summary.sh" "$log")"; then
	echo "PostgreSQL 15: passed in a fresh Debian 12 root (server and git only): $summary; $((secs / 60)) min $((secs % 60)) s"
	rm -rf --one-file-system "$root"
	exit 0
fi
echo "PostgreSQL 15: FAILED in a fresh Debian 12 root (exit $status): $(bash "$src/scripts/suite-summary.sh" "$log" || true); after $((secs / 60)) min $((secs % 60)) s; what failed, from $log:"
bash "$src/scripts/suite-failure.sh" "$log" | sed 's/^/    /'
exit 1
