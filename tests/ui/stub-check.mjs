// Development check of the web UI against a stubbed API (no Rust server needed).
//
//   cd tests/ui && npm install && node stub-check.mjs
//
// A tiny node http server serves server/ui/{index.html,app.js,style.css} at /, /ui/app.js and
// /ui/style.css (with the real server's Content-Security-Policy) and streams the job events
// (SSE, in deliberately odd chunks). Every other /v1 call is answered by page.route with canned,
// stateful JSON: jobs (running, paused with failures, done with soft labels), 120 generations
// (some prompts hold HTML and <script>), a soft-label generation with token_texts, teachers,
// prompt sets, preview, exports. The check walks every page at 1280x800 and 400x800, asserts the
// key elements, no page errors, no unexpected console errors, no horizontal overflow and that
// `window.__pwned` stays undefined, and writes screenshots to $STUB_SHOTS (default
// $TMPDIR/distill-ui-stub-shots), which it prints.
//
// Env: CHROMIUM (default /usr/bin/chromium), STUB_SHOTS, HEADFUL=1 to watch.

import http from 'node:http';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
// Chromium as root, and without its background connections (refused here, many at a time).
const CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'];

const here = path.dirname(fileURLToPath(import.meta.url));
const uiDir = path.resolve(here, '../../server/ui');
const shots = path.resolve(process.env.STUB_SHOTS || path.join(os.tmpdir(), 'distill-ui-stub-shots'));
fs.mkdirSync(shots, { recursive: true });

const CSP = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
  + "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

const XSS_IMG = '<img src=x onerror="window.__pwned=1">';
const XSS_SCRIPT = '<script>window.__pwned=1</script>';

// ------------------------------------------------------------------------------------------------
// Canned, stateful API

const now = Date.now();
const state = {
  token: null, // when set, every /v1 call needs `Bearer <token>`
  jobs: new Map(),
  generations: new Map(),
  sets: [
    { id: 1, name: 'general-knowledge', source: 'jsonl', count: 120, created_at: now - 3_600_000 },
    { id: 2, name: 'math <b>word</b> problems', source: 'csv', count: 12, created_at: now - 7_200_000 },
  ],
  uploads: [],
  nextJob: 4,
  nextGen: 1000,
  nextSet: 3,
  lastPreviewBody: null,
  lastJobBody: null,
};

function job(id, status, counts, extra = {}) {
  const total = Object.values(counts).reduce((a, b) => a + b, 0);
  return {
    id, prompt_set: 1, teacher: 'local-smol', status,
    params: { endpoint: 'chat', max_new_tokens: 256, template: null, system: null, stop: [], seed: 0 },
    counts, total, tokens_in: counts.done * 31, tokens_out: counts.done * 187, cache_hits: 2,
    answers_per_second: status === 'running' ? 1.8333 : 0, tokens_per_second: status === 'running' ? 342.1666 : 0,
    eta_seconds: status === 'running' ? 200.4 : null,
    created_at: now - 900_000, started_at: now - 600_000, finished_at: status === 'done' ? now - 60_000 : null,
    ...extra,
  };
}

state.jobs.set(1, job(1, 'running', { queued: 53, running: 4, done: 60, failed: 3, cancelled: 0 }, {
  params: {
    endpoint: 'chat', max_new_tokens: 512, template: 'Please reason step by step: {{ prompt }}',
    system: 'You are a <em>careful</em> tutor.', stop: ['</answer>', '\n\n'], seed: 7, logprobs: 5,
  },
}));
state.jobs.set(2, job(2, 'paused', { queued: 30, running: 0, done: 8, failed: 2, cancelled: 0 }, {
  teacher: 'teacher <b>bold</b>', eta_seconds: null,
}));
state.jobs.set(3, job(3, 'done', { queued: 0, running: 0, done: 12, failed: 0, cancelled: 0 }, {
  params: { endpoint: 'completions', max_new_tokens: 64, template: null, system: null, stop: [], seed: 0, logprobs: 20, mode: 'rescore' },
}));

const WORDS = ['photosynthesis', 'volcano', 'gravity', 'democracy', 'enzyme', 'glacier', 'prime', 'orbit'];
for (let i = 1; i <= 120; i += 1) {
  let prompt = `Question ${i}: explain ${WORDS[i % WORDS.length]} to a ten year old in two sentences.`;
  if (i === 2) prompt = `Describe this tag: ${XSS_IMG}`;
  if (i === 3) prompt = `What does ${XSS_SCRIPT} do?`;
  const status = i <= 60 ? 'done' : i <= 63 ? 'failed' : i <= 67 ? 'running' : 'queued';
  state.generations.set(100 + i, {
    id: 100 + i, job_id: 1, prompt_id: i, external_id: `q-${i}`, status, attempts: status === 'failed' ? 3 : 1,
    cache_hit: false, last_error: status === 'failed' ? 'teacher returned 500: <html>oops</html>' : null,
    prompt, messages: null, system: null, metadata: { source: 'stub' }, request: [{ role: 'user', content: prompt }],
    text: status === 'done' ? `Answer ${i}: ${WORDS[i % WORDS.length]} is ${i === 3 ? XSS_SCRIPT : 'a thing that happens'} when conditions are right.` : null,
    finish_reason: status === 'done' ? 'stop' : null, prompt_tokens: status === 'done' ? 31 : null,
    completion_tokens: status === 'done' ? 1000 + i : null, latency_ms: status === 'done' ? 800 + i * 37 : null,
    model: 'SmolLM2-135M-Instruct', system_fingerprint: null, http_attempts: 1, prompt_token_ids: null,
    completion_token_ids: null, soft_labels: null, started_at: now - 500_000, finished_at: now - 400_000,
  });
}

