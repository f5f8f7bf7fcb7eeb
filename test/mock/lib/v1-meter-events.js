// v1-meter-events.js: POST /v1/billing/meter_events, the endpoint
// stripe_meter delivers to: form body, validation, then execution under
// the idempotency rules and the one-call-per-customer-and-meter rule, and
// at decision time Stripe's identifier uniqueness check and the billing.
'use strict';

const crypto = require('crypto');
const { keepStr, intern } = require('./kept-strings');
const { stripeError, invalid } = require('./stripe-errors');
const { isMediaForm } = require('./media-types');
const { parseForm } = require('./form');
const { validateMeterEvent } = require('./meter-event-validation');
const { canon, executeIdempotent } = require('./idempotency');
const { reply } = require('./delivery');
const { EventRecord, identInfo, billedWithin, trackKey, keptPayload, recordBilled, noteSuccessKey,
  meterEventBody } = require('./ledger');

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
  // One call at a time per customer and meter (Stripe's 429).
  const lockKey = ctx.account + '|' + v.customer + '|' + v.event_name;
  // the canonical parameters only serve the idempotency check
  executeIdempotent(ctx, ctx.idemKey === undefined ? '' : canon(p.params), lockKey,
    'Cannot create multiple usage events for the same customer, meter concurrently.',
    (c) => decideMeterEvent(c, v));
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
    info = identInfo(st, ctx.account, identifier);
    trackKey(st, info, ctx.idemKey);
    if (billedWithin(info, now, cfg.identifier_ttl_s)) {
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
  const payload = keptPayload(v.payload);
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
  recordBilled(st, ev, info, now);
  if (info) noteSuccessKey(st, info, ctx.idemKey === undefined ? null : ctx.idemKey);
  return { status: 200, headers: null, body: meterEventBody(ev), ev };
}

module.exports = { handleMeterEvents };
