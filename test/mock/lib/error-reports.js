// error-reports.js: GET /v2/core/events, Stripe's asynchronous error
// reports: billed events Stripe would refuse after the fact (a customer
// in config.missing_customers; with report_no_meter an event name without
// a meter) and v2 stream events refused after acceptance become
// v1.billing.meter.error_report_triggered / no_meter_found events, grouped
// per account and meter, generated when the list is read.
'use strict';

const crypto = require('crypto');
const { v2EventsError } = require('./stripe-errors');
const { reply } = require('./delivery');
const { ACCOUNT_RE } = require('./connect');
const { queryParams } = require('./list-query');
const { life } = require('./lifecycle-records');

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

function replyError(ctx, status, code, message) {
  reply(ctx, status, v2EventsError(code, message));
}

// GET /v2/core/events
function handleV2Events(ctx) {
  const { params } = queryParams(ctx);
  let q = params;
  if (params.page !== undefined) {
    try {
      q = JSON.parse(Buffer.from(params.page, 'base64url').toString('utf8'));
    } catch (e) {
      return replyError(ctx, 400, 'invalid_page', 'The page token is not valid.');
    }
  }
  const allowed = new Set(['types', 'limit', 'object_id', 'created[gt]', 'created[gte]', 'created[lt]', 'created[lte]', 'page', 'offset']);
  for (const k of Object.keys(q)) {
    if (!allowed.has(k)) return replyError(ctx, 400, 'parameter_unknown', 'Received unknown parameter: ' + k);
  }
  const limit = q.limit === undefined ? 20 : +q.limit;
  if (!Number.isInteger(limit) || limit < 1 || limit > 100) return replyError(ctx, 400, 'invalid_limit', 'limit must be between 1 and 100.');
  const times = {};
  for (const op of ['gt', 'gte', 'lt', 'lte']) {
    const v = q['created[' + op + ']'];
    if (v === undefined) continue;
    const t = Date.parse(v);
    if (Number.isNaN(t) || !/^\d{4}-\d\d-\d\dT/.test(v)) return replyError(ctx, 400, 'invalid_timestamp', 'created[' + op + '] must be an RFC 3339 timestamp.');
    times[op] = t;
  }
  generateReports(ctx);
  const sa = ctx.headers['stripe-context'];
  if (sa !== undefined && !ACCOUNT_RE.test(sa)) return replyError(ctx, 403, 'account_invalid', 'The Stripe-Context header is not a valid account.');
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
  reply(ctx, 200, { data, next_page_url: next, previous_page_url: null });
}

module.exports = { handleV2Events };