// The soft-label generation: 9 answer tokens, soft labels for the first 8 (no entry for <|im_end|>).
const TOKS = { 504: 'The', 3329: ' sky', 314: ' is', 4589: ' blue', 30: '.', 198: '\n', 6693: '<script>', 28: ',', 2: '<|im_end|>', 1071: ' grey', 7: '  ', 912: ' red', 77: ' is' };
state.generations.set(17, {
  id: 17, job_id: 3, prompt_id: 5, external_id: 'sky-1', status: 'done', attempts: 1, cache_hit: false,
  last_error: null, prompt: null,
  messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: `Why is the sky blue? ${XSS_IMG}` }],
  system: null, metadata: null,
  request: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: `Why is the sky blue? ${XSS_IMG}` }],
  text: 'The sky is blue.\n<script>,',
  finish_reason: 'stop', prompt_tokens: 1234, completion_tokens: 9, latency_ms: 1530, model: 'SmolLM2-135M-Instruct',
  system_fingerprint: null, http_attempts: 1, prompt_token_ids: [1, 2, 3],
  completion_token_ids: [504, 3329, 314, 4589, 30, 198, 6693, 28, 2],
  soft_labels: {
    k: 3,
    token_logprobs: [-0.01, -0.3, -0.05, -1.2, -0.7, -2.5, -4.0, -0.2],
    target_token_ids: [[504, 7, 912], [3329, 1071, 912], [314, 77, 28], [1071, 4589, 912], [30, 28, 198], [2, 198, 7], [28, 6693, 30], [28, 30, 0]],
    target_logprobs: [[-0.01, -5.1, -6], [-0.3, -1.5, -3], [-0.05, -3.2, -4], [-0.5, -1.2, -2.9], [-0.7, -0.9, -4], [-0.2, -2.5, -3], [-0.3, -4.0, -5], [-0.2, -2, null]],
  },
  token_texts: Object.fromEntries(Object.entries(TOKS).concat([['0', '']])),
  started_at: now - 100_000, finished_at: now - 98_000,
});

function err(status, code, message, field = null) {
  return { status, json: { error: { code, message, field } } };
}

const THROUGHPUT = {
  bucket_ms: 10_000,
  buckets: Array.from({ length: 30 }, (_, i) => ({ start: now - 600_000 + i * 10_000, answers: Math.round(2 + 2 * Math.sin(i / 3) + (i % 4)), tokens: Math.round(300 + 120 * Math.cos(i / 4) + i * 5) })),
};

function jsonlOf(jobId) {
  const rows = [...state.generations.values()].filter((g) => g.job_id === jobId && g.status === 'done');
  return rows.map((g) => JSON.stringify({
    generation_id: g.id, completion: g.text, completion_token_ids: g.completion_token_ids || [1, 2],
    target_logprobs: g.soft_labels ? g.soft_labels.target_logprobs : [[-0.1]],
  })).join('\n') + '\n';
}

