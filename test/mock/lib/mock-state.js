// mock-state.js: the mock's one mutable object, `current`: the config, the
// sets derived from it, and the state (stats, billed events, idempotency
// store, identifiers, sessions, scripts, request log...). POST
// /__mock/reset replaces config and state wholesale, so modules read
// current.config / current.state when a request starts, never at load.
'use strict';

const { defaultConfig, mergeConfig, deriveConfig } = require('./config');
const { resizeLog } = require('./request-log');
const { dropStripeSockets } = require('./connections');

function newStats() {
  return {
    requests: 0,
    by_status: {},
    billed: 0,
    duplicate_identifier_attempts: 0,
    concurrency_violations: 0,
    replays: 0,
    idempotency_conflicts: 0,
    idempotency_mismatches: 0,
    rate_limited: 0,
    validation_errors: 0,
    auth_errors: 0,
    scripted: 0,
    faults_injected: {},
    max_in_flight: 0,
    in_flight: 0,
    client_aborts: 0,
    dropped_while_down: 0,
    tls_handshake_failures: 0,
    // connections accepted on the API port, by protocol once negotiated
    // (h2 sessions; http/1.1 sockets, plain or TLS)
    connections_accepted: 0,
    connections_h2: 0,
    connections_http1: 0,
    // Stripe requests by protocol, the connections that carried any, and
    // the most carried at once by one connection (concurrent streams)
    requests_h2: 0,
    requests_http1: 0,
    connections_with_requests: 0,
    max_streams_per_connection: 0,
    distinct_idempotency_keys_per_identifier_max: 0,
    identifiers_billed_under_multiple_keys: 0,
    identifiers_billed_multiple_times: 0,
    sessions_created: 0,
    session_expired_rejections: 0,
    session_token_rejections: 0,
    stream_requests: 0,
    stream_events: 0,
    stream_max_batch: 0,
    stream_duplicates_dropped: 0,
    async_errors: 0,
  };
}

function newState(cfg) {
  return {
    stats: newStats(),
    events: [],
    // key account|mode|Stripe-Account -> Map(Idempotency-Key -> IdemEntry),
    // inner maps in creation order (pruned from the front).
    idem: new Map(),
    idemCount: 0,
    // account|mode -> Map(identifier -> IdentInfo); permanent until reset.
    idents: new Map(),
    slots: new Set(),       // account|mode|customer|event_name being processed
    rl: new Map(),          // account|mode -> {buf, i}
    scripts: [],
    sessions: new Map(),    // v2 session token -> MeterEventSession
    asyncErrors: [],        // v2 events refused after acceptance
    log: new Array(cfg.request_log_size),
    logPos: 0,
    logCount: 0,
  };
}

const current = { config: null, derived: null, state: null };

// Validate and merge a config patch. Returns an error string or null.
function applyConfig(patch) {
  const next = mergeConfig(current.config, patch);
  if (typeof next === 'string') return next;
  const wasDown = current.config.down;
  const oldLog = current.config.request_log_size;
  current.config = next;
  current.derived = deriveConfig(next);
  if (next.request_log_size !== oldLog) resizeLog(current.state, next.request_log_size);
  if (next.down && !wasDown) dropStripeSockets();
  return null;
}

// The default config and a new, empty state. Switching `down` off this
// way needs nothing more: connections are accepted again.
function reset() {
  current.config = defaultConfig();
  current.derived = deriveConfig(current.config);
  current.state = newState(current.config);
}

reset();

module.exports = { current, applyConfig, reset };
