// connections.js: the connections of the mock's listeners: each accepted
// TCP socket gets a record (its id, the Stripe requests and control
// requests it carries now); the raw sockets are counted in the stats
// (open_connections), dropped when `down` is switched on (all but those
// carrying a control request), destroyed at shutdown. A request finds its
// record with connOf(); the faults that break a request off go through
// resetRequest() / abortRequest(), which act on the request's HTTP/2 stream
// under h2 (RST_STREAM; the session and its other streams live on) and on
// the connection under HTTP/1.1.
'use strict';

const { constants: h2c } = require('http2');

// The raw TCP sockets of every listener, while open.
const sockets = new Set();

const kConn = Symbol('stripe-mock connection');
let nextId = 1;

// One accepted TCP connection. stripe and control count the requests of
// each kind it carries now; countedBy is the state object
// (mock-state.js) whose stats last counted it as carrying a Stripe request,
// so a reset starts the count of connections used afresh.
class Conn {
  constructor(raw) {
    this.id = nextId++;
    this.raw = raw;
    this.stripe = 0;
    this.control = 0;
    this.countedBy = null;
  }
}

// Keep a listener's raw sockets in `sockets` while they are open, each with
// its record; onAccept(conn) is called for each new one.
function trackConnections(server, onAccept) {
  server.on('connection', (s) => {
    const c = new Conn(s);
    s[kConn] = c;
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    if (onAccept) onAccept(c);
  });
}

// The record of a TLS socket or of an HTTP/2 session's socket: that of the
// raw socket under it. (A TLS server's sockets wrap the raw socket the
// 'connection' event saw, as _parent.)
function connOfTls(tls) {
  let c = tls[kConn];
  if (c === undefined) {
    const raw = tls._parent;
    c = (raw && raw[kConn]) || new Conn(raw || null);
    tls[kConn] = c;
  }
  return c;
}

// Link an HTTP/2 session to its connection's record.
function linkSession(session) {
  const c = connOfTls(session.socket);
  session[kConn] = c;
  return c;
}

function isH2(req) {
  return req.httpVersionMajor === 2;
}

// The connection a request came on: the HTTP/2 session's, else the socket's
// (the raw socket in plain http, the TLS socket in https).
function connOf(req) {
  if (isH2(req)) {
    const s = req.stream.session;
    return s[kConn] || linkSession(s);
  }
  const sock = req.socket;
  return sock[kConn] || connOfTls(sock);
}

// A control request keeps its connection from being dropped by `down`
// until it is answered.
function holdForControl(req, res) {
  const c = connOf(req);
  c.control++;
  res.on('close', () => { c.control--; });
}

// `down` switched on: every connection goes, HTTP/2 sessions with all their
// streams, except those carrying a control request.
function dropStripeSockets() {
  for (const s of sockets) {
    const c = s[kConn];
    if (!c || c.control === 0) s.destroy();
  }
}

function resetSocket(sock) {
  if (!sock || sock.destroyed) return;
  if (typeof sock.resetAndDestroy === 'function') {
    try { sock.resetAndDestroy(); return; } catch (e) { /* fall through */ }
  }
  sock.destroy();
}

// A Stripe request stops counting among its connection's requests (the
// streams open on it) when the mock ends its answer or breaks it off, not
// when node reports the request closed: the client may already have opened
// the next stream (or sent the next HTTP/1.1 request) by then. Idempotent.
function releaseConn(ctx) {
  if (ctx.onConn) { ctx.onConn = false; ctx.conn.stripe--; }
}

// Close a request's HTTP/2 stream with RST_STREAM INTERNAL_ERROR (never
// REFUSED_STREAM, which tells the client the request was not processed and
// may be retried as is).
function resetStream(req) {
  const stream = req.stream;
  if (stream && !stream.closed && !stream.destroyed) stream.close(h2c.NGHTTP2_INTERNAL_ERROR);
}

// The reset faults: RST_STREAM under h2; a TCP reset of the connection
// under HTTP/1.1 (the raw socket's, so it is a real RST in https too).
function resetRequest(ctx) {
  releaseConn(ctx);
  if (ctx.h2) return resetStream(ctx.req);
  resetSocket(ctx.conn.raw || ctx.req.socket);
}

// Break a request off without an answer (a held request's end, a truncated
// answer's end, a request while `down`): RST_STREAM under h2; the
// connection closed under HTTP/1.1.
function abortRequest(ctx) {
  releaseConn(ctx);
  if (ctx.h2) return resetStream(ctx.req);
  ctx.req.socket.destroy();
}

module.exports = {
  sockets, trackConnections, connOf, isH2, holdForControl,
  dropStripeSockets, releaseConn, resetRequest, abortRequest,
};
