#!/usr/bin/env bash
# make check-asan: the whole test suite (pg_regress and TAP) with the
# extension built with AddressSanitizer.  The server itself is not
# instrumented: its binary, in a private copy of the installation, is
# replaced by a wrapper that preloads libasan, so every postgres process
# (and the extension's malloc, curl and libc calls) runs under ASan.  Leak
# detection is off (the server exits without freeing).  Each sanitizer
# report goes to a file; any such file fails the run.
#
# Note: palloc'd memory is not checked (memory contexts carve their own
# chunks); stack, global and malloc'd memory are.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
bash "$src/scripts/install-deps.sh"
. "$src/scripts/pg-select.sh"
pg_select
export PRIVATE_PG="${ASAN_PG:-/tmp/stripe_meter_asan_pg}"
reports="${ASAN_REPORTS:-/tmp/stripe_meter_asan_reports}"
libasan="$(gcc -print-file-name=libasan.so)"
libasan="$(readlink -f "$libasan")"
[ -f "$libasan" ] || { echo "libasan not found (gcc's libasan package)"; exit 1; }

bin="$PRIVATE_PG/usr/lib/postgresql/$PG_MAJOR/bin"
bash "$src/scripts/private-pg.sh" "$PRIVATE_PG"
[ -e "$bin/postgres.real" ] || mv "$bin/postgres" "$bin/postgres.real"

# A preloaded libasan initialises lazily, on the first malloc; when that
# happens inside libgpg-error's constructor (bindtextdomain, holding
# gettext's lock) ASan's start-up deadlocks on the same lock.  A copy of
# libgpg-error that depends on libasan makes ASan start first.
command -v patchelf >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq patchelf >/dev/null || exit 1; }
asanlib="$PRIVATE_PG/asan-lib"
mkdir -p "$asanlib"
gpg_error="$(ldconfig -p | sed -n 's/.*libgpg-error.so.0 (libc6,x86-64) => //p' | head -1)"
cp "$gpg_error" "$asanlib/libgpg-error.so.0"
patchelf --add-needed "$(basename "$libasan" | sed 's/\(\.so\.[0-9]*\).*/\1/')" "$asanlib/libgpg-error.so.0"

# The server keeps the name it was started by (exec -a): it records that
# path in postmaster.opts, and pg_ctl restart starts that path again, which
# must be this wrapper, not the bare binary without ASan.
cat > "$bin/postgres" <<WRAPPER
#!/bin/bash
# check-asan: run the server with AddressSanitizer preloaded
LD_LIBRARY_PATH="$asanlib" \\
LD_PRELOAD="$libasan\${LD_PRELOAD:+:\$LD_PRELOAD}" \\
ASAN_OPTIONS="detect_leaks=0:log_path=$reports/asan:detect_stack_use_after_return=0:allow_user_segv_handler=1:abort_on_error=0" \\
exec -a "\$0" "$bin/postgres.real" "\$@"
WRAPPER
chmod 755 "$bin/postgres"

rm -rf "$reports"
mkdir -p "$reports"
chmod 1777 "$reports"

start=$(date +%s)
status=0
# STRIPE_METER_ASAN: the tests skip their bounds on the worker's memory,
# which ASan's quarantine and redzones grow by design
STRIPE_METER_ASAN=1 COPT="-fsanitize=address -fno-omit-frame-pointer -g" bash "$src/scripts/test.sh" || status=$?
echo "check-asan: suite took $(( $(date +%s) - start )) s"

if ls "$reports"/asan.* >/dev/null 2>&1; then
	echo "=== AddressSanitizer reports ==="
	for f in "$reports"/asan.*; do echo "--- $f"; cat "$f"; done
	exit 1
fi
echo "check-asan: no AddressSanitizer report"
exit $status
