'use strict';
// The measuring part of bench/run.sh (which starts the cluster and the mock
// and passes them in the environment).  Usage: node bench.js full|quick
//
// Every figure comes from this one run on this one machine: throughput from
// wall-clock time, CPU from /proc/PID/stat (utime+stime) deltas, memory from
// /proc/PID/status, latency from the mock's arrival timestamps.
const fs = require('fs');
const path = require('path');
const http = require('http');
const os = require('os');
const { spawn, execFileSync } = require('child_process');
const { Client } = require('pg');

const MODE = process.argv[2] === 'quick' ? 'quick' : 'full';
const Q = MODE === 'quick';
const BENCH_DIR = path.resolve(__dirname, '..');
const PGBIN = process.env.PGBIN;
const PGDATA = process.env.PGDATA;
const MOCK_PORT = Number(process.env.MOCK_PORT);
const MOCK_PID = Number(process.env.MOCK_PID);
const TMP = process.env.BENCH_TMP;
const CA_FILE = process.env.BENCH_CA;
const DB = 'bench';
const CLK_TCK = Number(execFileSync('getconf', ['CLK_TCK']).toString().trim()) || 100;

// Sizes: the full run follows the issue; the quick run is a smoke test.
const P = Q ? {
  enqueueSeconds: 3, enqueueRounds: 1,
  drainEvents: 20000, latencies: [0, 20, 100], skewEvents: 20000, drainTimeout: 60,
  v2Events: 40000, skewWindowTimeout: 20, skewHotWindow: 3,
  wrkSeconds: 3, wrkConns: [256],
  h2loadSeconds: 3, h2loadWarm: 1, h2loadCases: [{ clients: 8, streams: 100 }],
  sdkSeconds: 4, sdkConcurrency: [1, 10, 100],
  probes: 40, loadRates: [500, 1000],
  fairCold: 200, fairCommits: 4, fairHot: 10000, fairTimeout: 15,
  memEvents: 100000, memProduceSeconds: 120, memTimeout: 240,
  scaleSteps: [1, 4, 16, 64, 256, 512], scaleWarm: 1, scaleSeconds: 2,
  rollupEvents: 100000, rollupSingle: 20000, rollupTimeout: 300,
} : {
  enqueueSeconds: 15, enqueueRounds: 3,
  drainEvents: 100000, latencies: [0, 20, 100], skewEvents: 100000, drainTimeout: 120,
  v2Events: 200000, skewWindowTimeout: 60, skewHotWindow: 10,
  wrkSeconds: 10, wrkConns: [64, 256],
  h2loadSeconds: 10, h2loadWarm: 2, h2loadCases: [{ clients: 1, streams: 100 }, { clients: 8, streams: 100 }],
  sdkSeconds: 15, sdkConcurrency: [1, 10, 100],
  probes: 300, loadRates: [1000, 2000],
  fairCold: 200, fairCommits: 4, fairHot: 50000, fairTimeout: 15,
  memEvents: 1000000, memProduceSeconds: 600, memTimeout: 900,
  scaleSteps: [1, 2, 4, 8, 16, 32, 64, 128, 256, 512], scaleWarm: 2, scaleSeconds: 6,
  rollupEvents: 1000000, rollupSingle: 100000, rollupTimeout: 900,
};

// Findings that explain gaps, printed under "Notes" in RESULTS.md.
const NOTES = [];

// The two paths to the mock (bench/README.md, "Two paths").  Each has its
// own mock process (its own stats and CPU time).  h2: the headline, TLS with
// HTTP/2 offered through ALPN as Stripe does, every setting at its default
// (max_files_per_process untouched, so PostgreSQL's 1000); the worker trusts
// the run's test CA.  http1: plain HTTP/1.1 on loopback, one connection per
// request in flight, so max_files_per_process = 2000 for the 512 of the
// scaling run.  maxFiles null means the server's default (ALTER SYSTEM RESET).
const PATHS = {
  h2: {
    name: 'h2', label: 'TLS + HTTP/2',
    url: `https://localhost:${process.env.TLS_MOCK_PORT}`, port: Number(process.env.TLS_MOCK_PORT),
    control: Number(process.env.TLS_MOCK_CONTROL), pid: Number(process.env.TLS_MOCK_PID),
    maxFiles: null,
  },
  http1: {
    name: 'http1', label: 'plain HTTP/1.1',
    url: `http://127.0.0.1:${MOCK_PORT}`, port: MOCK_PORT,
    control: MOCK_PORT, pid: MOCK_PID,
    maxFiles: 2000,
  },
};
// the path in use; the cluster starts with the TLS mock's URLs (and the
// CA file, for both paths) in postgresql.conf and max_files_per_process at
// its default
let CUR = PATHS.h2;
let curUrlsOf = 'h2';
let curMaxFiles = null;
// pg_settings' max_files_per_process and its source, and the server's
// safe descriptors are what the worker sizes its connections by
let curMaxFilesShown = null;

const log = (...a) => console.log('[bench ' + new Date().toISOString().slice(11, 19) + ']', ...a);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const nowMs = () => performance.timeOrigin + performance.now();

// ---------------------------------------------------------------- helpers

let db;	// the orchestrator's own connection (its backend is left out of CPU sums)
let dbPid;

async function sql(q, params) {
  return (await db.query(q, params)).rows;
}

async function setConf(name, value) {
  if (value === null) await db.query(`ALTER SYSTEM RESET ${name}`);
  else await db.query(`ALTER SYSTEM SET ${name} = '${value}'`);
  await db.query('SELECT pg_reload_conf()');
}

function mock(method, p, body) {
  return new Promise((resolve, reject) => {
    const data = body === undefined ? null : JSON.stringify(body);
    const req = http.request({
      host: '127.0.0.1', port: CUR.control, method, path: p,
      headers: data ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(data) } : {},
    }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString();
        if (res.statusCode >= 300) reject(new Error(`mock ${p}: ${res.statusCode} ${text}`));
        else resolve(JSON.parse(text));
      });
    });
    req.on('error', reject);
    if (data) req.write(data);
    req.end();
  });
}
const mockStats = () => mock('GET', '/__mock/stats');
async function mockReset(latencyMs) {
  await mock('POST', '/__mock/reset');
  await mock('POST', '/__mock/config', { latency_ms: latencyMs, request_log_size: 1000 });
}

// the machine's CPU time so far, all cores: busy and in all (jiffies)
function machineCpu() {
  const f = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
  const total = f.reduce((a, b) => a + b, 0);
  return { busy: total - f[3] - f[4], total };   // less idle and iowait
}

function procCpu(pid) {
  // seconds of user+system CPU, and of reaped children (for the postmaster)
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
    return { self: (Number(f[11]) + Number(f[12])) / CLK_TCK, children: (Number(f[13]) + Number(f[14])) / CLK_TCK, ppid: Number(f[1]) };
  } catch (e) {
    return null;
  }
}

// nanoseconds on a CPU and waiting for one (run queue), from schedstat
function procSched(pid) {
  try {
    const f = fs.readFileSync(`/proc/${pid}/schedstat`, 'utf8').trim().split(' ');
    return { run: Number(f[0]) / 1e9, wait: Number(f[1]) / 1e9 };
  } catch (e) {
    return { run: 0, wait: 0 };
  }
}

function postmasterPid() {
  return Number(fs.readFileSync(path.join(PGDATA, 'postmaster.pid'), 'utf8').split('\n')[0]);
}

// CPU seconds of every PostgreSQL process: the postmaster, its live children,
// and children that exited meanwhile (counted in the postmaster's cutime).
// The orchestrator's own backend is left out.
function pgCpu() {
  const pm = postmasterPid();
  const p = procCpu(pm);
  let total = p.self + p.children;
  for (const d of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    const pid = Number(d);
    if (pid === dbPid) continue;
    const c = procCpu(pid);
    if (c && c.ppid === pm) total += c.self;
  }
  return total;
}

// the worker's pid; not `old` (a worker being replaced).  The launcher starts
// a replacement within stripe_meter.launcher_naptime (10 s).
async function workerPid(old = null) {
  for (let i = 0; i < 300; i++) {
    const r = await sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'stripe_meter worker' AND pid IS DISTINCT FROM $1",
      [old]);
    if (r.length) return r[0].pid;
    await sleep(100);
  }
  throw new Error('no stripe_meter worker running');
}

// RSS in kB, and its private part: VmRSS also counts the shared buffers the
// process has touched, which grows towards shared_buffers and is not a leak.
function rssKb(pid) {
  const st = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const m = /VmRSS:\s+(\d+)/.exec(st);
  return m ? Number(m[1]) : null;
}
function anonKb(pid) {
  const m = /RssAnon:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) : null;
}

// TCP connections a process holds open to a local port: its sockets
// (/proc/PID/fd) that /proc/net/tcp{,6} lists as established to that port.
// The mock counts the connections that carried requests, not how many
// were open at once; this is the worker's side of it, sampled.
function openConnections(pid, port) {
  const inodes = new Set();
  try {
    for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
      try {
        const m = /^socket:\[(\d+)\]$/.exec(fs.readlinkSync(`/proc/${pid}/fd/${fd}`));
        if (m) inodes.add(m[1]);
      } catch (e) { /* closed meanwhile */ }
    }
  } catch (e) {
    return null;
  }
  let n = 0;
  for (const f of ['/proc/net/tcp', '/proc/net/tcp6']) {
    let lines;
    try { lines = fs.readFileSync(f, 'utf8').split('\n').slice(1); } catch (e) { continue; }
    for (const line of lines) {
      const c = line.trim().split(/\s+/);
      if (c.length < 10 || c[3] !== '01') continue;	// 01: ESTABLISHED
      if (parseInt(c[2].split(':')[1], 16) === port && inodes.has(c[9])) n++;
    }
  }
  return n;
}

function cpuSnap(wpid, extraPids = []) {
  return {
    t: nowMs(),
    pg: pgCpu(),
    worker: procCpu(wpid).self,
    mock: procCpu(CUR.pid).self,
    workerWait: procSched(wpid).wait,
    mockWait: procSched(CUR.pid).wait,
    extra: extraPids.map((p) => { const c = procCpu(p); return c ? c.self : 0; }),
  };
}

function run(cmd, args, opts = {}) {
  return new Promise((resolve, reject) => {
    const ch = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], ...opts });
    let out = '';
    let err = '';
    ch.stdout.on('data', (c) => { out += c; });
    ch.stderr.on('data', (c) => { err += c; });
    ch.on('error', reject);
    ch.on('close', (code) => (code === 0 ? resolve(out) : reject(new Error(`${cmd} exited ${code}: ${err}${out}`))));
    if (opts.onSpawn) opts.onSpawn(ch);
  });
}

const pgbench = (args, env = {}) => run(path.join(PGBIN, 'pgbench'), args,
  { env: { ...process.env, PGDATABASE: DB, ...env } });

function fmt(n, d = 0) {
  if (n === null || n === undefined || Number.isNaN(n)) return 'n/a';
  return Number(n).toLocaleString('en-US', { minimumFractionDigits: d, maximumFractionDigits: d });
}
function pct(a, b) { return b ? fmt(100 * a / b, 0) + ' %' : 'n/a'; }
function quantile(xs, q) {
  const s = [...xs].sort((a, b) => a - b);
  if (!s.length) return null;
  return s[Math.min(s.length - 1, Math.floor(q * s.length))];
}

async function clearOutbox() {
  await setConf('stripe_meter.enabled', 'off');
  // requests in flight (up to 100 ms at the mock) finish and are recorded
  await sleep(500);
  await db.query('TRUNCATE stripe_meter.outbox, stripe_meter.meter_events, stripe_meter.failed_events');
}

// Restart the cluster (for max_files_per_process), then reconnect.
async function restartCluster() {
  await db.end();
  await run(path.join(PGBIN, 'pg_ctl'), ['-D', PGDATA, '-l', path.join(TMP, 'postgres.log'), '-m', 'fast', '-w', '-t', '120', 'restart']);
  db = new Client({ database: DB });
  await db.connect();
  dbPid = (await sql('SELECT pg_backend_pid() AS p'))[0].p;
}

// The mock of a path, for the sections that do not involve the worker
// (the ceiling, the SDK baseline): control calls and CPU go to it.
function useMock(name) {
  CUR = PATHS[name];
  return CUR;
}

// Point the worker at a path: the mock's URL as api_url and stream_url by
// reload (stripe_meter.ca_file names the run's CA throughout), and
// max_files_per_process by a restart when it differs.  A new worker either way, so that it starts without the other
// path's connections in its cache, as a worker does when it starts.
async function usePath(name) {
  const p = useMock(name);
  if (curUrlsOf !== name || curMaxFiles !== p.maxFiles) {
    const old = await workerPid();
    await db.query(`ALTER SYSTEM SET stripe_meter.api_url = '${p.url}'`);
    await db.query(`ALTER SYSTEM SET stripe_meter.stream_url = '${p.url}'`);
    if (curMaxFiles !== p.maxFiles) {
      if (p.maxFiles === null) await db.query('ALTER SYSTEM RESET max_files_per_process');
      else await db.query(`ALTER SYSTEM SET max_files_per_process = ${Number(p.maxFiles)}`);
      await restartCluster();
      curMaxFiles = p.maxFiles;
    } else {
      await db.query('SELECT pg_reload_conf()');
      await sleep(200);
      await db.query('SELECT pg_terminate_backend($1)', [old]);
      await workerPid(old);
    }
    curUrlsOf = name;
  }
  await workerPid();
  const [mf] = await sql("SELECT setting, source FROM pg_settings WHERE name = 'max_files_per_process'");
  curMaxFilesShown = { setting: Number(mf.setting), source: mf.source };
  log(`   path ${p.label}: ${p.url}, max_files_per_process ${mf.setting} (${mf.source})`);
  return p;
}

