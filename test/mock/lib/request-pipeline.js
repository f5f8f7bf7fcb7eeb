// request-pipeline.js: the path of every Stripe API request (anything but
// /__mock/): `down`, the body (max_body_bytes), the request log and stats,
// then in order: faults (scripted, else random), routing, authentication,
// Stripe-Account, rate limit, the Idempotency-Key length, and the endpoint.
// See "processing order" in README.md.
'use strict';

const { performance } = require('perf_hooks');
const { current } = require('./mock-state');
const { randId } = require('./ids');
const { newLogEntry, pushLog } = require('./request-log');
const { stripeError, invalid, rateLimitBody } = require('./stripe-errors');
const { reply } = require('./delivery');
const { connOf, isH2, abortRequest, releaseConn } = require('./connections');
const { PRE_FAULTS, pickFault, preFault } = require('./faults');
const { takeScript, scriptedResponse } = require('./scripts');
const { findRoute } = require('./routes');
const { authenticate } = require('./auth');
const { authenticateSession } = require('./v2-meter-event-sessions');
const { STREAM_PATH } = require('./v2-meter-event-stream');
const { accountScope, checkStripeAccount } = require('./connect');
const { rateLimited } = require('./rate-limit');

const MAX_IDEMPOTENCY_KEY = 255;

// A Stripe request: counted, its body read, logged, then handled.
function onStripeRequest(req, res, path) {
  const h2 = isH2(req);
  // down: the request is dropped (its stream under h2, its connection under
  // HTTP/1.1)
  if (current.config.down) { current.state.stats.dropped_while_down++; abortRequest({ h2, req }); return; }
  const st = current.state;
  const cfg = current.config;
  const stats = st.stats;
  stats.requests++;
  stats.in_flight++;
  if (stats.in_flight > stats.max_in_flight) stats.max_in_flight = stats.in_flight;
  // per protocol and per connection: which carried Stripe requests, and how
  // many at once (HTTP/2 streams; one at a time on HTTP/1.1); see
  // releaseConn() for when a request stops counting
  const conn = connOf(req);
  if (h2) stats.requests_h2++; else stats.requests_http1++;
  if (conn.countedBy !== st) { conn.countedBy = st; stats.connections_with_requests++; }
  if (++conn.stripe > stats.max_streams_per_connection) stats.max_streams_per_connection = conn.stripe;
  const ctx = {
    req, res, st, cfg, path, h2, conn,
    onConn: true,
    method: req.method,
    headers: req.headers,
    raw: '',
    requestId: randId('req_', 14),
    stripeVersion: req.headers['stripe-version'] || cfg.default_stripe_version,
    idemKey: req.headers['idempotency-key'] || undefined,
    t0: Date.now(),
    // arrival on the Date.now() clock with sub-millisecond precision, so a
    // benchmark can measure commit-to-arrival latency
    arrivedAt: performance.timeOrigin + performance.now(),
    fault: null,
    extraDelay: 0,
    latencyDone: false,
    faultApplied: false,
    closed: false,
    entry: null,
    timer: null,
  };
  res.on('close', () => {
    if (ctx.closed) return;
    ctx.closed = true;
    if (ctx.entry) ctx.entry.open = false;
    releaseConn(ctx);
    st.stats.in_flight--;
    // (node's HTTP/2 answer reports writableFinished even when the client
    // reset the stream; writableEnded tells)
    if (!(h2 ? res.writableEnded : res.writableFinished) && !ctx.fault) st.stats.client_aborts++;
    if (ctx.timer) clearTimeout(ctx.timer);
  });
  const chunks = [];
  let size = 0;
  let tooBig = false;
  req.on('data', (c) => {
    size += c.length;
    if (size > cfg.max_body_bytes) tooBig = true; else chunks.push(c);
  });
  req.on('error', () => {});
  req.on('end', () => {
    ctx.raw = chunks.length === 1 ? chunks[0].toString('utf8') : Buffer.concat(chunks).toString('utf8');
    ctx.entry = newLogEntry(ctx, req, path);
    pushLog(st, ctx.entry);
    if (tooBig) {
      return reply(ctx, 413, invalid('Request body too large (limit ' + cfg.max_body_bytes + ' bytes).'));
    }
    try {
      handleStripe(ctx);
    } catch (e) {
      process.stderr.write('stripe-mock: internal error: ' + (e && e.stack || e) + '\n');
      reply(ctx, 500, stripeError('api_error', 'Internal mock error.'), { 'Stripe-Should-Retry': 'true' });
    }
  });
}

// Steps 1-6 of the processing order, then the endpoint.
function handleStripe(ctx) {
  const st = ctx.st;
  // 1. Faults: scripted entries win over random rates.
  let fault = null;
  const script = st.scripts.length ? takeScript(ctx) : null;
  if (script) {
    st.stats.scripted++;
    ctx.extraDelay += script.delay_ms || 0;
    ctx.entry.script_delay_ms = script.delay_ms || 0;
    if (script.fault) fault = script.fault;
    else if (script.status !== undefined) return scriptedResponse(ctx, script);
  } else {
    fault = pickFault(current.derived.faults);
  }
  if (fault) {
    ctx.fault = fault;
    ctx.entry.fault = fault;
    st.stats.faults_injected[fault] = (st.stats.faults_injected[fault] || 0) + 1;
    if (fault === 'slow') ctx.extraDelay += ctx.cfg.slow_ms;
    if (PRE_FAULTS.has(fault)) return preFault(ctx, fault);
  }

  // Routing.
  const handler = findRoute(ctx.method, ctx.path);
  if (!handler) {
    return reply(ctx, 404, invalid('Unrecognized request URL (' + ctx.method + ': ' + ctx.path +
      '). Please see https://stripe.com/docs or we can help at https://support.stripe.com/.'));
  }

  // 2. Authentication: the stream takes a session token, the rest the key.
  const streamed = ctx.path === STREAM_PATH;
  if (streamed ? !authenticateSession(ctx) : !authenticate(ctx, current.derived)) return;

  // Connect: the Stripe-Account header (the stream's session is bound to its
  // account).
  if (!streamed && !checkStripeAccount(ctx, current.derived.revokedAccounts)) return;
  ctx.account = accountScope(ctx);

  // 3. Rate limit (per account, sliding one-second window).
  if (ctx.cfg.rate_limit_per_s && rateLimited(st, ctx.cfg.rate_limit_per_s, ctx.account)) {
    st.stats.rate_limited++;
    return reply(ctx, 429, rateLimitBody());
  }

  if (ctx.idemKey !== undefined && ctx.idemKey.length > MAX_IDEMPOTENCY_KEY) {
    st.stats.validation_errors++;
    return reply(ctx, 400, invalid('Idempotency-Key must be at most ' + MAX_IDEMPOTENCY_KEY +
      ' characters long. Received ' + ctx.idemKey.length + ' characters.', undefined, 'idempotency_key_too_long'));
  }

  handler(ctx);
}

module.exports = { onStripeRequest };
