#!/usr/bin/env bash
# CI: build the Debian packages and check what they contain.
#
#   bash scripts/check-deb.sh             # build into dist/ and check
#   bash scripts/check-deb.sh --install   # also apt-get install them and create
#                                         # the extension from each (fresh
#                                         # machines or throwaway roots only:
#                                         # it writes into /usr)
#
# One package per installed PostgreSQL (scripts/build-deb.sh).  Each must hold
# the library, the control file and every SQL script this tree installs (the
# current version's, each delta, each frozen release), and depend on libcurl
# and on its own server.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
install=
[ "${1:-}" = "--install" ] && install=1

bash "$src/scripts/build-deb.sh" "$src/dist" >"${TMPDIR:-/tmp}/stripe_meter_build_deb.log" 2>&1 || {
	tail -n 100 "${TMPDIR:-/tmp}/stripe_meter_build_deb.log"
	echo "check-deb: package build failed" >&2
	exit 1
}
debs=("$src"/dist/postgresql-*-stripe-meter_*.deb)
[ -e "${debs[0]}" ] || { echo "check-deb: no package was built" >&2; exit 1; }

extversion="$(sed -n "s/^default_version = '\(.*\)'/\1/p" "$src/stripe_meter.control")"
oldest="$(ls "$src"/released/ | sed -n 's/^stripe_meter--\(.*\)\.sql$/\1/p' | sort -V | head -n 1)"
status=0
for deb in "${debs[@]}"; do
	major="$(dpkg-deb -f "$deb" Package | sed -n 's/^postgresql-\([0-9]*\)-stripe-meter$/\1/p')"
	want=(
		"usr/lib/postgresql/$major/lib/stripe_meter.so"
		"usr/share/postgresql/$major/extension/stripe_meter.control"
		"usr/share/postgresql/$major/extension/stripe_meter--$extversion.sql"
	)
	for f in "$src"/stripe_meter--*--*.sql "$src"/released/stripe_meter--*.sql; do
		[ -e "$f" ] && want+=("usr/share/postgresql/$major/extension/$(basename "$f")")
	done
	contents="$(dpkg -c "$deb" | awk '{print $6}' | sed 's|^\./||')"
	for f in "${want[@]}"; do
		if grep -qxF "$f" <<<"$contents"; then
			echo "ok: $f"
		else
			echo "MISSING from $(basename "$deb"): $f" >&2
			status=1
		fi
	done
	depends="$(dpkg-deb -f "$deb" Depends)"
	if grep -q 'libcurl' <<<"$depends" && grep -q "postgresql-$major" <<<"$depends"; then
		echo "ok: $(basename "$deb") Depends: $depends"
	else
		echo "$(basename "$deb") does not depend on libcurl and postgresql-$major: $depends" >&2
		status=1
	fi
done
[ $status -eq 0 ] || exit $status

if [ -n "$install" ]; then
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${debs[@]}" >/dev/null
	for deb in "${debs[@]}"; do
		package="$(dpkg-deb -f "$deb" Package)"
		major="$(sed -n 's/^postgresql-\([0-9]*\)-stripe-meter$/\1/p' <<<"$package")"
		dpkg -s "$package" | grep -q '^Status: install ok installed'
		# a throwaway cluster (as the postgres user) that creates the
		# extension at the oldest release and updates it
		pg_virtualenv -t -v "$major" psql -X -v ON_ERROR_STOP=1 -At -q -c "
			CREATE EXTENSION stripe_meter VERSION '$oldest';
			ALTER EXTENSION stripe_meter UPDATE;
			SELECT 'installed $package: stripe_meter ' || extversion || ' on ' || current_setting('server_version')
			FROM pg_extension WHERE extname = 'stripe_meter';"
	done
fi
echo "check-deb: $(for d in "${debs[@]}"; do basename "$d"; done | tr '\n' ' ')ok"
