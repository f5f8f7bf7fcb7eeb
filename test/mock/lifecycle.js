// lifecycle.js: the mock's endpoints for the event lifecycle after delivery:
// cancellations (POST /v1/billing/meter_event_adjustments), meters
// (GET /v1/billing/meters[/{id}]), event summaries
// (GET /v1/billing/meters/{id}/event_summaries) and asynchronous error
// reports (GET /v2/core/events). Loaded by stripe-mock.js; see README.md.
'use strict';

const crypto = require('crypto');

const ACCOUNT_RE = /^acct_[A-Za-z0-9]+$/;
const METER_TS_BASE = 1767225600; // 2026-01-01, "created" of the first meter
const REPORT_TYPES = new Set(['v1.billing.meter.error_report_triggered', 'v1.billing.meter.no_meter_found']);

let api = null;

function meterIdFor(name) {
  return 'mtr_' + crypto.createHash('sha1').update(name).digest('hex').slice(0, 24);
}

// Per-state lifecycle bookkeeping (a reset makes a new state, so it is cleared too).
function life(st) {
  if (!st.life) {
    st.life = {
      cancelled: new Map(),   // account|mode|identifier -> {at, event_name}
      adjustments: [],        // adjustment objects, in order
      reports: [],            // v2 events, oldest first
      reportedUpTo: 0,        // index into st.events already examined
      streamReportedUpTo: 0,  // index into st.asyncErrors (v2 stream) already reported
    };
  }
  return st.life;
}

function eventScope(ctx) {
  return (ctx.stripeAccount || ctx.keyAccount) + '|' + ctx.mode;
}

// Meters from the config, as billing.meter objects, newest first.
function meterList(ctx) {
  const names = Object.keys(ctx.cfg.meters);
  const out = [];
  names.forEach((name, i) => {
    const m = ctx.cfg.meters[name];
    out.push({
      id: m.id,
      object: 'billing.meter',
      created: METER_TS_BASE + i,
      customer_mapping: { event_payload_key: m.customer_key, type: 'by_id' },
      default_aggregation: { formula: m.formula },
      display_name: m.display_name || name,
      event_name: name,
      event_time_window: null,
      livemode: ctx.livemode,
      status: m.status,
      status_transitions: { deactivated_at: m.status === 'inactive' ? METER_TS_BASE + i + 1 : null },
      updated: METER_TS_BASE + i,
      value_settings: { event_payload_key: m.value_key },
    });
  });
  return out.reverse();
}

function queryParams(ctx) {
  const u = ctx.req.url;
  const q = u.indexOf('?');
  const sp = new URLSearchParams(q < 0 ? '' : u.slice(q + 1));
  const out = Object.create(null);
  const dup = [];
  for (const [k, v] of sp) {
    if (out[k] !== undefined && !k.endsWith('[]') && k !== 'types') dup.push(k);
    if (k === 'types' || k.startsWith('types[') || k.endsWith('[]')) {
      const key = k.startsWith('types') ? 'types' : k.slice(0, -2);
      (out[key] = out[key] || []).push(v);
    } else out[k] = v;
  }
  return { params: out, dup };
}

function v1Query(ctx, allowed) {
  const { params, dup } = queryParams(ctx);
  if (dup.length) {
    api.reply(ctx, 400, api.invalid('Received parameter ' + dup[0] + ' more than once.', dup[0], 'parameter_duplicate'));
    return null;
  }
  for (const k of Object.keys(params)) {
    if (!allowed.has(k)) {
      api.reply(ctx, 400, api.invalid('Received unknown parameter: ' + k, k, 'parameter_unknown'));
      return null;
    }
  }
  return params;
}

// limit: 1..100, default 10; returns the number or null after replying.
function listLimit(ctx, params) {
  if (params.limit === undefined) return 10;
  if (!/^[0-9]+$/.test(params.limit) || +params.limit < 1 || +params.limit > 100) {
    api.reply(ctx, 400, api.invalid('Invalid integer: ' + params.limit + '; must be between 1 and 100', 'limit', 'parameter_invalid_integer'));
    return null;
  }
  return +params.limit;
}

