// stripe-errors.js: the error bodies the mock answers with, in Stripe's
// shapes: API v1's {"error":{type, code, doc_url, message, param}}, the v2
// meter event session and stream's {"error":{code, message, type, doc_url}},
// GET /v2/core/events' {"error":{type, code, message}}, and the canned
// answers several places send (an unknown 500, a rate limit). Key order is
// part of the answer: clients and tests see these bytes.
'use strict';

function hyphenate(code) { return code.replace(/_/g, '-'); }

// Stripe-shaped error body (v1).
function stripeError(type, message, extra) {
  const e = { type };
  if (extra && extra.code) {
    e.code = extra.code;
    e.doc_url = 'https://stripe.com/docs/error-codes/' + hyphenate(extra.code);
  }
  e.message = message;
  if (extra && extra.param !== undefined) e.param = extra.param;
  if (extra && extra.request_log_url) e.request_log_url = extra.request_log_url;
  return { error: e };
}

function invalid(message, param, code) {
  return stripeError('invalid_request_error', message, { param, code });
}

// An API key as Stripe shows it in error messages: sk_test_****1234.
function maskKey(key) {
  const m = /^[a-z]+_(?:test|live)_/.exec(key);
  const prefix = m ? m[0] : '';
  return prefix + '****' + key.slice(-4);
}

// The 500 of the 500 and 500_after faults, as a whole answer (body as text).
function serverError500() {
  return {
    status: 500,
    headers: { 'Stripe-Should-Retry': 'true' },
    body: JSON.stringify(stripeError('api_error',
      'An unknown error occurred while processing your request. Please try again; if the problem persists, contact support.')),
  };
}

// The 429 body of rate_limit_per_s and of the 429 fault.
function rateLimitBody() {
  return stripeError('invalid_request_error',
    'Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.',
    { code: 'rate_limit' });
}

// API v2 error body: {"error":{"type"?,"code","message","doc_url"?}}.
function v2Error(code, message, type, docUrl) {
  const e = { code, message };
  if (type) e.type = type;
  if (docUrl) e.doc_url = docUrl;
  return { error: e };
}

// GET /v2/core/events' error body (its "type" differs from the stream's).
function v2EventsError(code, message) {
  return { error: { type: 'invalid_request', code, message } };
}

module.exports = { stripeError, invalid, maskKey, serverError500, rateLimitBody, v2Error, v2EventsError };