// What the mock saw of connections and protocols since its last reset.
function connStats(s) {
  return {
    path: CUR.name, maxFiles: curMaxFilesShown,
    connections: s.connections_with_requests, connectionsAccepted: s.connections_accepted,
    connectionsH2: s.connections_h2, connectionsHttp1: s.connections_http1,
    requests: s.requests, requestsH2: s.requests_h2, requestsHttp1: s.requests_http1,
    maxStreamsPerConnection: s.max_streams_per_connection, mockMaxInFlight: s.max_in_flight,
    // answers a retry got: a replay of the stored answer, or 409 while the
    // first attempt still ran; requests the client gave up on
    replays: s.replays, idempotencyConflicts: s.idempotency_conflicts, clientAborts: s.client_aborts,
  };
}

// customers: 'many' spreads events over 10,000 customers, a number over that
// many; 'skewed' gives 80 % of them to 8 customers (10 % each) and the rest
// to 10,000 others.
async function prefill(n, customers = 'many', eventName = 'bench_api') {
  const spread = customers === 'many' ? 10000 : Number(customers);
  const cust = customers === 'skewed'
    ? "CASE WHEN g % 5 <> 0 THEN 'cus_hot' || (g % 10) ELSE 'cus_cold' || (g % 10000) END"
    : `'cus_bench' || (g % ${spread})`;
  const t0 = nowMs();
  for (let done = 0; done < n; done += 100000) {
    const k = Math.min(100000, n - done);
    await db.query(`INSERT INTO stripe_meter.outbox (event_name, payload)
      SELECT $1, jsonb_build_object('stripe_customer_id', ${cust}, 'value', 1)
        FROM generate_series($2::int, $3::int) g`, [eventName, done + 1, done + k]);
  }
  await db.query('VACUUM ANALYZE stripe_meter.outbox');
  await db.query('CHECKPOINT');
  return (nowMs() - t0) / 1000;
}

async function outboxCount() {
  return Number((await sql('SELECT count(*) AS n FROM stripe_meter.outbox'))[0].n);
}

// Enable the worker on a pre-filled outbox and time it until the outbox is
// empty; CPU deltas over exactly that interval.
async function timedDrain(n, timeoutS) {
  const wpid = await workerPid();
  const before = cpuSnap(wpid);
  await setConf('stripe_meter.enabled', 'on');
  const deadline = nowMs() + timeoutS * 1000;
  let s;
  let maxOpen = 0;
  const sample = () => { maxOpen = Math.max(maxOpen, openConnections(wpid, CUR.port) || 0); };
  for (;;) {
    s = await mockStats();
    sample();
    if (s.billed >= n) break;
    if (nowMs() > deadline) break;
    await sleep(100);
  }
  let left;
  for (;;) {
    left = await outboxCount();
    sample();
    if (left === 0 || nowMs() > deadline) break;
    await sleep(50);
  }
  const after = cpuSnap(wpid);
  await setConf('stripe_meter.enabled', 'off');
  s = await mockStats();
  const secs = (after.t - before.t) / 1000;
  const delivered = n - left;
  // attempts the worker made for the delivered events (1 each without retries)
  const [att] = await sql('SELECT count(*) AS n, COALESCE(sum(attempts), 0) AS a FROM stripe_meter.meter_events');
  const [st] = await sql('SELECT last_error FROM stripe_meter.status');
  return {
    n, delivered, secs, evs: delivered / secs, complete: left === 0,
    pgCpu: after.pg - before.pg, workerCpu: after.worker - before.worker, mockCpu: after.mock - before.mock,
    workerWait: after.workerWait - before.workerWait, mockWait: after.mockWait - before.mockWait,
    concurrencyViolations: s.concurrency_violations, rateLimited: s.rate_limited, byStatus: s.by_status,
    streamRequests: s.stream_requests, streamEvents: s.stream_events, streamMaxBatch: s.stream_max_batch,
    sessions: s.sessions_created, attempts: Number(att.a), recorded: Number(att.n), lastError: st.last_error,
    maxOpenConnections: maxOpen,
    ...connStats(s),
  };
}

// ---------------------------------------------------------------- 1. enqueue

const ENQ_SCRIPTS = {
  function: `\\set c random(1, 10000)
SELECT stripe_meter_event_create('bench_api', ('{"stripe_customer_id": "cus_bench' || :c || '", "value": 1}')::jsonb);
`,
  outbox_insert: `\\set c random(1, 10000)
INSERT INTO stripe_meter.outbox (event_name, payload) VALUES ('bench_api', ('{"stripe_customer_id": "cus_bench' || :c || '", "value": 1}')::jsonb);
`,
  // what the trigger derives, supplied: the identifier, the timestamp, the
  // customer, and what it freezes of the request (the meter's value key, the
  // value's canonical text, the key scheme); checked in benchEnqueue
  plain_insert: `\\set c random(1, 10000)
INSERT INTO bench_plain (identifier, event_name, payload, ts, customer, value_payload_key, canonical_value, legacy_idempotency_key) VALUES (gen_random_uuid()::text, 'bench_api', ('{"stripe_customer_id": "cus_bench' || :c || '", "value": 1}')::jsonb, clock_timestamp(), 'cus_bench' || :c, 'value', '1', false);
`,
};

async function benchEnqueue() {
  log('1. enqueue cost (pgbench)');
  await clearOutbox();
  // The same columns, defaults, fillfactor and indexes as the outbox (primary
  // key, unique identifier, due index); no trigger.
  await db.query(`DROP TABLE IF EXISTS bench_plain;
    CREATE TABLE bench_plain (LIKE stripe_meter.outbox INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING INDEXES INCLUDING STORAGE)
      WITH (fillfactor = 80)`);
  const same = await plainMatchesOutbox();
  log(`   bench_plain: the outbox's indexes (${same.indexes.length}) and a row as the trigger makes it`);
  const files = {};
  for (const [k, v] of Object.entries(ENQ_SCRIPTS)) {
    files[k] = path.join(TMP, `enqueue-${k}.sql`);
    fs.writeFileSync(files[k], v);
  }
  const tps = { function: [], outbox_insert: [], plain_insert: [] };
  for (let r = 0; r < P.enqueueRounds; r++) {
    for (const k of ['plain_insert', 'function', 'outbox_insert']) {
      await db.query('TRUNCATE stripe_meter.outbox, bench_plain');
      await db.query('CHECKPOINT');
      const out = await pgbench(['-n', '-M', 'prepared', '-c', '2', '-j', '2', '-T', String(P.enqueueSeconds), '-f', files[k]],
        { PGOPTIONS: '-c synchronous_commit=off' });
      const m = /tps = ([\d.]+)/.exec(out);
      tps[k].push(Number(m[1]));
      log(`   ${k}: ${m[1]} tps`);
    }
  }
  await db.query('TRUNCATE stripe_meter.outbox, bench_plain');
  const best = {};
  for (const k of Object.keys(tps)) best[k] = Math.max(...tps[k]);
  return { tps, best, plainIndexes: same.indexes, plainRow: same.row };
}

// The comparison is fair only if bench_plain pays for the same indexes and
// stores the same row: check both before measuring, so that a new outbox
// column or index the plain path lacks (which would make the plain path
// cheaper and the trigger look dearer than it is) stops the run instead of
// skewing the ratio.  One row through each script (customer 1); everything
// but what differs per row (id, identifier, timestamps) must be equal.
async function plainMatchesOutbox() {
  const defs = async (table) => (await sql(`SELECT pg_get_indexdef(indexrelid) AS d FROM pg_index
      WHERE indrelid = $1::regclass`, [table]))
    .map((r) => r.d.replace(/^CREATE (UNIQUE )?INDEX \S+ ON \S+ /, 'CREATE $1INDEX ON t ')).sort();
  const outboxIdx = await defs('stripe_meter.outbox');
  const plainIdx = await defs('bench_plain');
  if (JSON.stringify(outboxIdx) !== JSON.stringify(plainIdx)) {
    throw new Error(`bench_plain's indexes differ from the outbox's:\n  outbox: ${outboxIdx.join('\n          ')}\n  plain:  ${plainIdx.join('\n          ')}`);
  }
  const stmt = (k) => ENQ_SCRIPTS[k].split('\n')[1].replace(/:c/g, '1');
  await db.query('TRUNCATE stripe_meter.outbox, bench_plain');
  await db.query(stmt('outbox_insert'));
  await db.query(stmt('plain_insert'));
  const strip = "- '{id,identifier,ts,enqueued_at,next_attempt_at}'::text[]";
  const [r] = await sql(`SELECT (SELECT to_jsonb(o) ${strip} FROM stripe_meter.outbox o) AS o,
      (SELECT to_jsonb(p) ${strip} FROM bench_plain p) AS p`);
  await db.query('TRUNCATE stripe_meter.outbox, bench_plain');
  if (!r.o || JSON.stringify(r.o) !== JSON.stringify(r.p)) {
    throw new Error(`bench_plain's row differs from the outbox's:\n  outbox: ${JSON.stringify(r.o)}\n  plain:  ${JSON.stringify(r.p)}`);
  }
  return { indexes: plainIdx, row: r.p };
}

// ---------------------------------------------------------------- 2. drain

// the connections a case used, and the protocol the mock saw them speak
function connLine(r) {
  return `${fmt(r.connections)} connection(s)${r.maxOpenConnections !== undefined ? `, at most ${fmt(r.maxOpenConnections)} open at once` : ''} (h2 ${fmt(r.connectionsH2)}, http/1.1 ${fmt(r.connectionsHttp1)}; requests h2 ${fmt(r.requestsH2)}, http/1.1 ${fmt(r.requestsHttp1)}; up to ${fmt(r.maxStreamsPerConnection)} per connection)` +
    (r.attempts !== undefined ? `, ${fmt(r.attempts - r.recorded)} retries` : '') +
    `, replays ${fmt(r.replays)}, 409s ${fmt(r.idempotencyConflicts)}, client aborts ${fmt(r.clientAborts)}`;
}

// Both paths, the headline (TLS + HTTP/2 at the defaults) first.
// BENCH_PATHS=h2 (or http1) measures one only, for development.
const PATH_ORDER = (process.env.BENCH_PATHS || 'h2,http1').split(',').filter((p) => PATHS[p]);

async function benchDrain() {
  log('2. drain throughput');
  const res = [];
  for (const pathName of PATH_ORDER) {
    await usePath(pathName);
    for (const lat of P.latencies) {
      await clearOutbox();
      await mockReset(lat);
      const fillS = await prefill(P.drainEvents, 'many');
      log(`   ${pathName}: prefilled ${P.drainEvents} in ${fmt(fillS, 1)} s; draining at ${lat} ms`);
      const r = await timedDrain(P.drainEvents, P.drainTimeout);
      r.latency = lat; r.customers = 'many';
      log(`   ${pathName} ${lat} ms: ${fmt(r.evs)} ev/s${r.complete ? '' : ' (timeout)'}, PG ${fmt(1e6 * r.pgCpu / r.delivered, 1)} us/ev, ${connLine(r)}`);
      res.push(r);
    }
    // skewed: at 0 ms only (at L ms the hot customers alone need 10 % * N * L / 1000 s)
    await clearOutbox();
    await mockReset(0);
    await prefill(P.skewEvents, 'skewed');
    const r = await timedDrain(P.skewEvents, P.drainTimeout);
    r.latency = 0; r.customers = 'skewed';
    log(`   ${pathName} skewed 0 ms: ${fmt(r.evs)} ev/s, ${connLine(r)}`);
    res.push(r);
  }
  return res;
}

// ---------------------------------------------------------------- 2b. drain through API v2

// Select the API for the bench database as doc/api-v2.md tells users to: a
// database setting, read by the worker when it starts, so the worker is
// replaced.  The stream URL (the mock) is in postgresql.conf (bench.sh).
async function useApi(version) {
  const old = await workerPid();
  if (version === 'v1') await db.query(`ALTER DATABASE ${DB} RESET stripe_meter.api_version`);
  else await db.query(`ALTER DATABASE ${DB} SET stripe_meter.api_version = '${version}'`);
  await db.query('SELECT pg_terminate_backend($1)', [old]);
  return workerPid(old);
}

// The skewed backlog at 100 ms cannot drain in bounded time (each of the 8
// hot customers holds 10 % of it, one event per 100 ms), so this measures
// what the per-customer rule leaves to measure: how soon the other 10,000
// customers' events get out from behind the hot ones, then the hot
// customers' rate over a further window against their bound (8 customers /
// 100 ms = 80 events/s).
async function skewWindow(n, latencyMs, timeoutS, windowS) {
  const cold = Math.floor(n / 5);
  const count = async () => (await sql(`SELECT count(*) FILTER (WHERE customer LIKE 'cus_cold%') AS cold, count(*) AS total
    FROM stripe_meter.meter_events`))[0];
  const wpid = await workerPid();
  const before = cpuSnap(wpid);
  await setConf('stripe_meter.enabled', 'on');
  const deadline = nowMs() + timeoutS * 1000;
  let c;
  for (;;) {
    await sleep(250);
    c = await count();
    if (Number(c.cold) >= cold || nowMs() > deadline) break;
  }
  const coldAt = nowMs();
  const coldDone = Number(c.cold);
  await sleep(windowS * 1000);
  const c2 = await count();
  const after = cpuSnap(wpid);
  await setConf('stripe_meter.enabled', 'off');
  const s = await mockStats();
  const hotInWindow = (Number(c2.total) - Number(c2.cold)) - (Number(c.total) - Number(c.cold));
  return {
    n, cold, coldDone, coldSecs: (coldAt - before.t) / 1000, complete: coldDone >= cold,
    hotWindowSecs: (after.t - coldAt) / 1000, hotEvs: hotInWindow / ((after.t - coldAt) / 1000), hotBound: 8 * 1000 / latencyMs,
    delivered: Number(c2.total), secs: (after.t - before.t) / 1000,
    pgCpu: after.pg - before.pg, workerCpu: after.worker - before.worker, mockCpu: after.mock - before.mock,
    concurrencyViolations: s.concurrency_violations, streamRequests: s.stream_requests, streamEvents: s.stream_events,
    ...connStats(s),
  };
}

