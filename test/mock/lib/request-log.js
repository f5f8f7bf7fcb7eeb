// request-log.js: the log of the Stripe requests received (GET
// /__mock/requests), a ring buffer of config.request_log_size entries kept
// in the state (st.log, st.logPos, st.logCount). Tests read it to see exactly
// what stripe_meter sent: headers, body, and how each request was answered.
'use strict';

const LOG_BODY_MAX = 16384;

// A request's entry, logged when its body has arrived; status, fault,
// replayed and duration_ms are filled in as it is answered, script_delay_ms
// when a script entry delays it, and open turns false when the request ends
// (answered, or the client went away), so a test can see which requests the
// mock is holding right now.
function newLogEntry(ctx, req, path) {
  return {
    time: ctx.t0, method: ctx.method, path, query: req.url.slice(path.length + 1),
    headers: ctx.h2 ? withoutPseudoHeaders(req.headers) : req.headers,
    body: ctx.raw.length > LOG_BODY_MAX ? ctx.raw.slice(0, LOG_BODY_MAX) : ctx.raw,
    status: null, fault: null, replayed: false, request_id: ctx.requestId, duration_ms: null,
    script_delay_ms: 0, open: !ctx.closed,
    protocol: ctx.h2 ? 'h2' : 'http/1.1', connection_id: ctx.conn.id,
  };
}

// An HTTP/2 request's headers without :method, :path, :scheme, :authority
// (method and path have their own fields).
function withoutPseudoHeaders(h) {
  const out = {};
  for (const k of Object.keys(h)) if (k.charCodeAt(0) !== 58) out[k] = h[k];
  return out;
}

function resizeLog(st, size) {
  const old = recentLog(st, st.logCount);
  st.log = new Array(size);
  st.logPos = 0;
  st.logCount = 0;
  for (const e of old.slice(-size)) pushLog(st, e);
}

function pushLog(st, entry) {
  const n = st.log.length;
  if (n === 0) return;
  st.log[st.logPos] = entry;
  st.logPos = (st.logPos + 1) % n;
  if (st.logCount < n) st.logCount++;
}

function recentLog(st, limit) {
  const n = st.log.length;
  const count = Math.min(limit, st.logCount);
  const out = [];
  for (let i = count; i >= 1; i--) out.push(st.log[(st.logPos - i + n) % n]);
  return out;
}

module.exports = { newLogEntry, pushLog, recentLog, resizeLog };
