// server.js: the listeners. Plain http (HTTP/1.1), or TLS (--tls-cert/
// --tls-key) offering h2 and http/1.1 through ALPN as Stripe does (only
// http/1.1 with --http1-only; --h2-max-streams sets HTTP/2's
// SETTINGS_MAX_CONCURRENT_STREAMS), with a second, plain http listener for
// the control API; keep-alive timeouts, malformed requests, TLS handshake
// failures; the connection counts of the stats; the split between the
// control API (/__mock/) and Stripe's; shutdown on SIGTERM/SIGINT or, with
// --parent-watch, when stdin closes; and the {"listening":PORT} line.
'use strict';

const http = require('http');
const fs = require('fs');
const { current } = require('./mock-state');
const { sockets, trackConnections } = require('./connections');
const { onControl } = require('./control-api');
const { onStripeRequest } = require('./request-pipeline');

// HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS unless --h2-max-streams says:
// 100, the least RFC 9113 recommends and a common server default (Stripe's
// own value is not documented).
const DEFAULT_H2_MAX_STREAMS = 100;

function onRequest(req, res) {
  const url = req.url;
  const q = url.indexOf('?');
  const path = q < 0 ? url : url.slice(0, q);
  if (path.startsWith('/__mock/')) {
    return onControl(req, res, path, new URLSearchParams(q < 0 ? '' : url.slice(q + 1)));
  }
  onStripeRequest(req, res, path);
}

// The TLS listener: HTTP/2 with an HTTP/1.1 fallback (ALPN h2, http/1.1;
// a client offering no ALPN gets HTTP/1.1), or HTTP/1.1 alone (ALPN
// http/1.1 only).
function tlsServer(opts, tls, http1Only, h2MaxStreams) {
  const creds = { cert: fs.readFileSync(tls.cert), key: fs.readFileSync(tls.key) };
  if (http1Only) {
    return require('https').createServer({ ...opts, ...creds, ALPNProtocols: ['http/1.1'] }, onRequest);
  }
  return require('http2').createSecureServer({
    ...opts, ...creds, allowHTTP1: true,
    settings: { maxConcurrentStreams: h2MaxStreams },
  }, onRequest);
}

// Listen as the command line says ({port, host, parentWatch, tlsCert,
// tlsKey, controlPort, http1Only, h2MaxStreams}; host already checked to be
// loopback).
function start({ port, host, parentWatch, tlsCert, tlsKey, controlPort, http1Only, h2MaxStreams }) {
  // TLS mode: the API is served over TLS, and a second, plain http
  // listener (--control-port) serves the same handler for the control API.
  const opts = { noDelay: true, keepAlive: true };
  const server = tlsCert === null ? http.createServer(opts, onRequest)
    : tlsServer(opts, { cert: tlsCert, key: tlsKey }, http1Only,
      h2MaxStreams === null || h2MaxStreams === undefined ? DEFAULT_H2_MAX_STREAMS : h2MaxStreams);
  const control = tlsCert === null ? null : http.createServer(opts, onRequest);
  // HTTP/1.1 connections (the TLS fallback included) close after 65 s idle;
  // HTTP/2 sessions are not closed when idle.
  server.keepAliveTimeout = 65000;
  server.headersTimeout = 66000;
  server.requestTimeout = 0;
  // Every connection accepted on the API port is counted; in plain http it
  // is HTTP/1.1 at once, in TLS once ALPN has chosen.
  trackConnections(server, () => {
    const stats = current.state.stats;
    stats.connections_accepted++;
    if (tlsCert === null) stats.connections_http1++;
  });
  server.on('clientError', (err, socket) => {
    if (socket.writable && !socket.destroyed) {
      try { socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n'); } catch (e) { /* ignore */ }
    }
    socket.destroy();
  });
  if (tlsCert !== null) {
    // a failed handshake is the client's verdict; note it, keep serving
    server.on('tlsClientError', () => { current.state.stats.tls_handshake_failures++; });
    server.on('secureConnection', (tls) => {
      if (tls.alpnProtocol === 'h2') current.state.stats.connections_h2++;
      else current.state.stats.connections_http1++;
    });
    // An HTTP/2 session's errors (a client breaking the protocol) end that
    // session alone, not the mock.
    server.on('sessionError', () => {});
  }
  server.on('error', (e) => {
    process.stderr.write('stripe-mock: server error: ' + e.message + '\n');
    process.exit(1);
  });

  let stopping = false;
  const shutdown = () => {
    if (stopping) return;
    stopping = true;
    server.close();
    if (control) control.close();
    for (const s of sockets) s.destroy();
    process.exit(0);
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);
  if (parentWatch) {
    // Exit when the parent (which holds our stdin open) goes away.
    process.stdin.on('end', shutdown);
    process.stdin.on('close', shutdown);
    process.stdin.on('error', shutdown);
    process.stdin.resume();
  }

  const announce = () => {
    const line = { listening: server.address().port };
    if (control) line.control = control.address().port;
    process.stdout.write(JSON.stringify(line) + '\n');
  };
  server.listen(port, host, () => {
    if (!control) return announce();
    trackConnections(control, null);
    control.listen(controlPort, host, announce);
  });
}

module.exports = { start };
