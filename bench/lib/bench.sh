#!/usr/bin/env bash
# The unprivileged part of bench/run.sh: a private cluster with the worker
# preloaded, the project's Stripe mock twice (plain HTTP/1.1, and TLS with
# HTTP/2 and a test CA made here), and the measuring script.  Expects PGBIN
# (the private server copy's bin directory, the extension installed there)
# and BENCH_MODE (full or quick); run from the source tree's root.
set -euo pipefail
root="$(pwd)"
tmp="$(mktemp -d /tmp/stripe_meter_bench_run.XXXXXX)"
data="$tmp/data"
mock_pid=
tls_mock_pid=

cleanup() {
	[ -n "$mock_pid" ] && kill "$mock_pid" 2>/dev/null || true
	[ -n "$tls_mock_pid" ] && kill "$tls_mock_pid" 2>/dev/null || true
	"$PGBIN/pg_ctl" -D "$data" -m fast stop >/dev/null 2>&1 || true
	if [ "${BENCH_STATUS:-1}" -eq 0 ] && [ -z "${BENCH_KEEP:-}" ]; then rm -rf "$tmp"; else echo "(server log and mock log kept in $tmp)"; fi
}
trap cleanup EXIT

# room for 512 connections in the worker and the SDK baseline's sockets
nofile="$(ulimit -Hn)"
{ [ "$nofile" = unlimited ] || [ "$nofile" -gt 8192 ]; } && nofile=8192
ulimit -n "$nofile" 2>/dev/null || true

# A test CA and a server certificate it signs for localhost and 127.0.0.1,
# as make_certificates in test/perl/StripeMeterTest.pm makes them: the TLS
# mock serves it, the worker trusts the CA through stripe_meter.ca_file and
# the Node SDK baseline through NODE_EXTRA_CA_CERTS.
tls="$tmp/tls"
mkdir -p "$tls"
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 "${ec[@]}" -keyout "$tls/ca.key" -out "$tls/ca.pem" -days 2 \
	-subj '/CN=stripe_meter bench CA' \
	-addext 'basicConstraints=critical,CA:TRUE' -addext 'keyUsage=critical,keyCertSign,cRLSign' 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$tls/server.ext"
openssl req "${ec[@]}" -keyout "$tls/server.key" -out "$tls/server.csr" -subj '/CN=localhost' 2>/dev/null
openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" -CAcreateserial \
	-out "$tls/server.pem" -days 2 -extfile "$tls/server.ext" 2>/dev/null

# The mocks first: the cluster's configuration names a port.  One speaks
# plain HTTP/1.1 (its control API on the same port); the other TLS, offering
# h2 and http/1.1 through ALPN as Stripe does, its control API on a second,
# plain port.  Each keeps its own stats and its own CPU time.
start_mock() {	# name, the variable for its pid, extra arguments...
	local name="$1" pidvar="$2"; shift 2
	node --max-old-space-size=4096 test/mock/stripe-mock.js --port 0 "$@" >"$tmp/$name.out" 2>"$tmp/$name.log" &
	printf -v "$pidvar" %s "$!"
	for _ in $(seq 100); do grep -q listening "$tmp/$name.out" 2>/dev/null && break; sleep 0.1; done
	grep -q listening "$tmp/$name.out" 2>/dev/null || { echo "bench: the $name did not start" >&2; cat "$tmp/$name.log" >&2; exit 1; }
}
start_mock mock mock_pid
mock_port="$(sed -n 's/.*"listening":\([0-9]*\).*/\1/p' "$tmp/mock.out")"
start_mock mock-tls tls_mock_pid --tls-cert "$tls/server.pem" --tls-key "$tls/server.key"
tls_mock_port="$(sed -n 's/.*"listening":\([0-9]*\).*/\1/p' "$tmp/mock-tls.out")"
tls_mock_control="$(sed -n 's/.*"control":\([0-9]*\).*/\1/p' "$tmp/mock-tls.out")"
[ -n "$mock_port" ] && [ -n "$tls_mock_port" ] && [ -n "$tls_mock_control" ] || { echo "bench: no mock port" >&2; exit 1; }

"$PGBIN/initdb" -D "$data" -E UTF8 --locale=C -A trust -U bench >/dev/null
# Server settings: PostgreSQL defaults except what a 1,000,000-event backlog
# and 100 SDK connections need; stripe_meter at its defaults except the
# client-side rate limit (lifted, as the goals say) and the key and URLs
# (the API v2 section selects v2 per database with ALTER DATABASE).
# The URLs here are the TLS mock's (the headline path; the CA file is for
# it, and unused over plain http); bench.js switches between the two
# paths with ALTER SYSTEM (bench/README.md, "Two paths"): the TLS + HTTP/2
# path runs with max_files_per_process untouched, the plain HTTP/1.1 path
# with 2000 (a restart), since each of its requests in flight holds a socket
# and a process may use only a third of max_files_per_process for sockets
# ("Requests in flight and file descriptors").
cat >>"$data/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$tmp'
max_connections = 250
shared_buffers = 512MB
max_wal_size = 4GB
log_min_messages = warning
shared_preload_libraries = 'stripe_meter'
stripe_meter.api_key = 'sk_test_benchMockKey0000'
stripe_meter.api_url = 'https://localhost:$tls_mock_port'
stripe_meter.stream_url = 'https://localhost:$tls_mock_port'
stripe_meter.ca_file = '$tls/ca.pem'
stripe_meter.rate_limit = 0
EOF
"$PGBIN/pg_ctl" -D "$data" -l "$tmp/postgres.log" -w start >/dev/null

# Every section has its own time limits (bench/README.md, "Time"); this one
# stops a run that hangs regardless.
limit=5400
[ "$BENCH_MODE" = quick ] && limit=1800
BENCH_STATUS=0
PGHOST="$tmp" PGUSER=bench PGDATABASE=postgres PGDATA="$data" PGBIN="$PGBIN" \
	MOCK_PORT="$mock_port" MOCK_PID="$mock_pid" BENCH_TMP="$tmp" \
	TLS_MOCK_PORT="$tls_mock_port" TLS_MOCK_CONTROL="$tls_mock_control" TLS_MOCK_PID="$tls_mock_pid" \
	BENCH_CA="$tls/ca.pem" \
	timeout "$limit" node bench/node/bench.js "$BENCH_MODE" || BENCH_STATUS=$?
[ "$BENCH_STATUS" -eq 124 ] && echo "bench: stopped after $limit s" >&2
if [ "$BENCH_STATUS" -ne 0 ]; then
	echo "--- postgres.log (last 40 lines)"; tail -n 40 "$tmp/postgres.log"
	echo "--- mock.log (last 20 lines)"; tail -n 20 "$tmp/mock.log"
	echo "--- mock-tls.log (last 20 lines)"; tail -n 20 "$tmp/mock-tls.log"
fi
exit "$BENCH_STATUS"
