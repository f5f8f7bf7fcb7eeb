// rate-limit.js: config.rate_limit_per_s, a sliding one-second window per
// account and mode (a ring of the last `limit` accepted request times).
'use strict';

// True when the account is over its limit; else counts this request.
function rateLimited(st, limit, account) {
  let r = st.rl.get(account);
  if (!r || r.buf.length !== limit) {
    r = { buf: new Float64Array(limit).fill(-1e15), i: 0 };
    st.rl.set(account, r);
  }
  const now = Date.now();
  // r.buf[r.i] is the oldest of the last `limit` accepted requests.
  if (now - r.buf[r.i] < 1000) return true;
  r.buf[r.i] = now;
  r.i = (r.i + 1) % limit;
  return false;
}

module.exports = { rateLimited };
