#!/usr/bin/env bash
# Build the Debian packages postgresql-NN-stripe-meter from this source tree,
# one for each PostgreSQL NN whose server headers are installed
# (debian/pgversions: 15 and later):
#
#   bash scripts/build-deb.sh [OUTDIR]        # default OUTDIR: dist/
#
# With no server headers at all, those of scripts/pg-select.sh's choice
# (PG_MAJOR, or the newest server installed) are installed first.
# Installs the build dependencies with apt-get when missing, builds with
# dpkg-buildpackage (pg_buildext; the pg_regress suite runs during the build)
# in a temporary copy of the tree, and leaves the .deb in OUTDIR.  The copy
# keeps the checkout free of build products and root-owned files; OUTDIR is
# given to the checkout's owner.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-$src/dist}" && cd "${1:-$src/dist}" && pwd)"

. "$src/scripts/pg-select.sh"
need=()
command -v dpkg-buildpackage >/dev/null 2>&1 || need+=(dpkg-dev)
command -v dh >/dev/null 2>&1 || need+=(debhelper)
command -v dh_pgxs_test >/dev/null 2>&1 || need+=(postgresql-server-dev-all)
if ! ls /usr/include/postgresql/*/server/postgres.h >/dev/null 2>&1; then
	pg_select
	need+=("postgresql-server-dev-$PG_MAJOR")
fi
command -v curl-config >/dev/null 2>&1 || need+=(libcurl4-openssl-dev)
# dpkg-checkbuilddeps wants the package itself, not only gcc and make
dpkg -s build-essential >/dev/null 2>&1 || need+=(build-essential)
if [ ${#need[@]} -gt 0 ]; then
	SUDO=
	[ "$(id -u)" -eq 0 ] || SUDO=sudo
	echo "build-deb: installing ${need[*]}"
	$SUDO apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The package version must be a version of what the control file declares.
extversion="$(sed -n "s/^default_version = '\(.*\)'/\1/p" "$src/stripe_meter.control")"
debversion="$(dpkg-parsechangelog -l "$src/debian/changelog" -S Version)"
case "$debversion" in
"$extversion" | "$extversion"[~+-]*) ;;
*)
	echo "build-deb: debian/changelog says $debversion, stripe_meter.control says $extversion" >&2
	exit 1
	;;
esac

# A world-readable copy: the regression cluster runs as the postgres user and
# reads the extension's files from the build tree.
tmp="$(mktemp -d /tmp/stripe_meter_deb.XXXXXX)"
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"
mkdir "$tmp/stripe-meter"
if git -c safe.directory='*' -C "$src" rev-parse --git-dir >/dev/null 2>&1; then
	# tracked and new files, but nothing ignored (build products, dist/)
	git -c safe.directory='*' -C "$src" ls-files -z --cached --others --exclude-standard |
		tar -C "$src" --null --no-recursion --ignore-failed-read -T - -cf - | tar -C "$tmp/stripe-meter" -xf -
else
	tar -C "$src" --exclude=.git --exclude='*.o' --exclude='*.so' --exclude='*.bc' \
		--exclude=tmp_check --exclude=tmp_regress --exclude=results --exclude=dist \
		-cf - . | tar -C "$tmp/stripe-meter" -xf -
fi
chmod -R a+rX "$tmp/stripe-meter"

# a package for every installed version (debian/rules says so too), named
# in debian/control from control.in
export PG_SUPPORTED_VERSIONS=installed
(cd "$tmp/stripe-meter" && pg_buildext updatecontrol && dpkg-checkbuilddeps && dpkg-buildpackage -us -uc -b)

rm -f "$out"/postgresql-*-stripe-meter_*.deb
cp "$tmp"/postgresql-*-stripe-meter_*.deb "$out/"
[ "$(id -u)" -eq 0 ] && chown -R --reference="$src" "$out"
ls -1 "$out"/postgresql-*-stripe-meter_*.deb
