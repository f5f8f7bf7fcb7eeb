#!/usr/bin/env bash
# Install what building, testing and running stripe_meter needs on Debian 12:
# PostgreSQL 15 with PGXS, libcurl, the TAP test modules and Node.js (the
# Stripe-compatible mock server).  Skips apt entirely when all are present.
set -euo pipefail

need=()
command -v /usr/lib/postgresql/15/bin/postgres >/dev/null 2>&1 || need+=(postgresql-15)
command -v pg_config >/dev/null 2>&1 && [ -d /usr/lib/postgresql/15/lib/pgxs ] || need+=(postgresql-server-dev-15)
command -v curl-config >/dev/null 2>&1 || need+=(libcurl4-openssl-dev)
perl -MIPC::Run -e1 >/dev/null 2>&1 || need+=(libipc-run-perl)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v make >/dev/null 2>&1 && command -v gcc >/dev/null 2>&1 || need+=(build-essential)
command -v prove >/dev/null 2>&1 || need+=(perl)

[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
	SUDO=
elif command -v sudo >/dev/null 2>&1; then
	SUDO=sudo
else
	echo "install-deps: missing ${need[*]} and not root (no sudo available)" >&2
	exit 1
fi
echo "install-deps: installing ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