// Cursor pagination over `all` (already ordered); replies on a bad cursor.
function page(ctx, all, params, limit, url, what) {
  let start = 0;
  let end = all.length;
  if (params.starting_after !== undefined) {
    const i = all.findIndex((o) => o.id === params.starting_after);
    if (i < 0) {
      api.reply(ctx, 404, api.invalid('No such ' + what + ": '" + params.starting_after + "'", 'starting_after', 'resource_missing'));
      return;
    }
    start = i + 1;
  } else if (params.ending_before !== undefined) {
    const i = all.findIndex((o) => o.id === params.ending_before);
    if (i < 0) {
      api.reply(ctx, 404, api.invalid('No such ' + what + ": '" + params.ending_before + "'", 'ending_before', 'resource_missing'));
      return;
    }
    end = i;
    start = Math.max(0, end - limit);
  }
  const data = all.slice(start, Math.min(end, start + limit));
  api.reply(ctx, 200, { object: 'list', data, has_more: start + data.length < end, url });
}

// GET /v1/billing/meters
function handleListMeters(ctx) {
  const params = v1Query(ctx, new Set(['limit', 'starting_after', 'ending_before', 'status', 'expand']));
  if (!params) return;
  const limit = listLimit(ctx, params);
  if (limit === null) return;
  let all = meterList(ctx);
  if (params.status !== undefined) {
    if (params.status !== 'active' && params.status !== 'inactive') {
      return api.reply(ctx, 400, api.invalid('Invalid status: must be one of active or inactive', 'status', 'parameter_invalid_string'));
    }
    all = all.filter((m) => m.status === params.status);
  }
  page(ctx, all, params, limit, '/v1/billing/meters', 'billing meter');
}

function findMeter(ctx, id) {
  return meterList(ctx).find((m) => m.id === id) || null;
}

function noSuchMeter(ctx, id) {
  api.reply(ctx, 404, api.invalid("No such billing meter: '" + id + "'", 'id', 'resource_missing'));
}

// GET /v1/billing/meters/{id}
function handleGetMeter(ctx, id) {
  const params = v1Query(ctx, new Set(['expand']));
  if (!params) return;
  const m = findMeter(ctx, id);
  if (!m) return noSuchMeter(ctx, id);
  api.reply(ctx, 200, m);
}

function isCancelled(st, scope, identifier) {
  return life(st).cancelled.has(scope + '|' + identifier);
}

// Billed, not cancelled, and not refused after the fact (missing customer).
function counts(ctx, ev, meter) {
  const cfg = ctx.cfg;
  if (ev.event_name !== meter.event_name) return false;
  if (ev.account + '|' + (ev.livemode ? 'live' : 'test') !== eventScope(ctx)) return false;
  if (isCancelled(ctx.st, eventScope(ctx), ev.identifier)) return false;
  const cust = ev.payload[meter.customer_mapping.event_payload_key];
  if (cfg.missing_customers.includes(cust)) return false;
  return true;
}

// GET /v1/billing/meters/{id}/event_summaries
function handleSummaries(ctx, id) {
  const params = v1Query(ctx, new Set(['customer', 'start_time', 'end_time', 'value_grouping_window',
    'limit', 'starting_after', 'ending_before', 'expand']));
  if (!params) return;
  const m = findMeter(ctx, id);
  if (!m) return noSuchMeter(ctx, id);
  for (const p of ['customer', 'start_time', 'end_time']) {
    if (params[p] === undefined) return api.reply(ctx, 400, api.invalid('Missing required param: ' + p + '.', p, 'parameter_missing'));
  }
  for (const p of ['start_time', 'end_time']) {
    if (!/^[0-9]{1,12}$/.test(params[p])) {
      return api.reply(ctx, 400, api.invalid('Invalid integer: ' + params[p], p, 'parameter_invalid_integer'));
    }
  }
  const start = +params.start_time, end = +params.end_time;
  const g = params.value_grouping_window;
  if (g !== undefined && g !== 'day' && g !== 'hour') {
    return api.reply(ctx, 400, api.invalid('Invalid value_grouping_window: must be one of day or hour', 'value_grouping_window', 'parameter_invalid_string'));
  }
  const step = g === 'day' ? 86400 : g === 'hour' ? 3600 : 60;
  for (const [p, v] of [['start_time', start], ['end_time', end]]) {
    if (v % step !== 0) {
      const unit = g === 'day' ? 'day boundaries (midnight UTC)' : g === 'hour' ? 'hour boundaries' : 'minute boundaries';
      return api.reply(ctx, 400, api.invalid(p + ' must be aligned to ' + unit + '.', p, 'parameter_invalid_integer'));
    }
  }
  if (start >= end) {
    return api.reply(ctx, 400, api.invalid('start_time must be before end_time.', 'start_time', 'parameter_invalid_integer'));
  }
  const limit = listLimit(ctx, params);
  if (limit === null) return;
  const windowLen = g === undefined ? end - start : step;
  const evs = ctx.st.events.filter((ev) => counts(ctx, ev, m) &&
    ev.payload[m.customer_mapping.event_payload_key] === params.customer &&
    ev.timestamp >= start && ev.timestamp < end);
  const all = [];
  for (let ws = start; ws < end; ws += windowLen) {
    const we = Math.min(ws + windowLen, end);
    const inWin = evs.filter((ev) => ev.timestamp >= ws && ev.timestamp < we);
    let v = 0;
    const f = m.default_aggregation.formula;
    if (f === 'count') v = inWin.length;
    else if (f === 'last') {
      let best = null;
      for (const ev of inWin) if (best === null || ev.timestamp >= best.timestamp) best = ev;
      v = best ? Number(best.payload[m.value_settings.event_payload_key]) : 0;
    } else for (const ev of inWin) v += Number(ev.payload[m.value_settings.event_payload_key]);
    all.push({
      id: 'mtrusg_' + crypto.createHash('sha1').update(m.id + '|' + params.customer + '|' + ws + '|' + we).digest('hex').slice(0, 24),
      object: 'billing.meter_event_summary',
      aggregated_value: v,
      end_time: we,
      livemode: ctx.livemode,
      meter: m.id,
      start_time: ws,
    });
  }
  all.reverse(); // newest window first
  page(ctx, all, params, limit, '/v1/billing/meters/' + id + '/event_summaries', 'billing meter event summary');
}