async function benchV2() {
  log('2b. drain throughput with API v2 (meter event streams)');
  const res = { drain: [], skewWindows: [] };
  const cases = [
    { latency: 100, customers: 'many', n: P.v2Events },
    { latency: 100, customers: 1000, n: P.v2Events },
    { latency: 0, customers: 'many', n: P.v2Events },
    { latency: 0, customers: 'skewed', n: P.skewEvents },
  ];
  // a reset mock forgets its sessions: each case starts a new worker, which
  // opens a new session within the timed drain, as a worker does on start
  const fresh = async (latency) => {
    await clearOutbox();
    await mockReset(latency);
    return useApi('v2');
  };
  for (const pathName of PATH_ORDER) {
    await usePath(pathName);
    for (const c of cases) {
      const wpid = await fresh(c.latency);
      const fillS = await prefill(c.n, c.customers);
      log(`   ${pathName}: prefilled ${c.n} (${c.customers} customers) in ${fmt(fillS, 1)} s; draining at ${c.latency} ms (worker ${wpid})`);
      const r = await timedDrain(c.n, P.drainTimeout);
      Object.assign(r, c);
      if (r.streamEvents < r.delivered) throw new Error(`v2 drain: ${r.delivered} delivered but only ${r.streamEvents} through the stream`);
      log(`   ${pathName} ${c.customers} ${c.latency} ms: ${fmt(r.evs)} ev/s${r.complete ? '' : ' (timeout)'}, ${fmt(r.streamEvents / r.streamRequests, 1)} ev/request, PG ${fmt(1e6 * r.pgCpu / r.delivered, 1)} us/ev, statuses ${JSON.stringify(r.byStatus)}, ${connLine(r)}`);
      res.drain.push(r);
    }
    await fresh(100);
    await prefill(P.skewEvents, 'skewed');
    const w = await skewWindow(P.skewEvents, 100, P.skewWindowTimeout, P.skewHotWindow);
    res.skewWindows.push(w);
    log(`   ${pathName} skewed 100 ms: ${fmt(w.coldDone)} of ${fmt(w.cold)} other customers' events in ${fmt(w.coldSecs, 1)} s; then hot ${fmt(w.hotEvs)} ev/s (bound ${fmt(w.hotBound)})`);
    await clearOutbox();
    await useApi('v1');
  }
  return res;
}

// ---------------------------------------------------------------- 3b. mock ceiling

async function benchWrk() {
  log('3b. mock ceiling on plain HTTP/1.1 (wrk)');
  useMock('http1');
  const res = [];
  for (const c of P.wrkConns) {
    await mockReset(0);
    const before = { t: nowMs(), mock: procCpu(CUR.pid).self, s: await mockStats() };
    const out = await run('wrk', ['-t', '2', '-c', String(c), '-d', `${P.wrkSeconds}s`, '--latency',
      '-s', path.join(BENCH_DIR, 'lib', 'wrk-meter-events.lua'), `http://127.0.0.1:${MOCK_PORT}`, '--', `c${c}`]);
    const after = { t: nowMs(), mock: procCpu(CUR.pid).self, s: await mockStats() };
    const billed = after.s.billed - before.s.billed;
    const m = /Requests\/sec:\s+([\d.]+)/.exec(out);
    const r = {
      ...connStats(after.s),
      conns: c, reqPerS: Number(m[1]), billed, requests: after.s.requests - before.s.requests,
      mockCpu: after.mock - before.mock,
    };
    r.billedPerS = r.reqPerS * (billed / Math.max(1, r.requests));
    log(`   wrk -c ${c}: ${fmt(r.reqPerS)} req/s, ${billed} billed of ${r.requests}`);
    res.push(r);
  }
  return res;
}

// The mock's ceiling on the TLS + HTTP/2 path.  wrk speaks HTTP/1.1 only;
// h2load (nghttp2) speaks h2 and sends one fixed body, so the body is the
// wrk script's without the identifier (the mock, as Stripe, makes one per
// request) and there is no Idempotency-Key (a fixed one would make every
// request after the first a replay).  One customer: at latency 0 the mock
// decides each request before it reads the next, so the one-call-per-
// customer rule never answers 429 (checked: concurrency_violations).
async function benchH2load() {
  log('3b. mock ceiling on TLS + HTTP/2 (h2load)');
  useMock('h2');
  const body = path.join(TMP, 'h2load-meter-event.form');
  fs.writeFileSync(body, 'event_name=bench_api&payload[stripe_customer_id]=cus_h2load&payload[value]=1' +
    `&timestamp=${Math.floor(Date.now() / 1000)}`);
  const res = [];
  for (const c of P.h2loadCases) {
    await mockReset(0);
    const before = { t: nowMs(), mock: procCpu(CUR.pid).self, s: await mockStats() };
    const out = await run('h2load', ['-c', String(c.clients), '-t', String(Math.min(2, c.clients)), '-m', String(c.streams),
      '-D', String(P.h2loadSeconds), '--warm-up-time', String(P.h2loadWarm), '-d', body,
      '-H', 'Authorization: Bearer sk_test_benchMockKey0000',
      '-H', 'Content-Type: application/x-www-form-urlencoded',
      '-H', 'Stripe-Version: 2026-09-30.endive',
      `https://127.0.0.1:${process.env.TLS_MOCK_PORT}/v1/billing/meter_events`]);
    const after = { t: nowMs(), mock: procCpu(CUR.pid).self, s: await mockStats() };
    const m = /finished in ([\d.]+)s, ([\d.]+) req\/s/.exec(out);
    const done = /requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed/.exec(out);
    const proto = (/Application protocol: (\S+)/.exec(out) || [])[1] || null;
    const billed = after.s.billed - before.s.billed;
    const r = {
      ...connStats(after.s),
      clients: c.clients, streams: c.streams, protocol: proto,
      reqPerS: m ? Number(m[2]) : null, succeeded: done ? Number(done[4]) : null, failed: done ? Number(done[5]) : null,
      billed, requests: after.s.requests - before.s.requests, mockCpu: after.mock - before.mock,
      concurrencyViolations: after.s.concurrency_violations,
    };
    r.billedPerS = r.reqPerS * (billed / Math.max(1, r.requests));
    log(`   h2load -c ${c.clients} -m ${c.streams}: ${fmt(r.reqPerS)} req/s (${proto}), ${billed} billed of ${r.requests}, ${r.failed} failed, 429s ${r.concurrencyViolations}, ${connLine(r)}`);
    if (proto !== 'h2') throw new Error(`h2load did not speak h2 to the TLS mock (${proto})`);
    res.push(r);
  }
  return res;
}

// ---------------------------------------------------------------- 3a. SDK baseline

async function benchSdk() {
  log('3a. Node SDK worker baseline');
  await db.query(`DROP TABLE IF EXISTS bench_sdk_outbox, bench_sdk_delivered;
    CREATE TABLE bench_sdk_outbox (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
      identifier text NOT NULL UNIQUE, event_name text NOT NULL, payload jsonb NOT NULL,
      ts timestamptz NOT NULL DEFAULT clock_timestamp(), enqueued_at timestamptz NOT NULL DEFAULT clock_timestamp());
    CREATE TABLE bench_sdk_delivered (identifier text PRIMARY KEY, event_name text NOT NULL,
      payload jsonb NOT NULL, meter_event jsonb NOT NULL, delivered_at timestamptz NOT NULL DEFAULT now())`);
  const res = [];
  for (const pathName of PATH_ORDER) for (const lat of P.latencies) {
    // the SDK's own mock; the worker is not involved (and stays disabled)
    const mp = useMock(pathName);
    for (const c of P.sdkConcurrency) {
      // enough rows for the run, capped at the drain size
      const rows = Math.min(P.drainEvents, Math.ceil(c * (1000 / Math.max(lat, 0.2)) * P.sdkSeconds * 1.2) + 1000);
      await db.query('TRUNCATE bench_sdk_outbox, bench_sdk_delivered');
      await db.query(`INSERT INTO bench_sdk_outbox (identifier, event_name, payload)
        SELECT gen_random_uuid()::text, 'bench_api', jsonb_build_object('stripe_customer_id', 'cus_bench' || (g % 10000), 'value', 1)
          FROM generate_series(1, $1::int) g`, [rows]);
      await db.query('VACUUM ANALYZE bench_sdk_outbox');
      await mockReset(lat);
      let child;
      const wpid = await workerPid();
      // over TLS the SDK trusts the run's CA as Node is told to, through
      // NODE_EXTRA_CA_CERTS; it speaks HTTP/1.1 (Node's https)
      const env = { ...process.env, PGDATABASE: DB, MOCK_URL: mp.url };
      if (mp.name === 'h2') env.NODE_EXTRA_CA_CERTS = CA_FILE;
      const p = run('node', [path.join(__dirname, 'sdk-worker.js'), String(c), String(P.sdkSeconds)],
        { env, onSpawn: (ch) => { child = ch; } });
      const before = cpuSnap(wpid, [child.pid]);
      // the child's CPU is read while it still exists: poll until it exits
      let last = before;
      const done = p.then((o) => o);
      let exited = false;
      done.then(() => { exited = true; }, () => { exited = true; });
      while (!exited) {
        const s = cpuSnap(wpid, [child.pid]);
        if (s.extra[0]) last = s;
        await sleep(100);
      }
      const out = JSON.parse((await done).trim().split('\n').pop());
      const after = cpuSnap(wpid, [child.pid]);
      const st = await mockStats();
      const r = {
        path: pathName, latency: lat, concurrency: c, delivered: out.delivered, errors: out.errors, secs: out.seconds,
        evs: out.delivered / out.seconds, nodeCpu: last.extra[0] - before.extra[0],
        pgCpu: after.pg - before.pg, mockCpu: after.mock - before.mock,
        concurrencyViolations: st.concurrency_violations, ...connStats(st),
      };
      log(`   sdk ${pathName} ${lat} ms c=${c}: ${fmt(r.evs)} ev/s, ${out.errors} errors${out.firstError ? ` (first: ${out.firstError})` : ''}, ${connLine(r)}`);
      if (out.errors && !out.delivered) throw new Error(`the SDK worker delivered nothing over ${mp.label}: ${out.firstError}`);
      res.push(r);
    }
  }
  await db.query('DROP TABLE bench_sdk_outbox, bench_sdk_delivered');
  return res;
}

// ---------------------------------------------------------------- 4. latency

async function probeLatency(tag, count, gapMs) {
  const c = new Client({ database: DB });
  await c.connect();
  const commits = new Map();
  for (let i = 0; i < count; i++) {
    const id = `lat-${tag}-${i}`;
    await c.query('BEGIN');
    await c.query("SELECT stripe_meter_event_create('bench_latency', $2, $1)", [id, { stripe_customer_id: `cus_lat${i}`, value: 1 }]);
    const t = nowMs();
    await c.query('COMMIT');
    commits.set(id, { sent: t, acked: nowMs() });
    await sleep(gapMs);
  }
  await c.end();
  // wait until the mock has them all
  let evs = [];
  for (let i = 0; i < 300; i++) {
    evs = (await mock('GET', '/__mock/events?event_name=bench_latency')).data.filter((e) => e.identifier.startsWith(`lat-${tag}-`));
    if (evs.length >= count) break;
    await sleep(100);
  }
  const lat = evs.map((e) => e.arrived_at - commits.get(e.identifier).sent);
  const commitRtt = [...commits.values()].map((v) => v.acked - v.sent);
  return {
    n: lat.length, p50: quantile(lat, 0.5), p99: quantile(lat, 0.99), max: quantile(lat, 1),
    commitP50: quantile(commitRtt, 0.5),
  };
}

async function benchLatency() {
  log('4. latency commit -> arrival (plain HTTP/1.1)');
  await usePath('http1');
  await clearOutbox();
  await mockReset(0);
  await setConf('stripe_meter.enabled', 'on');
  await sleep(500);
  const idle = await probeLatency('idle', P.probes, 20);
  log(`   idle: p50 ${fmt(idle.p50, 2)} ms p99 ${fmt(idle.p99, 2)} ms`);
  // under load: pgbench enqueues at a fixed rate with the function meanwhile,
  // at a rate that leaves the machine room and at one that fills it
  const file = path.join(TMP, 'enqueue-load.sql');
  fs.writeFileSync(file, ENQ_SCRIPTS.function);
  const loadSecs = Math.ceil(P.probes * 25 / 1000) + 6;
  const loads = [];
  for (const rate of P.loadRates) {
    // 8 clients, so that commit flushes do not cap the rate below the target
    const load = pgbench(['-n', '-M', 'prepared', '-c', '8', '-j', '2', '-R', String(rate), '-T', String(loadSecs), '-f', file],
      { PGOPTIONS: '-c synchronous_commit=off' });
    await sleep(2000);
    const s0 = await mockStats();
    const c0 = machineCpu();
    const t0 = nowMs();
    // the backlog: events in the outbox (queued, claimed or in flight), sampled meanwhile
    const queued = [];
    const sampler = setInterval(() => {
      db.query('SELECT count(*)::int AS n FROM stripe_meter.outbox')
        .then((r) => queued.push(r.rows[0].n), () => {});
    }, 250);
    const busy = await probeLatency(`load${rate}`, P.probes, 20);
    clearInterval(sampler);
    busy.queuedP50 = queued.length ? quantile(queued, 0.5) : null;
    const s1 = await mockStats();
    const c1 = machineCpu();
    busy.offered = rate;
    busy.rate = (s1.billed - s0.billed) / ((nowMs() - t0) / 1000);
    busy.cpuBusy = (c1.busy - c0.busy) / (c1.total - c0.total);
    const lout = await load;
    const m = /tps = ([\d.]+)/.exec(lout);
    busy.enqueueTps = m ? Number(m[1]) : null;
    log(`   load ${fmt(rate)}/s (${fmt(busy.rate)} ev/s delivered, CPU ${pct(busy.cpuBusy, 1)} busy, ${fmt(busy.queuedP50)} in the outbox): p50 ${fmt(busy.p50, 2)} ms p99 ${fmt(busy.p99, 2)} ms`);
    loads.push(busy);
    // the next rate starts from an empty outbox
    await clearOutbox();
    await setConf('stripe_meter.enabled', 'on');
    await sleep(500);
  }
  await setConf('stripe_meter.enabled', 'off');
  return { idle, loads };
}