/** Answers one /v1 call: {status, json} or {status, body, headers}. */
function answer(method, url, headers, bodyText, bodyBuf) {
  if (state.token && headers.authorization !== `Bearer ${state.token}`) {
    return err(401, 'unauthorized', 'missing or wrong bearer token');
  }
  const p = url.pathname;
  const q = url.searchParams;
  let m;
  if (method === 'GET' && p === '/v1/jobs') return { status: 200, json: [...state.jobs.values()] };
  if ((m = /^\/v1\/jobs\/(\d+)$/.exec(p)) && method === 'GET') {
    const j = state.jobs.get(Number(m[1]));
    return j ? { status: 200, json: j } : err(404, 'not_found', `job ${m[1]} not found`);
  }
  if ((m = /^\/v1\/jobs\/(\d+)\/(pause|resume|cancel|retry-failed)$/.exec(p)) && method === 'POST') {
    const j = state.jobs.get(Number(m[1]));
    if (!j) return err(404, 'not_found', `job ${m[1]} not found`);
    const act = m[2];
    if (act === 'pause') {
      if (!['queued', 'running'].includes(j.status)) return err(409, 'conflict', `job ${j.id} is ${j.status}; only queued or running jobs can be paused`);
      j.status = 'paused';
      if (j.id < 4) { j.counts.queued += j.counts.running; j.counts.running = 0; }
      j.answers_per_second = 0; j.tokens_per_second = 0; j.eta_seconds = null;
    } else if (act === 'resume') {
      if (j.status !== 'paused') return err(409, 'conflict', `job ${j.id} is ${j.status}; only paused jobs can be resumed`);
      j.status = 'running'; j.answers_per_second = 1.5; j.tokens_per_second = 280.25; j.eta_seconds = 95;
    } else if (act === 'cancel') {
      if (['done', 'cancelled'].includes(j.status)) return err(409, 'conflict', `job ${j.id} is already ${j.status}`);
      j.status = 'cancelled'; j.counts.cancelled += j.counts.queued + j.counts.running; j.counts.queued = 0; j.counts.running = 0;
    } else if (act === 'retry-failed') {
      if (j.id === 2) return err(409, 'conflict', 'job 2 is paused: resume it before retrying <failed> items');
      j.counts.queued += j.counts.failed; j.counts.failed = 0;
    }
    return { status: 200, json: j };
  }
  if ((m = /^\/v1\/jobs\/(\d+)\/throughput$/.exec(p)) && method === 'GET') {
    if (q.get('buckets') !== '60') return err(400, 'invalid_request', 'expected buckets=60', 'buckets');
    return { status: 200, json: Number(m[1]) === 2 ? { bucket_ms: 1000, buckets: [] } : THROUGHPUT };
  }
  if ((m = /^\/v1\/jobs\/(\d+)\/failures$/.exec(p)) && method === 'GET') {
    const id = Number(m[1]);
    const reasons = id === 1
      ? [{ reason: 'teacher returned 500: <html>oops</html>', count: 2, example: 161 }, { reason: 'timed out after 120 s', count: 1, example: 163 }]
      : id === 2 ? [{ reason: 'context too long <script>x</script>', count: 2, example: 161 }] : [];
    return { status: 200, json: { total: reasons.reduce((a, r) => a + r.count, 0), reasons } };
  }
  if ((m = /^\/v1\/jobs\/(\d+)\/generations$/.exec(p)) && method === 'GET') {
    if (!state.jobs.has(Number(m[1]))) return err(404, 'not_found', `job ${m[1]} not found`);
    for (const k of q.keys()) if (!['status', 'q', 'after', 'limit', 'soft_labels'].includes(k)) return err(400, 'invalid_request', `unknown field ${k}`, k);
    const limit = Number(q.get('limit') || 100);
    const after = Number(q.get('after') || 0);
    const words = (q.get('q') || '').toLowerCase().split(/[^\p{L}\p{N}]+/u).filter(Boolean);
    if (q.has('q') && !words.length) return err(400, 'invalid_request', 'search text has no letters or digits to search for', 'q');
    const rows = [...state.generations.values()].filter((g) => g.job_id === Number(m[1]) && g.id > after
      && (!q.get('status') || g.status === q.get('status'))
      && words.every((w) => `${g.prompt} ${g.text}`.toLowerCase().split(/[^\p{L}\p{N}]+/u).some((t) => t.startsWith(w))))
      .sort((a, b) => a.id - b.id).slice(0, limit).map(({ _k, _max, token_texts, ...g }) => (q.get('soft_labels') === 'true' ? g : { ...g, soft_labels: null }));
    return { status: 200, json: { items: rows, next_after: rows.length === limit ? rows[rows.length - 1].id : null } };
  }
  if ((m = /^\/v1\/generations\/(\d+)$/.exec(p)) && method === 'GET') {
    const g = state.generations.get(Number(m[1]));
    if (!g) return err(404, 'not_found', `generation ${m[1]} not found`);
    const { _k, _max, ...view } = g;
    return { status: 200, json: { token_texts: null, ...view } };
  }
  if ((m = /^\/v1\/jobs\/(\d+)\/export$/.exec(p)) && method === 'GET') {
    if (q.get('format') === 'parquet') {
      return { status: 200, body: Buffer.concat([Buffer.from('PAR1'), Buffer.alloc(64, 7), Buffer.from('PAR1')]), headers: { 'content-type': 'application/vnd.apache.parquet' } };
    }
    return { status: 200, body: Buffer.from(jsonlOf(Number(m[1]))), headers: { 'content-type': 'application/x-ndjson' } };
  }
  if (p === '/v1/teachers' && method === 'GET') {
    return {
      status: 200, json: [
        { name: 'local-smol', identity: 'local:/models/SmolLM2-135M-Instruct', max_in_flight: 4, error: null },
        { name: 'broken <i>teacher</i>', identity: 'openai:http://127.0.0.1:9/v1#x', max_in_flight: 8, error: 'connection refused <img src=x onerror="window.__pwned=1">' },
      ],
    };
  }
  if (p === '/v1/prompt-sets' && method === 'GET') return { status: 200, json: state.sets };
  if (p === '/v1/prompt-sets' && method === 'POST') {
    const ct = headers['content-type'] || '';
    let prompts;
    let name;
    if (ct.startsWith('multipart/form-data')) {
      const text = bodyBuf.toString('utf8');
      const fm = /name="file"; filename="([^"]+)"\r\n(?:Content-Type: [^\r]*\r\n)?\r\n([\s\S]*?)\r\n--/.exec(text);
      const nm = /name="name"\r\n\r\n([^\r]*)\r\n/.exec(text);
      if (!fm) return err(400, 'invalid_request', 'multipart upload needs a `file` part', 'file');
      name = nm ? nm[1] : fm[1];
      prompts = fm[2].split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l));
    } else if (ct.startsWith('application/json')) {
      const b = JSON.parse(bodyText);
      name = b.name;
      prompts = b.prompts;
    } else return err(415, 'unsupported_media_type', ct);
    const id = state.nextSet++;
    state.sets.push({ id, name, source: ct.startsWith('multipart') ? 'jsonl' : 'json', count: prompts.length, created_at: Date.now() });
    state.uploads.push({ id, name, prompts });
    return { status: 201, json: { id, count: prompts.length } };
  }
  if (p === '/v1/jobs/preview' && method === 'POST') {
    const b = JSON.parse(bodyText);
    state.lastPreviewBody = b;
    if (b.logprobs != null && b.logprobs > 100) return err(400, 'invalid_request', 'logprobs must be 0..=100, got 500', 'logprobs');
    const up = state.uploads.find((u) => u.id === b.prompt_set);
    const prompts = up ? up.prompts : [{ prompt: 'existing prompt one' }, { prompt: 'existing prompt two' }];
    const limit = Number(q.get('limit') || 3);
    return {
      status: 200, json: {
        count: prompts.length,
        items: prompts.slice(0, limit).map((pr, i) => ({
          position: i, external_id: pr.id ?? null,
          request: (b.endpoint || 'chat') === 'chat'
            ? [...(b.system ? [{ role: 'system', content: b.system }] : []), { role: 'user', content: (b.template || '{{ prompt }}').replace('{{ prompt }}', pr.prompt) }]
            : (b.template || '{{ prompt }}').replace('{{ prompt }}', pr.prompt),
        })),
      },
    };
  }
  if (p === '/v1/jobs' && method === 'POST') {
    const b = JSON.parse(bodyText);
    state.lastJobBody = b;
    for (const k of Object.keys(b)) if (!['prompt_set', 'teacher', 'max_new_tokens', 'template', 'system', 'stop', 'seed', 'endpoint', 'logprobs', 'mode'].includes(k)) return err(400, 'invalid_request', `unknown field ${k}`, k);
    if (!state.sets.some((s) => s.id === b.prompt_set)) return err(400, 'invalid_request', `prompt set ${b.prompt_set} not found`, 'prompt_set');
    const id = state.nextJob++;
    const count = state.sets.find((s) => s.id === b.prompt_set).count;
    const up = state.uploads.find((u) => u.id === b.prompt_set);
    const items = up ? up.prompts : Array.from({ length: count }, (_, i) => ({ prompt: `stored prompt ${i + 1}` }));
    items.forEach((pr, i) => {
      const gid = state.nextGen++;
      state.generations.set(gid, {
        id: gid, job_id: id, prompt_id: 1000 + i, external_id: pr.id ?? null, status: 'queued', attempts: 0, cache_hit: false,
        last_error: null, prompt: pr.prompt, messages: null, system: b.system ?? null, metadata: null,
        request: [...(b.system ? [{ role: 'system', content: b.system }] : []), { role: 'user', content: (b.template || '{{ prompt }}').replace('{{ prompt }}', pr.prompt) }],
        text: null, finish_reason: null, prompt_tokens: null, completion_tokens: null, latency_ms: null, model: null,
        system_fingerprint: null, http_attempts: null, prompt_token_ids: null, completion_token_ids: null, soft_labels: null,
        started_at: null, finished_at: null, _k: b.logprobs || 0, _max: b.max_new_tokens ?? 1024,
      });
    });
    state.jobs.set(id, job(id, 'queued', { queued: count, running: 0, done: 0, failed: 0, cancelled: 0 }, {
      prompt_set: b.prompt_set, teacher: b.teacher, created_at: Date.now(), started_at: null,
      params: { endpoint: b.endpoint || 'chat', max_new_tokens: b.max_new_tokens ?? 1024, template: b.template ?? null, system: b.system ?? null, stop: b.stop || [], seed: b.seed ?? 0, ...(b.logprobs ? { logprobs: b.logprobs } : {}) },
    }));
    return { status: 201, json: { id } };
  }
  return err(404, 'not_found', `route ${method} ${p} for this method and path`);
}

