'use strict';
// Baseline: the outbox worker a team would write instead of stripe_meter.
// Stripe's official Node SDK plus `pg`; CONCURRENCY lanes, each claiming one
// row of its own outbox table with FOR UPDATE SKIP LOCKED, creating the meter
// event (identifier as the Idempotency-Key), then recording the answer and
// deleting the row in the same transaction.  A failed call rolls back, so the
// row is retried later.
//
// Usage: node sdk-worker.js CONCURRENCY MAX_SECONDS
// Env: PGHOST/PGUSER/PGDATABASE (libpq style), MOCK_URL (http://HOST:PORT,
// or https://HOST:PORT with the CA in NODE_EXTRA_CA_CERTS).  The SDK's
// client is Node's http/https: HTTP/1.1, keep-alive connections, one request
// at a time on each.  The tables are bench_sdk_outbox and bench_sdk_delivered
// (bench.js creates them).
// Prints one JSON line: {"delivered":N,"errors":N,"seconds":S,"firstError":...}.
const { Pool } = require('pg');
const Stripe = require('stripe');

const concurrency = parseInt(process.argv[2], 10);
const maxSeconds = parseFloat(process.argv[3]);

const url = new URL(process.env.MOCK_URL);
const stripe = new Stripe('sk_test_benchMockKey0000', {
  host: url.hostname,
  port: Number(url.port),
  protocol: url.protocol.replace(/:$/, ''),
  maxNetworkRetries: 2,
  timeout: 30000,
});
const pool = new Pool({ max: concurrency });

let delivered = 0;
let errors = 0;
let firstError = null;
let stop = false;
const started = performance.now();
setTimeout(() => { stop = true; }, maxSeconds * 1000).unref();

async function lane() {
  const db = await pool.connect();
  try {
    while (!stop) {
      await db.query('BEGIN');
      const { rows } = await db.query(
        'SELECT id, identifier, event_name, payload, ts FROM bench_sdk_outbox ' +
        'ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED');
      if (rows.length === 0) {
        await db.query('COMMIT');
        return;	// drained (rows locked by other lanes are theirs)
      }
      const row = rows[0];
      try {
        const ev = await stripe.billing.meterEvents.create({
          event_name: row.event_name,
          identifier: row.identifier,
          payload: row.payload,
          timestamp: Math.floor(row.ts.getTime() / 1000),
        }, { idempotencyKey: row.identifier });
        await db.query(
          'INSERT INTO bench_sdk_delivered (identifier, event_name, payload, meter_event) ' +
          'VALUES ($1, $2, $3, $4)', [row.identifier, row.event_name, row.payload, ev]);
        await db.query('DELETE FROM bench_sdk_outbox WHERE id = $1', [row.id]);
        await db.query('COMMIT');
        delivered++;
      } catch (e) {
        errors++;
        if (firstError === null) firstError = String(e && e.message);
        await db.query('ROLLBACK');
      }
    }
  } finally {
    db.release();
  }
}

(async () => {
  await Promise.all(Array.from({ length: concurrency }, lane));
  const seconds = (performance.now() - started) / 1000;
  await pool.end();
  process.stdout.write(JSON.stringify({ delivered, errors, seconds, firstError }) + '\n');
})().catch((e) => { console.error(e); process.exit(1); });
