#!/usr/bin/env bash
# The unprivileged part of bench/run.sh: a private cluster with the worker
# preloaded, the project's Stripe mock, and the measuring script.  Expects
# PGBIN (the private server copy's bin directory, the extension installed
# there) and BENCH_MODE (full or quick); run from the source tree's root.
set -euo pipefail
root="$(pwd)"
tmp="$(mktemp -d /tmp/stripe_meter_bench_run.XXXXXX)"
data="$tmp/data"
mock_pid=

cleanup() {
	[ -n "$mock_pid" ] && kill "$mock_pid" 2>/dev/null || true
	"$PGBIN/pg_ctl" -D "$data" -m fast stop >/dev/null 2>&1 || true
	if [ "${BENCH_STATUS:-1}" -eq 0 ] && [ -z "${BENCH_KEEP:-}" ]; then rm -rf "$tmp"; else echo "(server log and mock log kept in $tmp)"; fi
}
trap cleanup EXIT

# room for 512 connections in the worker and the SDK baseline's sockets
nofile="$(ulimit -Hn)"
{ [ "$nofile" = unlimited ] || [ "$nofile" -gt 8192 ]; } && nofile=8192
ulimit -n "$nofile" 2>/dev/null || true

# the mock first: the cluster's configuration names its port
node --max-old-space-size=4096 test/mock/stripe-mock.js --port 0 >"$tmp/mock.out" 2>"$tmp/mock.log" &
mock_pid=$!
for _ in $(seq 100); do grep -q listening "$tmp/mock.out" 2>/dev/null && break; sleep 0.1; done
mock_port="$(sed -n 's/.*"listening":\([0-9]*\).*/\1/p' "$tmp/mock.out")"
[ -n "$mock_port" ] || { echo "bench: the mock did not start" >&2; cat "$tmp/mock.log" >&2; exit 1; }

"$PGBIN/initdb" -D "$data" -E UTF8 --locale=C -A trust -U bench >/dev/null
# Server settings: PostgreSQL defaults except what a 1,000,000-event backlog
# and 100 SDK connections need; stripe_meter at its defaults except the
# client-side rate limit (lifted, as the goals say) and the key and URLs
# (the API v2 section selects v2 per database with ALTER DATABASE).
# Each request in flight holds a socket, and a process may use only a third
# of max_files_per_process for sockets: 2000 allows the 512 of the scaling
# run (bench/README.md, "Requests in flight and file descriptors").
cat >>"$data/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$tmp'
max_connections = 250
shared_buffers = 512MB
max_wal_size = 4GB
max_files_per_process = 2000
log_min_messages = warning
shared_preload_libraries = 'stripe_meter'
stripe_meter.api_key = 'sk_test_benchMockKey0000'
stripe_meter.api_url = 'http://127.0.0.1:$mock_port'
stripe_meter.stream_url = 'http://127.0.0.1:$mock_port'
stripe_meter.rate_limit = 0
EOF
"$PGBIN/pg_ctl" -D "$data" -l "$tmp/postgres.log" -w start >/dev/null

# Every section has its own time limits (bench/README.md, "Time"); this one
# stops a run that hangs regardless.
limit=3600
[ "$BENCH_MODE" = quick ] && limit=1200
BENCH_STATUS=0
PGHOST="$tmp" PGUSER=bench PGDATABASE=postgres PGDATA="$data" PGBIN="$PGBIN" \
	MOCK_PORT="$mock_port" MOCK_PID="$mock_pid" BENCH_TMP="$tmp" \
	timeout "$limit" node bench/node/bench.js "$BENCH_MODE" || BENCH_STATUS=$?
[ "$BENCH_STATUS" -eq 124 ] && echo "bench: stopped after $limit s" >&2
if [ "$BENCH_STATUS" -ne 0 ]; then
	echo "--- postgres.log (last 40 lines)"; tail -n 40 "$tmp/postgres.log"
	echo "--- mock.log (last 20 lines)"; tail -n 20 "$tmp/mock.log"
fi
exit "$BENCH_STATUS"
