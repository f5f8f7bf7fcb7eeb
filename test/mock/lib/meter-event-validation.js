// meter-event-validation.js: the rules a meter event must meet, with
// Stripe's v1 400 bodies: parameters, lengths in characters, the timestamp
// window, the meter (strict_meters, inactive), and the customer and value
// keys of the payload. API v1 answers with the error at once; the v2
// stream checks the same rules after accepting and reports failures
// asynchronously.
'use strict';

const { invalid } = require('./stripe-errors');
const { asArray } = require('./form');

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

module.exports = { validateMeterEvent };