// ---------------------------------------------------------------- 4b. fairness

// What one customer's backlog costs everyone else.  Stripe allows one call
// per customer and meter at a time, so a backlog of one key drains at one
// event per round trip whatever the sender does; the worker claims key by
// key and holds at most two events of a key, and promises that an event of
// another customer waits for the backlog by no more than about one round
// trip: the claim that follows its commit, plus its own request.
const FAIR_LATENCY = 100;
// The goal's bound on the extra wait (p95 behind the backlog minus p95
// alone): one round trip (FAIR_LATENCY: the request) plus 150 ms for one
// claim pass (the walk of the due keys, then the claim and the sent mark,
// each committed with a WAL flush) on a machine whose cores the worker
// shares with the mock, the server and the harness.  A claim that let the
// backlog fill it would make the other customers wait for the backlog
// itself, one event per round trip: seconds for a few dozen hot events,
// hours for the whole backlog, far outside this bound.
const FAIR_BOUND_MS = FAIR_LATENCY + 150;

// The mock's record of the events of one event name, with an identifier
// starting with prefix (all when null).
async function mockArrivals(eventName, prefix = null) {
  const evs = (await mock('GET', `/__mock/events?event_name=${eventName}`)).data;
  return prefix === null ? evs : evs.filter((e) => e.identifier.startsWith(prefix));
}

// n events of n distinct customers ("cold": none has anything queued),
// committed in P.fairCommits transactions FAIR_GAP_MS apart; for each event,
// the time from the moment the client sends its transaction's COMMIT to its
// arrival at the mock (arrived_at, the same clock).  The gap is not a
// multiple of the round trip, so the commits fall at different points of
// the backlog's request cycle.  Waits at most timeoutS for all of them.
const FAIR_GAP_MS = 130;
async function coldWave(tag, n, timeoutS) {
  const prefix = `fair-${tag}-`;
  const k = P.fairCommits;
  const c = new Client({ database: DB });
  await c.connect();
  const sentAt = [];	// per transaction
  for (let t = 0; t < k; t++) {
    if (t) await sleep(FAIR_GAP_MS);
    await c.query('BEGIN');
    await c.query(`INSERT INTO stripe_meter.outbox (identifier, event_name, payload)
      SELECT $1 || g, 'bench_fair', jsonb_build_object('stripe_customer_id', 'cus_fair' || $2 || '_' || g, 'value', 1)
        FROM generate_series($3::int, $4::int) g`, [`${prefix}${t}-`, tag, Math.floor(t * n / k) + 1, Math.floor((t + 1) * n / k)]);
    sentAt.push(nowMs());
    await c.query('COMMIT');
  }
  await c.end();
  // identifiers: prefix, the transaction's number, '-', the event's
  const sent = (e) => sentAt[parseInt(e.identifier.slice(prefix.length), 10)];
  const deadline = sentAt[k - 1] + timeoutS * 1000;
  let evs;
  for (;;) {
    evs = await mockArrivals('bench_fair', prefix);
    if (evs.length >= n || nowMs() > deadline) break;
    await sleep(100);
  }
  const d = evs.map((e) => e.arrived_at - sent(e));
  return {
    n, commits: k, delivered: evs.length, complete: evs.length >= n,
    p50: quantile(d, 0.5), p95: quantile(d, 0.95), max: quantile(d, 1),
    lastArrival: evs.length ? Math.max(...evs.map((e) => e.arrived_at)) : null,
  };
}

// One API: cold events alone, then behind one customer's backlog.  Each
// wave waits at most P.fairTimeout, and so does the start of the backlog.
async function fairCase(api) {
  await clearOutbox();
  await mockReset(FAIR_LATENCY);
  // v2: a new worker, after the reset (a reset mock forgets its sessions)
  if (api !== 'v1') await useApi(api);
  await setConf('stripe_meter.enabled', 'on');
  // Not measured: a first wave of the same size opens the connections (and
  // the v2 session) that both measured waves then find alike.
  const warm = await coldWave(`${api}warm`, P.fairCold, P.fairTimeout);
  const alone = await coldWave(`${api}alone`, P.fairCold, P.fairTimeout);
  log(`   ${api} alone: p50 ${fmt(alone.p50, 1)} ms, p95 ${fmt(alone.p95, 1)} ms, max ${fmt(alone.max, 1)} ms (${alone.delivered} of ${alone.n}; warm-up ${warm.delivered} of ${warm.n})`);

  // the backlog: one customer and meter, queued while the worker is off
  await setConf('stripe_meter.enabled', 'off');
  await sleep(300);
  const fillS = await prefill(P.fairHot, 1, 'bench_api');
  const [{ hc: hotCustomer }] = await sql('SELECT min(customer) AS hc FROM stripe_meter.outbox');
  await setConf('stripe_meter.enabled', 'on');
  const hotT0 = nowMs();
  // let the worker start on it: a few of its events delivered
  let started = 0;
  while ((started = (await mockArrivals('bench_api')).length) < 3 && nowMs() - hotT0 < P.fairTimeout * 1000) await sleep(50);
  const hot = await coldWave(`${api}hot`, P.fairCold, P.fairTimeout);
  const hotEvs = await mockArrivals('bench_api');
  const st = await mockStats();
  await setConf('stripe_meter.enabled', 'off');
  // queued (or in flight, not yet at the mock) when the last cold event arrived
  const hotLeft = hot.lastArrival === null ? null
    : P.fairHot - hotEvs.filter((e) => e.arrived_at <= hot.lastArrival).length;
  const r = {
    api, latency: FAIR_LATENCY, cold: P.fairCold, hotEvents: P.fairHot, hotCustomer, fillSecs: fillS,
    alone, hot, hotStarted: started, hotLeft, hotDelivered: hotEvs.length,
    // the backlog's pace meanwhile: one event per round trip at best
    hotCycleMs: hotEvs.length > 1 ? (Math.max(...hotEvs.map((e) => e.arrived_at)) - Math.min(...hotEvs.map((e) => e.arrived_at))) / (hotEvs.length - 1) : null,
    concurrencyViolations: st.concurrency_violations, byStatus: st.by_status,
  };
  log(`   ${api} behind ${fmt(P.fairHot)} events of ${hotCustomer}: p50 ${fmt(hot.p50, 1)} ms, p95 ${fmt(hot.p95, 1)} ms, max ${fmt(hot.max, 1)} ms (${hot.delivered} of ${hot.n}); ${fmt(hotLeft)} hot events still queued at the last arrival; backlog ${hotEvs.length} delivered, one per ${fmt(r.hotCycleMs, 1)} ms; 429s ${st.concurrency_violations}`);
  await clearOutbox();
  if (api !== 'v1') await useApi('v1');
  return r;
}

async function benchFairness() {
  log(`4b. fairness: ${P.fairCold} cold customers behind one customer's ${P.fairHot}-event backlog at ${FAIR_LATENCY} ms (plain HTTP/1.1)`);
  await usePath('http1');
  const cases = [];
  for (const api of ['v1', 'v2']) cases.push(await fairCase(api));
  return { latency: FAIR_LATENCY, boundMs: FAIR_BOUND_MS, gapMs: FAIR_GAP_MS, cases };
}

// ---------------------------------------------------------------- 4c. rollups

const ROLLUP_LATENCY = 20;
const ROLLUP_CUSTOMERS = 100;

// n events of eventName for ROLLUP_CUSTOMERS customers, spread over the ten
// whole minutes before the current one (windows that have closed), through
// the validation trigger; values 1..1000
async function rollupFill(eventName, n) {
  for (let done = 0; done < n; done += 100000) {
    const k = Math.min(100000, n - done);
    await db.query(`INSERT INTO stripe_meter.outbox (event_name, payload, ts)
      SELECT $1, jsonb_build_object('stripe_customer_id', 'cus_roll' || (g % ${ROLLUP_CUSTOMERS}), 'value', g % 1000 + 1),
             date_trunc('minute', now()) - interval '10 minutes' + (g % 600) * interval '1 second'
        FROM generate_series($2::int, $3::int) g`, [eventName, done + 1, done + k]);
  }
  await db.query('VACUUM ANALYZE stripe_meter.outbox');
  await db.query('CHECKPOINT');
}

// The same events rolled up (a summed meter, 1-minute window) and one by
// one, on the headline path.  Rolled up, every window has closed before the
// worker is enabled: the time is from enabling to the last rollup recorded,
// forming included.  One by one is measured on a sample (rollupSingle
// events) and its time for all the events is that rate, extrapolated.
async function benchRollup() {
  log(`4c. rollups: ${P.rollupEvents} events for ${ROLLUP_CUSTOMERS} customers on a summed meter with a 1-minute window, and ${P.rollupSingle} of them one by one (TLS + HTTP/2, ${ROLLUP_LATENCY} ms)`);
  await usePath('h2');
  await clearOutbox();
  await db.query(`INSERT INTO stripe_meter.meters (event_name, aggregation) VALUES ('bench_rollup', 'sum')
    ON CONFLICT (event_name) DO UPDATE SET aggregation = 'sum'`);
  await db.query("SELECT stripe_meter_set_rollup_window('bench_rollup', interval '1 minute')");

  await mockReset(ROLLUP_LATENCY);
  let t = nowMs();
  await rollupFill('bench_rollup', P.rollupEvents);
  const fillSecs = (nowMs() - t) / 1000;
  const expected = {};
  for (const r of await sql(`SELECT payload->>'stripe_customer_id' AS c, sum((payload->>'value')::bigint) AS v
      FROM stripe_meter.outbox GROUP BY 1`)) expected[r.c] = Number(r.v);
  const [g] = await sql(`SELECT count(DISTINCT (customer, rollup_window_end)) AS n FROM stripe_meter.outbox`);
  const wpid = await workerPid();
  const before = cpuSnap(wpid);
  await setConf('stripe_meter.enabled', 'on');
  const deadline = nowMs() + P.rollupTimeout * 1000;
  let left;
  for (;;) {
    left = await outboxCount();
    if (left === 0 || nowMs() > deadline) break;
    await sleep(100);
  }
  const after = cpuSnap(wpid);
  await setConf('stripe_meter.enabled', 'off');
  const s = await mockStats();
  const billed = {};
  for (const e of await mock('GET', '/__mock/events?event_name=bench_rollup')
    .then((r) => r.data)) billed[e.payload.stripe_customer_id] = (billed[e.payload.stripe_customer_id] || 0) + Number(e.payload.value);
  const exact = Object.keys(expected).length === Object.keys(billed).length &&
    Object.keys(expected).every((c) => expected[c] === billed[c]);
  const [rolled] = await sql(`SELECT count(*) AS n FROM stripe_meter.meter_events WHERE outcome = 'rolled_up'`);
  const rollup = {
    n: P.rollupEvents, groups: Number(g.n), fillSecs, secs: (after.t - before.t) / 1000, complete: left === 0,
    calls: s.requests, billed: s.billed, exact, rolledUp: Number(rolled.n),
    duplicates: s.identifiers_billed_multiple_times,
    pgCpu: after.pg - before.pg, workerCpu: after.worker - before.worker,
  };
  log(`   rolled up: ${fmt(rollup.calls)} calls for ${fmt(rollup.n)} events in ${fmt(rollup.secs, 1)} s, ${fmt(1e6 * rollup.pgCpu / rollup.n, 1)} µs PostgreSQL CPU per event, sums ${exact ? 'exact' : 'NOT exact'}`);

  await clearOutbox();
  await mockReset(ROLLUP_LATENCY);
  await rollupFill('bench_single', P.rollupSingle);
  const one = await timedDrain(P.rollupSingle, P.rollupTimeout);
  log(`   one by one: ${fmt(one.evs)} events/s, ${fmt(1e6 * one.pgCpu / one.n, 1)} µs PostgreSQL CPU per event`);
  await clearOutbox();
  return { latency: ROLLUP_LATENCY, customers: ROLLUP_CUSTOMERS, rollup, single: one };
}

// ---------------------------------------------------------------- 5. memory and bloat

