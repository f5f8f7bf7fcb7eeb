#!/usr/bin/env bash
# The main job, end to end on one machine: installs what is missing, builds
# and installs stripe_meter, starts a throwaway PostgreSQL cluster (as an
# unprivileged user) with the delivery worker preloaded, pointed at the
# project's Stripe-compatible mock server on 127.0.0.1 -- or at Stripe itself
# when STRIPE_API_KEY is set -- queues sample events three ways, and shows
# them delivered.
#
#   bash scripts/demo.sh          start (or restart) the demo
#   bash scripts/demo.sh stop     stop the cluster and the mock
#
# Settings (environment): DEMO_DIR (default /tmp/stripe_meter_demo),
# DEMO_PORT (default 25432), STRIPE_API_KEY and STRIPE_CUSTOMER_ID (real
# Stripe: the key of a test-mode account and a customer of it; the account
# needs a meter for the event name "stripe_meter_demo"), PG_MAJOR or PG_CONFIG
# (which PostgreSQL; default: the newest installed).
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
dir="${DEMO_DIR:-/tmp/stripe_meter_demo}"
port="${DEMO_PORT:-25432}"
. "$src/scripts/pg-select.sh"

if [ "$(id -u)" -eq 0 ]; then
	user=stripe_meter_demo
	as_user() { su "$user" -s /bin/bash -c "$1"; }
	SUDO=
else
	user="$(id -un)"
	as_user() { bash -c "$1"; }
	SUDO=sudo
fi

stop() {
	if [ -f "$dir/data/postmaster.pid" ]; then
		as_user "$bindir/pg_ctl -D '$dir/data' -m fast -w stop" >/dev/null || true
	fi
	if [ -f "$dir/mock.pid" ]; then
		kill "$(cat "$dir/mock.pid")" 2>/dev/null || true
		rm -f "$dir/mock.pid"
	fi
}

if [ "${1:-}" = stop ]; then
	pg_select
	bindir="$PG_BINDIR"
	stop
	echo "stopped; remove $dir to delete the demo's data"
	exit 0
fi

bash "$src/scripts/install-deps.sh"
. "$src/scripts/pg-select.sh"
pg_select
bindir="$PG_BINDIR"
if [ "$(id -u)" -eq 0 ]; then
	id -u "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
fi

echo "== building and installing stripe_meter"
make -s -C "$src" PG_CONFIG="$PG_CONFIG" >/dev/null
$SUDO make -s -C "$src" PG_CONFIG="$PG_CONFIG" install >/dev/null

stop
mkdir -p "$dir"
chown "$user" "$dir"

if [ -n "${STRIPE_API_KEY:-}" ]; then
	api_url=https://api.stripe.com
	api_key="$STRIPE_API_KEY"
	customer="${STRIPE_CUSTOMER_ID:?set STRIPE_CUSTOMER_ID to a customer of that Stripe account}"
	echo "== delivering to Stripe itself ($api_url)"
else
	echo "== starting the Stripe-compatible mock server on 127.0.0.1"
	rm -f "$dir/mock.out"
	# a copy the unprivileged user can read, wherever the checkout is
	rm -rf "$dir/mock"
	cp -R "$src/test/mock" "$dir/mock"
	chown -R "$user" "$dir/mock"
	as_user "nohup node '$dir/mock/stripe-mock.js' --port 0 > '$dir/mock.out' 2> '$dir/mock.log' & echo \$! > '$dir/mock.pid'"
	for _ in $(seq 1 100); do
		grep -q listening "$dir/mock.out" 2>/dev/null && break
		sleep 0.1
	done
	mock_port="$(sed -n 's/.*"listening":\([0-9]*\).*/\1/p' "$dir/mock.out")"
	[ -n "$mock_port" ] || { echo "the mock did not start:"; cat "$dir/mock.log"; exit 1; }
	api_url="http://127.0.0.1:$mock_port"
	api_key="sk_test_demo$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
	customer=cus_NciAYcXfLnqBoz
	echo "   mock listening at $api_url"
fi

echo "== creating a throwaway cluster in $dir/data (port $port)"
rm -rf "$dir/data"
as_user "$bindir/initdb -D '$dir/data' -A trust >/dev/null"
# the key goes into a file only the cluster's owner can read, never a table
as_user "cat >> '$dir/data/postgresql.conf'" <<EOF
shared_preload_libraries = 'stripe_meter'
port = $port
listen_addresses = ''
unix_socket_directories = '$dir'
stripe_meter.api_url = '$api_url'
stripe_meter.api_key = '$api_key'
EOF
as_user "$bindir/pg_ctl -D '$dir/data' -l '$dir/server.log' -w start >/dev/null"

psql_demo() { as_user "$bindir/psql -X -q -h '$dir' -p $port -d postgres -v ON_ERROR_STOP=1 $*"; }

echo "== queueing sample events: the function, a trigger, a direct INSERT"
psql_demo <<EOF
CREATE EXTENSION stripe_meter;

-- 1. the function
SELECT stripe_meter_event_create('stripe_meter_demo',
       '{"stripe_customer_id": "$customer", "value": 25}');

-- 2. a trigger on an application table
CREATE TABLE api_calls (id bigserial PRIMARY KEY, customer_id text, tokens int);
CREATE TRIGGER bill_calls AFTER INSERT ON api_calls FOR EACH ROW
  EXECUTE FUNCTION stripe_meter_event_trigger('stripe_meter_demo', 'customer_id', 'tokens');
INSERT INTO api_calls (customer_id, tokens) VALUES ('$customer', 7), ('$customer', 12);

-- 3. a direct INSERT, as an application in any language would do
INSERT INTO stripe_meter.outbox (event_name, payload)
VALUES ('stripe_meter_demo', '{"stripe_customer_id": "$customer", "value": "3"}');
EOF

echo "== waiting for delivery"
for _ in $(seq 1 300); do
	left="$(psql_demo "-At -c 'SELECT pending + in_flight FROM stripe_meter.status'")"
	[ "$left" = 0 ] && break
	sleep 0.2
done

psql_demo <<'EOF'
\pset pager off
\echo
\echo Delivered events, with the billing.meter_event Stripe returned:
SELECT identifier, outcome, attempts, meter_event FROM stripe_meter.meter_events ORDER BY delivered_at;
\echo
\echo Events that failed for good (none expected):
SELECT identifier, reason FROM stripe_meter.failed_events;
\echo
\echo The status view:
SELECT * FROM stripe_meter.status;
EOF

cat <<EOF

The demo is running.
  connect:  $( [ "$(id -u)" -eq 0 ] && echo "su $user -c \"psql -h $dir -p $port -d postgres\"" || echo "psql -h $dir -p $port -d postgres")
  log:      $dir/server.log
  stop:     bash scripts/demo.sh stop
EOF
