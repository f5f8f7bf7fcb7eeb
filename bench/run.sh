#!/usr/bin/env bash
# The stripe_meter benchmark: one command, on a fresh Debian 12 machine.
#
#   bash bench/run.sh            # full run (about 35 minutes; stopped after 90)
#   bash bench/run.sh --quick    # smoke run with small counts (about 8 minutes; stopped after 30)
#
# Installs what it needs (PostgreSQL 15 and build tools through
# scripts/install-deps.sh; wrk, h2load (nghttp2-client), openssl, gnuplot
# and npm through apt; the official `stripe` Node SDK and `pg` through npm
# into bench/node/), builds the extension, installs it into a private
# relocated copy of the PostgreSQL installation (never the system one),
# starts a private cluster and the project's Stripe mock (plain HTTP/1.1,
# and TLS + HTTP/2 with a test CA made for the run), measures, and writes
# bench/RESULTS.md and bench/scaling.png.  See bench/README.md for what is
# measured.
#
# PostgreSQL refuses to run as root, so when run as root the benchmark runs
# as an unprivileged user (stripe_meter_bench) in a copy of the source tree,
# and the results are copied back.
#
# Environment: PRIVATE_PG (default /tmp/stripe_meter-bench-pg) is where the
# private server copy lives; BENCH_KEEP=1 keeps the work directory;
# BENCH_ONLY=drain,h2load,... runs some sections and prints their figures
# as JSON, leaving RESULTS.md alone (bench/README.md).
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"

mode=full
for a in "$@"; do
	case "$a" in
		--quick) mode=quick ;;
		-h|--help) sed -n '2,24p' "$0"; exit 0 ;;
		*) echo "run.sh: unknown argument $a (use --quick)" >&2; exit 2 ;;
	esac
done

# --- what the benchmark needs beyond the build and test dependencies
bash "$src/scripts/install-deps.sh"
. "$src/scripts/pg-select.sh"
pg_select
need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v gnuplot >/dev/null 2>&1 || need+=(gnuplot-nox)
command -v npm >/dev/null 2>&1 || need+=(npm)
[ -x "$PG_BINDIR/pgbench" ] || need+=("postgresql-$PG_MAJOR")
if [ ${#need[@]} -gt 0 ]; then
	if [ "$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi
	echo "bench: installing ${need[*]}"
	$SUDO apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

run_as() { if [ "$(id -u)" -eq 0 ]; then su "$bench_user" -s /bin/bash -c "$1"; else bash -c "$1"; fi; }

if [ "$(id -u)" -eq 0 ]; then
	bench_user=stripe_meter_bench
	id -u "$bench_user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$bench_user"
	work="$(mktemp -d /tmp/stripe_meter_bench.XXXXXX)"
	tar -C "$src" --exclude=.git --exclude='*.o' --exclude='*.so' --exclude=tmp_check \
		--exclude=tmp_regress --exclude=results --exclude=node_modules -cf - . | tar -C "$work" -xf -
	chown -R "$bench_user": "$work"
else
	work="$src"
fi

# --- the private server copy
PRIVATE_PG="${PRIVATE_PG:-/tmp/stripe_meter-bench-pg}"
bash "$src/scripts/private-pg.sh" "$PRIVATE_PG"
[ "$(id -u)" -eq 0 ] && chown -R "$bench_user": "$PRIVATE_PG"
pgbin="$PRIVATE_PG/usr/lib/postgresql/$PG_MAJOR/bin"

run_as "cd '$work' && make -s PG_CONFIG='$pgbin/pg_config' clean >/dev/null && make -s PG_CONFIG='$pgbin/pg_config' >/dev/null && make -s PG_CONFIG='$pgbin/pg_config' install >/dev/null"
run_as "cd '$work/bench/node' && npm ci --no-audit --no-fund --loglevel=error >/dev/null"

status=0
run_as "cd '$work' && PGBIN='$pgbin' BENCH_MODE='$mode' bash bench/lib/bench.sh" || status=$?

if [ "$work" != "$src" ]; then
	mkdir -p "$src/bench/out"
	for f in RESULTS.md scaling.png out/results.json; do
		[ -f "$work/bench/$f" ] && cp "$work/bench/$f" "$src/bench/$f"
	done
	if [ $status -eq 0 ] && [ -z "${BENCH_KEEP:-}" ]; then rm -rf "$work"; else echo "(work tree kept in $work)"; fi
fi
[ $status -eq 0 ] && echo "bench: results in $src/bench/RESULTS.md"
exit $status
