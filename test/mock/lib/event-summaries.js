// event-summaries.js: GET /v1/billing/meters/{id}/event_summaries, what
// stripe_meter's reconciliation reads back: the meter's formula (sum,
// count, last) over one customer's billed events per window, leaving out
// cancelled events and those of config.missing_customers.
'use strict';

const crypto = require('crypto');
const { invalid } = require('./stripe-errors');
const { reply } = require('./delivery');
const { accountScope } = require('./connect');
const { v1Query, listLimit, page } = require('./list-query');
const { findMeter, noSuchMeter } = require('./meters');
const { isCancelled } = require('./lifecycle-records');

// Billed, not cancelled, and not refused after the fact (missing customer).
function counts(ctx, ev, meter) {
  const cfg = ctx.cfg;
  if (ev.event_name !== meter.event_name) return false;
  if (ev.account + '|' + (ev.livemode ? 'live' : 'test') !== accountScope(ctx)) return false;
  if (isCancelled(ctx.st, accountScope(ctx), ev.identifier)) return false;
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
    if (params[p] === undefined) return reply(ctx, 400, invalid('Missing required param: ' + p + '.', p, 'parameter_missing'));
  }
  for (const p of ['start_time', 'end_time']) {
    if (!/^[0-9]{1,12}$/.test(params[p])) {
      return reply(ctx, 400, invalid('Invalid integer: ' + params[p], p, 'parameter_invalid_integer'));
    }
  }
  const start = +params.start_time, end = +params.end_time;
  const g = params.value_grouping_window;
  if (g !== undefined && g !== 'day' && g !== 'hour') {
    return reply(ctx, 400, invalid('Invalid value_grouping_window: must be one of day or hour', 'value_grouping_window', 'parameter_invalid_string'));
  }
  const step = g === 'day' ? 86400 : g === 'hour' ? 3600 : 60;
  for (const [p, v] of [['start_time', start], ['end_time', end]]) {
    if (v % step !== 0) {
      const unit = g === 'day' ? 'day boundaries (midnight UTC)' : g === 'hour' ? 'hour boundaries' : 'minute boundaries';
      return reply(ctx, 400, invalid(p + ' must be aligned to ' + unit + '.', p, 'parameter_invalid_integer'));
    }
  }
  if (start >= end) {
    return reply(ctx, 400, invalid('start_time must be before end_time.', 'start_time', 'parameter_invalid_integer'));
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

module.exports = { handleSummaries };
