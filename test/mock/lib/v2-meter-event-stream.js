// v2-meter-event-stream.js: API v2's POST /v2/billing/meter_event_stream:
// up to 100 events per JSON request, authenticated by a session token. The
// request is checked against the schema and the one-event-per-customer-
// and-meter rule, answered 200 {}, and each event is then validated on its
// own: a failure is not an HTTP error but an asynchronous error (st.
// asyncErrors, reported by GET /v2/core/events); duplicates are dropped.
'use strict';

const crypto = require('crypto');
const { keepStr, intern } = require('./kept-strings');
const { v2Error } = require('./stripe-errors');
const { isMediaJson } = require('./media-types');
const { validateMeterEvent } = require('./meter-event-validation');
const { reply, deliver, latencyFor } = require('./delivery');
const { EventRecord, identInfo, billedWithin, keptPayload, recordBilled } = require('./ledger');

const STREAM_PATH = '/v2/billing/meter_event_stream';
const V2_MAX_EVENTS = 100;
const V2_EVENT_KEYS = new Set(['event_name', 'identifier', 'payload', 'timestamp']);
const RFC3339_RE = /^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$/;

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
    info = identInfo(st, ctx.account, identifier);
    if (billedWithin(info, now, cfg.identifier_ttl_s)) {
      st.stats.duplicate_identifier_attempts++;
      st.stats.stream_duplicates_dropped++;
      return;
    }
  }
  const payload = keptPayload(v.payload);
  const rec = new EventRecord(identifier, intern(v.event_name), payload,
    v.timestamp === null ? Math.floor(now / 1000) : v.timestamp,
    intern(ctx.stripeAccount || ctx.keyAccount), ctx.livemode, null,
    intern(ctx.headers['stripe-version'] || null), intern(ctx.headers['user-agent'] || null),
    intern(ctx.apiKey), ctx.requestId, now, ctx.session.id, ctx.arrivedAt);
  recordBilled(st, rec, info, now);
}

module.exports = { STREAM_PATH, handleMeterEventStream };
