// meters.js: GET /v1/billing/meters and GET /v1/billing/meters/{id}: the
// meters of config.meters as billing.meter objects (stable ids and
// creation times, the last configured being the newest).
'use strict';

const { invalid } = require('./stripe-errors');
const { reply } = require('./delivery');
const { v1Query, listLimit, page } = require('./list-query');

const METER_TS_BASE = 1767225600; // 2026-01-01, "created" of the first meter

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

// GET /v1/billing/meters
function handleListMeters(ctx) {
  const params = v1Query(ctx, new Set(['limit', 'starting_after', 'ending_before', 'status', 'expand']));
  if (!params) return;
  const limit = listLimit(ctx, params);
  if (limit === null) return;
  let all = meterList(ctx);
  if (params.status !== undefined) {
    if (params.status !== 'active' && params.status !== 'inactive') {
      return reply(ctx, 400, invalid('Invalid status: must be one of active or inactive', 'status', 'parameter_invalid_string'));
    }
    all = all.filter((m) => m.status === params.status);
  }
  page(ctx, all, params, limit, '/v1/billing/meters', 'billing meter');
}

function findMeter(ctx, id) {
  return meterList(ctx).find((m) => m.id === id) || null;
}

function noSuchMeter(ctx, id) {
  reply(ctx, 404, invalid("No such billing meter: '" + id + "'", 'id', 'resource_missing'));
}

// GET /v1/billing/meters/{id}
function handleGetMeter(ctx, id) {
  const params = v1Query(ctx, new Set(['expand']));
  if (!params) return;
  const m = findMeter(ctx, id);
  if (!m) return noSuchMeter(ctx, id);
  reply(ctx, 200, m);
}

module.exports = { findMeter, noSuchMeter, handleListMeters, handleGetMeter };