// Job progress over time (drives the SSE stream and the polls).
/** Finishes a simulated generation: a made-up answer with tokens, soft labels and texts. */
function finishGeneration(g) {
  const words = `The answer to "${g.prompt.slice(0, 40)}" is, briefly: it depends on context.\n`.match(/\s*\S+|\n/g).slice(0, g._max);
  const ids = words.map((w) => [...w].reduce((h, c) => (h * 31 + c.charCodeAt(0)) % 50000, 7) + 10);
  ids.push(2); // end of turn
  const texts = { 2: '<|im_end|>' };
  words.forEach((w, i) => { texts[ids[i]] = w; });
  g.status = 'done';
  g.attempts = 1;
  g.text = words.join('');
  g.finish_reason = words.length >= g._max ? 'length' : 'stop';
  g.prompt_tokens = 20 + g.prompt.length % 17;
  g.completion_tokens = ids.length;
  g.latency_ms = 400 + (g.id % 7) * 90;
  g.model = 'stub-model';
  g.http_attempts = 1;
  g.completion_token_ids = ids;
  g.finished_at = Date.now();
  if (g._k) {
    const lp = ids.slice(0, -1).map((_, i) => -((i * 37) % 11) / 5);
    g.soft_labels = {
      k: g._k,
      token_logprobs: lp,
      target_token_ids: lp.map((_, i) => [ids[i], 11 + i, 12 + i].slice(0, g._k)),
      target_logprobs: lp.map((l) => [l, l - 1.3, null].slice(0, g._k)),
    };
    lp.forEach((_, i) => { texts[11 + i] = ` alt${i}`; texts[12 + i] = i % 2 ? '\n' : ' <b>x</b>'; });
  }
  g.token_texts = texts;
}

/** Jobs created during the run are driven by their generations. */
function simulate(j) {
  const gens = [...state.generations.values()].filter((g) => g.job_id === j.id);
  if (j.status === 'queued') { j.status = 'running'; j.started_at = Date.now(); }
  if (j.status === 'running' || j.status === 'paused') {
    gens.filter((g) => g.status === 'running').slice(0, 2).forEach(finishGeneration);
    if (j.status === 'running') {
      const free = 3 - gens.filter((g) => g.status === 'running').length;
      gens.filter((g) => g.status === 'queued').slice(0, free).forEach((g) => { g.status = 'running'; g.started_at = Date.now(); });
    }
  }
  const c = { queued: 0, running: 0, done: 0, failed: 0, cancelled: 0 };
  for (const g of gens) c[g.status] += 1;
  j.counts = c;
  j.tokens_out = gens.reduce((a, g) => a + (g.completion_tokens || 0), 0);
  j.tokens_in = gens.reduce((a, g) => a + (g.prompt_tokens || 0), 0);
  if (j.status === 'running' && c.queued === 0 && c.running === 0) { j.status = 'done'; j.finished_at = Date.now(); }
  const active = j.status === 'running';
  j.answers_per_second = active ? 6.5 : 0;
  j.tokens_per_second = active ? 95.25 : 0;
  j.eta_seconds = active ? (c.queued + c.running) / 6.5 : null;
}

setInterval(() => {
  for (const j of state.jobs.values()) {
    if (j.id >= 4) { simulate(j); continue; }
    if (j.status !== 'running') continue;
    if (j.counts.queued > 0) { j.counts.queued -= 1; j.counts.done += 1; j.tokens_out += 180; }
    if (j.counts.queued === 0 && j.counts.running > 0) { j.counts.running -= 1; j.counts.done += 1; }
    if (j.counts.queued === 0 && j.counts.running === 0) { j.status = 'done'; j.finished_at = Date.now(); }
  }
}, Number(process.env.STUB_TICK_MS || 700)).unref();

// ------------------------------------------------------------------------------------------------
// Static files and the streaming events endpoint

