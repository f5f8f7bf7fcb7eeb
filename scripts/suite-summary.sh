#!/usr/bin/env bash
# One line out of the log of scripts/test.sh (and scripts/demo.sh, when the
# log has its output): the server version, how many regression and TAP tests
# passed, and how many sample events the demo showed delivered.  Exits 1 when
# the log has a demo that did not deliver its four sample events.
#
#   bash scripts/suite-summary.sh LOG
set -euo pipefail
log="${1:?usage: suite-summary.sh LOG}"
version="$(sed -n 's/^all tests passed on PostgreSQL //p' "$log" | tail -n 1)"
regress="$(sed -n 's/^[# ]*All \([0-9]*\) tests passed.*/\1 regress tests/p' "$log" | tail -n 1)"
tap="$(sed -n 's/^Files=\([0-9]*\), Tests=\([0-9]*\),.*/\1 TAP files, \2 TAP tests/p' "$log" | tail -n 1)"
line="${version:-?}; ${regress:-no regress tests}, ${tap:-no TAP tests}"
if grep -q '^Delivered events, with the billing.meter_event Stripe returned:' "$log"; then
	# psql's table of delivered events ends with "(N rows)"
	delivered="$(awk '/^Delivered events, with the billing.meter_event/ { on = 1 }
		on && /^\([0-9]+ rows?\)$/ { gsub(/[^0-9]/, ""); print; exit }' "$log")"
	delivered="${delivered:-0}"
	echo "$line; demo delivered $delivered sample events"
	[ "$delivered" -ge 4 ]
else
	echo "$line"
fi
