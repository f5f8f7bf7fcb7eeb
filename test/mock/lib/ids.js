// ids.js: random Stripe-style ids (req_..., bmes_..., bmest_...): a prefix
// and base-62 characters drawn from a pooled crypto.randomBytes buffer, so
// that an id costs no system call on the hot meter-event path.
'use strict';

const crypto = require('crypto');

const B62 = Buffer.from('ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789', 'latin1');
let randPool = crypto.randomBytes(16384);
let randPos = 0;
const idBuf = Buffer.alloc(64);

// prefix + n random base-62 characters, as a flat string.
function randId(prefix, n) {
  if (randPos + n > randPool.length) {
    randPool = crypto.randomBytes(16384);
    randPos = 0;
  }
  const off = idBuf.write(prefix, 0, 'latin1');
  for (let i = 0; i < n; i++) idBuf[off + i] = B62[randPool[randPos++] % 62];
  return idBuf.toString('latin1', 0, off + n);
}

module.exports = { randId };
