// adjustments.js: POST /v1/billing/meter_event_adjustments, the
// cancellation of a billed event by identifier: form body, idempotent like
// meter events, refused when no such event, already cancelled, or past
// cancel_window_s. A cancelled event leaves the event summaries.
'use strict';

const { invalid } = require('./stripe-errors');
const { isMediaForm } = require('./media-types');
const { parseForm } = require('./form');
const { canon, executeIdempotent } = require('./idempotency');
const { reply } = require('./delivery');
const { accountScope } = require('./connect');
const { life } = require('./lifecycle-records');

// POST /v1/billing/meter_event_adjustments
const ADJUSTMENT_PARAMS = new Set(['event_name', 'type', 'cancel', 'expand']);

function handleAdjustments(ctx) {
  const st = ctx.st, cfg = ctx.cfg;
  if (!isMediaForm(ctx.headers['content-type'])) {
    st.stats.validation_errors++;
    return reply(ctx, 400, invalid('Invalid request: unsupported Content-Type ' + (ctx.headers['content-type'] || '(none)') +
      '. This endpoint expects application/x-www-form-urlencoded.'));
  }
  const p = parseForm(ctx.raw);
  if (p.error) { st.stats.validation_errors++; return reply(ctx, 400, p.error); }
  const params = p.params;
  const bad = (e) => { st.stats.validation_errors++; reply(ctx, 400, e); };
  for (const k of Object.keys(params)) {
    if (!ADJUSTMENT_PARAMS.has(k)) return bad(invalid('Received unknown parameter: ' + k, k, 'parameter_unknown'));
  }
  const en = params.event_name;
  if (en === undefined) return bad(invalid('Missing required param: event_name.', 'event_name', 'parameter_missing'));
  if (typeof en !== 'string' || en === '') return bad(invalid('Invalid event_name.', 'event_name', 'parameter_invalid_empty'));
  if (en.length > 100) return bad(invalid('Invalid string: ' + en.slice(0, 100) + '...; must be at most 100 characters', 'event_name', 'string_too_long'));
  if (params.type === undefined) return bad(invalid('Missing required param: type.', 'type', 'parameter_missing'));
  if (params.type !== 'cancel') return bad(invalid('Invalid type: must be one of cancel', 'type', 'parameter_invalid_string'));
  const c = params.cancel;
  if (c === undefined || typeof c !== 'object' || Array.isArray(c)) {
    return bad(invalid('Missing required param: cancel[identifier].', 'cancel[identifier]', 'parameter_missing'));
  }
  for (const k of Object.keys(c)) {
    if (k !== 'identifier') return bad(invalid('Received unknown parameter: cancel[' + k + ']', 'cancel[' + k + ']', 'parameter_unknown'));
  }
  const ident = c.identifier;
  if (ident === undefined) return bad(invalid('Missing required param: cancel[identifier].', 'cancel[identifier]', 'parameter_missing'));
  if (typeof ident !== 'string' || ident === '') return bad(invalid('Invalid cancel[identifier].', 'cancel[identifier]', 'parameter_invalid_empty'));
  if (ident.length > 100) return bad(invalid('Invalid string: cancel[identifier]; must be at most 100 characters', 'cancel[identifier]', 'string_too_long'));

  executeIdempotent(ctx, canon(params), null, null, () => {
    const scope = accountScope(ctx);
    let ev = null;
    for (let i = st.events.length - 1; i >= 0; i--) {
      const e = st.events[i];
      if (e.identifier === ident && e.event_name === en && e.account + '|' + (e.livemode ? 'live' : 'test') === scope) { ev = e; break; }
    }
    const err = (msg, code) => ({ status: 400, headers: null, body: JSON.stringify(invalid(msg, 'cancel[identifier]', code)) });
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

module.exports = { handleAdjustments };
