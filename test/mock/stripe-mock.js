#!/usr/bin/env node
// stripe-mock.js: a Stripe-compatible mock of POST /v1/billing/meter_events
// and of API v2's meter event session and stream, for stripe_meter's tests
// and benchmarks.
//
// Built-in modules only (Node 18+). Binds to loopback only.
// See test/mock/README.md for the CLI, the control API and the fault names.
'use strict';

const http = require('http');
const fs = require('fs');
const crypto = require('crypto');
// Cancellations, meters, event summaries, v2 error reports.
const lifecycle = require('./lifecycle');
const { performance } = require('perf_hooks');

// ---------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------

const DEFAULT_STRIPE_VERSION = '2026-09-30.endive';
const PLATFORM_ACCOUNT = 'acct_1MockPlatform00000';
const KEY_RE = /^(sk|rk)_(test|live)_[A-Za-z0-9]{8,}$/;
const ACCOUNT_RE = /^acct_[A-Za-z0-9]+$/;
const MAX_IDEMPOTENCY_KEY = 255;
const LOG_BODY_MAX = 16384;

// Faults that answer before endpoint execution (nothing billed, nothing
// stored for idempotency).
const PRE_FAULTS = new Set(['500', '503', '429', '409', 'timeout', 'reset',
  'html', 'malformed_json', 'huge']);
// Faults that let the request execute normally and then alter the delivery.
const POST_FAULTS = new Set(['500_after', 'reset_after', 'timeout_after',
  'truncated', 'slow', 'trickle', 'wrong_content_type']);
const FAULT_NAMES = new Set([...PRE_FAULTS, ...POST_FAULTS]);

function defaultConfig() {
  return {
    latency_ms: 0,
    latency_jitter_ms: 0,
    faults: {},
    slow_ms: 2000,
    huge_bytes: 20 * 1024 * 1024,
    huge_status: 200,
    trickle_interval_ms: 200,
    timeout_hold_ms: 120000,
    auth_phase: null,
    revoked_keys: [],
    // Connect accounts that revoked the platform's access: 403 account_invalid
    revoked_accounts: [],
    forbidden_keys: [],
    key_accounts: {},
    rate_limit_per_s: null,
    meters: {},
    strict_meters: false,
    any_customer: true,
    idempotency_ttl_s: 86400,
    identifier_ttl_s: 86400,
    timestamp_past_s: 35 * 86400,
    timestamp_future_s: 300,
    request_log_size: 10000,
    max_body_bytes: 1048576,
    default_stripe_version: DEFAULT_STRIPE_VERSION,
    down: false,
    session_ttl_s: 900,
    missing_customers: [],
    report_no_meter: false,
    cancel_window_s: 86400,
  };
}

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

const B62 = Buffer.from('ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789', 'latin1');
let randPool = crypto.randomBytes(16384);
let randPos = 0;
const idBuf = Buffer.alloc(64);
// prefix + n random base-62 characters, as a flat string.
function randId(prefix, n) {
  if (randPos + n > randPool.length) {
    randPool = crypto.randomBytes(16384);
    randPos = 0;
  }
  const off = idBuf.write(prefix, 0, 'latin1');
  for (let i = 0; i < n; i++) idBuf[off + i] = B62[randPool[randPos++] % 62];
  return idBuf.toString('latin1', 0, off + n);
}

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

function hyphenate(code) { return code.replace(/_/g, '-'); }

// Stripe-shaped error body (v1).
function stripeError(type, message, extra) {
  const e = { type };
  if (extra && extra.code) {
    e.code = extra.code;
    e.doc_url = 'https://stripe.com/docs/error-codes/' + hyphenate(extra.code);
  }
  e.message = message;
  if (extra && extra.param !== undefined) e.param = extra.param;
  if (extra && extra.request_log_url) e.request_log_url = extra.request_log_url;
  return { error: e };
}

function invalid(message, param, code) {
  return stripeError('invalid_request_error', message, { param, code });
}

function maskKey(key) {
  const m = /^[a-z]+_(?:test|live)_/.exec(key);
  const prefix = m ? m[0] : '';
  return prefix + '****' + key.slice(-4);
}

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

function truthy(v) { return v === true || v === 1 || v === '1' || v === 'true'; }

// ---------------------------------------------------------------------------
// Form parsing (application/x-www-form-urlencoded with deepObject brackets)
// ---------------------------------------------------------------------------

function formDecode(s) {
  if (s.indexOf('%') < 0 && s.indexOf('+') < 0) return s;
  return decodeURIComponent(s.replace(/\+/g, ' '));
}

// Parameter hashes: objects without Object.prototype in their chain (so that
// names like "constructor" or "__proto__" are plain keys), made by a
// constructor rather than Object.create(null) so V8 keeps them in fast mode.
function Params() {}
Params.prototype = Object.create(null);

const PARAM_NAME_RE = /^([^[\]]+)((?:\[[^[\]]*\])*)$/;
const NO_SUBS = [];

function duplicateParam(k) {
  return { error: invalid('Received parameter ' + k + ' more than once. Each parameter may be given only once.', k, 'parameter_duplicate') };
}

// The name of a parameter down to its first n subscripts, as in errors.
function paramPath(name, subs, n) {
  let path = name;
  for (let i = 0; i < n; i++) path += '[' + subs[i] + ']';
  return path;
}

// Returns { params } (a tree of objects / arrays / strings, with the order of
// first appearance kept in params) or { error: {status, body} }.
function parseForm(body) {
  const params = new Params();
  if (body.length === 0) return { params };
  let seen = null;
  let start = 0;
  const blen = body.length;
  while (start <= blen) {
    let amp = body.indexOf('&', start);
    if (amp < 0) amp = blen;
    const part = body.slice(start, amp);
    start = amp + 1;
    if (part === '') continue;
    const eq = part.indexOf('=');
    let k, v;
    try {
      k = formDecode(eq < 0 ? part : part.slice(0, eq));
      v = formDecode(eq < 0 ? '' : part.slice(eq + 1));
    } catch (e) {
      return { error: invalid('Invalid request: the request body could not be decoded as application/x-www-form-urlencoded (malformed percent-encoding).') };
    }
    let name, subs;
    if (k.length > 0 && k.indexOf('[') < 0 && k.indexOf(']') < 0) {
      name = k;
      subs = NO_SUBS;
    } else {
      const m = PARAM_NAME_RE.exec(k);
      if (!m) {
        return { error: invalid('Invalid parameter name: ' + k + '.', k) };
      }
      name = m[1];
      subs = m[2] ? m[2].slice(1, -1).split('][') : NO_SUBS;
    }
    // A key given twice is refused. For a key without "[]" its path in the
    // tree is the key itself, and only that key can have put a string there,
    // so the walk below finds the repeat; a key with an inner "[]" starts a
    // new array element each time and needs remembering.
    let innerArray = false;
    for (let i = 0; i < subs.length - 1; i++) if (subs[i] === '') innerArray = true;
    if (innerArray && subs[subs.length - 1] !== '') {
      if (seen === null) seen = new Set();
      if (seen.has(k)) return duplicateParam(k);
      seen.add(k);
    }
    // Walk / build the tree.
    let holder = params, slot = name;
    for (let i = 0; i <= subs.length; i++) {
      const last = i === subs.length;
      const cur = holder[slot];
      if (last) {
        if (Array.isArray(holder)) holder.push(v);
        else if (typeof cur === 'string' && !innerArray) return duplicateParam(k);
        else if (cur !== undefined) {
          const path = paramPath(name, subs, i);
          return { error: invalid('Invalid value for ' + path + ': cannot be given both as a string and as a hash.', path) };
        } else holder[slot] = v;
        break;
      }
      const sub = subs[i];
      const wantArray = sub === '';
      let next = Array.isArray(holder) ? undefined : cur;
      if (next === undefined) {
        next = wantArray ? [] : new Params();
        if (Array.isArray(holder)) holder.push(next); else holder[slot] = next;
      } else if (typeof next === 'string' || Array.isArray(next) !== wantArray) {
        const path = paramPath(name, subs, i);
        return { error: invalid('Invalid value for ' + path + ': conflicting types for this parameter.', path) };
      }
      holder = next;
      slot = wantArray ? null : sub;
    }
  }
  return { params };
}

