// lifecycle-records.js: what happened to events after delivery, kept in
// the state (st.life, made on first use, so a reset clears it): the
// cancellations and adjustment objects (adjustments.js), the error reports
// generated (error-reports.js), and how far generation has read.
'use strict';

// Per-state lifecycle bookkeeping (a reset makes a new state, so it is cleared too).
function life(st) {
  if (!st.life) {
    st.life = {
      cancelled: new Map(),   // account|mode|identifier -> {at, event_name}
      adjustments: [],        // adjustment objects, in order
      reports: [],            // v2 events, oldest first
      reportedUpTo: 0,        // index into st.events already examined
      streamReportedUpTo: 0,  // index into st.asyncErrors (v2 stream) already reported
    };
  }
  return st.life;
}

// An event cancelled in its account scope (account|mode).
function isCancelled(st, scope, identifier) {
  return life(st).cancelled.has(scope + '|' + identifier);
}

// GET /__mock/lifecycle: cancellations and generated error reports.
function lifecycleView(st) {
  const l = life(st);
  return {
    adjustments: l.adjustments,
    cancelled: [...l.cancelled.keys()],
    error_reports: l.reports.map((r) => Object.assign({ account: r.account }, r.event)),
  };
}

module.exports = { life, isCancelled, lifecycleView };