// rate: events/s the producer offers (null: as fast as it can); at least
// memEvents / memProduceSeconds, so that the section ends in bounded time
// on a slow machine (a backlog then builds up and drains afterwards)
async function benchMemory(rate) {
  if (rate) rate = Math.max(rate, P.memEvents / P.memProduceSeconds);
  log(`5. memory and bloat over ${P.memEvents} events, offered at ${rate ? fmt(rate) + ' events/s' : 'full speed'} (plain HTTP/1.1)`);
  await usePath('http1');
  await clearOutbox();
  await db.query('VACUUM stripe_meter.outbox');
  await mockReset(0);
  await setConf('stripe_meter.enabled', 'on');
  const wpid = await workerPid();
  await sleep(500);
  const size = async () => Number((await sql("SELECT pg_total_relation_size('stripe_meter.outbox') AS s"))[0].s);
  const before = { rss: rssKb(wpid), anon: anonKb(wpid), outbox: await size() };
  // a producer enqueueing in batches of 100 while the worker drains
  const file = path.join(TMP, 'enqueue-batch.sql');
  fs.writeFileSync(file, `INSERT INTO stripe_meter.outbox (event_name, payload)
  SELECT 'bench_api', jsonb_build_object('stripe_customer_id', 'cus_bench' || (random() * 9999)::int, 'value', 1)
    FROM generate_series(1, 100);
`);
  const perClient = Math.ceil(P.memEvents / 100 / 2);
  const t0 = nowMs();
  let producing = true;
  let timedOut = false;
  let producer;
  const prod = run(path.join(PGBIN, 'pgbench'), ['-n', '-M', 'prepared', '-c', '2', '-j', '2', '-t', String(perClient),
    ...(rate ? ['-R', String(Math.max(1, Math.round(rate / 100)))] : []), '-f', file],
  { env: { ...process.env, PGDATABASE: DB }, onSpawn: (ch) => { producer = ch; } })
    .catch((e) => { if (!timedOut) throw e; })
    .finally(() => { producing = false; });
  const peak = { rss: before.rss, anon: before.anon, outbox: before.outbox };
  const total = perClient * 2 * 100;
  for (;;) {
    const st = await mockStats();
    peak.rss = Math.max(peak.rss, rssKb(wpid));
    peak.anon = Math.max(peak.anon, anonKb(wpid));
    peak.outbox = Math.max(peak.outbox, await size());
    if (!producing) {
      if (st.billed >= total && (await outboxCount()) === 0) break;
    }
    if (nowMs() - t0 > P.memTimeout * 1000) {
      timedOut = true;
      if (producing) producer.kill('SIGTERM');
      break;
    }
    await sleep(1000);
  }
  await prod;
  const delivered = (await mockStats()).billed;
  const secs = (nowMs() - t0) / 1000;
  const after = { rss: rssKb(wpid), anon: anonKb(wpid), outbox: await size() };
  await db.query('VACUUM stripe_meter.outbox');
  after.outboxVacuumed = await size();
  const mockMem = (await mockStats()).memory;
  const meterEvents = Number((await sql("SELECT pg_total_relation_size('stripe_meter.meter_events') AS s"))[0].s);
  const av = await sql(`SELECT autovacuum_count, n_dead_tup FROM pg_stat_user_tables
    WHERE schemaname = 'stripe_meter' AND relname = 'outbox'`);
  await setConf('stripe_meter.enabled', 'off');
  log(`   ${total} events in ${fmt(secs, 1)} s; worker RSS ${before.rss} -> ${after.rss} kB; outbox ${before.outbox} -> ${after.outbox} B`);
  return { total, delivered, complete: !timedOut, secs, rate, before, peak, after, mockMem, meterEvents, autovacuums: av[0] ? Number(av[0].autovacuum_count) : null };
}

// ---------------------------------------------------------------- 6. scaling

async function benchScaling() {
  log('6. scaling with max_in_flight at 100 ms (plain HTTP/1.1)');
  await usePath('http1');
  await clearOutbox();
  await mockReset(100);
  let need = 0;
  for (const k of P.scaleSteps) need += Math.min(k * 10, 6000) * (P.scaleWarm + P.scaleSeconds);
  await prefill(Math.ceil(need * 1.2 + 5000), 'many');
  const res = [];
  let enabled = false;
  for (const k of P.scaleSteps) {
    await setConf('stripe_meter.max_in_flight', String(k));
    if (!enabled) { await setConf('stripe_meter.enabled', 'on'); enabled = true; }
    await sleep(P.scaleWarm * 1000);
    const s0 = await mockStats();
    const t0 = nowMs();
    await sleep(P.scaleSeconds * 1000);
    const s1 = await mockStats();
    const r = { maxInFlight: k, evs: (s1.billed - s0.billed) / ((nowMs() - t0) / 1000), ideal: k * 1000 / 100 };
    log(`   max_in_flight ${k}: ${fmt(r.evs)} ev/s (ideal ${r.ideal})`);
    res.push(r);
  }
  await setConf('stripe_meter.enabled', 'off');
  await setConf('stripe_meter.max_in_flight', null);
  return res;
}

// bench/scaling.png from the scaling figures (gnuplot)
async function plotScaling(res) {
  const dat = path.join(os.tmpdir(), `stripe_meter-scaling-${process.pid}.dat`);
  fs.writeFileSync(dat, res.map((r) => `${r.maxInFlight} ${r.evs.toFixed(1)} ${r.ideal}`).join('\n') + '\n');
  const png = path.join(BENCH_DIR, 'scaling.png');
  const gp = `set terminal pngcairo size 800,500 noenhanced
set output '${png}'
set title 'stripe_meter: throughput vs stripe_meter.max_in_flight (mock latency 100 ms)'
set xlabel 'stripe_meter.max_in_flight'
set ylabel 'events/s'
set logscale xy 2
set key top left
set grid
plot '${dat}' using 1:2 with linespoints lw 2 pt 7 title 'measured', '${dat}' using 1:3 with lines dt 2 title 'ideal (in flight / 100 ms)'
`;
  try {
    await run('gnuplot', ['-e', gp.replace(/\n/g, '; ')]);
  } catch (e) {
    log('   gnuplot failed: ' + e.message);
  }
  fs.rmSync(dat, { force: true });
}

// ---------------------------------------------------------------- report

function pkgVersion(name) {
  return JSON.parse(fs.readFileSync(path.join(__dirname, 'node_modules', name, 'package.json'), 'utf8')).version;
}

function machine() {
  const cpu = (/model name\s*:\s*(.*)/.exec(fs.readFileSync('/proc/cpuinfo', 'utf8')) || [])[1];
  const sh = (c, a) => { try { return execFileSync(c, a).toString().trim(); } catch (e) { return 'n/a'; } };
  return {
    cpu, cores: os.cpus().length, ram: `${fmt(os.totalmem() / 2 ** 30, 1)} GiB`, kernel: os.release(),
    pg: sh(path.join(PGBIN, 'postgres'), ['--version']), curl: sh('curl-config', ['--version']),
    node: process.version, wrk: sh('sh', ['-c', 'wrk -v 2>&1 | head -1']), h2load: sh('h2load', ['--version']),
    stripeSdk: pkgVersion('stripe'), pgNode: pkgVersion('pg'),
    date: new Date().toISOString().replace(/\.\d+Z$/, 'Z'), load: os.loadavg().map((x) => x.toFixed(2)).join(' '),
  };
}

function goal(ok) { return ok ? '**met**' : '**not met**'; }

// Results saved before the two paths existed ran on plain HTTP/1.1.
function pathOf(r) { return r.path || 'http1'; }
const PATH_LABEL = { h2: 'TLS + HTTP/2', http1: 'plain HTTP/1.1' };
// what each path ran with (bench/README.md, "Two paths")
function pathSetting(R, p) {
  const r = (R.drain || []).find((d) => pathOf(d) === p && d.maxFiles);
  const mf = r ? `max_files_per_process = ${fmt(r.maxFiles.setting)} (${r.maxFiles.source})`
    : (p === 'h2' ? 'max_files_per_process untouched' : 'max_files_per_process = 2000');
  return p === 'h2' ? `every setting at its default, ${mf}` : mf;
}

