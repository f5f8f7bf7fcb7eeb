// connections.js: the open sockets of the mock's listeners: counted in the
// stats (open_connections), dropped when `down` is switched on (all but the
// control request's own), destroyed at shutdown; and the TCP reset that the
// reset faults send.
'use strict';

const sockets = new Set();

// Keep a listener's sockets in `sockets` while they are open.
function trackConnections(server) {
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
}

// `down` switched on: every connection goes, except those of control requests.
function dropStripeSockets() {
  for (const s of sockets) {
    if (!s._smMockBusy) s.destroy();
  }
}

function resetSocket(sock) {
  if (!sock || sock.destroyed) return;
  if (typeof sock.resetAndDestroy === 'function') {
    try { sock.resetAndDestroy(); return; } catch (e) { /* fall through */ }
  }
  sock.destroy();
}

module.exports = { sockets, trackConnections, dropStripeSockets, resetSocket };