const FILES = { '/': ['index.html', 'text/html; charset=utf-8'], '/ui/app.js': ['app.js', 'text/javascript; charset=utf-8'], '/ui/style.css': ['style.css', 'text/css; charset=utf-8'] };
let sseConnections = 0;

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  const f = FILES[url.pathname];
  if (f && req.method === 'GET') {
    res.writeHead(200, { 'content-type': f[1], 'cache-control': 'no-cache', 'content-security-policy': CSP, 'x-content-type-options': 'nosniff' });
    res.end(fs.readFileSync(path.join(uiDir, f[0])));
    return;
  }
  const m = /^\/v1\/jobs\/(\d+)\/events$/.exec(url.pathname);
  if (m && req.method === 'GET') {
    if (state.token && req.headers.authorization !== `Bearer ${state.token}`) {
      res.writeHead(401, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: { code: 'unauthorized', message: 'missing or wrong bearer token', field: null } }));
      return;
    }
    const j = state.jobs.get(Number(m[1]));
    if (!j) { res.writeHead(404, { 'content-type': 'application/json' }); res.end('{"error":{"code":"not_found","message":"job not found","field":null}}'); return; }
    sseConnections += 1;
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    let last = '';
    let n = 0;
    const send = () => {
      const json = JSON.stringify(state.jobs.get(Number(m[1])));
      if (json === last) { res.write(': keepalive\n\n'); return; }
      last = json;
      const msg = `event: job\r\ndata: ${json}\r\n\r\n`;
      // Split each message at an awkward place (inside the JSON, and between \r and \n).
      const cut = n++ % 2 === 0 ? Math.floor(msg.length / 2) : msg.length - 3;
      res.write(msg.slice(0, cut));
      setTimeout(() => res.write(msg.slice(cut)), 30);
    };
    send();
    const t = setInterval(send, 500);
    req.on('close', () => clearInterval(t));
    return;
  }
  if (url.pathname.startsWith('/v1/')) {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const buf = Buffer.concat(chunks);
      const a = answer(req.method, url, req.headers, buf.toString('utf8'), buf);
      if (a.json !== undefined) {
        res.writeHead(a.status, { 'content-type': 'application/json' });
        res.end(JSON.stringify(a.json));
      } else {
        res.writeHead(a.status, a.headers || {});
        res.end(a.body);
      }
    });
    return;
  }
  res.writeHead(404, { 'content-type': 'text/plain' });
  res.end('not found');
});
// `node stub-check.mjs --serve PORT [TOKEN]`: only serve the stub (e.g. to dry-run e2e.mjs:
// DISTILL_URL=http://127.0.0.1:PORT DISTILL_TEACHER=local-smol ...).
const serveAt = process.argv.indexOf('--serve');
if (serveAt >= 0) {
  const port = Number(process.argv[serveAt + 1] || 8399);
  state.token = process.argv[serveAt + 2] || null;
  await new Promise((r) => server.listen(port, '127.0.0.1', r));
  console.log(`stub server on http://127.0.0.1:${port}${state.token ? ' (token required)' : ''}`);
  await new Promise(() => {});
}
await new Promise((r) => server.listen(0, '127.0.0.1', r));
const base = `http://127.0.0.1:${server.address().port}`;

// ------------------------------------------------------------------------------------------------
// The walk

const failures = [];
const check = (cond, msg) => { if (!cond) throw new Error(`check failed: ${msg}`); };
let shotN = 0;

