#!/usr/bin/env bash
# Throwaway Debian root file systems that carry a PostgreSQL major this
# machine's Debian does not, for building and testing stripe_meter against it
# with chroot.  Each root is Debian's own release of that major, made with
# debootstrap from the machine's Debian mirror and cached, so a second run
# starts at once; a missing root is made again.
#
#   scripts/pg-root.sh ensure MAJOR        make the root for MAJOR when missing, with
#                                          Debian's postgresql-MAJOR and -dev packages
#   scripts/pg-root.sh dir MAJOR           print that root's directory
#   scripts/pg-root.sh run MAJOR CMD...    run CMD (bash -c) as root inside it, with
#                                          /proc, /dev and /dev/shm mounted
#   scripts/pg-root.sh fresh DIR           make DIR a new Debian 12 root holding only
#                                          postgresql-15 (the server, no headers) and git,
#                                          as a database server usually is
#   scripts/pg-root.sh run-in DIR CMD...   as run, in the root at DIR
#
# MAJOR is 15 (Debian 12), 17 (Debian 13), 18 (unstable) or 19 (experimental,
# on an unstable root, which therefore serves 18 and 19 alike).  Roots live in
# $STRIPE_METER_ROOTS (default /var/cache/stripe_meter/roots).  Needs root.
set -euo pipefail

cache="${STRIPE_METER_ROOTS:-/var/cache/stripe_meter/roots}"

die() { echo "pg-root: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mount)"

# The mounts a root needs (/proc, /dev) live in this script's own mount
# namespace, so they vanish with it even when it is killed.  A /dev bind
# mount left behind on the machine would let a later rm -rf of the root
# delete the machine's own device nodes.
if [ -z "${STRIPE_METER_ROOT_NS:-}" ]; then
	export STRIPE_METER_ROOT_NS=1
	exec unshare --mount --propagation private bash "$0" "$@"
fi

# The Debian suite that carries each major, and the root that holds it.
suite_of() {
	case "$1" in
	15) echo bookworm ;;
	17) echo trixie ;;
	18 | 19) echo sid ;;
	*) die "no Debian release here carries PostgreSQL $1 (15, 17, 18 and 19 do)" ;;
	esac
}

# The machine's own Debian mirror, so roots come from where apt-get does.
mirror() {
	local m
	m="$(sed -n 's/^URIs: *\(.*\/debian\)\/*$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)"
	[ -n "$m" ] || m="$(sed -n 's/^deb \([^ ]*\/debian\)\/* .*/\1/p' /etc/apt/sources.list 2>/dev/null | head -n 1)"
	echo "${m:-http://deb.debian.org/debian}"
}

# apt-get inside a root: the reachable archive is a snapshot whose
# unstable and experimental Release files have expired.
root_apt() {
	local root="$1"
	shift
	chroot "$root" env DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 \
		apt-get -o Acquire::Check-Valid-Until=false -o Dpkg::Use-Pty=0 "$@"
}

# Remove a root: unmount whatever is mounted inside it first, deepest first,
# and never cross into another file system.
remove_tree() {
	local dir="$1" m
	[ -e "$dir" ] || return 0
	dir="$(realpath "$dir")"
	for m in $(awk -v d="$dir" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/self/mounts | sort -r); do
		umount "$m" 2>/dev/null || umount -l "$m"
	done
	rm -rf --one-file-system "$dir"
}

bootstrap() {
	local suite="$1" root="$2"
	local m
	m="$(mirror)"
	command -v debootstrap >/dev/null 2>&1 || {
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
	}
	remove_tree "$root"
	mkdir -p "$(dirname "$root")"
	echo "pg-root: debootstrap $suite into $root"
	debootstrap --variant=minbase "$suite" "$root" "$m" >"$root.debootstrap.log" 2>&1 || {
		tail -n 30 "$root.debootstrap.log" >&2
		die "debootstrap $suite failed"
	}
	rm -f "$root.debootstrap.log"
	{
		echo "deb $m $suite main"
		[ "$suite" = sid ] && echo "deb $m experimental main"
	} >"$root/etc/apt/sources.list"
	cat >"$root/etc/apt/apt.conf.d/90stripe-meter" <<-'EOF'
		Acquire::Check-Valid-Until "false";
		APT::Install-Recommends "false";
		Acquire::Languages "none";
	EOF
	printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
	# the services a package's postinst would start belong to the tests alone
	printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
	chmod 755 "$root/usr/sbin/policy-rc.d"
}