// POST /v1/billing/meter_event_adjustments
const ADJUSTMENT_PARAMS = new Set(['event_name', 'type', 'cancel', 'expand']);

function handleAdjustments(ctx) {
  const st = ctx.st, cfg = ctx.cfg;
  if (!api.isMediaForm(ctx.headers['content-type'])) {
    st.stats.validation_errors++;
    return api.reply(ctx, 400, api.invalid('Invalid request: unsupported Content-Type ' + (ctx.headers['content-type'] || '(none)') +
      '. This endpoint expects application/x-www-form-urlencoded.'));
  }
  const p = api.parseForm(ctx.raw);
  if (p.error) { st.stats.validation_errors++; return api.reply(ctx, 400, p.error); }
  const params = p.params;
  const bad = (e) => { st.stats.validation_errors++; api.reply(ctx, 400, e); };
  for (const k of Object.keys(params)) {
    if (!ADJUSTMENT_PARAMS.has(k)) return bad(api.invalid('Received unknown parameter: ' + k, k, 'parameter_unknown'));
  }
  const en = params.event_name;
  if (en === undefined) return bad(api.invalid('Missing required param: event_name.', 'event_name', 'parameter_missing'));
  if (typeof en !== 'string' || en === '') return bad(api.invalid('Invalid event_name.', 'event_name', 'parameter_invalid_empty'));
  if (en.length > 100) return bad(api.invalid('Invalid string: ' + en.slice(0, 100) + '...; must be at most 100 characters', 'event_name', 'string_too_long'));
  if (params.type === undefined) return bad(api.invalid('Missing required param: type.', 'type', 'parameter_missing'));
  if (params.type !== 'cancel') return bad(api.invalid('Invalid type: must be one of cancel', 'type', 'parameter_invalid_string'));
  const c = params.cancel;
  if (c === undefined || typeof c !== 'object' || Array.isArray(c)) {
    return bad(api.invalid('Missing required param: cancel[identifier].', 'cancel[identifier]', 'parameter_missing'));
  }
  for (const k of Object.keys(c)) {
    if (k !== 'identifier') return bad(api.invalid('Received unknown parameter: cancel[' + k + ']', 'cancel[' + k + ']', 'parameter_unknown'));
  }
  const ident = c.identifier;
  if (ident === undefined) return bad(api.invalid('Missing required param: cancel[identifier].', 'cancel[identifier]', 'parameter_missing'));
  if (typeof ident !== 'string' || ident === '') return bad(api.invalid('Invalid cancel[identifier].', 'cancel[identifier]', 'parameter_invalid_empty'));
  if (ident.length > 100) return bad(api.invalid('Invalid string: cancel[identifier]; must be at most 100 characters', 'cancel[identifier]', 'string_too_long'));

  api.executeIdempotent(ctx, api.canon(params), null, null, () => {
    const scope = eventScope(ctx);
    let ev = null;
    for (let i = st.events.length - 1; i >= 0; i--) {
      const e = st.events[i];
      if (e.identifier === ident && e.event_name === en && e.account + '|' + (e.livemode ? 'live' : 'test') === scope) { ev = e; break; }
    }
    const err = (msg, code) => ({ status: 400, headers: null, body: JSON.stringify(api.invalid(msg, 'cancel[identifier]', code)) });
    if (!ev) return err("No meter event with identifier '" + ident + "' was found for event_name " + en + '.', 'resource_missing');
    const key = scope + '|' + ident;
    const l = life(st);
    if (l.cancelled.has(key)) return err('The meter event with identifier ' + ident + ' has already been cancelled.', undefined);
    if (Date.now() - ev.billed_at > cfg.cancel_window_s * 1000) {
      return err('The meter event with identifier ' + ident + ' cannot be cancelled: events can only be cancelled within 24 hours of being received.', 'invalid_cancel_configuration');
    }
    l.cancelled.set(key, { at: Date.now(), event_name: en });
    const obj = {
      object: 'billing.meter_event_adjustment',
      cancel: { identifier: ident },
      event_name: en,
      livemode: ctx.livemode,
      status: 'pending',
      type: 'cancel',
    };
    l.adjustments.push(Object.assign({ account: ev.account, idempotency_key: ctx.idemKey || null }, obj));
    return { status: 200, headers: null, body: JSON.stringify(obj) };
  });
}

