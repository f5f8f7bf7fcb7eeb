// idempotency.js: Stripe's Idempotency-Key rules around an endpoint's
// execution: the store of answers per key (scoped by the key's account,
// mode and Stripe-Account; expiring after idempotency_ttl_s), the replay
// of a stored answer, the 400 for other parameters and the 409 while the
// first request still runs; and the per-object concurrency slot (one call
// at a time per customer and meter) held from execution to decision.
'use strict';

const crypto = require('crypto');
const { keepStr, intern } = require('./kept-strings');
const { stripeError, serverError500 } = require('./stripe-errors');
const { reply, deliver, latencyFor } = require('./delivery');
const { meterEventBody } = require('./ledger');

// Canonical string of a parsed parameter tree (key order independent).
function canon(v) {
  // With every hash's keys already in order (the usual case) the canonical
  // string is exactly JSON.stringify's, which is much cheaper.
  return keysSorted(v) ? JSON.stringify(v) : canonSorted(v);
}

function keysSorted(v) {
  if (typeof v === 'string') return true;
  if (Array.isArray(v)) {
    for (let i = 0; i < v.length; i++) if (!keysSorted(v[i])) return false;
    return true;
  }
  const keys = Object.keys(v);
  for (let i = 0; i < keys.length; i++) {
    if (i > 0 && !(keys[i - 1] < keys[i])) return false;
    if (!keysSorted(v[keys[i]])) return false;
  }
  return true;
}

function canonSorted(v) {
  if (typeof v === 'string') return JSON.stringify(v);
  if (Array.isArray(v)) return '[' + v.map(canonSorted).join(',') + ']';
  const keys = Object.keys(v).sort();
  let s = '{';
  for (let i = 0; i < keys.length; i++) {
    if (i) s += ',';
    s += JSON.stringify(keys[i]) + ':' + canonSorted(v[keys[i]]);
  }
  return s + '}';
}

// A stored answer (fixed shape, as there may be millions).
class IdemEntry {
  constructor(hash, path, t) {
    this.hash = hash;        // sha1 of the canonical parameters
    this.path = path;
    this.t = t;              // execution start (ms)
    this.inFlight = true;
    this.status = 0;
    this.headers = null;     // extra response headers (errors only)
    this.body = null;        // stored body, or null when ev is set
    this.ev = null;          // billed EventRecord (success body rebuilt from it)
    this.requestId = null;
    this.stripeVersion = null;
  }
}

// crypto.hash (Node 20.12+) is a one-shot without the Hash object.
const hashParams = typeof crypto.hash === 'function'
  ? (canonical) => crypto.hash('sha1', canonical, 'base64')
  : (canonical) => crypto.createHash('sha1').update(canonical).digest('base64');

// Idempotency scope: the key's account + mode + Stripe-Account, then the key.
function idemMap(st, ctx, create) {
  const scope = ctx.keyAccount + '|' + ctx.mode + '|' + (ctx.stripeAccount || '');
  let m = st.idem.get(scope);
  if (!m && create) { m = new Map(); st.idem.set(intern(scope), m); }
  return m;
}

function pruneIdem(st, m, cfg, now) {
  const ttl = cfg.idempotency_ttl_s * 1000;
  // Entries are in creation order: drop from the front while expired.
  for (const [k, e] of m) {
    if (now - e.t < ttl || e.inFlight) break;
    m.delete(k);
    st.idemCount--;
  }
}

function storeIdem(st, m, key, entry) {
  if (m.delete(key)) st.idemCount--;
  m.set(key, entry);
  st.idemCount++;
}

// Run an endpoint's execution under Stripe's idempotency and per-object
// concurrency rules. `canonParams` identifies the request parameters,
// `lockKey` (or null) names the object that may be processed only once at a
// time, and decide(ctx) returns {status, body, headers} at decision time.
function executeIdempotent(ctx, canonParams, lockKey, lockMessage, decide) {
  const st = ctx.st, cfg = ctx.cfg;
  const now = Date.now();
  const m = ctx.idemKey === undefined ? null : idemMap(st, ctx, true);
  const hash = m === null ? null : hashParams(canonParams);
  if (m !== null) {
    pruneIdem(st, m, cfg, now);
    const e = m.get(ctx.idemKey);
    if (e && (e.inFlight || now - e.t < cfg.idempotency_ttl_s * 1000)) {
      if (e.hash !== hash || e.path !== ctx.path) {
        st.stats.idempotency_mismatches++;
        return reply(ctx, 400, stripeError('idempotency_error',
          'Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than \'' +
          ctx.idemKey + '\' if you meant to execute a different request.'));
      }
      if (e.inFlight) {
        st.stats.idempotency_conflicts++;
        return reply(ctx, 409, stripeError('idempotency_error',
          'There is currently another in-progress request using this Idempotent Key (that probably means you submitted twice, and the other request is still going through): ' +
          ctx.idemKey + '. Please try again later.', { code: 'idempotency_key_in_use' }));
      }
      return replay(ctx, e);
    }
  }
  if (lockKey !== null && st.slots.has(lockKey)) {
    st.stats.concurrency_violations++;
    return reply(ctx, 429, stripeError('invalid_request_error', lockMessage, { code: 'rate_limit' }));
  }
  // Execution begins.
  let entry = null;
  if (m !== null) {
    ctx.idemKey = keepStr(ctx.idemKey);
    entry = new IdemEntry(hash, ctx.path, now);
    storeIdem(st, m, ctx.idemKey, entry);
  }
  if (lockKey !== null) st.slots.add(lockKey);
  const run = () => {
    if (lockKey !== null) st.slots.delete(lockKey);
    let r = decide(ctx);
    if (ctx.fault === '500_after') {
      r = serverError500();
      ctx.faultApplied = true;
    }
    if (entry) {
      entry.inFlight = false;
      entry.status = r.status;
      entry.headers = r.headers || null;
      if (r.ev) entry.ev = r.ev; else entry.body = r.body;
      entry.requestId = ctx.requestId;
      entry.stripeVersion = intern(ctx.stripeVersion);
    }
    deliver(ctx, r);
  };
  const d = latencyFor(ctx);
  ctx.latencyDone = true;
  if (d > 0) setTimeout(run, d); else run();
}

function replay(ctx, e) {
  ctx.st.stats.replays++;
  ctx.entry.replayed = true;
  ctx.stripeVersion = e.stripeVersion;
  const headers = Object.assign({}, e.headers, {
    'Idempotent-Replayed': 'true',
    'Original-Request': e.requestId,
  });
  deliver(ctx, { status: e.status, headers, body: e.ev ? meterEventBody(e.ev) : e.body });
}

module.exports = { canon, IdemEntry, hashParams, idemMap, storeIdem, executeIdempotent };
