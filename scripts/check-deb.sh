#!/usr/bin/env bash
# CI: build the Debian package and check what it contains.
#
#   bash scripts/check-deb.sh             # build into dist/ and check
#   bash scripts/check-deb.sh --install   # also apt-get install it and create
#                                         # the extension (fresh machines only:
#                                         # it writes into /usr)
#
# The package must hold the library, the control file and every SQL script
# this tree installs (the current version's, each delta, each frozen release),
# and depend on libcurl.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
install=
[ "${1:-}" = "--install" ] && install=1

bash "$src/scripts/build-deb.sh" "$src/dist" >"${TMPDIR:-/tmp}/stripe_meter_build_deb.log" 2>&1 || {
	tail -n 100 "${TMPDIR:-/tmp}/stripe_meter_build_deb.log"
	echo "check-deb: package build failed" >&2
	exit 1
}
deb="$(ls -1 "$src"/dist/postgresql-15-stripe-meter_*.deb)"

extversion="$(sed -n "s/^default_version = '\(.*\)'/\1/p" "$src/stripe_meter.control")"
want=(
	usr/lib/postgresql/15/lib/stripe_meter.so
	usr/share/postgresql/15/extension/stripe_meter.control
	"usr/share/postgresql/15/extension/stripe_meter--$extversion.sql"
)
for f in "$src"/stripe_meter--*--*.sql "$src"/released/stripe_meter--*.sql; do
	[ -e "$f" ] && want+=("usr/share/postgresql/15/extension/$(basename "$f")")
done

contents="$(dpkg -c "$deb" | awk '{print $6}' | sed 's|^\./||')"
status=0
for f in "${want[@]}"; do
	if grep -qxF "$f" <<<"$contents"; then
		echo "ok: $f"
	else
		echo "MISSING from $(basename "$deb"): $f" >&2
		status=1
	fi
done
depends="$(dpkg-deb -f "$deb" Depends)"
if grep -q 'libcurl' <<<"$depends"; then
	echo "ok: Depends: $depends"
else
	echo "package does not depend on libcurl: $depends" >&2
	status=1
fi
[ $status -eq 0 ] || exit $status

if [ -n "$install" ]; then
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$deb" >/dev/null
	dpkg -s postgresql-15-stripe-meter | grep -q '^Status: install ok installed'
	# a throwaway cluster (as the postgres user) that creates the extension at
	# the oldest release and updates it
	oldest="$(ls "$src"/released/ | sed -n 's/^stripe_meter--\(.*\)\.sql$/\1/p' | sort -V | head -n 1)"
	pg_virtualenv -t -v 15 psql -X -v ON_ERROR_STOP=1 -q -c "
		CREATE EXTENSION stripe_meter VERSION '$oldest';
		ALTER EXTENSION stripe_meter UPDATE;
		SELECT 'installed package: stripe_meter ' || extversion FROM pg_extension WHERE extname = 'stripe_meter';"
fi
echo "check-deb: $(basename "$deb") ok"