// Error reports for billed events Stripe would refuse after the fact: a
// customer listed in missing_customers, or (with report_no_meter) an event
// name that has no meter. Generated when the events API is read.
function generateReports(ctx) {
  const st = ctx.st, cfg = ctx.cfg;
  const l = life(st);
  const groups = new Map();
  for (; l.reportedUpTo < st.events.length; l.reportedUpTo++) {
    const ev = st.events[l.reportedUpTo];
    const m = cfg.meters[ev.event_name];
    let type = null, code = null, msg = null;
    const ck = m ? m.customer_key : 'stripe_customer_id';
    if (!m && cfg.report_no_meter) {
      type = 'v1.billing.meter.no_meter_found';
      code = 'no_meter';
      msg = 'No meter was found for event_name ' + ev.event_name + '.';
    } else if (cfg.missing_customers.includes(ev.payload[ck])) {
      type = 'v1.billing.meter.error_report_triggered';
      code = 'meter_event_customer_not_found';
      msg = "No customer found with id '" + ev.payload[ck] + "'.";
    }
    if (!type) continue;
    const gk = ev.account + '|' + ev.livemode + '|' + type + '|' + ev.event_name;
    let g = groups.get(gk);
    if (!g) { g = { ev, type, code, samples: [] }; groups.set(gk, g); }
    g.samples.push({ error_message: msg, request: { id: ev.request_id, identifier: ev.identifier } });
  }
  // Stream events (API v2) Stripe accepted but refused on validation: the
  // same reports, which is the only way a v2 sender learns of them.
  for (; l.streamReportedUpTo < st.asyncErrors.length; l.streamReportedUpTo++) {
    const a = st.asyncErrors[l.streamReportedUpTo];
    const type = a.code === 'no_meter' ? 'v1.billing.meter.no_meter_found'
      : 'v1.billing.meter.error_report_triggered';
    const ev = { account: a.account, livemode: !!a.livemode, event_name: a.event_name };
    const gk = ev.account + '|' + ev.livemode + '|' + type + '|' + ev.event_name + '|' + a.code;
    let g = groups.get(gk);
    if (!g) { g = { ev, type, code: a.code, samples: [] }; groups.set(gk, g); }
    g.samples.push({ error_message: a.message, request: { id: a.request_id, identifier: a.identifier } });
  }
  for (const g of groups.values()) {
    const m = cfg.meters[g.ev.event_name];
    const now = new Date();
    const n = g.samples.length;
    l.reports.push({
      account: g.ev.account,
      livemode: g.ev.livemode,
      event: {
        id: 'evt_' + crypto.randomBytes(12).toString('hex'),
        object: 'v2.core.event',
        type: g.type,
        created: now.toISOString(),
        livemode: g.ev.livemode,
        context: null,
        reason: null,
        related_object: m ? { id: m.id, type: 'billing.meter', url: '/v1/billing/meters/' + m.id } : null,
        data: {
          developer_message_summary: 'There ' + (n === 1 ? 'is 1 invalid event' : 'are ' + n + ' invalid events'),
          reason: {
            error_count: n,
            error_types: [{ code: g.code, error_count: n, sample_errors: g.samples.slice(0, 100) }],
          },
          validation_start: new Date(now.getTime() - 60000).toISOString(),
          validation_end: now.toISOString(),
        },
      },
    });
  }
}

