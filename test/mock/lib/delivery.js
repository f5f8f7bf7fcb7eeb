// delivery.js: how an answer reaches the client: the latency (latency_ms,
// jitter, slow and scripted delays), Stripe's response headers (Request-Id,
// Stripe-Version, echoed Idempotency-Key), and the delivery faults that
// alter the answer after execution (500_after, reset_after, timeout_after,
// truncated, trickle, wrong_content_type) or that stream a huge body.
// Every Stripe answer goes through deliver(); `reply` is the JSON shortcut.
'use strict';

const { validateHeaderName, validateHeaderValue } = require('http');
const { stripeError, serverError500 } = require('./stripe-errors');
const { releaseConn, resetRequest, abortRequest } = require('./connections');

function reply(ctx, status, bodyObj, headers) {
  deliver(ctx, { status, headers: headers || null, body: JSON.stringify(bodyObj) });
}

function latencyFor(ctx) {
  const cfg = ctx.cfg;
  let d = cfg.latency_ms + ctx.extraDelay;
  if (cfg.latency_jitter_ms > 0) d += Math.random() * cfg.latency_jitter_ms;
  return d;
}

// An answer r is {status, headers, body} (body as text), or {mode: 'hold' |
// 'reset' | 'huge'}. It waits out the latency first unless the request's
// execution already did (ctx.latencyDone).
function deliver(ctx, r) {
  if (!ctx.latencyDone) {
    ctx.latencyDone = true;
    const d = latencyFor(ctx);
    if (d > 0) { setTimeout(() => deliverNow(ctx, r), d); return; }
  }
  deliverNow(ctx, r);
}

function setCtxTimer(ctx, t) {
  ctx.timer = t;
}

function deliverNow(ctx, r) {
  const fault = ctx.fault;
  const entry = ctx.entry;
  entry.duration_ms = Date.now() - ctx.t0;
  if (fault === '500_after' && !ctx.faultApplied) { r = serverError500(); ctx.faultApplied = true; }
  let mode = r.mode || 'normal';
  if (mode === 'normal') {
    if (fault === 'reset_after') mode = 'reset';
    else if (fault === 'timeout_after') mode = 'hold';
    else if (fault === 'truncated') mode = 'truncated';
    else if (fault === 'trickle') mode = 'trickle';
  }
  // reset, and a hold's end, break off this request only: its stream under
  // h2, its connection under HTTP/1.1 (connections.js)
  if (mode === 'reset') { resetRequest(ctx); return; }
  if (mode === 'hold') {
    if (!ctx.closed) setCtxTimer(ctx, setTimeout(() => abortRequest(ctx), ctx.cfg.timeout_hold_ms));
    return;
  }
  const status = r.status;
  entry.status = status;
  if (ctx.closed) return;
  const res = ctx.res;
  const headers = {
    'Content-Type': 'application/json',
    'Request-Id': ctx.requestId,
    'Stripe-Version': ctx.stripeVersion,
    'Cache-Control': 'no-cache, no-store',
  };
  if (ctx.idemKey !== undefined && ctx.method === 'POST') headers['Idempotency-Key'] = ctx.idemKey;
  if (r.headers) mergeHeaders(headers, r.headers);
  if (fault === 'wrong_content_type') headers['Content-Type'] = 'text/plain';
  const by = ctx.st.stats.by_status;
  by[status] = (by[status] || 0) + 1;

  if (mode === 'huge') return sendHuge(ctx, res, status, headers);
  if (mode === 'normal') {
    // A string body goes out in the same write as the headers.  Under h2 the
    // body ends with the stream (END_STREAM), without Content-Length: node
    // sends END_STREAM in a frame of its own after the body, libcurl 7.88
    // then ends the transfer at Content-Length and resets the stream
    // (RST_STREAM STREAM_CLOSED, for about a third of them), and node's
    // guard against rapid resets ends the connection after a thousand or so,
    // cutting off the requests in flight on it.
    if (!ctx.h2) headers['Content-Length'] = String(Buffer.byteLength(r.body, 'utf8'));
    if (!safeWriteHead(ctx, res, status, headers)) return;
    releaseConn(ctx);
    res.end(r.body, 'utf8');
    return;
  }
  const buf = Buffer.from(r.body, 'utf8');
  if (mode === 'truncated') {
    headers['Content-Length'] = String(buf.length * 2 + 64);
    if (!safeWriteHead(ctx, res, status, headers)) return;
    // half the body, then the stream (h2) or the connection is broken off
    res.write(buf.subarray(0, Math.max(1, buf.length >> 1)), () => abortRequest(ctx));
    return;
  }
  headers['Content-Length'] = String(buf.length);
  if (mode === 'trickle') {
    if (!safeWriteHead(ctx, res, status, headers)) return;
    res.flushHeaders();
    let i = 0;
    const step = () => {
      if (ctx.closed) return;
      if (i >= buf.length) { releaseConn(ctx); res.end(); return; }
      res.write(buf.subarray(i, i + 1));
      i++;
      setCtxTimer(ctx, setTimeout(step, ctx.cfg.trickle_interval_ms));
    };
    step();
  }
}