// Convert {"0": a, "1": b} (expand[0]=a) to [a, b].
function asArray(v) {
  if (Array.isArray(v)) return v;
  if (v && typeof v === 'object') {
    const keys = Object.keys(v);
    if (keys.every((k) => /^[0-9]+$/.test(k))) {
      return keys.sort((a, b) => a - b).map((k) => v[k]);
    }
  }
  return null;
}

function isMediaForm(ct) {
  if (!ct) return false;
  const semi = ct.indexOf(';');
  const media = (semi < 0 ? ct : ct.slice(0, semi)).trim().toLowerCase();
  return media === 'application/x-www-form-urlencoded';
}

// ---------------------------------------------------------------------------
// Configuration and state
// ---------------------------------------------------------------------------

let config = defaultConfig();
let derived = deriveConfig(config);
let state = newState(config);

function deriveConfig(cfg) {
  const faults = [];
  for (const [name, rate] of Object.entries(cfg.faults)) {
    if (rate > 0) faults.push([name, rate]);
  }
  return {
    revoked: new Set(cfg.revoked_keys),
    revokedAccounts: new Set(cfg.revoked_accounts),
    forbidden: new Set(cfg.forbidden_keys),
    faults,
  };
}

function newStats() {
  return {
    requests: 0,
    by_status: {},
    billed: 0,
    duplicate_identifier_attempts: 0,
    concurrency_violations: 0,
    replays: 0,
    idempotency_conflicts: 0,
    idempotency_mismatches: 0,
    rate_limited: 0,
    validation_errors: 0,
    auth_errors: 0,
    scripted: 0,
    faults_injected: {},
    max_in_flight: 0,
    in_flight: 0,
    client_aborts: 0,
    dropped_while_down: 0,
    tls_handshake_failures: 0,
    distinct_idempotency_keys_per_identifier_max: 0,
    identifiers_billed_under_multiple_keys: 0,
    identifiers_billed_multiple_times: 0,
    sessions_created: 0,
    session_expired_rejections: 0,
    session_token_rejections: 0,
    stream_requests: 0,
    stream_events: 0,
    stream_max_batch: 0,
    stream_duplicates_dropped: 0,
    async_errors: 0,
  };
}

