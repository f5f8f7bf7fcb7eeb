// ledger.js: what the mock billed. Each billed event is an EventRecord in
// st.events (GET /__mock/events); each identifier seen, per account and
// mode, has an IdentInfo: when it was last billed (Stripe's identifier
// uniqueness window), how often, and under which Idempotency-Keys, which is
// how the stats show double billing.
'use strict';

const { keepStr, intern } = require('./kept-strings');

// Compact fixed-shape records.
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

// The IdentInfo of an identifier in an account scope (account|mode), made
// on first sight; kept until a reset.
function identInfo(st, account, identifier) {
  let m = st.idents.get(account);
  if (!m) { m = new Map(); st.idents.set(intern(account), m); }
  let info = m.get(identifier);
  if (!info) { info = new IdentInfo(); m.set(identifier, info); }
  return info;
}

// Billed less than ttlS seconds before `now` (ms).
function billedWithin(info, now, ttlS) {
  return info.billedAt >= 0 && now - info.billedAt < ttlS * 1000;
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

// A payload to keep with its record: own strings (see keepStr).
function keptPayload(p) {
  const payload = {};
  for (const k of Object.keys(p)) payload[k] = keepStr(p[k]);
  return payload;
}

// Bill a record; info is its identifier's IdentInfo, or null when the
// identifier was generated.
function recordBilled(st, ev, info, now) {
  st.events.push(ev);
  st.stats.billed++;
  if (info) {
    info.billedAt = now;
    info.n++;
    if (info.n === 2) st.stats.identifiers_billed_multiple_times++;
  }
}

// Successful answers for this identifier under distinct idempotency keys
// (k: the key, or null for none); a second one is double billing.
function noteSuccessKey(st, info, k) {
  if (info.ok === undefined) info.ok = k;
  else if (!info.okMulti && (k === null || k !== info.ok)) {
    info.okMulti = true;
    st.stats.identifiers_billed_under_multiple_keys++;
  }
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

module.exports = { EventRecord, identInfo, billedWithin, trackKey, keptPayload, recordBilled, noteSuccessKey, meterEventBody };
