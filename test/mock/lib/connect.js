// connect.js: Stripe Connect accounts. Every key belongs to an account (the
// platform's unless config.key_accounts says otherwise); a Stripe-Account
// header makes the request act on a connected account, refused with 403
// account_invalid when malformed or in config.revoked_accounts. Events,
// identifiers, idempotency keys, rate limits and concurrency slots are all
// scoped by account and mode (accountScope).
'use strict';

const { stripeError, maskKey } = require('./stripe-errors');
const { reply } = require('./delivery');

const PLATFORM_ACCOUNT = 'acct_1MockPlatform00000';
const ACCOUNT_RE = /^acct_[A-Za-z0-9]+$/;

// The scope of a request's records: "acct_...|test" (or |live), the
// Stripe-Account if given, else the key's account.
function accountScope(ctx) {
  return (ctx.stripeAccount || ctx.keyAccount) + '|' + ctx.mode;
}

// The Stripe-Account header of an authenticated request: sets
// ctx.stripeAccount (null without the header), or answers 403
// account_invalid and returns false.
function checkStripeAccount(ctx, revokedAccounts) {
  const st = ctx.st;
  const sa = ctx.headers['stripe-account'];
  if (sa !== undefined) {
    if (!ACCOUNT_RE.test(sa) || revokedAccounts.has(sa)) {
      st.stats.auth_errors++;
      reply(ctx, 403, stripeError('invalid_request_error',
        "The provided key '" + maskKey(ctx.apiKey) + "' does not have access to account '" + sa +
        "' (or that account does not exist). Application access may have been revoked.",
        { code: 'account_invalid' }));
      return false;
    }
    ctx.stripeAccount = sa;
  } else {
    ctx.stripeAccount = null;
  }
  return true;
}

module.exports = { PLATFORM_ACCOUNT, ACCOUNT_RE, accountScope, checkStripeAccount };
