// control-api.js: the control API the tests drive the mock with
// (/__mock/...: health, config, reset, script, stats, events, requests,
// sessions, expire_sessions, async_errors, lifecycle); JSON in and out, no
// auth, never faulted, logged or counted. Its requests keep their connection
// when `down` drops the others.
'use strict';

const { current, applyConfig, reset } = require('./mock-state');
const { sockets, holdForControl } = require('./connections');
const { recentLog } = require('./request-log');
const { validateScript } = require('./scripts');
const { sessionInfo, expireSessions } = require('./v2-meter-event-sessions');
const { lifecycleView } = require('./lifecycle-records');

function sendJson(res, status, obj) {
  const body = JSON.stringify(obj);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
}

function controlStats(query) {
  const st = current.state;
  // ?gc=1 forces a collection first when node runs with --expose-gc.
  if (query.get('gc') === '1' && typeof global.gc === 'function') global.gc();
  const mem = process.memoryUsage();
  return Object.assign({}, st.stats, {
    memory: { rss: mem.rss, heap_used: mem.heapUsed },
    by_status: Object.assign({}, st.stats.by_status),
    faults_injected: Object.assign({}, st.stats.faults_injected),
    events_stored: st.events.length,
    idempotency_keys_stored: st.idemCount,
    scripts_remaining: st.scripts.length,
    open_connections: sockets.size,
  });
}

function onControl(req, res, path, query) {
  holdForControl(req, res);
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('error', () => {});
  req.on('end', () => {
    const raw = Buffer.concat(chunks).toString('utf8');
    let json;
    const needJson = () => {
      if (json !== undefined) return true;
      try { json = raw.length ? JSON.parse(raw) : {}; return true; } catch (e) {
        sendJson(res, 400, { error: 'invalid JSON body: ' + e.message });
        return false;
      }
    };
    const route = req.method + ' ' + path;
    switch (route) {
      case 'GET /__mock/health':
        return sendJson(res, 200, { ok: true });
      case 'GET /__mock/stats':
        return sendJson(res, 200, controlStats(query));
      case 'GET /__mock/events': {
        let data = current.state.events;
        const ident = query.get('identifier');
        const en = query.get('event_name');
        if (ident !== null) data = data.filter((e) => e.identifier === ident);
        if (en !== null) data = data.filter((e) => e.event_name === en);
        const offset = parseInt(query.get('offset') || '0', 10) || 0;
        const limit = query.get('limit') !== null ? parseInt(query.get('limit'), 10) : null;
        if (offset > 0 || limit !== null) data = data.slice(offset, limit !== null ? offset + limit : undefined);
        return sendJson(res, 200, { data });
      }
      case 'GET /__mock/requests': {
        const limit = query.get('limit') !== null ? parseInt(query.get('limit'), 10) : 100;
        return sendJson(res, 200, { data: recentLog(current.state, Math.max(0, limit || 0)) });
      }
      case 'GET /__mock/config':
        return sendJson(res, 200, current.config);
      case 'POST /__mock/config': {
        if (!needJson()) return;
        const err = applyConfig(json);
        if (err) return sendJson(res, 400, { error: err });
        return sendJson(res, 200, current.config);
      }
      case 'POST /__mock/reset': {
        reset();
        return sendJson(res, 200, { ok: true });
      }
      case 'GET /__mock/script':
        return sendJson(res, 200, { data: current.state.scripts });
      case 'GET /__mock/sessions':
        return sendJson(res, 200, { data: [...current.state.sessions.values()].map(sessionInfo) });
      case 'POST /__mock/expire_sessions': {
        if (!needJson()) return;
        return sendJson(res, 200, { expired: expireSessions(current.state, json && json.account) });
      }
      case 'GET /__mock/async_errors':
        return sendJson(res, 200, { data: current.state.asyncErrors });
      case 'GET /__mock/lifecycle':
        return sendJson(res, 200, lifecycleView(current.state));
      case 'POST /__mock/script': {
        if (!needJson()) return;
        const list = validateScript(json);
        if (typeof list === 'string') return sendJson(res, 400, { error: list });
        if (query.get('append') === '1' || query.get('append') === 'true') current.state.scripts.push(...list);
        else current.state.scripts = list;
        return sendJson(res, 200, { data: current.state.scripts });
      }
      default:
        return sendJson(res, 404, { error: 'unknown control endpoint: ' + route });
    }
  });
}

module.exports = { onControl };
