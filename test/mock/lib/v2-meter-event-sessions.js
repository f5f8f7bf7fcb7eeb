// v2-meter-event-sessions.js: API v2's POST /v2/billing/meter_event_session,
// which trades an API key for a short-lived token (session_ttl_s), and the
// check of that token on the stream (401 unknown or expired). Sessions are
// kept in st.sessions; the control API lists and expires them.
'use strict';

const { randId } = require('./ids');
const { v2Error } = require('./stripe-errors');
const { isMediaJson } = require('./media-types');
const { bearerKey } = require('./auth');
const { executeIdempotent } = require('./idempotency');
const { reply } = require('./delivery');

class MeterEventSession {
  constructor(id, token, account, stripeAccount, keyAccount, mode, apiKey, created, expiresAt) {
    this.id = id;
    this.token = token;
    this.account = account;          // account|mode, as ctx.account
    this.stripeAccount = stripeAccount;
    this.keyAccount = keyAccount;
    this.mode = mode;
    this.apiKey = apiKey;
    this.created = created;          // ms
    this.expiresAt = expiresAt;      // ms
    this.expired = false;            // expired on demand
  }
}

// A session as GET /__mock/sessions shows it (no token).
function sessionInfo(s) {
  return { id: s.id, account: s.stripeAccount || s.keyAccount, livemode: s.mode === 'live',
    created: new Date(s.created).toISOString(), expires_at: new Date(s.expiresAt).toISOString(),
    expired: s.expired || Date.now() >= s.expiresAt };
}

// Expire every session (or those of one account) now; returns how many.
function expireSessions(st, account) {
  let n = 0;
  for (const s of st.sessions.values()) {
    if (s.expired || (account && (s.stripeAccount || s.keyAccount) !== account)) continue;
    s.expired = true;
    n++;
  }
  return n;
}

// Session token authentication for the stream.
function authenticateSession(ctx) {
  const st = ctx.st;
  const token = bearerKey(ctx.headers.authorization);
  const s = token ? st.sessions.get(token) : undefined;
  if (!s) {
    st.stats.session_token_rejections++;
    reply(ctx, 401, v2Error('invalid_authentication_token',
      'The provided authentication token is not valid for the meter event stream. Create a meter event session with POST /v2/billing/meter_event_session and use its authentication_token.',
      'invalid_request_error'));
    return false;
  }
  if (s.expired || Date.now() >= s.expiresAt) {
    st.stats.session_expired_rejections++;
    reply(ctx, 401, v2Error('billing_meter_event_session_expired',
      'The meter event session has expired. Create a new meter event session.',
      'temporary_session_expired', 'https://docs.stripe.com/api/v2/billing/meter-event-stream/session'));
    return false;
  }
  ctx.apiKey = s.apiKey;
  ctx.livemode = s.mode === 'live';
  ctx.mode = s.mode;
  ctx.keyAccount = s.keyAccount;
  ctx.stripeAccount = s.stripeAccount;
  ctx.session = s;
  return true;
}

function handleMeterEventSession(ctx) {
  const st = ctx.st;
  const ct = ctx.headers['content-type'];
  let params = {};
  if (ctx.raw.length > 0) {
    if (!isMediaJson(ct)) {
      st.stats.validation_errors++;
      return reply(ctx, 400, v2Error('invalid_request', 'Invalid request: API v2 expects a JSON body (Content-Type: application/json).', 'invalid_request_error'));
    }
    try { params = JSON.parse(ctx.raw); } catch (e) {
      st.stats.validation_errors++;
      return reply(ctx, 400, v2Error('invalid_request', 'Invalid JSON body.', 'invalid_request_error'));
    }
    if (!params || typeof params !== 'object' || Array.isArray(params)) {
      st.stats.validation_errors++;
      return reply(ctx, 400, v2Error('invalid_request', 'The request body must be a JSON object.', 'invalid_request_error'));
    }
    const extra = Object.keys(params);
    if (extra.length > 0) {
      st.stats.validation_errors++;
      return reply(ctx, 400, v2Error('parameter_unknown', 'Received unknown parameter: ' + extra[0], 'invalid_request_error'));
    }
  }
  executeIdempotent(ctx, '{}', null, null, (c) => {
    const now = Date.now();
    const s = new MeterEventSession(randId('bmes_', 24), randId('bmest_' + c.mode + '_', 40), c.account,
      c.stripeAccount, c.keyAccount, c.mode, c.apiKey, now, now + c.cfg.session_ttl_s * 1000);
    c.st.sessions.set(s.token, s);
    c.st.stats.sessions_created++;
    return { status: 200, headers: null, body: JSON.stringify({
      id: s.id, object: 'v2.billing.meter_event_session', authentication_token: s.token,
      created: new Date(s.created).toISOString(), expires_at: new Date(s.expiresAt).toISOString(),
      livemode: c.livemode }) };
  });
}

module.exports = { sessionInfo, expireSessions, authenticateSession, handleMeterEventSession };
