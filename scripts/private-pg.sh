#!/usr/bin/env bash
# Make DIR a private, relocated copy of the PostgreSQL installation that
# scripts/pg-select.sh picks (PG_MAJOR, PG_CONFIG), laid out as Debian lays
# it out, unless DIR already holds one.  Its pg_config then points into DIR,
# so stripe_meter installs there and not into the system's server: several
# checkouts, the AddressSanitizer build and the benchmark can each have
# their own.
#
#   bash scripts/private-pg.sh DIR     # then: make PG_CONFIG=DIR/usr/lib/postgresql/NN/bin/pg_config
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
. "$src/scripts/pg-select.sh"
pg_select
dir="${1:?usage: private-pg.sh DIR}"
[ -x "$dir/usr/lib/postgresql/$PG_MAJOR/bin/pg_config" ] && exit 0
[ -d "/usr/lib/postgresql/$PG_MAJOR" ] || {
	echo "private-pg: PostgreSQL $PG_MAJOR is not installed under /usr/lib/postgresql" >&2
	exit 1
}
mkdir -p "$dir/usr/lib/postgresql" "$dir/usr/share/postgresql" "$dir/usr/include/postgresql"
cp -a "/usr/lib/postgresql/$PG_MAJOR" "$dir/usr/lib/postgresql/"
cp -a "/usr/share/postgresql/$PG_MAJOR" "$dir/usr/share/postgresql/"
# the server headers of this major, and the client headers beside them
cp -a /usr/include/postgresql/. "$dir/usr/include/postgresql/"