// Merge `extra` into `headers`, replacing names case-insensitively.
function mergeHeaders(headers, extra) {
  for (const k of Object.keys(extra)) {
    const lk = k.toLowerCase();
    for (const h of Object.keys(headers)) {
      if (h !== k && h.toLowerCase() === lk) delete headers[h];
    }
    headers[k] = String(extra[k]);
  }
}

// Headers HTTP/2 forbids (RFC 9113 8.2.2); a scripted answer's are dropped
// under h2, as a proxy in front of an HTTP/1.1 origin drops them.
const H1_CONNECTION_HEADERS = new Set(['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'upgrade']);

function safeWriteHead(ctx, res, status, headers) {
  try {
    if (ctx.h2) {
      // node's HTTP/1.1 answer checks header names and values, its HTTP/2
      // answer does not (the client would refuse the stream): check here
      for (const k of Object.keys(headers)) {
        if (H1_CONNECTION_HEADERS.has(k.toLowerCase())) { delete headers[k]; continue; }
        validateHeaderName(k);
        validateHeaderValue(k, headers[k]);
      }
    }
    res.writeHead(status, headers);
    return true;
  } catch (e) {
    // A header value from a scripted response (or an echoed request header)
    // was not representable.
    try {
      res.writeHead(500, { 'Content-Type': 'application/json' });
      res.end(JSON.stringify(stripeError('api_error', 'mock: cannot write headers: ' + e.message)));
    } catch (e2) { res.destroy(); }
    return false;
  }
}

// The huge fault: a JSON-looking body of exactly config.huge_bytes.
function sendHuge(ctx, res, status, headers) {
  const total = ctx.cfg.huge_bytes;
  const head = status >= 400
    ? '{"error":{"type":"api_error","message":"'
    : '{"object":"billing.meter_event","padding":"';
  const tail = status >= 400 ? '"}}' : '"}';
  if (status >= 500) headers['Stripe-Should-Retry'] = 'true';
  headers['Content-Length'] = String(total);
  if (!safeWriteHead(ctx, res, status, headers)) return;
  // Stream: head, padding, tail, exactly `total` bytes (truncated if tiny).
  const prefix = Buffer.from(head.slice(0, total), 'utf8');
  const suffixLen = Math.max(0, Math.min(tail.length, total - prefix.length));
  let padLeft = total - prefix.length - suffixLen;
  const chunk = Buffer.alloc(65536, 'x');
  res.write(prefix);
  const pump = () => {
    while (padLeft > 0) {
      if (ctx.closed) return;
      const n = Math.min(padLeft, chunk.length);
      padLeft -= n;
      if (!res.write(n === chunk.length ? chunk : chunk.subarray(0, n))) {
        res.once('drain', pump);
        return;
      }
    }
    releaseConn(ctx);
    res.end(tail.slice(tail.length - suffixLen));
  };
  pump();
}

module.exports = { reply, deliver, latencyFor };