function newState(cfg) {
  return {
    stats: newStats(),
    events: [],
    // key account|mode|Stripe-Account -> Map(Idempotency-Key -> IdemEntry),
    // inner maps in creation order (pruned from the front).
    idem: new Map(),
    idemCount: 0,
    // account|mode -> Map(identifier -> IdentInfo); permanent until reset.
    idents: new Map(),
    slots: new Set(),       // account|mode|customer|event_name being processed
    rl: new Map(),          // account|mode -> {buf, i}
    scripts: [],
    sessions: new Map(),    // v2 session token -> MeterEventSession
    asyncErrors: [],        // v2 events refused after acceptance
    log: new Array(cfg.request_log_size),
    logPos: 0,
    logCount: 0,
  };
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

// Validate and merge a config patch. Returns an error string or null.
const CONFIG_TYPES = {
  latency_ms: 'nonneg', latency_jitter_ms: 'nonneg', slow_ms: 'nonneg',
  huge_bytes: 'nonneg', huge_status: 'status', trickle_interval_ms: 'nonneg',
  timeout_hold_ms: 'nonneg', faults: 'faults', auth_phase: 'auth_phase',
  revoked_keys: 'strarray', revoked_accounts: 'strarray', forbidden_keys: 'strarray', key_accounts: 'accounts',
  rate_limit_per_s: 'nullpos', meters: 'meters', strict_meters: 'bool',
  any_customer: 'bool', idempotency_ttl_s: 'nonneg', identifier_ttl_s: 'nonneg',
  timestamp_past_s: 'nonneg', timestamp_future_s: 'nonneg',
  request_log_size: 'count', max_body_bytes: 'posint',
  default_stripe_version: 'string', down: 'bool', session_ttl_s: 'posint',
  missing_customers: 'strarray', report_no_meter: 'bool', cancel_window_s: 'nonneg',
};

function checkValue(type, k, v) {
  const num = typeof v === 'number' && Number.isFinite(v);
  switch (type) {
    case 'nonneg': return num && v >= 0 ? [v] : k + ' must be a number >= 0';
    case 'posint': return num && v >= 1 ? [Math.floor(v)] : k + ' must be an integer >= 1';
    case 'count': return num && v >= 0 && v <= 10000000 ? [Math.floor(v)] : k + ' must be an integer in 0..10000000';
    case 'status': return num && v >= 100 && v <= 599 ? [Math.floor(v)] : k + ' must be an HTTP status';
    case 'nullpos':
      if (v === null) return [null];
      return num && v >= 1 && v <= 10000000 ? [Math.floor(v)] : k + ' must be null or a number >= 1';
    case 'bool':
      if (v === true || v === false || v === 0 || v === 1) return [!!v];
      return k + ' must be a boolean';
    case 'string': return typeof v === 'string' && v.length > 0 ? [v] : k + ' must be a non-empty string';
    case 'auth_phase':
      if (v === null || v === '' || v === 0) return [null];
      if (String(v) === '401' || String(v) === '403') return [String(v)];
      return 'auth_phase must be null, "401" or "403"';
    case 'strarray':
      return Array.isArray(v) && v.every((x) => typeof x === 'string') ? [v.slice()] : k + ' must be an array of strings';
    case 'accounts': {
      if (!v || typeof v !== 'object' || Array.isArray(v)) return k + ' must be an object';
      for (const a of Object.values(v)) {
        if (typeof a !== 'string' || !ACCOUNT_RE.test(a)) return k + ' values must be acct_ ids';
      }
      return [Object.assign({}, v)];
    }
    case 'faults': {
      if (!v || typeof v !== 'object' || Array.isArray(v)) return 'faults must be an object of rates';
      const out = {};
      for (const [name, rate] of Object.entries(v)) {
        if (!FAULT_NAMES.has(name)) return 'unknown fault: ' + name;
        if (typeof rate !== 'number' || !(rate >= 0 && rate <= 1)) return 'fault rate for ' + name + ' must be in [0,1]';
        out[name] = rate;
      }
      return [out];
    }
    case 'meters': {
      if (!v || typeof v !== 'object' || Array.isArray(v)) return 'meters must be an object';
      const out = {};
      for (const [name, m] of Object.entries(v)) {
        if (!m || typeof m !== 'object') return 'meter ' + name + ' must be an object';
        const status = m.status === undefined ? 'active' : m.status;
        if (status !== 'active' && status !== 'inactive') return 'meter status must be active or inactive';
        const ck = m.customer_key === undefined ? 'stripe_customer_id' : m.customer_key;
        const vk = m.value_key === undefined ? 'value' : m.value_key;
        if (typeof ck !== 'string' || !ck || typeof vk !== 'string' || !vk) return 'meter keys must be non-empty strings';
        const formula = m.formula === undefined ? 'sum' : m.formula;
        if (!['sum', 'count', 'last'].includes(formula)) return 'meter formula must be sum, count or last';
        const id = m.id === undefined ? lifecycle.meterIdFor(name) : m.id;
        if (typeof id !== 'string' || !/^mtr_[A-Za-z0-9]+$/.test(id)) return 'meter id must look like mtr_...';
        out[name] = { customer_key: ck, value_key: vk, status, id, formula };
      }
      return [out];
    }
    default: return 'bad type';
  }
}

function applyConfig(patch) {
  if (!patch || typeof patch !== 'object' || Array.isArray(patch)) return 'config must be a JSON object';
  const next = Object.assign({}, config);
  for (const [k, v] of Object.entries(patch)) {
    const type = CONFIG_TYPES[k];
    if (!type) return 'unknown config key: ' + k;
    const r = checkValue(type, k, v);
    if (typeof r === 'string') return r;
    next[k] = r[0];
  }
  const wasDown = config.down;
  const oldLog = config.request_log_size;
  config = next;
  derived = deriveConfig(config);
  if (config.request_log_size !== oldLog) resizeLog(state, config.request_log_size);
  if (config.down && !wasDown) dropStripeSockets();
  return null;
}

// ---------------------------------------------------------------------------
// Server and socket bookkeeping
// ---------------------------------------------------------------------------

const sockets = new Set();

function dropStripeSockets() {
  for (const s of sockets) {
    if (!s._smMockBusy) s.destroy();
  }
}

function resetSocket(sock) {
  if (!sock || sock.destroyed) return;
  if (typeof sock.resetAndDestroy === 'function') {
    try { sock.resetAndDestroy(); return; } catch (e) { /* fall through */ }
  }
  sock.destroy();
}

// ---------------------------------------------------------------------------
// Stripe request pipeline
// ---------------------------------------------------------------------------

// Endpoint handlers, keyed by "METHOD path". Each handler gets a ctx that has
// already passed faults, routing, authentication and rate limiting.
// Future: 'POST /v1/billing/meter_event_adjustments', 'GET /v1/billing/meters'.
const ROUTES = {
  'POST /v1/billing/meter_events': handleMeterEvents,
  'POST /v2/billing/meter_event_session': handleMeterEventSession,
  'POST /v2/billing/meter_event_stream': handleMeterEventStream,
};

function onStripeRequest(req, res, path) {
  if (config.down) { state.stats.dropped_while_down++; req.socket.destroy(); return; }
  const st = state;
  const cfg = config;
  st.stats.requests++;
  st.stats.in_flight++;
  if (st.stats.in_flight > st.stats.max_in_flight) st.stats.max_in_flight = st.stats.in_flight;
  const ctx = {
    req, res, st, cfg, path,
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
    st.stats.in_flight--;
    if (!res.writableFinished && !ctx.fault) st.stats.client_aborts++;
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
    ctx.entry = {
      time: ctx.t0, method: ctx.method, path, query: req.url.slice(path.length + 1), headers: req.headers,
      body: ctx.raw.length > LOG_BODY_MAX ? ctx.raw.slice(0, LOG_BODY_MAX) : ctx.raw,
      status: null, fault: null, replayed: false, request_id: ctx.requestId, duration_ms: null,
    };
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

function pickFault(list) {
  if (list.length === 0) return null;
  const r = Math.random();
  let acc = 0;
  for (let i = 0; i < list.length; i++) {
    acc += list[i][1];
    if (r < acc) return list[i][0];
  }
  return null;
}

function handleStripe(ctx) {
  const st = ctx.st;
  // 1. Faults: scripted entries win over random rates.
  let fault = null;
  const script = st.scripts.length ? takeScript(ctx) : null;
  if (script) {
    st.stats.scripted++;
    ctx.extraDelay += script.delay_ms || 0;
    if (script.fault) fault = script.fault;
    else if (script.status !== undefined) return scriptedResponse(ctx, script);
  } else {
    fault = pickFault(derived.faults);
  }
  if (fault) {
    ctx.fault = fault;
    ctx.entry.fault = fault;
    st.stats.faults_injected[fault] = (st.stats.faults_injected[fault] || 0) + 1;
    if (fault === 'slow') ctx.extraDelay += ctx.cfg.slow_ms;
    if (PRE_FAULTS.has(fault)) return preFault(ctx, fault);
  }

  // Routing.
  const handler = ROUTES[ctx.method + ' ' + ctx.path] || lifecycle.match(ctx.method, ctx.path);
  if (!handler) {
    return reply(ctx, 404, invalid('Unrecognized request URL (' + ctx.method + ': ' + ctx.path +
      '). Please see https://stripe.com/docs or we can help at https://support.stripe.com/.'));
  }

  // 2. Authentication: the stream takes a session token, the rest the key.
  const streamed = ctx.path === STREAM_PATH;
  if (streamed ? !authenticateSession(ctx) : !authenticate(ctx)) return;

  // Connect header and generic header checks.
  const sa = streamed ? undefined : ctx.headers['stripe-account'];
  if (streamed) {
    // the session is bound to its account
  } else if (sa !== undefined) {
    if (!ACCOUNT_RE.test(sa) || derived.revokedAccounts.has(sa)) {
      st.stats.auth_errors++;
      return reply(ctx, 403, stripeError('invalid_request_error',
        "The provided key '" + maskKey(ctx.apiKey) + "' does not have access to account '" + sa +
        "' (or that account does not exist). Application access may have been revoked.",
        { code: 'account_invalid' }));
    }
    ctx.stripeAccount = sa;
  } else {
    ctx.stripeAccount = null;
  }
  ctx.account = (ctx.stripeAccount || ctx.keyAccount) + '|' + ctx.mode;

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

function rateLimitBody() {
  return stripeError('invalid_request_error',
    'Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.',
    { code: 'rate_limit' });
}

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

function authenticate(ctx) {
  const st = ctx.st, cfg = ctx.cfg;
  const h = ctx.headers.authorization;
  let key = null;
  if (h) {
    const m = /^\s*([A-Za-z]+)\s+(.*?)\s*$/.exec(h);
    if (m) {
      const scheme = m[1].toLowerCase();
      if (scheme === 'bearer') key = m[2];
      else if (scheme === 'basic') {
        const dec = Buffer.from(m[2], 'base64').toString('utf8');
        const c = dec.indexOf(':');
        key = c < 0 ? dec : dec.slice(0, c);
      }
    }
  }
  if (!key) {
    st.stats.auth_errors++;
    reply(ctx, 401, stripeError('invalid_request_error',
      "You did not provide an API key. You need to provide your API key in the Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for details, or we can help at https://support.stripe.com/."),
      { 'WWW-Authenticate': 'Basic realm="Stripe"' });
    return false;
  }
  if (!KEY_RE.test(key) || derived.revoked.has(key) || cfg.auth_phase === '401') {
    st.stats.auth_errors++;
    reply(ctx, 401, stripeError('invalid_request_error', 'Invalid API Key provided: ' + maskKey(key)),
      { 'WWW-Authenticate': 'Basic realm="Stripe"' });
    return false;
  }
  const keyAccount = cfg.key_accounts[key] || PLATFORM_ACCOUNT;
  if (cfg.auth_phase === '403' || derived.forbidden.has(key)) {
    st.stats.auth_errors++;
    const body = key.startsWith('rk_')
      ? stripeError('invalid_request_error',
        "The provided key '" + maskKey(key) + "' does not have the required permissions for this endpoint on account '" +
        keyAccount + "'. Having the 'rak_billing_meter_event_write' permission would allow this request to continue.")
      : stripeError('invalid_request_error',
        'This API call cannot be made with a publishable API key or a key lacking permission. Please use a secret API key with access to this resource.',
        { code: 'secret_key_required' });
    reply(ctx, 403, body);
    return false;
  }
  ctx.apiKey = key;
  ctx.livemode = key.indexOf('_live_') >= 0;
  ctx.mode = ctx.livemode ? 'live' : 'test';
  ctx.keyAccount = keyAccount;
  return true;
}

// Compact fixed-shape records.
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

class EventRecord {
  constructor(identifier, eventName, payload, timestamp, account, livemode, idemKey,
    stripeVersion, userAgent, apiKey, requestId, billedAt, sessionId, arrivedAt) {
    this.identifier = identifier;
    this.event_name = eventName;
    this.payload = payload;
    this.timestamp = timestamp;
    this.account = account;
    this.livemode = livemode;
    this.idempotency_key = idemKey;
    this.stripe_version = stripeVersion;
    this.user_agent = userAgent;
    this.api_key = apiKey;
    this.request_id = requestId;
    this.billed_at = billedAt;
    this.session_id = sessionId || null;  // v2 stream: the session used
    this.arrived_at = arrivedAt;  // when the request arrived (ms, fractional)
  }
}

class IdentInfo {
  constructor() {
    this.billedAt = -1;  // last billing time (ms), -1 = never billed
    this.n = 0;          // times billed
    this.keys = null;    // distinct Idempotency-Keys seen executing: string or array
    this.nkeys = 0;
    this.ok = undefined; // first key that got a 200 (null = no key)
    this.okMulti = false;
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

function serverError500() {
  return {
    status: 500,
    headers: { 'Stripe-Should-Retry': 'true' },
    body: JSON.stringify(stripeError('api_error',
      'An unknown error occurred while processing your request. Please try again; if the problem persists, contact support.')),
  };
}

// ---------------------------------------------------------------------------
// POST /v1/billing/meter_events
// ---------------------------------------------------------------------------

const METER_EVENT_PARAMS = new Set(['event_name', 'payload', 'identifier', 'timestamp', 'expand']);
const DIGITS_RE = /^[0-9]+$/;
const INT_RE = /^-?[0-9]+$/;

// Stripe's maxLength counts characters (code points, as Ruby and JSON Schema
// do), not the UTF-16 units of a JS string's .length.
function chars(s) {
  let n = 0;
  for (const _ of s) n++;
  return n;
}

// chars(s) > max; a string of at most max UTF-16 units has at most max characters.
function charsOver(s, max) {
  return s.length > max && chars(s) > max;
}

function tooLong(param, v, max) {
  return invalid('Invalid string: ' + (v.length > 100 ? v.slice(0, 100) + '...' : v) +
    '; must be at most ' + max + ' characters', param, 'string_too_long');
}

function emptyParam(param) {
  return invalid("You passed an empty string for '" + param + "'. We assume empty values are an attempt to unset a parameter; however '" +
    param + "' cannot be unset. You should remove '" + param + "' from your request or supply a non-empty value.",
  param, 'parameter_invalid_empty');
}

function missingParam(param) {
  return invalid('Missing required param: ' + param + '.', param, 'parameter_missing');
}

function notString(param) {
  return invalid('Invalid string: expected a string for ' + param + ', got a hash or an array.', param, 'parameter_invalid_string');
}

// Returns {error} or {event_name, payload, identifier, timestamp, meter}.
function validateMeterEvent(ctx, params) {
  const cfg = ctx.cfg;
  for (const k of Object.keys(params)) {
    if (!METER_EVENT_PARAMS.has(k)) {
      return { error: invalid('Received unknown parameter: ' + k, k, 'parameter_unknown') };
    }
  }
  const { event_name: en, payload, identifier, timestamp } = params;
  // event_name
  if (en === undefined) return { error: missingParam('event_name') };
  if (typeof en !== 'string') return { error: notString('event_name') };
  if (en === '') return { error: emptyParam('event_name') };
  if (charsOver(en, 100)) return { error: tooLong('event_name', en, 100) };
  // payload
  if (payload === undefined) return { error: missingParam('payload') };
  if (typeof payload !== 'object' || Array.isArray(payload)) {
    return { error: invalid('Invalid object: payload must be a hash (payload[key]=value).', 'payload', 'parameter_invalid_object') };
  }
  // identifier
  if (identifier !== undefined) {
    if (typeof identifier !== 'string') return { error: notString('identifier') };
    if (identifier === '') return { error: emptyParam('identifier') };
    if (charsOver(identifier, 100)) return { error: tooLong('identifier', identifier, 100) };
  }
  // timestamp
  let ts = null;
  if (timestamp !== undefined) {
    if (typeof timestamp !== 'string') return { error: invalid('Invalid integer: expected an integer for timestamp.', 'timestamp', 'parameter_invalid_integer') };
    if (timestamp === '') return { error: emptyParam('timestamp') };
    if (!INT_RE.test(timestamp) || timestamp.length > 16) {
      return { error: invalid('Invalid integer: ' + timestamp, 'timestamp', 'parameter_invalid_integer') };
    }
    ts = parseInt(timestamp, 10);
    const nowS = Math.floor(Date.now() / 1000);
    const min = nowS - cfg.timestamp_past_s;
    const max = nowS + cfg.timestamp_future_s;
    if (ts < min) {
      return { error: invalid('The event timestamp cannot be more than ' + Math.round(cfg.timestamp_past_s / 86400) +
        ' days in past. Expected a timestamp greater than or equal to ' + min + '.', 'timestamp', 'timestamp_too_far_in_past') };
    }
    if (ts > max) {
      return { error: invalid('The event timestamp cannot be more than ' + Math.round(cfg.timestamp_future_s / 60) +
        ' minutes in the future. Expected a timestamp less than or equal to ' + max + '.', 'timestamp', 'timestamp_in_future') };
    }
  }
  // expand
  if (params.expand !== undefined) {
    const ex = asArray(params.expand);
    if (!ex || ex.some((x) => typeof x !== 'string')) {
      return { error: invalid('Invalid array: expand must be an array of strings.', 'expand', 'parameter_invalid_array') };
    }
    for (let i = 0; i < ex.length; i++) {
      if (ex[i].length > 5000) return { error: tooLong('expand[' + i + ']', ex[i], 5000) };
    }
  }
  // meter
  let meter = cfg.meters[en];
  if (!meter) {
    if (cfg.strict_meters) {
      return { error: invalid('No active meter was found for event_name ' + en + '. Create a meter with this event_name before sending events.', 'event_name', 'no_meter') };
    }
    meter = { customer_key: 'stripe_customer_id', value_key: 'value', status: 'active' };
  }
  if (meter.status !== 'active') {
    return { error: invalid('The meter for event_name ' + en + ' is inactive. Meter must be active to receive events.', 'event_name', 'archived_meter') };
  }
  // payload entries
  for (const k of Object.keys(payload)) {
    const v = payload[k];
    if (k === '') return { error: invalid('Invalid payload: keys must be non-empty.', 'payload', 'parameter_invalid_empty') };
    if (typeof v === 'string' && !charsOver(k, 100) && !charsOver(v, 100)) continue;
    const param = 'payload[' + k + ']';
    if (typeof v !== 'string') return { error: notString(param) };
    if (charsOver(k, 100)) return { error: invalid('Invalid payload key: ' + k.slice(0, 100) + '...; must be at most 100 characters', param, 'string_too_long') };
    if (charsOver(v, 100)) return { error: tooLong(param, v, 100) };
  }
  const ck = meter.customer_key, vk = meter.value_key;
  const cust = payload[ck];
  if (cust === undefined) return { error: missingParam('payload[' + ck + ']') };
  if (cust === '') return { error: emptyParam('payload[' + ck + ']') };
  if (!cfg.any_customer && !/^cus_[A-Za-z0-9]+$/.test(cust)) {
    return { error: invalid("No such customer: '" + cust + "'", 'payload[' + ck + ']', 'resource_missing') };
  }
  const val = payload[vk];
  const vparam = 'payload[' + vk + ']';
  if (val === undefined) return { error: missingParam(vparam) };
  if (val === '') return { error: emptyParam(vparam) };
  if (!DIGITS_RE.test(val)) {
    return { error: invalid('Invalid value for ' + vparam + ': the value in the event payload must be a whole number (base-10 digits only, no sign, decimal point or exponent). Received ' +
      val + '.', vparam, 'parameter_invalid_integer') };
  }
  const sig = val.replace(/^0+/, '');
  if (sig.length > 15) {
    return { error: invalid('The value in the event payload can have at most 15 digits. Received ' + val + '.', vparam, 'meter_event_value_too_many_digits') };
  }
  return { event_name: en, payload, identifier, timestamp: ts, customer: cust };
}

function handleMeterEvents(ctx) {
  const st = ctx.st;
  const ct = ctx.headers['content-type'];
  if (!isMediaForm(ct) && !(ct === undefined && ctx.raw.length === 0)) {
    st.stats.validation_errors++;
    return reply(ctx, 400, invalid('Invalid request: unsupported Content-Type ' + (ct || '(none)') +
      '. This endpoint expects application/x-www-form-urlencoded. If error persists and you need assistance, please contact support@stripe.com.'));
  }
  const p = parseForm(ctx.raw);
  if (p.error) { st.stats.validation_errors++; return reply(ctx, 400, p.error); }
  const v = validateMeterEvent(ctx, p.params);
  if (v.error) { st.stats.validation_errors++; return reply(ctx, 400, v.error); }
  const lockKey = ctx.account + '|' + v.customer + '|' + v.event_name;
  // the canonical parameters only serve the idempotency check
  executeIdempotent(ctx, ctx.idemKey === undefined ? '' : canon(p.params), lockKey,
    'Cannot create multiple usage events for the same customer, meter concurrently.',
    (c) => decideMeterEvent(c, v));
}

// The same text as JSON.stringify of {object, created, event_name,
// identifier, livemode, payload, timestamp}, without the temporary object.
function meterEventBody(ev) {
  return '{"object":"billing.meter_event","created":' + Math.floor(ev.billed_at / 1000) +
    ',"event_name":' + JSON.stringify(ev.event_name) +
    ',"identifier":' + JSON.stringify(ev.identifier) +
    ',"livemode":' + (ev.livemode ? 'true' : 'false') +
    ',"payload":' + JSON.stringify(ev.payload) +
    ',"timestamp":' + JSON.stringify(ev.timestamp) + '}';
}

function decideMeterEvent(ctx, v) {
  const st = ctx.st, cfg = ctx.cfg;
  const now = Date.now();
  const generated = v.identifier === undefined;
  // The Idempotency-Key is usually the identifier itself (stripe_meter sends
  // it so): then both fields of the record share one string.
  const identifier = generated ? crypto.randomUUID()
    : v.identifier === ctx.idemKey ? ctx.idemKey : keepStr(v.identifier);
  let info = null;
  if (!generated) {
    let m = st.idents.get(ctx.account);
    if (!m) { m = new Map(); st.idents.set(intern(ctx.account), m); }
    info = m.get(identifier);
    if (!info) { info = new IdentInfo(); m.set(identifier, info); }
    trackKey(st, info, ctx.idemKey);
    if (info.billedAt >= 0 && now - info.billedAt < cfg.identifier_ttl_s * 1000) {
      st.stats.duplicate_identifier_attempts++;
      return {
        status: 400,
        headers: { 'Stripe-Should-Retry': 'false' },
        body: JSON.stringify(stripeError('invalid_request_error', 'An event already exists with identifier ' + identifier + '.',
          { request_log_url: 'https://dashboard.stripe.com/' + (ctx.livemode ? '' : 'test/') + 'logs/' + ctx.requestId })),
      };
    }
  }
  // Bill it.
  const payload = {};
  for (const k of Object.keys(v.payload)) payload[k] = keepStr(v.payload[k]);
  const ev = new EventRecord(
    identifier,
    intern(v.event_name),
    payload,
    v.timestamp === null ? Math.floor(now / 1000) : v.timestamp,
    intern(ctx.stripeAccount || ctx.keyAccount),
    ctx.livemode,
    ctx.idemKey === undefined ? null : ctx.idemKey,
    intern(ctx.headers['stripe-version'] || null),
    intern(ctx.headers['user-agent'] || null),
    intern(ctx.apiKey),
    ctx.requestId,
    now,
    null,
    ctx.arrivedAt);
  st.events.push(ev);
  st.stats.billed++;
  if (info) {
    info.billedAt = now;
    info.n++;
    if (info.n === 2) st.stats.identifiers_billed_multiple_times++;
    // Successful answers for this identifier under distinct idempotency keys.
    const k = ctx.idemKey === undefined ? null : ctx.idemKey;
    if (info.ok === undefined) info.ok = k;
    else if (!info.okMulti && (k === null || k !== info.ok)) {
      info.okMulti = true;
      st.stats.identifiers_billed_under_multiple_keys++;
    }
  }
  return { status: 200, headers: null, body: meterEventBody(ev), ev };
}

// Count distinct Idempotency-Keys seen executing for one identifier. A
// request without a key counts as a key of its own.
function trackKey(st, info, key) {
  if (key === undefined) {
    info.nkeys++;
  } else if (info.keys === null) {
    info.keys = key;
    info.nkeys++;
  } else if (typeof info.keys === 'string') {
    if (info.keys !== key) { info.keys = [info.keys, key]; info.nkeys++; }
  } else if (!info.keys.includes(key)) {
    info.keys.push(key);
    info.nkeys++;
  }
  if (info.nkeys > st.stats.distinct_idempotency_keys_per_identifier_max) {
    st.stats.distinct_idempotency_keys_per_identifier_max = info.nkeys;
  }
}

// ---------------------------------------------------------------------------
// API v2: POST /v2/billing/meter_event_session, POST /v2/billing/meter_event_stream
// ---------------------------------------------------------------------------

const STREAM_PATH = '/v2/billing/meter_event_stream';
const V2_MAX_EVENTS = 100;
const V2_EVENT_KEYS = new Set(['event_name', 'identifier', 'payload', 'timestamp']);
const RFC3339_RE = /^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$/;

class MeterEventSession {
  constructor(id, token, account, stripeAccount, keyAccount, mode, apiKey, created, expiresAt) {
    this.id = id;
    this.token = token;
    this.account = account;          // account|mode, as ctx.account
    this.stripeAccount = stripeAccount;
    this.keyAccount = keyAccount;
    this.mode = mode;
    this.apiKey = apiKey;
    this.created = created;          // ms
    this.expiresAt = expiresAt;      // ms
    this.expired = false;            // expired on demand
  }
}

function sessionInfo(s) {
  return { id: s.id, account: s.stripeAccount || s.keyAccount, livemode: s.mode === 'live',
    created: new Date(s.created).toISOString(), expires_at: new Date(s.expiresAt).toISOString(),
    expired: s.expired || Date.now() >= s.expiresAt };
}

// Expire every session (or those of one account) now; returns how many.
function expireSessions(account) {
  let n = 0;
  for (const s of state.sessions.values()) {
    if (s.expired || (account && (s.stripeAccount || s.keyAccount) !== account)) continue;
    s.expired = true;
    n++;
  }
  return n;
}

// API v2 error body: {"error":{"type"?,"code","message","doc_url"?}}.
function v2Error(code, message, type, docUrl) {
  const e = { code, message };
  if (type) e.type = type;
  if (docUrl) e.doc_url = docUrl;
  return { error: e };
}

function isMediaJson(ct) {
  if (ct === undefined) return false;
  return /^application\/json\s*(;.*)?$/i.test(ct.trim());
}

// Session token authentication for the stream.
function authenticateSession(ctx) {
  const st = ctx.st;
  const token = bearerKey(ctx.headers.authorization);
  const s = token ? st.sessions.get(token) : undefined;
  if (!s) {
    st.stats.session_token_rejections++;
    reply(ctx, 401, v2Error('invalid_authentication_token',
      'The provided authentication token is not valid for the meter event stream. Create a meter event session with POST /v2/billing/meter_event_session and use its authentication_token.',
      'invalid_request_error'));
    return false;
  }
  if (s.expired || Date.now() >= s.expiresAt) {
    st.stats.session_expired_rejections++;
    reply(ctx, 401, v2Error('billing_meter_event_session_expired',
      'The meter event session has expired. Create a new meter event session.',
      'temporary_session_expired', 'https://docs.stripe.com/api/v2/billing/meter-event-stream/session'));
    return false;
  }
  ctx.apiKey = s.apiKey;
  ctx.livemode = s.mode === 'live';
  ctx.mode = s.mode;
  ctx.keyAccount = s.keyAccount;
  ctx.stripeAccount = s.stripeAccount;
  ctx.session = s;
  return true;
}

function handleMeterEventSession(ctx) {
  const st = ctx.st;
  const ct = ctx.headers['content-type'];
  let params = {};
  if (ctx.raw.length > 0) {
    if (!isMediaJson(ct)) {
      st.stats.validation_errors++;
      return reply(ctx, 400, v2Error('invalid_request', 'Invalid request: API v2 expects a JSON body (Content-Type: application/json).', 'invalid_request_error'));
    }
    try { params = JSON.parse(ctx.raw); } catch (e) {
      st.stats.validation_errors++;
      return reply(ctx, 400, v2Error('invalid_request', 'Invalid JSON body.', 'invalid_request_error'));
    }
    if (!params || typeof params !== 'object' || Array.isArray(params)) {
      st.stats.validation_errors++;
      return reply(ctx, 400, v2Error('invalid_request', 'The request body must be a JSON object.', 'invalid_request_error'));
    }
    const extra = Object.keys(params);
    if (extra.length > 0) {
      st.stats.validation_errors++;
      return reply(ctx, 400, v2Error('parameter_unknown', 'Received unknown parameter: ' + extra[0], 'invalid_request_error'));
    }
  }
  executeIdempotent(ctx, '{}', null, null, (c) => {
    const now = Date.now();
    const s = new MeterEventSession(randId('bmes_', 24), randId('bmest_' + c.mode + '_', 40), c.account,
      c.stripeAccount, c.keyAccount, c.mode, c.apiKey, now, now + c.cfg.session_ttl_s * 1000);
    c.st.sessions.set(s.token, s);
    c.st.stats.sessions_created++;
    return { status: 200, headers: null, body: JSON.stringify({
      id: s.id, object: 'v2.billing.meter_event_session', authentication_token: s.token,
      created: new Date(s.created).toISOString(), expires_at: new Date(s.expiresAt).toISOString(),
      livemode: c.livemode }) };
  });
}

// Schema checks Stripe makes before accepting a stream request. Returns an
// error body or null.
function validateStreamBody(body) {
  const bad = (code, msg) => v2Error(code, msg, 'invalid_request_error');
  if (!body || typeof body !== 'object' || Array.isArray(body)) return bad('invalid_request', 'The request body must be a JSON object.');
  for (const k of Object.keys(body)) if (k !== 'events') return bad('parameter_unknown', 'Received unknown parameter: ' + k);
  const evs = body.events;
  if (evs === undefined) return bad('parameter_missing', 'Missing required param: events.');
  if (!Array.isArray(evs)) return bad('parameter_invalid', 'Invalid events: must be an array.');
  if (evs.length === 0) return bad('parameter_invalid', 'Invalid events: must contain at least one event.');
  if (evs.length > V2_MAX_EVENTS) return bad('parameter_invalid', 'Invalid events: at most ' + V2_MAX_EVENTS + ' events per request; received ' + evs.length + '.');
  for (let i = 0; i < evs.length; i++) {
    const ev = evs[i];
    const at = 'events[' + i + ']';
    if (!ev || typeof ev !== 'object' || Array.isArray(ev)) return bad('parameter_invalid', 'Invalid ' + at + ': must be an object.');
    for (const k of Object.keys(ev)) if (!V2_EVENT_KEYS.has(k)) return bad('parameter_unknown', 'Received unknown parameter: ' + at + '.' + k);
    if (ev.event_name === undefined) return bad('parameter_missing', 'Missing required param: ' + at + '.event_name.');
    if (typeof ev.event_name !== 'string' || ev.event_name === '' || ev.event_name.length > 100) return bad('parameter_invalid', 'Invalid ' + at + '.event_name: must be a string of 1 to 100 characters.');
    if (ev.identifier !== undefined && (typeof ev.identifier !== 'string' || ev.identifier === '' || ev.identifier.length > 100)) return bad('parameter_invalid', 'Invalid ' + at + '.identifier: must be a string of 1 to 100 characters.');
    if (ev.payload === undefined) return bad('parameter_missing', 'Missing required param: ' + at + '.payload.');
    if (!ev.payload || typeof ev.payload !== 'object' || Array.isArray(ev.payload)) return bad('parameter_invalid', 'Invalid ' + at + '.payload: must be an object.');
    for (const [k, v] of Object.entries(ev.payload)) {
      if (typeof v !== 'string') return bad('parameter_invalid', 'Invalid ' + at + '.payload.' + k + ': must be a string.');
    }
    if (ev.timestamp !== undefined && (typeof ev.timestamp !== 'string' || !RFC3339_RE.test(ev.timestamp) || isNaN(Date.parse(ev.timestamp)))) {
      return bad('parameter_invalid', 'Invalid ' + at + '.timestamp: must be an RFC 3339 date-time.');
    }
  }
  return null;
}

function handleMeterEventStream(ctx) {
  const st = ctx.st;
  if (!isMediaJson(ctx.headers['content-type'])) {
    st.stats.validation_errors++;
    return reply(ctx, 400, v2Error('invalid_request', 'Invalid request: the meter event stream expects Content-Type: application/json.', 'invalid_request_error'));
  }
  let body;
  try { body = JSON.parse(ctx.raw); } catch (e) {
    st.stats.validation_errors++;
    return reply(ctx, 400, v2Error('invalid_request', 'Invalid JSON body.', 'invalid_request_error'));
  }
  const err = validateStreamBody(body);
  if (err) { st.stats.validation_errors++; return reply(ctx, 400, err); }
  const events = body.events;
  st.stats.stream_requests++;
  st.stats.stream_events += events.length;
  if (events.length > st.stats.stream_max_batch) st.stats.stream_max_batch = events.length;

  // One concurrent usage event per customer and meter, within the request
  // and across requests being processed.
  // (a Set: with up to 100 events an array's includes() was quadratic)
  const locks = new Set();
  for (const ev of events) {
    const meter = ctx.cfg.meters[ev.event_name];
    const cust = ev.payload[meter ? meter.customer_key : 'stripe_customer_id'];
    if (typeof cust !== 'string') continue;
    const k = ctx.account + '|' + cust + '|' + ev.event_name;
    if (st.slots.has(k) || locks.has(k)) {
      st.stats.concurrency_violations++;
      return reply(ctx, 429, v2Error('too_many_concurrent_requests',
        'Cannot create multiple usage events for the same customer, meter concurrently.', 'rate_limit'));
    }
    locks.add(k);
  }
  for (const k of locks) st.slots.add(k);
  const run = () => {
    for (const k of locks) st.slots.delete(k);
    for (const ev of events) streamEvent(ctx, ev);
    deliver(ctx, { status: 200, headers: null, body: '{}' });
  };
  const d = latencyFor(ctx);
  ctx.latencyDone = true;
  if (d > 0) setTimeout(run, d); else run();
}

// The error-report code Stripe uses asynchronously for a v1 validation error.
function asyncErrorCode(e, customerKey) {
  const onCustomer = e.param === 'payload[' + customerKey + ']';
  switch (e.code) {
    case 'resource_missing': return 'meter_event_customer_not_found';
    case 'parameter_missing':
    case 'parameter_invalid_empty':
      return onCustomer ? 'meter_event_no_customer_defined' : 'meter_event_invalid_value';
    case 'parameter_invalid_integer': return 'meter_event_invalid_value';
    default: return e.code || 'meter_event_invalid_value';
  }
}

// One accepted stream event: validated now (Stripe does it asynchronously
// and reports failures later), deduped by identifier, billed.
function streamEvent(ctx, ev) {
  const st = ctx.st, cfg = ctx.cfg;
  const now = Date.now();
  const params = { event_name: ev.event_name, payload: ev.payload };
  if (ev.identifier !== undefined) params.identifier = ev.identifier;
  if (ev.timestamp !== undefined) params.timestamp = String(Math.floor(Date.parse(ev.timestamp) / 1000));
  const v = validateMeterEvent(ctx, params);
  if (v.error) {
    st.stats.async_errors++;
    st.asyncErrors.push({ identifier: ev.identifier || null, event_name: ev.event_name,
      code: asyncErrorCode(v.error.error, (cfg.meters[ev.event_name] || { customer_key: 'stripe_customer_id' }).customer_key), message: v.error.error.message,
      account: ctx.stripeAccount || ctx.keyAccount, livemode: ctx.livemode, request_id: ctx.requestId, time: now });
    return;
  }
  const identifier = ev.identifier === undefined ? crypto.randomUUID() : keepStr(ev.identifier);
  let info = null;
  if (ev.identifier !== undefined) {
    let m = st.idents.get(ctx.account);
    if (!m) { m = new Map(); st.idents.set(intern(ctx.account), m); }
    info = m.get(identifier);
    if (!info) { info = new IdentInfo(); m.set(identifier, info); }
    if (info.billedAt >= 0 && now - info.billedAt < cfg.identifier_ttl_s * 1000) {
      st.stats.duplicate_identifier_attempts++;
      st.stats.stream_duplicates_dropped++;
      return;
    }
  }
  const payload = {};
  for (const k of Object.keys(v.payload)) payload[k] = keepStr(v.payload[k]);
  const rec = new EventRecord(identifier, intern(v.event_name), payload,
    v.timestamp === null ? Math.floor(now / 1000) : v.timestamp,
    intern(ctx.stripeAccount || ctx.keyAccount), ctx.livemode, null,
    intern(ctx.headers['stripe-version'] || null), intern(ctx.headers['user-agent'] || null),
    intern(ctx.apiKey), ctx.requestId, now, ctx.session.id, ctx.arrivedAt);
  st.events.push(rec);
  st.stats.billed++;
  if (info) {
    info.billedAt = now;
    info.n++;
    if (info.n === 2) st.stats.identifiers_billed_multiple_times++;
  }
}

// ---------------------------------------------------------------------------
// Faults, scripted responses and delivery
// ---------------------------------------------------------------------------

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

function bearerKey(h) {
  if (!h) return null;
  const m = /^\s*([A-Za-z]+)\s+(.*?)\s*$/.exec(h);
  if (!m) return null;
  if (m[1].toLowerCase() === 'bearer') return m[2];
  if (m[1].toLowerCase() === 'basic') return Buffer.from(m[2], 'base64').toString('utf8').split(':')[0];
  return null;
}

const HTML_502 = '<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n';

function preFault(ctx, fault) {
  switch (fault) {
    case '500': return deliver(ctx, serverError500());
    case '503':
      return reply(ctx, 503, stripeError('api_error',
        'Stripe is temporarily unavailable. Please try again later.'), { 'Stripe-Should-Retry': 'true' });
    case '429': return reply(ctx, 429, rateLimitBody());
    case '409':
      return reply(ctx, 409, stripeError('idempotency_error',
        'There is currently another in-progress request using this Idempotent Key (that probably means you submitted twice, and the other request is still going through): ' +
        (ctx.idemKey || '') + '. Please try again later.', { code: 'idempotency_key_in_use' }));
    case 'timeout': return deliver(ctx, { mode: 'hold' });
    case 'reset': return deliver(ctx, { mode: 'reset' });
    case 'html':
      return deliver(ctx, { status: 502, headers: { 'Content-Type': 'text/html' }, body: HTML_502 });
    case 'malformed_json':
      return deliver(ctx, { status: 200, headers: null,
        body: '{"object":"billing.meter_event","created":' + Math.floor(Date.now() / 1000) + ',"event_name":<html>unexpected' });
    case 'huge': return deliver(ctx, { mode: 'huge', status: ctx.cfg.huge_status });
    default: return deliver(ctx, serverError500());
  }
}

function reply(ctx, status, bodyObj, headers) {
  deliver(ctx, { status, headers: headers || null, body: JSON.stringify(bodyObj) });
}

function latencyFor(ctx) {
  const cfg = ctx.cfg;
  let d = cfg.latency_ms + ctx.extraDelay;
  if (cfg.latency_jitter_ms > 0) d += Math.random() * cfg.latency_jitter_ms;
  return d;
}

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
  const sock = ctx.req.socket;
  if (mode === 'reset') { resetSocket(sock); return; }
  if (mode === 'hold') {
    if (!ctx.closed) setCtxTimer(ctx, setTimeout(() => sock.destroy(), ctx.cfg.timeout_hold_ms));
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
    // A string body goes out in the same write as the headers.
    headers['Content-Length'] = String(Buffer.byteLength(r.body, 'utf8'));
    if (!safeWriteHead(res, status, headers)) return;
    res.end(r.body, 'utf8');
    return;
  }
  const buf = Buffer.from(r.body, 'utf8');
  if (mode === 'truncated') {
    headers['Content-Length'] = String(buf.length * 2 + 64);
    if (!safeWriteHead(res, status, headers)) return;
    res.write(buf.subarray(0, Math.max(1, buf.length >> 1)), () => sock.destroy());
    return;
  }
  headers['Content-Length'] = String(buf.length);
  if (mode === 'trickle') {
    if (!safeWriteHead(res, status, headers)) return;
    res.flushHeaders();
    let i = 0;
    const step = () => {
      if (ctx.closed) return;
      if (i >= buf.length) { res.end(); return; }
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

function safeWriteHead(res, status, headers) {
  try {
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

function sendHuge(ctx, res, status, headers) {
  const total = ctx.cfg.huge_bytes;
  const head = status >= 400
    ? '{"error":{"type":"api_error","message":"'
    : '{"object":"billing.meter_event","padding":"';
  const tail = status >= 400 ? '"}}' : '"}';
  if (status >= 500) headers['Stripe-Should-Retry'] = 'true';
  headers['Content-Length'] = String(total);
  if (!safeWriteHead(res, status, headers)) return;
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
    res.end(tail.slice(tail.length - suffixLen));
  };
  pump();
}

// ---------------------------------------------------------------------------
// Control API (/__mock/...)
// ---------------------------------------------------------------------------

function sendJson(res, status, obj) {
  const body = JSON.stringify(obj);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
}

function controlStats(query) {
  const st = state;
  // ?gc=1 forces a collection first when node runs with --expose-gc.
  if (query.get('gc') === '1' && typeof global.gc === 'function') global.gc();
  const mem = process.memoryUsage();
  return Object.assign({}, st.stats, {
    memory: { rss: mem.rss, heap_used: mem.heapUsed },
    by_status: Object.assign({}, st.stats.by_status),
    faults_injected: Object.assign({}, st.stats.faults_injected),
    events_stored: st.events.length,
    idempotency_keys_stored: st.idemCount,
    scripts_remaining: st.scripts.length,
    open_connections: sockets.size,
  });
}

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

function onControl(req, res, path, query) {
  const sock = req.socket;
  sock._smMockBusy = true;
  res.on('close', () => { sock._smMockBusy = false; });
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('error', () => {});
  req.on('end', () => {
    const raw = Buffer.concat(chunks).toString('utf8');
    let json;
    const needJson = () => {
      if (json !== undefined) return true;
      try { json = raw.length ? JSON.parse(raw) : {}; return true; } catch (e) {
        sendJson(res, 400, { error: 'invalid JSON body: ' + e.message });
        return false;
      }
    };
    const route = req.method + ' ' + path;
    switch (route) {
      case 'GET /__mock/health':
        return sendJson(res, 200, { ok: true });
      case 'GET /__mock/stats':
        return sendJson(res, 200, controlStats(query));
      case 'GET /__mock/events': {
        let data = state.events;
        const ident = query.get('identifier');
        const en = query.get('event_name');
        if (ident !== null) data = data.filter((e) => e.identifier === ident);
        if (en !== null) data = data.filter((e) => e.event_name === en);
        const offset = parseInt(query.get('offset') || '0', 10) || 0;
        const limit = query.get('limit') !== null ? parseInt(query.get('limit'), 10) : null;
        if (offset > 0 || limit !== null) data = data.slice(offset, limit !== null ? offset + limit : undefined);
        return sendJson(res, 200, { data });
      }
      case 'GET /__mock/requests': {
        const limit = query.get('limit') !== null ? parseInt(query.get('limit'), 10) : 100;
        return sendJson(res, 200, { data: recentLog(state, Math.max(0, limit || 0)) });
      }
      case 'GET /__mock/config':
        return sendJson(res, 200, config);
      case 'POST /__mock/config': {
        if (!needJson()) return;
        const err = applyConfig(json);
        if (err) return sendJson(res, 400, { error: err });
        return sendJson(res, 200, config);
      }
      case 'POST /__mock/reset': {
        const wasDown = config.down;
        config = defaultConfig();
        derived = deriveConfig(config);
        state = newState(config);
        if (wasDown) { /* connections are accepted again */ }
        return sendJson(res, 200, { ok: true });
      }
      case 'GET /__mock/script':
        return sendJson(res, 200, { data: state.scripts });
      case 'GET /__mock/sessions':
        return sendJson(res, 200, { data: [...state.sessions.values()].map(sessionInfo) });
      case 'POST /__mock/expire_sessions': {
        if (!needJson()) return;
        return sendJson(res, 200, { expired: expireSessions(json && json.account) });
      }
      case 'GET /__mock/async_errors':
        return sendJson(res, 200, { data: state.asyncErrors });
      case 'GET /__mock/lifecycle':
        return sendJson(res, 200, lifecycle.control(state));
      case 'POST /__mock/script': {
        if (!needJson()) return;
        const list = validateScript(json);
        if (typeof list === 'string') return sendJson(res, 400, { error: list });
        if (query.get('append') === '1' || query.get('append') === 'true') state.scripts.push(...list);
        else state.scripts = list;
        return sendJson(res, 200, { data: state.scripts });
      }
      default:
        return sendJson(res, 404, { error: 'unknown control endpoint: ' + route });
    }
  });
}

// ---------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------

lifecycle.install({ reply, invalid, parseForm, canon, isMediaForm, executeIdempotent });

function onRequest(req, res) {
  const url = req.url;
  const q = url.indexOf('?');
  const path = q < 0 ? url : url.slice(0, q);
  if (path.startsWith('/__mock/')) {
    return onControl(req, res, path, new URLSearchParams(q < 0 ? '' : url.slice(q + 1)));
  }
  onStripeRequest(req, res, path);
}

function usage(msg) {
  if (msg) process.stderr.write('stripe-mock: ' + msg + '\n');
  process.stderr.write('usage: node stripe-mock.js [--port N] [--host 127.0.0.1|localhost|::1] [--parent-watch]\n' +
    '       [--tls-cert FILE --tls-key FILE [--control-port N]]\n');
  process.exit(2);
}

function main() {
  let port = 0;
  let host = '127.0.0.1';
  let parentWatch = false;
  let tlsCert = null;
  let tlsKey = null;
  let controlPort = 0;
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    let a = argv[i];
    let val;
    const eq = a.indexOf('=');
    if (a.startsWith('--') && eq > 0) { val = a.slice(eq + 1); a = a.slice(0, eq); }
    const next = () => (val !== undefined ? val : (i + 1 < argv.length ? argv[++i] : usage(a + ' needs a value')));
    if (a === '--port') {
      const v = next();
      if (!/^[0-9]+$/.test(v) || Number(v) > 65535) usage('bad port: ' + v);
      port = Number(v);
    } else if (a === '--host') {
      host = next();
    } else if (a === '--tls-cert') {
      tlsCert = next();
    } else if (a === '--tls-key') {
      tlsKey = next();
    } else if (a === '--control-port') {
      const v = next();
      if (!/^[0-9]+$/.test(v) || Number(v) > 65535) usage('bad control port: ' + v);
      controlPort = Number(v);
    } else if (a === '--parent-watch') {
      parentWatch = true;
    } else if (a === '--help' || a === '-h') {
      usage();
    } else {
      usage('unknown argument: ' + a);
    }
  }
  if (host === 'localhost') host = '127.0.0.1';
  if (host !== '127.0.0.1' && host !== '::1') usage('refusing to bind to non-loopback host ' + host);

  if ((tlsCert === null) !== (tlsKey === null)) usage('--tls-cert and --tls-key go together');
  // https mode: the API is served over TLS, and a second, plain http
  // listener (--control-port) serves the same handler for the control API.
  const opts = { noDelay: true, keepAlive: true };
  const server = tlsCert === null ? http.createServer(opts, onRequest)
    : require('https').createServer({ ...opts, cert: fs.readFileSync(tlsCert), key: fs.readFileSync(tlsKey) }, onRequest);
  const control = tlsCert === null ? null : http.createServer(opts, onRequest);
  server.keepAliveTimeout = 65000;
  server.headersTimeout = 66000;
  server.requestTimeout = 0;
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  server.on('clientError', (err, socket) => {
    if (socket.writable && !socket.destroyed) {
      try { socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n'); } catch (e) { /* ignore */ }
    }
    socket.destroy();
  });
  if (tlsCert !== null) {
    // a failed handshake is the client's verdict; note it, keep serving
    server.on('tlsClientError', () => { state.stats.tls_handshake_failures++; });
  }
  server.on('error', (e) => {
    process.stderr.write('stripe-mock: server error: ' + e.message + '\n');
    process.exit(1);
  });

  let stopping = false;
  const shutdown = () => {
    if (stopping) return;
    stopping = true;
    server.close();
    if (control) control.close();
    for (const s of sockets) s.destroy();
    process.exit(0);
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);
  if (parentWatch) {
    // Exit when the parent (which holds our stdin open) goes away.
    process.stdin.on('end', shutdown);
    process.stdin.on('close', shutdown);
    process.stdin.on('error', shutdown);
    process.stdin.resume();
  }

  const announce = () => {
    const line = { listening: server.address().port };
    if (control) line.control = control.address().port;
    process.stdout.write(JSON.stringify(line) + '\n');
  };
  server.listen(port, host, () => {
    if (!control) return announce();
    control.on('connection', (s) => {
      sockets.add(s);
      s.on('close', () => sockets.delete(s));
    });
    control.listen(controlPort, host, announce);
  });
}

main();
