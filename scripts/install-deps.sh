#!/usr/bin/env bash
# Install what building, testing and running stripe_meter needs on Debian:
# the PostgreSQL server and its development headers (PGXS), libcurl's headers,
# the Perl modules of the TAP tests and Node.js (the Stripe-compatible mock).
# Checks for each thing the build really uses, not for a package's name, and
# skips apt entirely when all are present.
#
# Which PostgreSQL: see scripts/pg-select.sh (PG_CONFIG, PG_MAJOR, or the
# newest installed).  A machine with the server but no headers, as a database
# server usually is, gets the matching postgresql-server-dev-NN.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
. "$src/scripts/pg-select.sh"

if [ "$(id -u)" -eq 0 ]; then
	SUDO=
elif command -v sudo >/dev/null 2>&1; then
	SUDO=sudo
else
	SUDO=none
fi
updated=
apt_install() {
	if [ "$SUDO" = none ]; then
		echo "install-deps: missing $* and not root (no sudo available)" >&2
		exit 1
	fi
	echo "install-deps: installing $*"
	[ -n "$updated" ] || { $SUDO apt-get update -qq; updated=1; }
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

given="${PG_CONFIG:-}"
# No server at all: Debian's default one (pg_select then picks it).
if [ -z "${PG_CONFIG:-}" ] && [ -z "${PG_MAJOR:-}" ] && ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
	apt_install postgresql
fi
pg_select

need=()
if [ -n "$given" ]; then
	# a server of the user's own build: nothing of Debian's fits it
	[ -x "$PG_BINDIR/postgres" ] && [ -f "$("$PG_CONFIG" --includedir-server)/postgres.h" ] || {
		echo "install-deps: $PG_CONFIG has no server or no server headers beside it" >&2
		exit 1
	}
elif [ ! -x "$PG_BINDIR/postgres" ]; then
	need+=("postgresql-$PG_MAJOR")
fi
# The headers: the client package ships pg_config and part of pgxs, so only
# postgres.h where pg_config says the server headers are proves them there.
incdir="$("$PG_CONFIG" --includedir-server 2>/dev/null || true)"
pgxs="$("$PG_CONFIG" --pgxs 2>/dev/null || true)"
if [ -z "$given" ] && { [ -z "$incdir" ] || [ ! -f "$incdir/postgres.h" ] || [ ! -f "$pgxs" ]; }; then
	need+=("postgresql-server-dev-$PG_MAJOR")
fi
command -v curl-config >/dev/null 2>&1 || need+=(libcurl4-openssl-dev)
command -v make >/dev/null 2>&1 || need+=(make)
command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
command -v prove >/dev/null 2>&1 || need+=(perl)
perl -MIPC::Run -e1 >/dev/null 2>&1 || need+=(libipc-run-perl)
perl -MTest::More -MTime::HiRes -MJSON::PP -MHTTP::Tiny -e1 >/dev/null 2>&1 || need+=(perl)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v su >/dev/null 2>&1 || need+=(util-linux)

[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"

# PGXS may name a compiler other than gcc (the one the server was built with)
cc="$("$PG_CONFIG" --cc 2>/dev/null | awk '{print $1}')"
if [ -n "$cc" ] && ! command -v "$cc" >/dev/null 2>&1; then
	apt_install "$cc"
fi
[ -f "$("$PG_CONFIG" --includedir-server)/postgres.h" ] || {
	echo "install-deps: $PG_CONFIG has no server headers after installing postgresql-server-dev-$PG_MAJOR" >&2
	exit 1
}