mounts_up() {
	local root="$1"
	cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
	mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
	mountpoint -q "$root/dev" || mount --bind /dev "$root/dev"
	mountpoint -q "$root/dev/pts" || mount --bind /dev/pts "$root/dev/pts"
	mountpoint -q "$root/dev/shm" || mount --bind /dev/shm "$root/dev/shm"
}

mounts_down() {
	local root="$1" m
	for m in dev/shm dev/pts dev proc; do
		mountpoint -q "$root/$m" && { umount "$root/$m" 2>/dev/null || umount -l "$root/$m"; }
	done
	return 0
}

# Run a command in a root, one at a time per root (the mounts are shared).
run_in() {
	local root="$1"
	shift
	[ -d "$root/etc" ] || die "no root at $root"
	exec 9>"$root.lock"
	flock 9
	mounts_up "$root"
	trap 'mounts_down "'"$root"'"' EXIT
	local status=0
	chroot "$root" /usr/bin/env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		LC_ALL=C.UTF-8 TERM=dumb ${CI:+CI=$CI} /bin/bash -c "$*" || status=$?
	mounts_down "$root"
	trap - EXIT
	return $status
}

# Install Debian's server and -dev packages of a major into its root.
ensure() {
	local major="$1" suite root target=()
	suite="$(suite_of "$major")"
	root="$cache/$suite"
	exec 8>"$cache/$suite.ensure.lock"
	flock 8
	[ -x "$root/usr/bin/apt-get" ] && [ -f "$root/.stripe-meter-ready" ] || {
		bootstrap "$suite" "$root"
		touch "$root/.stripe-meter-ready"
	}
	if [ ! -f "$root/usr/lib/postgresql/$major/bin/postgres" ] ||
		[ ! -f "$root/usr/include/postgresql/$major/server/postgres.h" ]; then
		[ "$major" = 19 ] && target=(-t experimental)
		# not while a command runs in the root: the mounts are shared
		exec 9>"$root.lock"
		flock 9
		mounts_up "$root"
		echo "pg-root: installing postgresql-$major and postgresql-server-dev-$major into $root"
		if ! { root_apt "$root" -qq update &&
			root_apt "$root" -y -qq install "${target[@]}" "postgresql-$major" "postgresql-server-dev-$major"; } >"$root.apt.log" 2>&1; then
			mounts_down "$root"
			tail -n 30 "$root.apt.log" >&2
			die "could not install PostgreSQL $major into $root"
		fi
		mounts_down "$root"
		flock -u 9
	fi
	flock -u 8
}

cmd="${1:-}"
shift || true
case "$cmd" in
dir)
	[ $# -eq 1 ] || die "usage: pg-root.sh dir MAJOR"
	echo "$cache/$(suite_of "$1")"
	;;
ensure)
	[ $# -eq 1 ] || die "usage: pg-root.sh ensure MAJOR"
	mkdir -p "$cache"
	ensure "$1"
	;;
run)
	[ $# -ge 2 ] || die "usage: pg-root.sh run MAJOR CMD..."
	major="$1"
	shift
	run_in "$cache/$(suite_of "$major")" "$@"
	;;
run-in)
	[ $# -ge 2 ] || die "usage: pg-root.sh run-in DIR CMD..."
	root="$1"
	shift
	run_in "$root" "$@"
	;;
fresh)
	[ $# -eq 1 ] || die "usage: pg-root.sh fresh DIR"
	# A cached copy of a new Debian 12 root with postgresql-15 and git, so
	# each check starts from the same untouched state.
	mkdir -p "$cache"
	base="$cache/bookworm-server.tar"
	if [ ! -f "$base" ]; then
		tmp="$cache/bookworm-server.tmp"
		bootstrap bookworm "$tmp"
		mounts_up "$tmp"
		if ! { root_apt "$tmp" -qq update && root_apt "$tmp" -y -qq install postgresql-15 git; } >"$tmp.apt.log" 2>&1; then
			mounts_down "$tmp"
			tail -n 30 "$tmp.apt.log" >&2
			die "could not install postgresql-15 and git into $tmp"
		fi
		mounts_down "$tmp"
		root_apt "$tmp" clean
		tar -C "$tmp" -cf "$base.part" . && mv "$base.part" "$base"
		remove_tree "$tmp"
		rm -f "$tmp.apt.log"
	fi
	remove_tree "$1"
	mkdir -p "$1"
	tar -C "$1" -xf "$base"
	;;
*)
	sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
	exit 2
	;;
esac
