// config.js: the mock's configuration (GET/POST /__mock/config): the
// defaults, the type of every key and the check of a patch, and the sets
// derived from it for the request path (revoked and forbidden keys, revoked
// accounts, the fault rates). A meter configured by name gets a stable id.
'use strict';

const crypto = require('crypto');
const { FAULT_NAMES } = require('./faults');
const { ACCOUNT_RE } = require('./connect');

const DEFAULT_STRIPE_VERSION = '2026-09-30.endive';

function defaultConfig() {
  return {
    latency_ms: 0,
    latency_jitter_ms: 0,
    faults: {},
    slow_ms: 2000,
    huge_bytes: 20 * 1024 * 1024,
    huge_status: 200,
    trickle_interval_ms: 200,
    timeout_hold_ms: 120000,
    auth_phase: null,
    revoked_keys: [],
    // Connect accounts that revoked the platform's access: 403 account_invalid
    revoked_accounts: [],
    forbidden_keys: [],
    key_accounts: {},
    rate_limit_per_s: null,
    meters: {},
    strict_meters: false,
    any_customer: true,
    idempotency_ttl_s: 86400,
    identifier_ttl_s: 86400,
    timestamp_past_s: 35 * 86400,
    timestamp_future_s: 300,
    request_log_size: 10000,
    max_body_bytes: 1048576,
    default_stripe_version: DEFAULT_STRIPE_VERSION,
    down: false,
    session_ttl_s: 900,
    missing_customers: [],
    report_no_meter: false,
    cancel_window_s: 86400,
  };
}

// The id of a meter configured without one: stable across restarts.
function meterIdFor(name) {
  return 'mtr_' + crypto.createHash('sha1').update(name).digest('hex').slice(0, 24);
}

// The type of each key, checked by checkValue.
const CONFIG_TYPES = {
  latency_ms: 'nonneg', latency_jitter_ms: 'nonneg', slow_ms: 'nonneg',
  huge_bytes: 'nonneg', huge_status: 'status', trickle_interval_ms: 'nonneg',
  timeout_hold_ms: 'nonneg', faults: 'faults', auth_phase: 'auth_phase',
  revoked_keys: 'strarray', revoked_accounts: 'strarray', forbidden_keys: 'strarray', key_accounts: 'accounts',
  rate_limit_per_s: 'nullpos', meters: 'meters', strict_meters: 'bool',
  any_customer: 'bool', idempotency_ttl_s: 'nonneg', identifier_ttl_s: 'nonneg',
  timestamp_past_s: 'nonneg', timestamp_future_s: 'nonneg',
  request_log_size: 'count', max_body_bytes: 'posint',
  default_stripe_version: 'string', down: 'bool', session_ttl_s: 'posint',
  missing_customers: 'strarray', report_no_meter: 'bool', cancel_window_s: 'nonneg',
};

// [value] (normalized) or an error string.
function checkValue(type, k, v) {
  const num = typeof v === 'number' && Number.isFinite(v);
  switch (type) {
    case 'nonneg': return num && v >= 0 ? [v] : k + ' must be a number >= 0';
    case 'posint': return num && v >= 1 ? [Math.floor(v)] : k + ' must be an integer >= 1';
    case 'count': return num && v >= 0 && v <= 10000000 ? [Math.floor(v)] : k + ' must be an integer in 0..10000000';
    case 'status': return num && v >= 100 && v <= 599 ? [Math.floor(v)] : k + ' must be an HTTP status';
    case 'nullpos':
      if (v === null) return [null];
      return num && v >= 1 && v <= 10000000 ? [Math.floor(v)] : k + ' must be null or a number >= 1';
    case 'bool':
      if (v === true || v === false || v === 0 || v === 1) return [!!v];
      return k + ' must be a boolean';
    case 'string': return typeof v === 'string' && v.length > 0 ? [v] : k + ' must be a non-empty string';
    case 'auth_phase':
      if (v === null || v === '' || v === 0) return [null];
      if (String(v) === '401' || String(v) === '403') return [String(v)];
      return 'auth_phase must be null, "401" or "403"';
    case 'strarray':
      return Array.isArray(v) && v.every((x) => typeof x === 'string') ? [v.slice()] : k + ' must be an array of strings';
    case 'accounts': {
      if (!v || typeof v !== 'object' || Array.isArray(v)) return k + ' must be an object';
      for (const a of Object.values(v)) {
        if (typeof a !== 'string' || !ACCOUNT_RE.test(a)) return k + ' values must be acct_ ids';
      }
      return [Object.assign({}, v)];
    }
    case 'faults': {
      if (!v || typeof v !== 'object' || Array.isArray(v)) return 'faults must be an object of rates';
      const out = {};
      for (const [name, rate] of Object.entries(v)) {
        if (!FAULT_NAMES.has(name)) return 'unknown fault: ' + name;
        if (typeof rate !== 'number' || !(rate >= 0 && rate <= 1)) return 'fault rate for ' + name + ' must be in [0,1]';
        out[name] = rate;
      }
      return [out];
    }
    case 'meters': {
      if (!v || typeof v !== 'object' || Array.isArray(v)) return 'meters must be an object';
      const out = {};
      for (const [name, m] of Object.entries(v)) {
        if (!m || typeof m !== 'object') return 'meter ' + name + ' must be an object';
        const status = m.status === undefined ? 'active' : m.status;
        if (status !== 'active' && status !== 'inactive') return 'meter status must be active or inactive';
        const ck = m.customer_key === undefined ? 'stripe_customer_id' : m.customer_key;
        const vk = m.value_key === undefined ? 'value' : m.value_key;
        if (typeof ck !== 'string' || !ck || typeof vk !== 'string' || !vk) return 'meter keys must be non-empty strings';
        const formula = m.formula === undefined ? 'sum' : m.formula;
        if (!['sum', 'count', 'last'].includes(formula)) return 'meter formula must be sum, count or last';
        const id = m.id === undefined ? meterIdFor(name) : m.id;
        if (typeof id !== 'string' || !/^mtr_[A-Za-z0-9]+$/.test(id)) return 'meter id must look like mtr_...';
        out[name] = { customer_key: ck, value_key: vk, status, id, formula };
      }
      return [out];
    }
    default: return 'bad type';
  }
}

// The config after a patch (top-level keys replace), or an error string.
function mergeConfig(config, patch) {
  if (!patch || typeof patch !== 'object' || Array.isArray(patch)) return 'config must be a JSON object';
  const next = Object.assign({}, config);
  for (const [k, v] of Object.entries(patch)) {
    const type = CONFIG_TYPES[k];
    if (!type) return 'unknown config key: ' + k;
    const r = checkValue(type, k, v);
    if (typeof r === 'string') return r;
    next[k] = r[0];
  }
  return next;
}

function deriveConfig(cfg) {
  const faults = [];
  for (const [name, rate] of Object.entries(cfg.faults)) {
    if (rate > 0) faults.push([name, rate]);
  }
  return {
    revoked: new Set(cfg.revoked_keys),
    revokedAccounts: new Set(cfg.revoked_accounts),
    forbidden: new Set(cfg.forbidden_keys),
    faults,
  };
}

module.exports = { defaultConfig, mergeConfig, deriveConfig };