function report(R) {
  const m = R.machine;
  const L = [];
  const us = (cpu, n) => (n ? 1e6 * cpu / n : null);
  const cores = m.cores;
  const drainOf = (p, lat, customers = 'many') => (R.drain || []).find((r) => pathOf(r) === p && r.latency === lat && r.customers === customers) || null;
  const v2Of = (p, lat, customers = 'many') => (R.v2 ? R.v2.drain : []).find((r) => pathOf(r) === p && r.latency === lat && r.customers === customers) || null;
  const sdkBest = (p, lat) => (R.sdk || []).filter((r) => pathOf(r) === p && r.latency === lat)
    .reduce((a, b) => (b.evs > (a ? a.evs : -1) ? b : a), null);
  const ceilingRuns = (p) => (p === 'h2' ? R.h2load : R.wrk) || [];
  const ceilingOf = (p) => (ceilingRuns(p).length ? Math.max(...ceilingRuns(p).map((w) => w.billedPerS)) : null);
  const ceilingTool = (p) => (p === 'h2' ? 'h2load' : 'wrk');
  const busyOf = (r) => (r.pgCpu + r.mockCpu) / r.secs;
  const conns = (r) => (r.connections === undefined ? 'n/a' : fmt(r.connections));
  // connections open at once (sampled at the worker) where measured, else
  // the distinct connections that carried requests (the mock's count)
  const openConns = (r) => (r.maxOpenConnections !== undefined ? r.maxOpenConnections : r.connections);
  const h2Only = (r) => pathOf(r) !== 'h2' || (r.requestsHttp1 === 0 && r.requestsH2 > 0);
  const paths = ['h2', 'http1'];

  // why a rate fell short of target, in a few words
  const rateWhy = (r, target) => {
    const busy = busyOf(r);
    const perEv = `PostgreSQL ${fmt(us(r.pgCpu, r.delivered))} + mock ${fmt(us(r.mockCpu, r.delivered))} µs per event`;
    const why = [];
    if (busy >= 0.85 * cores) why.push(`CPU: ${fmt(busy, 2)} of ${cores} cores busy (${perEv})`);
    else if (r.workerWait / r.secs > 0.2) why.push(`CPU shared with other work: the worker waited for a CPU ${pct(r.workerWait, r.secs)} of the time (${perEv})`);
    // requests in flight at the mock, times events per request (v2: up to 100)
    const perReq = r.streamRequests ? r.streamEvents / r.streamRequests : 1;
    if (r.latency > 0 && r.mockMaxInFlight && r.mockMaxInFlight * perReq * 1000 / r.latency < 1.1 * target) {
      why.push(`window: at most ${fmt(r.mockMaxInFlight)} requests in flight at ${r.latency} ms (${fmt(r.mockMaxInFlight * perReq * 1000 / r.latency)} events per second)`);
    }
    if (r.requests !== undefined && !r.streamRequests && r.requests - r.delivered > 0.01 * r.delivered) {
      why.push(`${fmt(r.requests - r.delivered)} requests repeated (Notes)`);
    }
    if (!why.length) why.push(`neither CPU (${fmt(busy, 2)} of ${cores} cores busy) nor the window (${fmt(r.mockMaxInFlight)} in flight): the worker's own pace`);
    return why.join('; ');
  };
  // a throughput goal: the cell, whether met, and the cause
  const rateGoal = (r, target, maxConns = null) => {
    if (!r) return { cell: 'not measured', ok: null, why: '' };
    const why = [];
    let ok = r.complete !== false && r.evs >= target;
    if (r.complete === false) why.push('timed out');
    if (!h2Only(r)) { ok = false; why.push(`${fmt(r.requestsHttp1)} requests in HTTP/1.1`); }
    if (maxConns !== null && openConns(r) > maxConns) {
      ok = false;
      why.push(pathOf(r) === 'http1' ? `${fmt(openConns(r))} connections: HTTP/1.1 carries one request at a time per connection` : `${fmt(openConns(r))} connections open at once`);
    } else if (maxConns !== null && r.connections > openConns(r)) {
      why.push(`${conns(r)} distinct connections over the drain, at most ${fmt(openConns(r))} at once: some were replaced (Notes)`);
    }
    if (r.evs < target) why.push(rateWhy(r, target));
    if (!why.length) {
      why.push(pathOf(r) === 'h2'
        ? `${fmt(r.mockMaxInFlight)} requests in flight on ${fmt(openConns(r))} connection(s), up to ${fmt(r.maxStreamsPerConnection)} streams each`
        : `${fmt(r.mockMaxInFlight)} requests in flight on ${fmt(openConns(r))} connections`);
    }
    const cell = `${fmt(r.evs)} events/s${r.complete === false ? ' (timeout)' : ''}${maxConns !== null ? ` on ${fmt(openConns(r))} connection(s)` : ''}: ${goal(ok)}`;
    return { cell, ok, why: why.join('; ') };
  };
  // a CPU goal: the highest PostgreSQL CPU per event of the cases given
  const cpuGoal = (cases, bound, perRequest = false) => {
    cases = cases.filter(Boolean);
    if (!cases.length) return { cell: 'not measured', ok: null, why: '' };
    const top = cases.reduce((a, b) => (us(b.pgCpu, b.delivered) > us(a.pgCpu, a.delivered) ? b : a));
    const v = us(top.pgCpu, top.delivered);
    const ok = v <= bound;
    const w = us(top.workerCpu, top.delivered);
    let why = `at ${top.latency} ms: the worker ${fmt(w, 1)} µs, other server processes ${fmt(v - w, 1)} µs`;
    if (perRequest) why += `; ${fmt(top.streamEvents / top.streamRequests, 1)} events per request`;
    if (!ok && top.workerWait / top.secs > 0.05) why += `; the worker waited for a CPU ${pct(top.workerWait, top.secs)} of the time`;
    return { cell: `${fmt(v, 1)} µs (highest: ${top.latency} ms): ${goal(ok)}`, ok, why };
  };
  // throughput and CPU per event against the Node SDK worker's best, per latency
  const sdkGoal = (p) => {
    const rows = P.latencies.map((lat) => ({ lat, ours: drainOf(p, lat), b: sdkBest(p, lat) })).filter((a) => a.ours && a.b);
    if (!rows.length) return { cell: 'not measured', ok: null, why: '', rows };
    for (const a of rows) {
      a.ratio = a.ours.evs / a.b.evs;
      a.cpu = (a.ours.pgCpu / a.ours.delivered) / ((a.b.nodeCpu + a.b.pgCpu) / a.b.delivered);
      a.ok = a.ratio >= 3 && a.cpu < 0.5;
    }
    const ok = rows.length === P.latencies.length && rows.every((a) => a.ok);
    const cell = rows.map((a) => `${a.lat} ms: ${fmt(a.ratio, 1)}x, CPU ${fmt(a.cpu, 2)}x`).join('; ') + `: ${goal(ok)}`;
    const bad = rows.filter((a) => !a.ok);
    const why = bad.length
      ? bad.map((a) => `${a.lat} ms: ${a.ratio < 3 ? `SDK ${fmt(a.b.evs)} events/s at concurrency ${a.b.concurrency}` : ''}${a.ratio < 3 && a.cpu >= 0.5 ? ', ' : ''}${a.cpu >= 0.5 ? `CPU ${fmt(us(a.ours.pgCpu, a.ours.delivered))} vs ${fmt(us(a.b.nodeCpu + a.b.pgCpu, a.b.delivered))} µs per event` : ''}`).join('; ')
      : `SDK best ${rows.map((a) => `${fmt(a.b.evs)}`).join(' / ')} events/s (concurrency ${rows.map((a) => a.b.concurrency).join(' / ')}), one request per connection at a time`;
    return { cell, ok, why, rows };
  };
  const row = (text, gs) => {
    const cause = paths.map((p, i) => (gs[i].why ? `${p === 'h2' ? 'h2' : 'HTTP/1.1'}: ${gs[i].why}` : '')).filter(Boolean).join('. ');
    L.push(`| ${text} | ${gs[0].cell} | ${gs[1].cell} | ${cause} |`);
  };

  L.push('# stripe_meter benchmark results', '');
  L.push(`Run: \`bash bench/run.sh${Q ? ' --quick' : ''}\` (${MODE} mode${Q ? ': small counts, a smoke run, not the figures to quote' : ''}), ${m.date}.`, '');
  L.push('| machine | |', '|---|---|');
  L.push(`| CPU | ${m.cpu}, ${m.cores} cores |`, `| RAM | ${m.ram} |`, `| kernel | ${m.kernel} |`,
    `| PostgreSQL | ${m.pg} |`, `| libcurl | ${m.curl} |`, `| Node.js | ${m.node} (stripe ${m.stripeSdk}, pg ${m.pgNode}) |`,
    `| wrk | ${m.wrk} |`, ...(m.h2load ? [`| h2load | ${m.h2load} |`] : []),
    `| load average at start | ${m.load} (other work on the machine skews every figure) |`);
  if (R.seconds) {
    L.push(`| time taken | ${fmt(R.seconds.total / 60, 1)} minutes: ${Object.entries(R.seconds).filter(([k]) => k !== 'total').map(([k, v]) => `${k} ${fmt(v)} s`).join(', ')} |`);
  }
  L.push('');

  // ---- goals first, the two paths side by side
  L.push('## Goals', '');
  L.push('Two paths to the mock (bench/README.md, "Two paths"): **TLS + HTTP/2**, the headline, as the worker reaches Stripe,',
    `with ${pathSetting(R, 'h2')}; and **plain HTTP/1.1** on loopback, with ${pathSetting(R, 'http1')} (each request`,
    'in flight holds a connection there). Each goal is judged on each path; the issue 14 goals are about the TLS + HTTP/2',
    'column, the plain one is for comparison. "Connections" are those the worker held open to the mock at once (section 2).', '');
  const head = ['| goal | TLS + HTTP/2 (the defaults) | plain HTTP/1.1 | cause |', '|---|---|---|---|'];
  L.push('### Issue 14: TLS + HTTP/2 at the defaults', '', ...head);
  row('at least 4,000 events/s at 100 ms on at most 8 connections (10,000 customers queued)',
    paths.map((p) => rateGoal(drainOf(p, 100), 4000, 8)));
  row('at most 100 µs PostgreSQL CPU per event, API v1 (highest of 0, 20 and 100 ms)',
    paths.map((p) => cpuGoal(P.latencies.map((lat) => drainOf(p, lat)), 100)));
  row('at most 40 µs PostgreSQL CPU per event, API v2 (highest of the 10,000-customer cases)',
    paths.map((p) => cpuGoal((R.v2 ? R.v2.drain : []).filter((r) => pathOf(r) === p && r.customers === 'many'), 40, true)));
  const sdkG = paths.map((p) => sdkGoal(p));
  row('at least 3x the Node SDK worker\'s throughput at its best concurrency, at under half its CPU per event, at every latency (same path)', sdkG);
  L.push('');

  L.push('### Earlier goals', '', ...head);
  if (R.enqueue) {
    const f = R.enqueue.best.plain_insert / R.enqueue.best.function;
    const i = R.enqueue.best.plain_insert / R.enqueue.best.outbox_insert;
    const ok = f <= 1.3 && i <= 1.3;
    L.push(`| enqueue at most 1.3x the cost of a plain INSERT (no delivery: the same for both paths) | function ${fmt(f, 2)}x, direct INSERT ${fmt(i, 2)}x: ${goal(ok)} | (the same) | ${ok ? 'the validation trigger within the bound' : 'the validation trigger\'s lookups and the function\'s SPI INSERT (Notes)'} |`);
  }
  row('at least 6,000 events/s at 0 ms', paths.map((p) => rateGoal(drainOf(p, 0), 6000)));
  row('at least 70 % of the mock\'s ceiling on the same path at 0 ms', paths.map((p) => {
    const d = drainOf(p, 0);
    const c = ceilingOf(p);
    if (!d || !c) return { cell: 'not measured', ok: null, why: '' };
    const ok = d.evs >= 0.7 * c;
    const best = ceilingRuns(p).reduce((a, b) => (b.billedPerS > a.billedPerS ? b : a));
    return {
      cell: `${pct(d.evs, c)} of ${fmt(c)} events/s (${ceilingTool(p)}): ${goal(ok)}`, ok,
      why: `the mock spends ${fmt(us(d.mockCpu, d.delivered))} µs per event under the worker, ${fmt(us(best.mockCpu, best.billed))} under ${ceilingTool(p)}${ok ? '' : `; ${fmt(busyOf(d), 2)} of ${cores} cores busy`}`,
    };
  }));
  row('API v2: at least 10,000 events/s at 100 ms (10,000 customers)', paths.map((p) => rateGoal(v2Of(p, 100), 10000)));
  const notRun = { cell: '— (not run on this path)', ok: null, why: '' };
  if (R.memory) {
    const mm = R.memory;
    const memOk = mm.complete !== false && mm.after.anon - mm.before.anon < 64 * 1024 &&
      mm.after.outboxVacuumed < Math.max(16 * 2 ** 20, 0.5 * mm.peak.outbox);
    row(`worker RSS and outbox size bounded over ${fmt(mm.total)} events`, [notRun, {
      cell: `private RSS ${fmt(mm.before.anon)} → ${fmt(mm.after.anon)} kB (peak ${fmt(mm.peak.anon)}); outbox ${fmt(mm.before.outbox / 1024)} → ${fmt(mm.after.outbox / 1024)} kB (peak ${fmt(mm.peak.outbox / 1024)}), ${fmt(mm.after.outboxVacuumed / 1024)} kB after VACUUM: ${goal(memOk)}`,
      ok: memOk,
      why: memOk ? 'private memory grew less than 64 MB; the outbox shrank back after draining'
        : (mm.complete === false ? 'timed out' : 'private memory or the vacuumed outbox stayed high (section 5)'),
    }]);
  }
  const fair = R.fairness;
  if (fair) {
    const extra = (c) => c.hot.p95 - c.alone.p95;
    const fairOk = fair.cases.every((c) => c.alone.complete && c.hot.complete && extra(c) <= fair.boundMs && c.hotLeft > c.hotEvents / 2);
    row(`cold customers behind one customer's backlog wait at most about one round trip more than alone (p95 at most ${fmt(fair.boundMs)} ms more at ${fmt(fair.latency)} ms)`, [notRun, {
      cell: `${fair.cases.map((c) => `${c.api}: ${fmt(c.alone.p95, 1)} → ${fmt(c.hot.p95, 1)} ms (${extra(c) >= 0 ? '+' : ''}${fmt(extra(c), 1)} ms)${c.alone.complete && c.hot.complete ? '' : ' (timeout)'}`).join(', ')}: ${goal(fairOk)}`,
      ok: fairOk,
      why: fairOk ? 'the claim takes other customers\' events around the backlog' : 'see section 4b',
    }]);
  }
  L.push('');

  if (R.enqueue) {
    L.push('## 1. Enqueue cost', '');
    L.push(`pgbench, 2 clients, ${P.enqueueSeconds} s per run, best of ${P.enqueueRounds} round(s), prepared statements, worker disabled,`,
      '`synchronous_commit = off` for the clients so the figures show the CPU cost of each path rather than',
      'the WAL flush every path shares. The plain table is `LIKE stripe_meter.outbox INCLUDING ALL`-style:',
      'the same columns, defaults, fillfactor and indexes (primary key, unique identifier, due index), no trigger;',
      'the plain INSERT supplies what the trigger derives (a UUID identifier, the timestamp, the customer, the meter\'s value key,',
      'the value\'s canonical text and the key scheme); the run checks both before measuring (the same index definitions, and the',
      'same row through either path but for id, identifier and timestamps).', '');
    L.push('| path | TPS (best) | runs | cost vs plain INSERT |', '|---|---|---|---|');
    for (const k of ['plain_insert', 'function', 'outbox_insert']) {
      const label = { plain_insert: 'plain INSERT into an ordinary table', function: '`stripe_meter_event_create(...)`', outbox_insert: 'INSERT into `stripe_meter.outbox`' }[k];
      L.push(`| ${label} | ${fmt(R.enqueue.best[k])} | ${R.enqueue.tps[k].map((x) => fmt(x)).join(', ')} | ${fmt(R.enqueue.best.plain_insert / R.enqueue.best[k], 2)}x |`);
    }
    L.push('');
  }

  const connCols = (r) => `${r.maxOpenConnections !== undefined ? `${fmt(r.maxOpenConnections)} / ` : ''}${conns(r)} | ${r.requestsH2 === undefined ? 'n/a' : `${fmt(r.requestsH2)} / ${fmt(r.requestsHttp1)}`} | ${fmt(r.maxStreamsPerConnection)}`;
  if (R.drain) {
    L.push('## 2. Drain throughput', '');
    L.push(`A pre-filled outbox (INSERT ... SELECT through the validation trigger, then VACUUM ANALYZE and CHECKPOINT) drained to the mock;`,
      'timed from enabling the worker (reload) to an empty outbox. stripe_meter at its defaults except `rate_limit = 0`, on each path.',
      '"many": 10,000 customers; "skewed": 8 customers hold 80 % of the events (10 % each), 10,000 others the rest.',
      '"Connections": the most the worker held open to the mock at once (its sockets, sampled every 100 ms) / the distinct connections',
      'that carried a request during the drain (the mock\'s count; more than the first when connections were replaced); "requests h2 / http/1.1" shows the protocol',
      'the mock saw (all h2 on the TLS path means no fallback); "streams" is the most requests one connection carried at once.',
      '"Repeated requests" are the requests beyond one per event (retries, by the worker or inside libcurl): of them, answers replayed',
      'from the Idempotency-Key store, and 409s for a key whose first request was still running.',
      'CPU is user+system from /proc, per delivered event; "PostgreSQL" is every server process (postmaster, its children, and exited children),',
      'of which "worker" is the stripe_meter worker (over TLS it encrypts, and frames HTTP/2, itself).',
      '"Waiting for a CPU" is the time the worker or the mock was runnable but not running (/proc/PID/schedstat), as a share of the',
      'drain: well above a few percent means the machine, not the sender, set the pace.', '');
    L.push('| path | customers | mock latency | events | seconds | events/s | connections: open at once / used | requests h2 / http/1.1 | streams | repeated requests (replayed / 409) | worker µs/ev | PostgreSQL µs/ev | mock µs/ev | cores busy (PostgreSQL + mock) | waiting for a CPU: worker / mock | 429s (same customer) |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|');
    for (const r of R.drain) {
      const repeated = r.requests === undefined ? 'n/a' : `${fmt(r.requests - r.delivered)} (${fmt(r.replays)} / ${fmt(r.idempotencyConflicts)})`;
      L.push(`| ${PATH_LABEL[pathOf(r)]} | ${r.customers} | ${r.latency} ms | ${fmt(r.delivered)}${r.complete ? '' : ' (timeout)'} | ${fmt(r.secs, 2)} | ${fmt(r.evs)} | ${connCols(r)} | ${repeated} | ${fmt(us(r.workerCpu, r.delivered), 1)} | ${fmt(us(r.pgCpu, r.delivered), 1)} | ${fmt(us(r.mockCpu, r.delivered), 1)} | ${fmt(busyOf(r), 2)} of ${cores} | ${pct(r.workerWait, r.secs)} / ${pct(r.mockWait, r.secs)} | ${fmt(r.concurrencyViolations)} |`);
    }
    L.push('', 'The skewed case runs at 0 ms only: with one call per customer and meter in flight, a customer holding',
      '10 % of N events needs at least N/10 × latency (10,000 × 100 ms = 1,000 s at 100 ms), whatever the sender.', '');
  }

  if (R.v2) {
    L.push('## 2b. Drain throughput with API v2 (meter event streams)', '');
    L.push("The same pre-filled outbox and timing as section 2, on each path, delivered through Stripe's meter event stream: the bench database is",
      "switched with `ALTER DATABASE bench SET stripe_meter.api_version = 'v2'` and a new worker, `stripe_meter.stream_url` points",
      'at the mock, and everything else stays at its defaults (`max_in_flight` counts stream requests of up to 100 events).',
      'Each case starts a new worker, so the timed drain includes opening the meter event session (and, over TLS, the connections).',
      '"many": 10,000 customers; "1,000": exactly 1,000 customers; "skewed": as in section 2.', '');
    L.push('| path | customers | mock latency | events | seconds | events/s | events per request (mean / max) | connections: open at once / used | requests h2 / http/1.1 | streams | worker µs/ev | PostgreSQL µs/ev | mock µs/ev | cores busy (PostgreSQL + mock) | waiting for a CPU: worker / mock | 429s (same customer) | v1, same case and path (section 2) |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|');
    for (const r of R.v2.drain) {
      const v1 = drainOf(pathOf(r), r.latency, r.customers);
      const v1s = v1 ? `${fmt(v1.evs)} events/s, ${fmt(us(v1.pgCpu, v1.delivered), 1)} µs/ev` : '—';
      L.push(`| ${PATH_LABEL[pathOf(r)]} | ${typeof r.customers === 'number' ? fmt(r.customers) : r.customers} | ${r.latency} ms | ${fmt(r.delivered)}${r.complete ? '' : ' (timeout)'} | ${fmt(r.secs, 2)} | ${fmt(r.evs)} | ${fmt(r.streamEvents / r.streamRequests, 1)} / ${fmt(r.streamMaxBatch)} | ${connCols(r)} | ${fmt(us(r.workerCpu, r.delivered), 1)} | ${fmt(us(r.pgCpu, r.delivered), 1)} | ${fmt(us(r.mockCpu, r.delivered), 1)} | ${fmt(busyOf(r), 2)} of ${cores} | ${pct(r.workerWait, r.secs)} / ${pct(r.mockWait, r.secs)} | ${fmt(r.concurrencyViolations)} | ${v1s} |`);
    }
    L.push('', 'Stripe allows one event per customer and meter in flight, within a request and across requests, so at latency L the',
      'throughput is at most (distinct customer-meter pairs with events queued) / L: 10,000 events/s at 100 ms needs at least',
      '1,000 pairs queued throughout. With exactly 1,000 customers each holds N/1,000 events and the drain takes at least',
      'N/1,000 × 100 ms, so 10,000 events/s is that case\'s ceiling: the time the worker takes between an answer and that',
      'customer\'s next request adds to every 100 ms, and the start and the tail fall below it too.', '');
    const windows = R.v2.skewWindows || (R.v2.skewWindow ? [R.v2.skewWindow] : []);
    if (windows.length) {
      const w0 = windows[0];
      L.push(`Skewed at 100 ms (${fmt(w0.n)} events: 8 customers with 10 % each, 10,000 others with the rest) cannot drain in bounded time`,
        `(each hot customer needs ${fmt(w0.n / 10)} × 100 ms). Measured instead: how soon the other customers' events get out from behind`,
        `the hot ones, then the hot customers' rate over ${fmt(w0.hotWindowSecs, 1)} s against their bound.`, '');
      L.push('| path | other customers\' events delivered | in | hot customers\' rate afterwards | bound (8 customers / 100 ms) | connections used | 429s |', '|---|---|---|---|---|---|---|');
      for (const w of windows) {
        L.push(`| ${PATH_LABEL[pathOf(w)]} | ${fmt(w.coldDone)} of ${fmt(w.cold)}${w.complete ? '' : ' (timeout)'} | ${fmt(w.coldSecs, 2)} s (${fmt(w.coldDone / w.coldSecs)} events/s) | ${fmt(w.hotEvs)} events/s | ${fmt(w.hotBound)} events/s | ${conns(w)} | ${fmt(w.concurrencyViolations)} |`);
      }
      L.push('');
    }
  }

  L.push('## 3. Baselines', '');
  if (R.h2load || R.wrk) {
    L.push('### (b) The mock\'s ceiling, on each path', '');
    L.push('Mock latency 0, no PostgreSQL involved: what the mock alone can answer on this machine, which bounds any sender at 0 ms.', '');
  }
  if (R.h2load) {
    L.push(`**TLS + HTTP/2: h2load** (nghttp2), ${P.h2loadSeconds} s per run after ${P.h2loadWarm} s of warm-up (connections and TLS set up),`,
      'over the TLS mock with ALPN h2; requests/s are those h2load completed in the measured time. h2load sends one fixed body,',
      'so it is bench/lib/wrk-meter-events.lua\'s without the identifier (the mock makes one per request, as Stripe does when none is',
      'given) and without an Idempotency-Key (a fixed key would make every request after the first a replay); one customer, which at',
      'latency 0 never meets the one-call-per-customer rule (the mock decides each request before it reads the next: see the 429s).',
      'h2load does not verify the certificate. "Clients" are its connections, "streams" the requests each keeps in flight (`-m`).', '');
    L.push('| clients (connections) | streams per connection | requests/s | billed | failed | 429s | connections (h2) | mock µs / request |', '|---|---|---|---|---|---|---|---|');
    for (const w of R.h2load) {
      L.push(`| ${w.clients} | ${w.streams} | ${fmt(w.reqPerS)} | ${fmt(w.billed)} of ${fmt(w.requests)} | ${fmt(w.failed)} | ${fmt(w.concurrencyViolations)} | ${fmt(w.connections)} (${fmt(w.connectionsH2)}) | ${fmt(us(w.mockCpu, w.billed), 1)} |`);
    }
    L.push('');
  }
  if (R.wrk) {
    L.push(`**Plain HTTP/1.1: wrk**, 2 threads, ${P.wrkSeconds} s, a Lua script sending valid, unique meter events (bench/lib/wrk-meter-events.lua).`, '');
    L.push('| connections | requests/s | billed | mock µs / request |', '|---|---|---|---|');
    for (const w of R.wrk) L.push(`| ${w.conns} | ${fmt(w.reqPerS)} | ${fmt(w.billed)} of ${fmt(w.requests)} | ${fmt(us(w.mockCpu, w.billed), 1)} |`);
    L.push('');
  }
  for (const p of paths) {
    const d0 = drainOf(p, 0);
    const c = ceilingOf(p);
    if (!d0 || !c) continue;
    const best = ceilingRuns(p).reduce((a, b) => (b.billedPerS > a.billedPerS ? b : a));
    L.push(`${PATH_LABEL[p]}: stripe_meter at 0 ms reached ${pct(d0.evs, c)} of the ceiling; the mock spent ${fmt(us(d0.mockCpu, d0.delivered), 1)} µs per event under the worker vs ${fmt(us(best.mockCpu, best.billed), 1)} under ${ceilingTool(p)}.`, '');
  }
  if (R.sdk) {
    L.push('### (a) A Node worker with the official SDK, on each path', '');
    L.push(`bench/node/sdk-worker.js: \`stripe\` ${m.stripeSdk} + \`pg\` ${m.pgNode}; each lane claims one row with`,
      '`FOR UPDATE SKIP LOCKED`, creates the meter event (identifier as Idempotency-Key), inserts the answer and',
      `deletes the row in the same transaction. Run for up to ${P.sdkSeconds} s per setting on its own table; 10,000 customers.`,
      'The SDK speaks **HTTP/1.1 on both paths** (Node\'s http/https modules, keep-alive, one request at a time per connection):',
      'over TLS it trusts the run\'s CA through `NODE_EXTRA_CA_CERTS` and otherwise keeps its defaults. Its own connection count',
      'is shown; the worker is disabled meanwhile.', '');
    L.push('| path | mock latency | concurrency | events/s | errors | connections | Node µs/ev | PostgreSQL µs/ev | total µs/ev |',
      '|---|---|---|---|---|---|---|---|---|');
    for (const r of R.sdk) {
      L.push(`| ${PATH_LABEL[pathOf(r)]} | ${r.latency} ms | ${r.concurrency} | ${fmt(r.evs)} | ${fmt(r.errors)} | ${conns(r)} | ${fmt(us(r.nodeCpu, r.delivered), 1)} | ${fmt(us(r.pgCpu, r.delivered), 1)} | ${fmt(us(r.nodeCpu + r.pgCpu, r.delivered), 1)} |`);
    }
    L.push('');
  }
  if (R.drain && R.sdk) {
    L.push('### stripe_meter as a ratio to each baseline, on the same path', '');
    L.push('| path | mock latency | stripe_meter events/s | vs SDK best (concurrency) | vs the mock\'s ceiling | sender CPU per event vs SDK best (stripe_meter: all PostgreSQL; SDK: Node + PostgreSQL) |',
      '|---|---|---|---|---|---|');
    for (let i = 0; i < paths.length; i++) {
      for (const a of sdkG[i].rows) {
        const ours = us(a.ours.pgCpu, a.ours.delivered);
        const theirs = us(a.b.nodeCpu + a.b.pgCpu, a.b.delivered);
        L.push(`| ${PATH_LABEL[paths[i]]} | ${a.lat} ms | ${fmt(a.ours.evs)} | ${fmt(a.ratio, 2)}x (${a.b.concurrency}) | ${ceilingOf(paths[i]) ? pct(a.ours.evs, ceilingOf(paths[i])) : 'n/a'} | ${fmt(ours, 1)} vs ${fmt(theirs, 1)} µs = ${fmt(ours / theirs, 2)}x |`);
      }
    }
    L.push('');
  }

  if (R.latency) {
    L.push('## 4. Latency: COMMIT to arrival at the mock (plain HTTP/1.1)', '');
    L.push('One event per transaction through `stripe_meter_event_create`, 20 ms apart; from the moment the client sends COMMIT',
      'to the moment the request arrives at the mock (both on the wall clock, sub-millisecond). Mock latency 0.',
      `Under load, pgbench (8 clients) aims at ${P.loadRates.map((r) => fmt(r)).join(' and then ')} events/s (single-event transactions) meanwhile;`,
      `"CPU busy" is the share of all ${cores} cores' time spent outside idle while the probes ran.`,
      'The claim commits (flushing WAL) before the request is sent, which the delivery guarantee needs: one WAL flush is part of this latency.', '');
    L.push('| | probes | p50 | p99 | max | COMMIT round trip p50 | CPU busy | events in the outbox (median) |', '|---|---|---|---|---|---|---|---|');
    const lr = (k, x, extra) => L.push(`| ${k}${extra || ''} | ${x.n} | ${fmt(x.p50, 2)} ms | ${fmt(x.p99, 2)} ms | ${fmt(x.max, 2)} ms | ${fmt(x.commitP50, 2)} ms | ${x.cpuBusy === undefined ? 'n/a' : pct(x.cpuBusy, 1)} | ${x.queuedP50 === undefined ? 'n/a' : fmt(x.queuedP50)} |`);
    lr('idle', R.latency.idle);
    for (const x of R.latency.loads) lr(`under load: ${fmt(x.offered)} ev/s offered`, x, `, ${fmt(x.rate)} delivered`);
    L.push('');
  }

  if (fair) {
    L.push('## 4b. Fairness: other customers behind one customer\'s backlog (plain HTTP/1.1)', '');
    const c0 = fair.cases[0];
    L.push(`Mock latency ${fmt(fair.latency)} ms. ${fmt(c0.cold)} events of ${fmt(c0.cold)} customers with nothing queued ("cold"), committed in ${fmt(c0.alone.commits)}`,
      `transactions ${fmt(fair.gapMs)} ms apart; each one timed from the moment the client sends its COMMIT to its arrival at the mock. First with an empty`,
      `outbox ("alone"), then behind a backlog of ${fmt(c0.hotEvents)} events of one customer and meter queued before them, once the worker has started`,
      'on it. Stripe allows one call per customer and meter at a time, so the backlog drains at one event per round trip; the',
      'worker holds at most two of its events and claims the cold ones around it. A first wave of cold events, not measured, opens',
      `the connections (and the v2 session) both measured waves find. The goal allows ${fmt(fair.boundMs)} ms more at p95: one round trip`,
      `(${fmt(fair.latency)} ms) plus ${fmt(fair.boundMs - fair.latency)} ms for one claim pass on a shared machine; cold events waiting for the backlog would take seconds.`,
      'API v2 sends up to 100 events per stream request, so its figures are the arrival times of a few requests.', '');
    L.push('| API | alone p50 / p95 / max | behind the backlog p50 / p95 / max | ratio p95 / max | extra p95 / max (round trip ' + fmt(fair.latency) + ' ms) | backlog still queued at the last cold arrival | backlog meanwhile | 429s (same customer) |',
      '|---|---|---|---|---|---|---|---|');
    const trio = (w) => `${fmt(w.p50, 1)} / ${fmt(w.p95, 1)} / ${fmt(w.max, 1)} ms${w.complete ? '' : ` (timeout: ${fmt(w.delivered)} of ${fmt(w.n)})`}`;
    const signed = (x) => `${x >= 0 ? '+' : ''}${fmt(x, 1)}`;
    for (const c of fair.cases) {
      L.push(`| ${c.api} | ${trio(c.alone)} | ${trio(c.hot)} | ${fmt(c.hot.p95 / c.alone.p95, 2)}x / ${fmt(c.hot.max / c.alone.max, 2)}x | ${signed(c.hot.p95 - c.alone.p95)} / ${signed(c.hot.max - c.alone.max)} ms | ${fmt(c.hotLeft)} of ${fmt(c.hotEvents)} | ${fmt(c.hotDelivered)} delivered, one per ${fmt(c.hotCycleMs, 1)} ms (at best one per round trip) | ${fmt(c.concurrencyViolations)} |`);
    }
    L.push('');
  }

  if (R.rollup) {
    const ru = R.rollup.rollup;
    const one = R.rollup.single;
    const oneAllSecs = ru.n / one.evs;
    L.push(`## 4c. Rollups: ${fmt(ru.n)} events for ${fmt(R.rollup.customers)} customers on a summed meter (TLS + HTTP/2, ${fmt(R.rollup.latency)} ms)`, '');
    L.push(`The events are queued through the validation trigger, spread over the ten whole minutes before the run (every window has closed)`,
      `with values 1 to 1,000. Rolled up: the meter has a 1-minute window; timed from enabling the worker to an empty outbox, forming the`,
      `rollups included, and each customer's billed sum checked against its events'. One by one: ${fmt(one.n)} of the same kind of events on a`,
      'meter without a window, drained the same way; its time for all the events is its rate, extrapolated. Stripe allows one call per',
      `customer and meter at a time, so one by one ${fmt(R.rollup.customers)} customers are served at most ${fmt(R.rollup.customers)} calls at a time.`, '');
    L.push('| | events | Stripe calls | time | PostgreSQL CPU | CPU per source event | billed sums |', '|---|---|---|---|---|---|---|');
    L.push(`| rolled up (${fmt(ru.groups)} customer-windows) | ${fmt(ru.n)} | ${fmt(ru.calls)} | ${fmt(ru.secs, 1)} s${ru.complete ? '' : ' (timeout)'} | ${fmt(ru.pgCpu, 1)} s | ${fmt(1e6 * ru.pgCpu / ru.n, 1)} µs | ${ru.exact ? 'exact' : '**not exact**'}; ${fmt(ru.rolledUp)} kept as rolled_up; ${fmt(ru.duplicates)} identifiers billed twice |`);
    L.push(`| one by one (measured on ${fmt(one.n)}) | ${fmt(one.n)} | ${fmt(one.requests)} | ${fmt(one.secs, 1)} s (${fmt(one.evs)} events/s; all ${fmt(ru.n)}: about ${fmt(oneAllSecs)} s) | ${fmt(one.pgCpu, 1)} s | ${fmt(1e6 * one.pgCpu / one.n, 1)} µs | one call per event |`);
    L.push('', `Rolled up, Stripe gets ${fmt(ru.n / Math.max(ru.calls, 1))} events per call, the drain takes ${fmt(oneAllSecs / Math.max(ru.secs, 0.001), 1)}x less time than one by one would, and each source event costs ${fmt((one.pgCpu / one.n) / Math.max(ru.pgCpu / ru.n, 1e-9), 1)}x less PostgreSQL CPU.`, '');
  }

  if (R.memory) {
    L.push(`## 5. Memory and bloat over ${fmt(R.memory.total)} events (plain HTTP/1.1)`, '');
    const mm = R.memory;
    L.push(`pgbench enqueues batches of 100 events (2 clients) at ${mm.rate ? fmt(mm.rate) + ` events/s (half the plain path's 0 ms drain rate above, but at least ${fmt(P.memEvents / P.memProduceSeconds)} so that the producer ends within ${fmt(P.memProduceSeconds / 60)} minutes)` : 'full speed'} while the worker delivers at 0 ms;`,
      'sampled every second. Autovacuum at its defaults.', '');
    L.push('| | before | peak | after |', '|---|---|---|---|');
    L.push(`| worker RSS (VmRSS: includes shared buffers it touched) | ${fmt(mm.before.rss)} kB | ${fmt(mm.peak.rss)} kB | ${fmt(mm.after.rss)} kB |`);
    L.push(`| worker private memory (RssAnon) | ${fmt(mm.before.anon)} kB | ${fmt(mm.peak.anon)} kB | ${fmt(mm.after.anon)} kB |`);
    L.push(`| pg_total_relation_size(outbox) | ${fmt(mm.before.outbox / 1024)} kB | ${fmt(mm.peak.outbox / 1024)} kB | ${fmt(mm.after.outbox / 1024)} kB; ${fmt(mm.after.outboxVacuumed / 1024)} kB after a VACUUM (what autovacuum does within a minute) |`);
    L.push('', 'Delivered rows leave dead tuples in the outbox until autovacuum (every `autovacuum_naptime`, 1 minute by default) frees',
      'their space, so the outbox grows to about a minute of traffic (plus any backlog) and should then stay there: compare the peak of',
      'a 100,000-event run with that of a 1,000,000-event run. Private memory staying flat is what shows the worker does not leak.', '');
    const mmDone = mm.complete === false
      ? `Timed out after ${fmt(mm.secs, 1)} s (the section's limit): ${fmt(mm.delivered)} of ${fmt(mm.total)} events delivered`
      : `${fmt(mm.total)} events delivered in ${fmt(mm.secs, 1)} s (${fmt(mm.total / mm.secs)} events/s end to end)`;
    L.push(`${mmDone}; autovacuum ran ${mm.autovacuums} time(s) on the outbox.`,
      `\`stripe_meter.meter_events\` (delivered rows, kept for \`delivered_retention\`) grew to ${fmt(mm.meterEvents / 2 ** 20)} MiB, as intended.`, '');
  }

  if (R.scaling) {
    L.push('## 6. Scaling with requests in flight (100 ms, plain HTTP/1.1)', '');
    L.push(`Throughput over ${P.scaleSeconds} s after ${P.scaleWarm} s of warm-up per setting, changed by reload while draining a pre-filled outbox.`, '');
    L.push('![throughput vs max_in_flight](scaling.png)', '');
    L.push('| max_in_flight | events/s | ideal (in flight / 100 ms) | efficiency |', '|---|---|---|---|');
    for (const r of R.scaling) L.push(`| ${r.maxInFlight} | ${fmt(r.evs)} | ${fmt(r.ideal)} | ${pct(r.evs, r.ideal)} |`);
    L.push('');
  }

  // what explains the figures, derived from them
  const notes = [...(R.notes || [])];
  const load = Number(m.load.split(' ')[0]);
  if (load > 0.5 * cores) {
    notes.push(`- The machine was busy when the run started (load average ${m.load} on ${cores} cores): every figure here is lower, and CPU per event higher, than on an idle machine.`);
  }
  for (const p of paths) {
    const d0 = drainOf(p, 0);
    if (d0 && d0.evs < 6000) {
      const perEv = us(d0.pgCpu + d0.mockCpu, d0.delivered);
      notes.push(`- ${PATH_LABEL[p]} at 0 ms: the worker, the rest of PostgreSQL and the mock share ${cores} cores: together they kept ${fmt(busyOf(d0), 2)} cores busy, at ${fmt(us(d0.pgCpu, d0.delivered))} µs (PostgreSQL) + ${fmt(us(d0.mockCpu, d0.delivered))} µs (mock) of CPU per event, so ${fmt(1e6 * cores / perEv)} events/s is the most this machine could give with every core on it.${ceilingOf(p) ? ` The mock alone reaches ${fmt(ceilingOf(p))} events/s under ${ceilingTool(p)}.` : ''}`);
    }
  }
  const v2h = v2Of('h2', 100);
  if (v2h && v2h.evs < 10000) {
    const perEv = (v2h.pgCpu + v2h.mockCpu) / v2h.delivered;
    notes.push(`- API v2 over TLS + HTTP/2 at 100 ms: ${fmt(v2h.evs)} events/s. PostgreSQL (mostly the worker: ${fmt(us(v2h.workerCpu, v2h.delivered), 1)} µs per event) and the mock spent ${fmt(1e6 * perEv, 1)} µs of CPU per event and kept ${fmt(busyOf(v2h), 2)} of ${cores} cores busy, the worker waiting for a CPU ${pct(v2h.workerWait, v2h.secs)} of the time; ${fmt(cores / perEv)} events/s is the most ${cores} cores could give at that cost.`);
  }
  if (R.enqueue && (R.enqueue.best.plain_insert / R.enqueue.best.function > 1.3 || R.enqueue.best.plain_insert / R.enqueue.best.outbox_insert > 1.3)) {
    notes.push('- Enqueue: callgrind on one pgbench backend (prepared, worker disabled) counts about 149k instructions per direct'
      + ' INSERT into the outbox and 165k per stripe_meter_event_create() against 124k per plain INSERT. What remains is the'
      + ' validation trigger\'s index probes of meters and sync_state (about 12k) and, for the function, its SECURITY DEFINER'
      + ' call and the SPI INSERT (about 27k). Compare the figures above with the load average (src/enqueue.c,'
      + ' src/store_probe.c).');
  }
  {
    const plain = P.latencies.map((lat) => drainOf('http1', lat)).filter(Boolean);
    const pgUsMax = plain.length ? Math.max(...plain.map((d) => us(d.pgCpu, d.delivered))) : 0;
    if (pgUsMax > 100) {
      notes.push(`- PostgreSQL CPU per v1 event on plain HTTP/1.1 (up to ${fmt(pgUsMax, 1)} µs): almost all of it is the worker. A profile`
        + ' of it over TLS + HTTP/2 at 100 ms (perf with DWARF call graphs and pg_stat_statements, 40,000 events for 5,000 customers,'
        + ' 512 in flight) put about 47 % in libcurl\'s socket handling (curl_multi_socket_action: libcurl itself about half,'
        + ' nghttp2, TLS and malloc the rest) and about 43 % in SQL: the record (about 17 %: the outbox DELETE and the meter_events'
        + ' INSERT), the claim (about 16 %, of which the walk over the keys with events waiting 5 %) and the durable sent marks'
        + ' (about 8 %: in a backlog the events waiting behind a busy key or a full window are marked when they go; an event'
        + ' that goes out as soon as it is claimed is marked by the claim). With API v2 (up to 100 events per request) the CPU'
        + ' per event is almost all that SQL. doc/performance.md has the figures before and after.');
    }
  }
  for (const x of (R.latency ? R.latency.loads : [])) {
    // more in the outbox than a tenth of a second brings: the probes wait behind a backlog
    if (x.rate < 0.95 * x.offered || x.queuedP50 > x.offered / 10) {
      notes.push(`- Latency at ${fmt(x.offered)} events/s offered: ${fmt(x.rate)} events/s delivered, with a median of ${fmt(x.queuedP50)} events in the outbox (queued, claimed or in flight) while the probes ran, and the machine's cores ${pct(x.cpuBusy, 1)} busy (pgbench, its backends, the worker and the mock). The probes waited behind that backlog: this latency measures what the machine can carry, not the wake-up path. At that load a backlog, once formed, drains only slowly, so the figure varies from run to run.`);
    }
  }
  {
    // requests repeated over TLS + HTTP/2, and what the worker last saw
    const rep = (R.drain || []).filter((r) => pathOf(r) === 'h2' && r.requests !== undefined && r.requests > r.delivered);
    // the worker's last errors, without the key that varies
    const errs = [...new Set(rep.map((r) => r.lastError).filter(Boolean)
      .map((e) => e.replace(/: meter_event:[0-9a-f-]+/, '').replace(/ \(that probably means.*?\)/, '').slice(0, 160)))];
    if (rep.length) {
      notes.push(`- Over TLS + HTTP/2 some requests were sent again: ${rep.map((r) => `${r.customers} ${r.latency} ms: ${fmt(r.requests - r.delivered)} (${fmt(r.replays)} replayed, ${fmt(r.idempotencyConflicts)} 409s, ${fmt(r.clientAborts)} streams the client gave up on, ${conns(r)} connections)`).join('; ')}.`
        + ' The Idempotency-Key keeps each event billed once, but every repeat costs a request.'
        + `${errs.length ? ` The worker's last error after these drains: ${errs.map((e) => `"${e}"`).join(', ')}.` : ''}`);
    }
  }
  {
    const h = drainOf('h2', 100);
    const p1 = drainOf('http1', 100);
    notes.push('- Connections and file descriptors: over TLS + HTTP/2 the worker multiplexes its requests in flight over at most 8 connections'
      + ` in use (stripe_meter.max_connections = 0, automatic)${h ? `; at 100 ms it held at most ${fmt(openConns(h))} open at once (idle ones included), ${conns(h)} distinct over the drain, up to ${fmt(h.maxStreamsPerConnection)} streams on one` : ''}, so`
      + ' PostgreSQL\'s default `max_files_per_process` (1000) is plenty and that path runs with it untouched. Over plain HTTP/1.1 every'
      + ' request in flight holds its own connection, and PostgreSQL lets a process use about a third of `max_files_per_process` for'
      + ' sockets: with the default the worker caps itself at about 320 connections (3,200 events/s at 100 ms), so that path runs with'
      + ` \`max_files_per_process = 2000\`${p1 ? ` and held ${fmt(openConns(p1))} connections at 100 ms` : ''}.`);
  }
  L.push('## Notes', '', ...notes, '');
  return L.join('\n');
}

// ---------------------------------------------------------------- main

(async () => {
  const t0 = nowMs();
  // BENCH_REPORT_FROM=bench/out/results.json re-renders RESULTS.md from a
  // saved run (or the JSON a BENCH_ONLY run printed: its sections only);
  // BENCH_REPORT_TO=FILE writes it elsewhere (and leaves scaling.png alone)
  if (process.env.BENCH_REPORT_FROM) {
    const R = JSON.parse(fs.readFileSync(process.env.BENCH_REPORT_FROM, 'utf8'));
    fs.writeFileSync(process.env.BENCH_REPORT_TO || path.join(BENCH_DIR, 'RESULTS.md'), report(R));
    if (R.scaling && !process.env.BENCH_REPORT_TO) await plotScaling(R.scaling);
    return;
  }
  db = new Client({ database: 'postgres' });
  await db.connect();
  await db.query(`CREATE DATABASE ${DB}`);
  await db.end();
  db = new Client({ database: DB });
  await db.connect();
  dbPid = (await sql('SELECT pg_backend_pid() AS p'))[0].p;
  await db.query('CREATE EXTENSION stripe_meter');
  await setConf('stripe_meter.enabled', 'off');
  await workerPid();

  const R = { machine: machine() };
  // BENCH_ONLY=drain,latency,... runs some sections only (for development):
  // it prints their figures and leaves RESULTS.md and scaling.png alone
  const only = process.env.BENCH_ONLY ? process.env.BENCH_ONLY.split(',') : null;
  const sections = [['enqueue', benchEnqueue], ['wrk', benchWrk], ['h2load', benchH2load], ['drain', benchDrain], ['v2', benchV2],
    ['sdk', benchSdk],
    ['latency', benchLatency], ['fairness', benchFairness], ['rollup', benchRollup], ['scaling', benchScaling],
    // steady state: the producer offers half the measured 0 ms drain rate (the producer shares the CPU), so the outbox
    // should stay small if delivery and autovacuum keep up
    ['memory', () => benchMemory(R.drain ? 0.5 * R.drain.find((r) => r.latency === 0 && r.customers === 'many' && pathOf(r) === 'http1').evs : null)]];
  R.seconds = {};
  for (const [name, fn] of sections) {
    if (only && !only.includes(name)) continue;
    const ts = nowMs();
    R[name] = await fn();
    R.seconds[name] = Math.round((nowMs() - ts) / 1000);
  }
  R.seconds.total = Math.round((nowMs() - t0) / 1000);
  log(`sections took (s): ${JSON.stringify(R.seconds)}`);
  R.notes = NOTES;
  if (only) {
    console.log(JSON.stringify(R, null, 1));
    await db.end();
    return;
  }
  fs.writeFileSync(path.join(BENCH_DIR, 'RESULTS.md'), report(R));
  await plotScaling(R.scaling);
  fs.mkdirSync(path.join(BENCH_DIR, 'out'), { recursive: true });
  fs.writeFileSync(path.join(BENCH_DIR, 'out', 'results.json'), JSON.stringify(R, null, 1));
  log(`done in ${fmt((nowMs() - t0) / 1000)} s; bench/RESULTS.md written`);
  await db.end();
})().catch((e) => { console.error(e); process.exit(1); });
