// kept-strings.js: how strings that outlive their request are kept. The
// mock holds every billed event for the whole run (bench/ sends millions),
// so a kept string must not pin the request body it was sliced from, and
// the few distinct values repeated on every event are stored once.
'use strict';

// Strings kept for the lifetime of the records are copied so that they do
// not pin the request body they were sliced from (V8 sliced strings).
function keepStr(s) {
  return typeof s === 'string' && s.length > 12 ? JSON.parse(JSON.stringify(s)) : s;
}

// Interning of low-cardinality strings kept per event (API key, user agent,
// Stripe-Version, event name, account), bounded.
const interned = new Map();
function intern(s) {
  if (typeof s !== 'string') return s;
  const v = interned.get(s);
  if (v !== undefined) return v;
  const c = keepStr(s);
  if (interned.size < 100000) interned.set(c, c);
  return c;
}

module.exports = { keepStr, intern };
