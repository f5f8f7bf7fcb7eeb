// scripts.js: the script of POST /__mock/script: entries that match
// requests (by path, method, headers, body parameters or payload entries)
// and inject a fault, a delay or a custom answer, consumed in order, the
// first match winning over the random fault draw. A custom answer may be
// stored for its Idempotency-Key as if the request had executed.
'use strict';

const { parseForm } = require('./form');
const { FAULT_NAMES } = require('./faults');
const { canon, IdemEntry, hashParams, idemMap, storeIdem } = require('./idempotency');
const { bearerKey } = require('./auth');
const { PLATFORM_ACCOUNT } = require('./connect');
const { deliver } = require('./delivery');

// The request's form parameters for matching, parsed once; null when the
// body does not parse.
function lenientParams(ctx) {
  if (ctx.lenient === undefined) {
    const p = parseForm(ctx.raw);
    ctx.lenient = p.params || null;
  }
  return ctx.lenient;
}

// Script match keys: identifier, event_name, timestamp (body parameters),
// payload[KEY] (a payload entry), idempotency_key, stripe_account, path, method.
const MATCH_HEADER_KEYS = { idempotency_key: 'idempotency-key', stripe_account: 'stripe-account' };
const MATCH_PARAM_KEYS = new Set(['identifier', 'event_name', 'timestamp']);
const MATCH_PAYLOAD_RE = /^payload\[([^[\]]+)\]$/;

function validMatchKey(k) {
  return k === 'path' || k === 'method' || MATCH_HEADER_KEYS[k] !== undefined ||
    MATCH_PARAM_KEYS.has(k) || MATCH_PAYLOAD_RE.test(k);
}

function scriptMatches(ctx, match) {
  for (const k of Object.keys(match)) {
    const want = match[k];
    let got;
    if (k === 'path') got = ctx.path;
    else if (k === 'method') got = ctx.method;
    else if (MATCH_HEADER_KEYS[k] !== undefined) got = ctx.headers[MATCH_HEADER_KEYS[k]];
    else {
      const p = lenientParams(ctx);
      const pm = MATCH_PAYLOAD_RE.exec(k);
      if (!p) got = undefined;
      else if (pm) got = p.payload && typeof p.payload === 'object' ? p.payload[pm[1]] : undefined;
      else got = p[k];
    }
    if (got !== want) return false;
  }
  return true;
}

// The first entry matching the request, counted down (and removed when
// spent); null when none.
function takeScript(ctx) {
  const scripts = ctx.st.scripts;
  for (let i = 0; i < scripts.length; i++) {
    const s = scripts[i];
    if (!scriptMatches(ctx, s.match)) continue;
    if (s.times > 0) {
      s.times--;
      if (s.times === 0) scripts.splice(i, 1);
    }
    return s;
  }
  return null;
}

function truthy(v) { return v === true || v === 1 || v === '1' || v === 'true'; }

// Check a POST /__mock/script body; returns the entries or an error string.
function validateScript(list) {
  if (!Array.isArray(list)) return 'script must be a JSON array';
  const out = [];
  for (const s of list) {
    if (!s || typeof s !== 'object' || Array.isArray(s)) return 'script entries must be objects';
    const e = { match: s.match || {}, times: s.times === undefined ? 1 : s.times };
    if (typeof e.match !== 'object' || Array.isArray(e.match)) return 'match must be an object';
    for (const k of Object.keys(e.match)) {
      if (!validMatchKey(k)) return 'unknown match key: ' + k;
      if (typeof e.match[k] !== 'string') return 'match values must be strings: ' + k;
    }
    if (typeof e.times !== 'number' || !Number.isInteger(e.times) || e.times === 0) return 'times must be a non-zero integer (negative = unlimited)';
    if (s.delay_ms !== undefined) {
      if (typeof s.delay_ms !== 'number' || s.delay_ms < 0) return 'delay_ms must be a number >= 0';
      e.delay_ms = s.delay_ms;
    }
    if (s.fault !== undefined) {
      if (!FAULT_NAMES.has(s.fault)) return 'unknown fault: ' + s.fault;
      e.fault = s.fault;
    } else if (s.status !== undefined) {
      if (!Number.isInteger(s.status) || s.status < 100 || s.status > 599) return 'status must be an HTTP status';
      e.status = s.status;
      if (s.headers !== undefined && (typeof s.headers !== 'object' || Array.isArray(s.headers) || s.headers === null)) return 'headers must be an object';
      e.headers = s.headers || {};
      e.body = s.body;
      e.store = truthy(s.store);
    } else if (s.delay_ms === undefined) {
      return 'script entry needs fault, status or delay_ms';
    }
    out.push(e);
  }
  return out;
}

// Answer with an entry's custom status, headers and body.
function scriptedResponse(ctx, s) {
  const headers = Object.assign({}, s.headers || {});
  let body;
  if (typeof s.body === 'string') body = s.body;
  else if (s.body === undefined || s.body === null) body = '';
  else body = JSON.stringify(s.body);
  const r = { status: s.status, headers, body };
  ctx.entry.fault = 'script';
  if (s.store && ctx.idemKey !== undefined) {
    // Store as if executed, scoped like a real request would be.
    const key = bearerKey(ctx.headers.authorization);
    const livemode = key ? key.indexOf('_live_') >= 0 : false;
    const sctx = { keyAccount: (key && ctx.cfg.key_accounts[key]) || PLATFORM_ACCOUNT, mode: livemode ? 'live' : 'test',
      stripeAccount: ctx.headers['stripe-account'] || null };
    const p = lenientParams(ctx);
    const e = new IdemEntry(hashParams(p ? canon(p) : ctx.raw), ctx.path, Date.now());
    e.inFlight = false;
    e.status = r.status;
    e.headers = headers;
    e.body = body;
    e.requestId = ctx.requestId;
    e.stripeVersion = ctx.stripeVersion;
    storeIdem(ctx.st, idemMap(ctx.st, sctx, true), ctx.idemKey, e);
  }
  deliver(ctx, r);
}

module.exports = { takeScript, validateScript, scriptedResponse };
