#!/usr/bin/env bash
# What a failed run of scripts/test.sh needs to show, out of its log: the
# regression diffs, prove's summary report, and the last lines of the server
# and test logs of each TAP file that failed.  Falls back to the log's end
# when the failure came before the tests.
#
#   bash scripts/suite-failure.sh LOG
set -uo pipefail
log="${1:?usage: suite-failure.sh LOG}"

failed_files="$(awk '/^Test Summary Report/ { on = 1; next }
	on && /^Files=/ { exit }
	on && /^test\/t\/[^ ]*\.pl/ { sub(/\.pl.*/, ""); sub(/^test\/t\//, ""); print }' "$log")"
if [ -z "$failed_files" ] && ! grep -q '^--- regression.diffs' "$log"; then
	tail -n 150 "$log"
	exit 0
fi

# the regression diffs, if any
awk '/^--- regression.diffs/ { on = 1 } on && /^--- tmp_check\/log\// { exit } on' "$log" | head -n 200
# prove's report
awk '/^Test Summary Report/ { on = 1 } on { print } on && /^Result:/ { exit }' "$log"
# the logs that test.sh printed for each failed file
for name in $failed_files; do
	awk -v name="$name" '
		/^--- tmp_check\/log\// { on = (index($0, "/regress_log_" name " ") > 0 || index($0, "/" name "_") > 0) }
		/^\(work tree kept in / { on = 0 }
		on' "$log"
done
