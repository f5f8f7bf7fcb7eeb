// faults.js: the fault names of config.faults and of script entries, the
// random draw among the configured rates, and the answers of the "pre"
// faults that answer before execution (nothing billed or stored). The
// "post" faults are applied where the answer is delivered (delivery.js;
// 500_after also where it is stored, idempotency.js).
'use strict';

const { stripeError, serverError500, rateLimitBody } = require('./stripe-errors');
const { reply, deliver } = require('./delivery');

// Faults that answer before endpoint execution (nothing billed, nothing
// stored for idempotency).
const PRE_FAULTS = new Set(['500', '503', '429', '409', 'timeout', 'reset',
  'html', 'malformed_json', 'huge']);
// Faults that let the request execute normally and then alter the delivery.
const POST_FAULTS = new Set(['500_after', 'reset_after', 'timeout_after',
  'truncated', 'slow', 'trickle', 'wrong_content_type']);
const FAULT_NAMES = new Set([...PRE_FAULTS, ...POST_FAULTS]);

// One draw over [name, rate] pairs, rates cumulative in config order.
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

module.exports = { PRE_FAULTS, FAULT_NAMES, pickFault, preFault };
