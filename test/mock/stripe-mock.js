#!/usr/bin/env node
// stripe-mock.js: a Stripe-compatible mock of POST /v1/billing/meter_events,
// of API v2's meter event session and stream, and of the endpoints of the
// event lifecycle (cancellations, meters, event summaries, error reports),
// for stripe_meter's tests and benchmarks. This file is the command line;
// the mock itself is in lib/, one file per part (README.md lists them).
//
// Built-in modules only (Node 18+). Binds to loopback only.
// See test/mock/README.md for the CLI, the control API and the fault names.
'use strict';

const { start } = require('./lib/server');

function usage(msg) {
  if (msg) process.stderr.write('stripe-mock: ' + msg + '\n');
  process.stderr.write('usage: node stripe-mock.js [--port N] [--host 127.0.0.1|localhost|::1] [--parent-watch]\n' +
    '       [--tls-cert FILE --tls-key FILE [--control-port N] [--http1-only | --h2-max-streams N]]\n');
  process.exit(2);
}

function main() {
  let port = 0;
  let host = '127.0.0.1';
  let parentWatch = false;
  let tlsCert = null;
  let tlsKey = null;
  let controlPort = 0;
  let http1Only = false;
  let h2MaxStreams = null;
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    let a = argv[i];
    let val;
    const eq = a.indexOf('=');
    if (a.startsWith('--') && eq > 0) { val = a.slice(eq + 1); a = a.slice(0, eq); }
    const next = () => (val !== undefined ? val : (i + 1 < argv.length ? argv[++i] : usage(a + ' needs a value')));
    if (a === '--port') {
      const v = next();
      if (!/^[0-9]+$/.test(v) || Number(v) > 65535) usage('bad port: ' + v);
      port = Number(v);
    } else if (a === '--host') {
      host = next();
    } else if (a === '--tls-cert') {
      tlsCert = next();
    } else if (a === '--tls-key') {
      tlsKey = next();
    } else if (a === '--control-port') {
      const v = next();
      if (!/^[0-9]+$/.test(v) || Number(v) > 65535) usage('bad control port: ' + v);
      controlPort = Number(v);
    } else if (a === '--http1-only') {
      http1Only = true;
    } else if (a === '--h2-max-streams') {
      const v = next();
      if (!/^[0-9]+$/.test(v) || Number(v) < 1 || Number(v) > 4294967295) usage('bad --h2-max-streams: ' + v);
      h2MaxStreams = Number(v);
    } else if (a === '--parent-watch') {
      parentWatch = true;
    } else if (a === '--help' || a === '-h') {
      usage();
    } else {
      usage('unknown argument: ' + a);
    }
  }
  if (host === 'localhost') host = '127.0.0.1';
  if (host !== '127.0.0.1' && host !== '::1') usage('refusing to bind to non-loopback host ' + host);

  if ((tlsCert === null) !== (tlsKey === null)) usage('--tls-cert and --tls-key go together');
  // HTTP/2 is offered over TLS only (no h2c), so plain http is HTTP/1.1
  // anyway and --http1-only changes nothing there.
  if (h2MaxStreams !== null && (tlsCert === null || http1Only)) usage('--h2-max-streams needs TLS and HTTP/2 (no --http1-only)');
  start({ port, host, parentWatch, tlsCert, tlsKey, controlPort, http1Only, h2MaxStreams });
}

main();