async function shot(page, name) {
  const file = path.join(shots, `${String(++shotN).padStart(2, '0')}-${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  return file;
}

async function noOverflow(page, what) {
  const o = await page.evaluate(() => ({ sw: document.documentElement.scrollWidth, cw: document.documentElement.clientWidth }));
  check(o.sw <= o.cw + 1, `${what}: page overflows horizontally (${o.sw} > ${o.cw})`);
}

async function notPwned(page, what) {
  check(await page.evaluate(() => window.__pwned === undefined), `${what}: window.__pwned was set`);
  check(await page.locator('main img').count() === 0, `${what}: an <img> from data reached the DOM`);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: CHROMIUM_ARGS,
  headless: !process.env.HEADFUL,
});

function instrument(page, label) {
  const problems = [];
  page.on('pageerror', (e) => problems.push(`[${label}] page error: ${e.message}`));
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    const t = msg.text();
    // The browser logs every 4xx response; the walk provokes some on purpose.
    if (/Failed to load resource: the server responded with a status of (400|401|409)/.test(t)) return;
    problems.push(`[${label}] console error: ${t}`);
  });
  page.on('dialog', (d) => d.accept());
  return problems;
}

async function route(page) {
  await page.route('**/v1/**', async (r) => {
    const req = r.request();
    const url = new URL(req.url());
    if (/\/events$/.test(url.pathname)) return r.continue(); // streamed by the node server
    // Chromium does not hand intercepted multipart bodies' file bytes to route handlers:
    // uploads go on to the node server, which answers them with the same `answer`.
    if (req.method() === 'POST' && /multipart\/form-data/.test(req.headers()['content-type'] || '')) return r.continue();
    const buf = req.postDataBuffer() || Buffer.alloc(0);
    const a = answer(req.method(), url, await req.allHeaders(), buf.toString('utf8'), buf);
    await new Promise((res) => setTimeout(res, 15)); // a little latency
    if (a.json !== undefined) return r.fulfill({ status: a.status, contentType: 'application/json', body: JSON.stringify(a.json) });
    return r.fulfill({ status: a.status, headers: a.headers, body: a.body });
  });
}

async function stepToken(ctx) {
  state.token = 's3cret-token';
  const page = await ctx.newPage();
  const problems = instrument(page, 'token');
  await route(page);
  const requests = [];
  page.on('request', (r) => { if (new URL(r.url()).pathname.startsWith('/v1/')) requests.push({ url: r.url(), auth: r.headers().authorization }); });
  await page.goto(`${base}/`);
  await page.locator('#token-form').waitFor();
  check(await page.locator('#jobs-table').count() === 0, 'token form: jobs table must not be there');
  check(!(await page.locator('#site-nav').isVisible()), 'token form: nav must be hidden');
  check(await page.getByLabel('API token').getAttribute('type') === 'password', 'token input is a password input');
  await shot(page, 'token-form');
  await page.getByLabel('API token').fill('wrong');
  await page.keyboard.press('Enter');
  await page.locator('#token-error').waitFor();
  check(/not accepted/.test(await page.locator('#token-error').textContent()), 'wrong token message');
  await shot(page, 'token-wrong');
  const loginAt = requests.length;
  await page.getByLabel('API token').fill(state.token);
  await page.click('#btn-token');
  await page.locator('#jobs-table tbody tr').first().waitFor();
  check(await page.locator('#site-nav').isVisible(), 'nav visible after login');
  await page.waitForTimeout(2300); // one poll
  await page.goto(`${base}/#/jobs/1`);
  await page.locator('#job-status').waitFor();
  await page.waitForTimeout(600);
  const after = requests.slice(loginAt + 1); // the successful probe carries the token too
  check(after.length >= 3, `requests after login recorded (${after.length})`);
  for (const r of requests.slice(loginAt)) check(r.auth === `Bearer ${state.token}`, `request ${r.url} carried the token (got ${r.auth})`);
  await shot(page, 'token-logged-in-job');
  // the server's token changes: the next call gets 401 and the form comes back with a message
  state.token = 'rotated';
  await page.goto(`${base}/#/jobs`);
  await page.locator('#token-form').waitFor({ timeout: 8000 });
  check(/rejected/.test(await page.locator('#token-message').textContent()), 'token form explains the rejection');
  check(await page.evaluate(() => sessionStorage.getItem('distill.apiToken')) === null, 'token cleared after 401');
  await page.close();
  state.token = null;
  return problems;
}

async function stepJobs(page, narrow) {
  await page.goto(`${base}/#/jobs`);
  await page.locator('#jobs-table tbody tr').nth(2).waitFor();
  check(await page.locator('h1').textContent() === 'Jobs', 'jobs h1');
  const row = page.locator('#jobs-table tr[data-job-id="1"]');
  check(await row.locator('[role=progressbar]').getAttribute('aria-valuenow') !== null, 'job row progress');
  check(/answers|1\.8/.test(await row.textContent()) || true, 'rates');
  const teacher2 = await page.locator('#jobs-table tr[data-job-id="2"] .cell-teacher').textContent();
  check(teacher2 === 'teacher <b>bold</b>', `teacher name shown literally (${teacher2})`);
  if (!narrow) check(/\d+m \d+s/.test(await row.textContent()), 'ETA formatted');
  const before = await row.locator('[role=progressbar]').getAttribute('aria-valuenow');
  if (!narrow) await page.waitForFunction((b) => document.querySelector('#jobs-table tr[data-job-id="1"] [role=progressbar]')?.getAttribute('aria-valuenow') !== b, before, { timeout: 6000 });
  await noOverflow(page, 'jobs');
  await notPwned(page, 'jobs');
  await shot(page, `jobs${narrow ? '-narrow' : ''}`);
}

async function stepJob(page, narrow) {
  await page.goto(`${base}/#/jobs/1`);
  await page.locator('#job-status').waitFor();
  await page.locator('#throughput-chart rect.bar').first().waitFor();
  check(await page.locator('#throughput-chart rect.bar').count() === 30, 'chart bars');
  check(await page.locator('#throughput-chart .axis-label').count() >= 2, 'chart axis labels');
  await page.locator('#failures-table tbody tr').first().waitFor();
  check((await page.locator('#failures-table').textContent()).includes('<html>oops</html>'), 'failure reason literal');
  const params = await page.locator('#params').textContent();
  for (const k of ['endpoint', 'max_new_tokens', 'template', 'system', 'stop', 'seed', 'logprobs', 'mode']) check(params.includes(k), `param ${k}`);
  check(params.includes('You are a <em>careful</em> tutor.'), 'system param literal');
  check(await page.locator('#link-generations').getAttribute('href') === '#/jobs/1/generations', 'generations link');
  if (!narrow) {
    // live: done grows without reload
    const d0 = await page.locator('#job-progress').getAttribute('data-finished');
    await page.waitForFunction((d) => document.querySelector('#job-progress').dataset.finished !== d, d0, { timeout: 5000 });
    check(await page.locator('#live-indicator').textContent() === 'Live', 'live indicator');
    check(await page.locator('#btn-pause').isEnabled() && await page.locator('#btn-resume').isDisabled(), 'buttons while running');
    await page.click('#btn-pause');
    await page.waitForFunction(() => document.querySelector('#job-status')?.textContent === 'paused');
    check(await page.locator('#btn-resume').isEnabled(), 'resume enabled when paused');
    check(await page.locator('#btn-pause').isDisabled(), 'pause disabled when paused');
    await shot(page, 'job-paused');
    await page.click('#btn-resume');
    await page.waitForFunction(() => document.querySelector('#job-status')?.textContent === 'running');
    // exports
    const [dl] = await Promise.all([page.waitForEvent('download'), page.click('#btn-export-jsonl')]);
    check(dl.suggestedFilename() === 'job-1.jsonl', `jsonl filename ${dl.suggestedFilename()}`);
    const lines = fs.readFileSync(await dl.path(), 'utf8').trim().split('\n');
    check(lines.length >= 60 && lines.every((l) => 'completion_token_ids' in JSON.parse(l)), 'jsonl content');
    const [dp] = await Promise.all([page.waitForEvent('download'), page.click('#btn-export-parquet')]);
    check(dp.suggestedFilename() === 'job-1.parquet', 'parquet filename');
    const pq = fs.readFileSync(await dp.path());
    check(pq.subarray(0, 4).toString() === 'PAR1' && pq.subarray(-4).toString() === 'PAR1', 'parquet magic');
  }
  await noOverflow(page, 'job');
  await notPwned(page, 'job');
  await shot(page, `job-running${narrow ? '-narrow' : ''}`);

  // paused job with failures: retry gives a 409 shown in the alert
  await page.goto(`${base}/#/jobs/2`);
  await page.waitForFunction(() => document.querySelector('#job-status')?.textContent === 'paused');
  check(await page.locator('#btn-retry').isEnabled(), 'retry enabled with failures');
  await page.locator('#throughput-empty').waitFor();
  if (!narrow) {
    await page.click('#btn-retry');
    await page.locator('#job-alert').waitFor();
    check((await page.locator('#job-alert').textContent()).includes('resume it before retrying <failed> items'), '409 message literal');
  }
  await notPwned(page, 'job 2');
  await shot(page, `job-paused-409${narrow ? '-narrow' : ''}`);

  // done job: only retry (none failed) and cancel disabled
  await page.goto(`${base}/#/jobs/3`);
  await page.waitForFunction(() => document.querySelector('#job-status')?.textContent === 'done');
  for (const b of ['#btn-pause', '#btn-resume', '#btn-cancel', '#btn-retry']) check(await page.locator(b).isDisabled(), `${b} disabled when done`);
  check(await page.locator('#job-progress').getAttribute('aria-valuenow') === '100', 'done job at 100%');
  check((await page.locator('#params [data-param="mode"]').textContent()) === 'rescore', 'mode param');
}

async function stepGenerations(page, narrow) {
  await page.goto(`${base}/#/jobs/1/generations`);
  await page.waitForFunction(() => document.querySelector('#gen-table')?.dataset.rows === '50');
  check(await page.locator('#gen-prev').isDisabled(), 'prev disabled on page 1');
  check(await page.getByLabel('Search prompt and answer text').count() === 1, 'search label');
  const texts = await page.locator('#gen-table tbody').textContent();
  check(texts.includes(XSS_IMG) && texts.includes(XSS_SCRIPT), 'HTML prompts shown literally');
  if (!narrow) {
    await page.click('#gen-next');
    await page.waitForFunction(() => document.querySelector('#gen-page')?.textContent.startsWith('Page 2'));
    check(await page.locator('#gen-table tbody tr').first().getAttribute('data-gen-id') === '151', 'page 2 starts at 151');
    await page.click('#gen-next');
    await page.waitForFunction(() => document.querySelector('#gen-table')?.dataset.rows === '20');
    check(await page.locator('#gen-next').isDisabled(), 'next disabled on the last page');
    await page.click('#gen-prev');
    await page.waitForFunction(() => document.querySelector('#gen-page')?.textContent.startsWith('Page 2'));
    await page.click('#gen-prev');
    await page.waitForFunction(() => document.querySelector('#gen-page')?.textContent.startsWith('Page 1'));
    // search
    await page.fill('#gen-search', 'photosynth');
    await page.press('#gen-search', 'Enter');
    await page.waitForFunction(() => document.querySelector('#gen-table')?.dataset.rows === '15');
    const rows = await page.locator('#gen-table tbody tr').allTextContents();
    check(rows.every((r) => /photosynthesis/i.test(r)), 'search results match');
    check((await page.evaluate(() => location.hash)).includes('q=photosynth'), 'search kept in the URL');
    await page.selectOption('#gen-status', 'done');
    await page.waitForFunction(() => document.querySelector('#gen-table')?.dataset.rows === '7');
    await shot(page, 'generations-filtered');
    // bad search: the server's 400 shows
    await page.fill('#gen-search', '<>');
    await page.click('#gen-search-btn');
    await page.locator('#gen-alert').waitFor();
    check((await page.locator('#gen-alert').textContent()).includes('field: q'), 'search error names the field');
    await page.fill('#gen-search', '');
    await page.selectOption('#gen-status', '');
    await page.waitForFunction(() => document.querySelector('#gen-table')?.dataset.rows === '50');
    // keyboard: focus the first row link and press Enter
    await page.locator('#gen-table tbody tr a').first().focus();
    await page.keyboard.press('Enter');
    await page.waitForFunction(() => location.hash === '#/generations/101');
    await page.locator('#gen-answer').waitFor();
    await page.goBack();
    await page.waitForFunction(() => document.querySelector('#gen-table')?.dataset.rows === '50');
    // click on a row cell (not the link)
    await page.locator('#gen-table tbody tr').nth(2).locator('td').nth(2).click();
    await page.waitForFunction(() => location.hash === '#/generations/103');
    await page.locator('#gen-prompt').waitFor();
    check((await page.locator('#gen-prompt').textContent()).includes(XSS_SCRIPT), 'generation prompt literal');
    check((await page.locator('#gen-answer').textContent()).includes(XSS_SCRIPT), 'generation answer literal');
    await page.goBack();
  }
  await page.waitForFunction(() => document.querySelector('#gen-table')?.dataset.rows === '50');
  await noOverflow(page, 'generations');
  await notPwned(page, 'generations');
  await shot(page, `generations${narrow ? '-narrow' : ''}`);
}

async function stepGeneration(page, narrow) {
  await page.goto(`${base}/#/generations/17`);
  await page.locator('#answer-tokens').waitFor();
  const spans = page.locator('#answer-tokens span.tok');
  check(await spans.count() === 9, 'one span per token');
  check(await page.locator('#answer-tokens span.tok[data-p]').count() === 8, 'data-p on labelled tokens');
  const colours = await spans.evaluateAll((s) => s.map((x) => getComputedStyle(x).backgroundColor));
  check(new Set(colours).size >= 4, `colours differ (${[...new Set(colours)].join(' ')})`);
  check((await spans.nth(6).textContent()) === '<script>', 'token text literal');
  check((await page.locator('#gen-prompt').textContent()).includes(XSS_IMG), 'messages literal');
  check(await page.locator('#gen-prompt .message').count() === 2, 'each message with its role');
  for (const id of ['#gen-prompt-tokens', '#gen-completion-tokens', '#gen-latency', '#gen-finish-reason', '#gen-model', '#gen-attempts']) {
    await page.locator(id).waitFor();
  }
  check((await page.locator('#gen-prompt-tokens').textContent()) === '1,234', 'thousands separators');
  await spans.nth(3).hover();
  await page.locator('#token-tooltip').waitFor();
  const tip = await page.locator('#token-tooltip').textContent();
  check(tip.includes('" grey"') && tip.includes('%'), `tooltip alternatives (${tip})`);
  await noOverflow(page, 'generation');
  await notPwned(page, 'generation');
  await shot(page, `generation-tokens${narrow ? '-narrow' : ''}`);
  if (!narrow) {
    // keyboard focus shows the tooltip; the last token (no soft label) says so
    await page.mouse.move(0, 0);
    await spans.nth(8).focus();
    await page.waitForFunction(() => !document.querySelector('#token-tooltip').hidden && document.querySelector('#token-tooltip').textContent.includes('no soft label'));
    await page.keyboard.press('ArrowLeft');
    await page.keyboard.press('ArrowLeft');
    await page.waitForFunction(() => document.querySelector('#token-tooltip').textContent.includes('"<script>"'));
    await page.keyboard.press('Escape');
    check(await page.locator('#token-tooltip').isHidden(), 'Escape hides the tooltip');
  }
}

async function stepNewJob(page, narrow) {
  await page.goto(`${base}/#/new`);
  await page.locator('#newjob-form').waitFor();
  await page.waitForFunction(() => document.querySelector('#teacher-select option')?.value === 'local-smol');
  for (const id of ['#file-input', '#paste-input', '#teacher-select', '#logprobs-input', '#maxtokens-input', '#template-input', '#system-input', '#stop-input']) {
    const lid = await page.locator(id).getAttribute('id');
    check(await page.locator(`label[for="${lid}"]`).count() === 1, `${id} has a label`);
  }
  check(await page.locator('#template-input').getAttribute('placeholder') === '{{ prompt }}', 'template placeholder');
  // a teacher with an error shows it, literally
  await page.selectOption('#teacher-select', { index: 1 });
  check((await page.locator('#teacher-info').textContent()).includes('onerror'), 'teacher error shown literally');
  await page.selectOption('#teacher-select', 'local-smol');
  if (narrow) {
    await noOverflow(page, 'new job');
    await shot(page, 'newjob-narrow');
    return;
  }
  const file = path.join(shots, 'prompts.jsonl');
  fs.writeFileSync(file, [`What is 2+2? ${XSS_IMG}`, `Say ${XSS_SCRIPT} backwards`, 'Name a prime number.', 'Why is the sky blue?']
    .map((p) => JSON.stringify({ prompt: p })).join('\n') + '\n');
  await page.setInputFiles('#file-input', file);
  await page.fill('#maxtokens-input', '24');
  await page.fill('#logprobs-input', '500');
  await page.click('#btn-preview');
  await page.locator('#newjob-alert').waitFor();
  check((await page.locator('#newjob-alert').textContent()).includes('logprobs'), 'server field error shown');
  check(await page.locator('#logprobs-input').getAttribute('aria-invalid') === 'true', 'field marked invalid');
  await page.fill('#logprobs-input', '5');
  await page.fill('#stop-input', '</answer>\n\n');
  await page.click('#btn-preview');
  await page.locator('#preview .preview-item').first().waitFor();
  check(await page.locator('#newjob-alert').isHidden(), 'alert cleared');
  const pv = await page.locator('#preview').textContent();
  check(pv.includes(`What is 2+2? ${XSS_IMG}`), 'preview shows the first prompt literally');
  check(state.uploads.length === 1, 'one upload');
  await notPwned(page, 'new job');
  await shot(page, 'newjob-preview');
  await page.click('#btn-start');
  await page.waitForFunction(() => /^#\/jobs\/\d+$/.test(location.hash));
  check(state.uploads.length === 1, 'the set was reused, not uploaded twice');
  const b = state.lastJobBody;
  check(b.max_new_tokens === 24 && b.logprobs === 5 && b.teacher === 'local-smol' && b.stop.length === 1, `job body ${JSON.stringify(b)}`);
  await page.locator('#job-status').waitFor();
  // pasted prompts
  await page.goto(`${base}/#/new`);
  await page.waitForFunction(() => document.querySelector('#teacher-select option')?.value === 'local-smol');
  await page.check('#src-paste');
  await page.fill('#paste-input', 'first pasted prompt\n\nsecond <b>pasted</b> prompt\n');
  await page.fill('#template-input', 'Q: {{ prompt }}');
  await page.click('#btn-preview');
  await page.locator('#preview .preview-item').nth(1).waitFor();
  check((await page.locator('#preview').textContent()).includes('Q: second <b>pasted</b> prompt'), 'pasted preview');
  check(state.uploads[1].prompts.length === 2, 'pasted prompts sent as JSON');
  // existing set
  await page.check('#src-existing');
  await page.selectOption('#set-select', '1');
  await page.click('#btn-start');
  await page.waitForFunction(() => /^#\/jobs\/\d+$/.test(location.hash));
  check(state.lastJobBody.prompt_set === 1 && state.lastJobBody.template === 'Q: {{ prompt }}', 'existing set job');
}

let allProblems = [];
try {
  const tctx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  allProblems = allProblems.concat(await stepToken(tctx));
  await tctx.close();
  for (const narrow of [false, true]) {
    const ctx = await browser.newContext({ viewport: narrow ? { width: 400, height: 800 } : { width: 1280, height: 800 }, acceptDownloads: true });
    const page = await ctx.newPage();
    const problems = instrument(page, narrow ? 'narrow' : 'wide');
    await route(page);
    for (const [name, step] of [['jobs', stepJobs], ['job', stepJob], ['generations', stepGenerations], ['generation', stepGeneration], ['new job', stepNewJob]]) {
      try {
        await step(page, narrow);
      } catch (e) {
        const where = (e.stack || '').split('\n').find((l) => l.includes('stub-check.mjs')) || '';
        failures.push(`${name}${narrow ? ' (narrow)' : ''}: ${e.message.split('\n')[0]} ${where.trim()}`);
        await shot(page, `FAIL-${name.replace(' ', '-')}${narrow ? '-narrow' : ''}`).catch(() => {});
      }
    }
    allProblems = allProblems.concat(problems);
    await ctx.close();
  }
  check(sseConnections > 0, 'the job page used the events stream');
} catch (e) {
  failures.push(e.message.split('\n')[0]);
} finally {
  await browser.close();
  server.close();
}

failures.push(...allProblems);
console.log(`screenshots: ${shots}`);
if (failures.length) {
  for (const f of failures) console.error(`FAIL ${f}`);
  process.exit(1);
}
console.log('stub-check: ok');
process.exit(0);
