// server.js: the listeners. Plain http, or https (--tls-cert/--tls-key)
// with a second, plain http listener for the control API; keep-alive
// timeouts, malformed requests, TLS handshake failures; the split between
// the control API (/__mock/) and Stripe's; shutdown on SIGTERM/SIGINT or,
// with --parent-watch, when stdin closes; and the {"listening":PORT} line.
'use strict';

const http = require('http');
const fs = require('fs');
const { current } = require('./mock-state');
const { sockets, trackConnections } = require('./connections');
const { onControl } = require('./control-api');
const { onStripeRequest } = require('./request-pipeline');

function onRequest(req, res) {
  const url = req.url;
  const q = url.indexOf('?');
  const path = q < 0 ? url : url.slice(0, q);
  if (path.startsWith('/__mock/')) {
    return onControl(req, res, path, new URLSearchParams(q < 0 ? '' : url.slice(q + 1)));
  }
  onStripeRequest(req, res, path);
}

// Listen as the command line says ({port, host, parentWatch, tlsCert,
// tlsKey, controlPort}; host already checked to be loopback).
function start({ port, host, parentWatch, tlsCert, tlsKey, controlPort }) {
  // https mode: the API is served over TLS, and a second, plain http
  // listener (--control-port) serves the same handler for the control API.
  const opts = { noDelay: true, keepAlive: true };
  const server = tlsCert === null ? http.createServer(opts, onRequest)
    : require('https').createServer({ ...opts, cert: fs.readFileSync(tlsCert), key: fs.readFileSync(tlsKey) }, onRequest);
  const control = tlsCert === null ? null : http.createServer(opts, onRequest);
  server.keepAliveTimeout = 65000;
  server.headersTimeout = 66000;
  server.requestTimeout = 0;
  trackConnections(server);
  server.on('clientError', (err, socket) => {
    if (socket.writable && !socket.destroyed) {
      try { socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n'); } catch (e) { /* ignore */ }
    }
    socket.destroy();
  });
  if (tlsCert !== null) {
    // a failed handshake is the client's verdict; note it, keep serving
    server.on('tlsClientError', () => { current.state.stats.tls_handshake_failures++; });
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
    trackConnections(control);
    control.listen(controlPort, host, announce);
  });
}

module.exports = { start };