function v2Error(ctx, status, code, message) {
  api.reply(ctx, status, { error: { type: 'invalid_request', code, message } });
}

// GET /v2/core/events
function handleV2Events(ctx) {
  const { params } = queryParams(ctx);
  let q = params;
  if (params.page !== undefined) {
    try {
      q = JSON.parse(Buffer.from(params.page, 'base64url').toString('utf8'));
    } catch (e) {
      return v2Error(ctx, 400, 'invalid_page', 'The page token is not valid.');
    }
  }
  const allowed = new Set(['types', 'limit', 'object_id', 'created[gt]', 'created[gte]', 'created[lt]', 'created[lte]', 'page', 'offset']);
  for (const k of Object.keys(q)) {
    if (!allowed.has(k)) return v2Error(ctx, 400, 'parameter_unknown', 'Received unknown parameter: ' + k);
  }
  const limit = q.limit === undefined ? 20 : +q.limit;
  if (!Number.isInteger(limit) || limit < 1 || limit > 100) return v2Error(ctx, 400, 'invalid_limit', 'limit must be between 1 and 100.');
  const times = {};
  for (const op of ['gt', 'gte', 'lt', 'lte']) {
    const v = q['created[' + op + ']'];
    if (v === undefined) continue;
    const t = Date.parse(v);
    if (Number.isNaN(t) || !/^\d{4}-\d\d-\d\dT/.test(v)) return v2Error(ctx, 400, 'invalid_timestamp', 'created[' + op + '] must be an RFC 3339 timestamp.');
    times[op] = t;
  }
  generateReports(ctx);
  const sa = ctx.headers['stripe-context'];
  if (sa !== undefined && !ACCOUNT_RE.test(sa)) return v2Error(ctx, 403, 'account_invalid', 'The Stripe-Context header is not a valid account.');
  const account = sa || ctx.keyAccount;
  let all = life(ctx.st).reports
    .filter((r) => r.account === account && r.livemode === ctx.livemode)
    .map((r) => r.event)
    .filter((e) => {
      const t = Date.parse(e.created);
      if (q.types && !q.types.includes(e.type)) return false;
      if (times.gt !== undefined && !(t > times.gt)) return false;
      if (times.gte !== undefined && !(t >= times.gte)) return false;
      if (times.lt !== undefined && !(t < times.lt)) return false;
      if (times.lte !== undefined && !(t <= times.lte)) return false;
      if (q.object_id !== undefined && !(e.related_object && e.related_object.id === q.object_id)) return false;
      return true;
    });
  all = all.slice().reverse(); // newest first
  const offset = q.offset ? +q.offset : 0;
  const data = all.slice(offset, offset + limit);
  let next = null;
  if (offset + limit < all.length) {
    const token = Buffer.from(JSON.stringify(Object.assign({}, q, { page: undefined, offset: String(offset + limit) })), 'utf8').toString('base64url');
    next = '/v2/core/events?page=' + token;
  }
  api.reply(ctx, 200, { data, next_page_url: next, previous_page_url: null });
}

// Pattern routes: returns a handler or null.
function match(method, path) {
  if (method === 'GET' && path === '/v1/billing/meters') return handleListMeters;
  if (method === 'POST' && path === '/v1/billing/meter_event_adjustments') return handleAdjustments;
  if (method === 'GET' && path === '/v2/core/events') return handleV2Events;
  let m;
  if (method === 'GET' && (m = /^\/v1\/billing\/meters\/([^/]+)\/event_summaries$/.exec(path))) {
    const id = decodeURIComponent(m[1]);
    return (ctx) => handleSummaries(ctx, id);
  }
  if (method === 'GET' && (m = /^\/v1\/billing\/meters\/([^/]+)$/.exec(path))) {
    const id = decodeURIComponent(m[1]);
    return (ctx) => handleGetMeter(ctx, id);
  }
  return null;
}

// GET /__mock/lifecycle: cancellations and generated error reports.
function control(st) {
  const l = life(st);
  return {
    adjustments: l.adjustments,
    cancelled: [...l.cancelled.keys()],
    error_reports: l.reports.map((r) => Object.assign({ account: r.account }, r.event)),
  };
}

function install(a) { api = a; }

module.exports = { install, match, control, meterIdFor };
