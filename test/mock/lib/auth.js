// auth.js: API key authentication (every endpoint but the v2 stream, whose
// session token is checked in v2-meter-event-sessions.js): Bearer or Basic,
// the key's shape, revoked and forbidden keys and config.auth_phase, with
// Stripe's 401 and 403 answers. Sets the key, mode and account on ctx.
'use strict';

const { stripeError, maskKey } = require('./stripe-errors');
const { reply } = require('./delivery');
const { PLATFORM_ACCOUNT } = require('./connect');

const KEY_RE = /^(sk|rk)_(test|live)_[A-Za-z0-9]{8,}$/;

// `derived` is the config's derived sets (revoked, forbidden keys).
function authenticate(ctx, derived) {
  const st = ctx.st, cfg = ctx.cfg;
  const h = ctx.headers.authorization;
  let key = null;
  if (h) {
    const m = /^\s*([A-Za-z]+)\s+(.*?)\s*$/.exec(h);
    if (m) {
      const scheme = m[1].toLowerCase();
      if (scheme === 'bearer') key = m[2];
      else if (scheme === 'basic') {
        const dec = Buffer.from(m[2], 'base64').toString('utf8');
        const c = dec.indexOf(':');
        key = c < 0 ? dec : dec.slice(0, c);
      }
    }
  }
  if (!key) {
    st.stats.auth_errors++;
    reply(ctx, 401, stripeError('invalid_request_error',
      "You did not provide an API key. You need to provide your API key in the Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for details, or we can help at https://support.stripe.com/."),
      { 'WWW-Authenticate': 'Basic realm="Stripe"' });
    return false;
  }
  if (!KEY_RE.test(key) || derived.revoked.has(key) || cfg.auth_phase === '401') {
    st.stats.auth_errors++;
    reply(ctx, 401, stripeError('invalid_request_error', 'Invalid API Key provided: ' + maskKey(key)),
      { 'WWW-Authenticate': 'Basic realm="Stripe"' });
    return false;
  }
  const keyAccount = cfg.key_accounts[key] || PLATFORM_ACCOUNT;
  if (cfg.auth_phase === '403' || derived.forbidden.has(key)) {
    st.stats.auth_errors++;
    const body = key.startsWith('rk_')
      ? stripeError('invalid_request_error',
        "The provided key '" + maskKey(key) + "' does not have the required permissions for this endpoint on account '" +
        keyAccount + "'. Having the 'rak_billing_meter_event_write' permission would allow this request to continue.")
      : stripeError('invalid_request_error',
        'This API call cannot be made with a publishable API key or a key lacking permission. Please use a secret API key with access to this resource.',
        { code: 'secret_key_required' });
    reply(ctx, 403, body);
    return false;
  }
  ctx.apiKey = key;
  ctx.livemode = key.indexOf('_live_') >= 0;
  ctx.mode = ctx.livemode ? 'live' : 'test';
  ctx.keyAccount = keyAccount;
  return true;
}

// The key (or session token) of an Authorization header, or null.
function bearerKey(h) {
  if (!h) return null;
  const m = /^\s*([A-Za-z]+)\s+(.*?)\s*$/.exec(h);
  if (!m) return null;
  if (m[1].toLowerCase() === 'bearer') return m[2];
  if (m[1].toLowerCase() === 'basic') return Buffer.from(m[2], 'base64').toString('utf8').split(':')[0];
  return null;
}

module.exports = { authenticate, bearerKey };
