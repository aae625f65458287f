// distill web UI: a dependency-free single-page app over the /v1 REST API.
//
// Security rule of this file: every value that comes from the server (prompts, answers, token
// texts, error messages, names, parameters) reaches the DOM only through textContent,
// createTextNode or setAttribute, via the `el` helper below. Never innerHTML and friends.

const TOKEN_KEY = 'distill.apiToken';
const PAGE_SIZE = 50;
const JOBS_POLL_MS = 2000;
const THROUGHPUT_MS = 4000;
const SSE_RETRY_MS = 2000;
const JOB_STATUSES = ['queued', 'running', 'paused', 'done', 'cancelled'];
const ITEM_STATUSES = ['queued', 'running', 'done', 'failed', 'cancelled'];
const SVG_NS = 'http://www.w3.org/2000/svg';

// ---------------------------------------------------------------------------------------------
// DOM helpers

/** Appends children (nodes, strings as text, arrays, null/false skipped) to `node`. */
function append(node, children) {
  for (const c of children) {
    if (c == null || c === false) continue;
    if (Array.isArray(c)) append(node, c);
    else if (c instanceof Node) node.appendChild(c);
    else node.appendChild(document.createTextNode(String(c)));
  }
  return node;
}

const PROPS = new Set(['value', 'checked', 'disabled', 'hidden', 'selected', 'multiple', 'required']);

/** Replaces the children of `node` (same child rules as `append`). */
function replace(node, ...children) {
  node.replaceChildren();
  return append(node, children);
}

function setAttrs(n, attrs) {
  if (!attrs) return n;
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === 'class') n.setAttribute('class', Array.isArray(v) ? v.filter(Boolean).join(' ') : v);
    else if (k === 'text') n.textContent = String(v);
    else if (k === 'dataset') for (const [dk, dv] of Object.entries(v)) { if (dv != null) n.dataset[dk] = String(dv); }
    else if (k.startsWith('on')) {
      if (typeof v !== 'function') throw new Error(`refusing a string ${k} attribute`);
      n.addEventListener(k.slice(2), v);
    }
    else if (k === 'style' && typeof v === 'object') Object.assign(n.style, v); // CSSOM, not markup
    else if (PROPS.has(k) && !(n instanceof SVGElement)) n[k] = v;
    else n.setAttribute(k, v === true ? '' : String(v));
  }
  return n;
}

/** `el('a', {href: '#/jobs'}, 'Jobs')`: builds an element; children are appended as text. */
function el(tag, attrs, ...children) {
  return append(setAttrs(document.createElement(tag), attrs), children);
}

function svg(tag, attrs, ...children) {
  return append(setAttrs(document.createElementNS(SVG_NS, tag), attrs), children);
}

const $ = (sel, root = document) => root.querySelector(sel);

// ---------------------------------------------------------------------------------------------
// Formatting

const LOCALE = navigator.language || 'en-US';
const intFmt = new Intl.NumberFormat(LOCALE, { maximumFractionDigits: 0 });
const rateFmt = new Intl.NumberFormat(LOCALE, { minimumFractionDigits: 1, maximumFractionDigits: 2 });
const pctFmt = new Intl.NumberFormat(LOCALE, { minimumFractionDigits: 1, maximumFractionDigits: 1 });
const dateFmt = new Intl.DateTimeFormat(LOCALE, {
  year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', second: '2-digit',
});

const fmtInt = (n) => (n == null || Number.isNaN(Number(n)) ? '—' : intFmt.format(Number(n)));
const fmtRate = (n) => (n == null || !Number.isFinite(Number(n)) ? '—' : rateFmt.format(Number(n)));
const fmtTime = (ms) => (ms == null ? '—' : dateFmt.format(new Date(Number(ms))));
const fmtPct = (p) => `${pctFmt.format(p * 100)}%`;

/** Seconds as "3m 20s", "1h 5m", "2d 3h", "45s"; null as "—". */
function fmtDuration(sec) {
  if (sec == null || !Number.isFinite(Number(sec))) return '—';
  let s = Math.max(0, Math.round(Number(sec)));
  if (s < 60) return `${s}s`;
  const units = [['d', 86400], ['h', 3600], ['m', 60], ['s', 1]];
  const parts = [];
  for (const [u, n] of units) {
    if (s >= n || parts.length) {
      const q = Math.floor(s / n);
      s -= q * n;
      parts.push(q ? `${q}${u}` : '');
      if (parts.length === 2) break;
    }
  }
  return parts.filter(Boolean).join(' ');
}

function fmtLatency(ms) {
  if (ms == null) return '—';
  const n = Number(ms);
  return n < 1000 ? `${fmtInt(n)} ms` : `${rateFmt.format(n / 1000)} s`;
}

function truncate(s, n) {
  if (s == null) return '';
  const t = String(s).replace(/\s+/g, ' ').trim();
  return t.length > n ? `${t.slice(0, n - 1)}…` : t;
}

function statusBadge(status, attrs = {}) {
  const s = String(status ?? 'unknown');
  return el('span', { ...attrs, class: `status status-${s.replace(/[^a-z_]/g, '')}`, dataset: { status: s } }, s);
}

/** Finished share of a job: (done + failed + cancelled) / total. */
function jobProgress(job) {
  const c = job.counts || {};
  const total = Number(job.total) || 0;
  const finished = (c.done || 0) + (c.failed || 0) + (c.cancelled || 0);
  let pct = total > 0 ? Math.floor((finished * 1000) / total) / 10 : job.status === 'done' ? 100 : 0;
  if (total > 0 && finished >= total) pct = 100;
  return { finished, total, pct };
}

function progressBar(job, attrs = {}) {
  const bar = el('div', { class: 'progress-fill' });
  const label = el('span', { class: 'progress-label' });
  const node = el('div', { ...attrs, class: 'progress', role: 'progressbar', 'aria-valuemin': '0', 'aria-valuemax': '100' },
    el('div', { class: 'progress-track' }, bar), label);
  updateProgress(node, job);
  return node;
}

function updateProgress(node, job) {
  const { finished, total, pct } = jobProgress(job);
  node.setAttribute('aria-valuenow', String(pct));
  node.setAttribute('aria-valuetext', `${fmtInt(finished)} of ${fmtInt(total)} finished (${pct}%)`);
  node.dataset.finished = String(finished);
  node.dataset.total = String(total);
  node.querySelector('.progress-fill').style.width = `${pct}%`;
  node.querySelector('.progress-label').textContent = `${fmtInt(finished)} / ${fmtInt(total)} · ${pct}%`;
}

// ---------------------------------------------------------------------------------------------
// API access

class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
    this.field = field ?? null;
  }
}

/** Thrown after a 401: the token form is already shown, callers just stop. */
class AuthError extends Error {
  constructor() { super('unauthorized'); this.name = 'AuthError'; }
}

const getToken = () => sessionStorage.getItem(TOKEN_KEY);

async function errorFrom(res) {
  let code = 'http_error';
  let message = `${res.status} ${res.statusText}`.trim();
  let field = null;
  try {
    const text = await res.text();
    try {
      const body = JSON.parse(text);
      if (body && body.error) {
        code = body.error.code || code;
        message = body.error.message || message;
        field = body.error.field ?? null;
      }
    } catch {
      if (text.trim()) message = `${message}: ${text.trim().slice(0, 300)}`;
    }
  } catch { /* body unreadable: keep the status line */ }
  return new ApiError(res.status, code, message, field);
}

/**
 * Calls the API. `json` sends a JSON body, `body` a raw one (FormData); `raw` returns the
 * Response. A 401 clears the token and shows the token form unless `probeToken` is given.
 */
async function api(path, { method = 'GET', json, body, signal, raw = false, probeToken, headers } = {}) {
  const h = new Headers(headers || {});
  const token = probeToken !== undefined ? probeToken : getToken();
  if (token) h.set('Authorization', `Bearer ${token}`);
  let payload = body;
  if (json !== undefined) {
    h.set('Content-Type', 'application/json');
    payload = JSON.stringify(json);
  }
  let res;
  try {
    res = await fetch(path, { method, headers: h, body: payload, signal, cache: 'no-store' });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'network', `Cannot reach the server (${e.message})`, null);
  }
  if (res.status === 401) {
    if (probeToken !== undefined) throw await errorFrom(res);
    onUnauthorized();
    throw new AuthError();
  }
  if (!res.ok) throw await errorFrom(res);
  if (raw) return res;
  if (res.status === 204) return null;
  const text = await res.text();
  return text ? JSON.parse(text) : null;
}

function qs(params) {
  const u = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v != null && v !== '') u.set(k, String(v));
  const s = u.toString();
  return s ? `?${s}` : '';
}

const isQuiet = (e) => e instanceof AuthError || (e && e.name === 'AbortError');

/** Shows an error in an alert region (no-op for auth/abort, which are handled elsewhere). */
function showError(region, err, prefix) {
  if (isQuiet(err)) return;
  if (!(err instanceof ApiError)) console.warn(err);
  const msg = err instanceof ApiError ? err.message : String(err && err.message ? err.message : err);
  replace(region,
    prefix ? el('strong', null, `${prefix}: `) : null,
    msg,
    err && err.field ? el('span', { class: 'err-field' }, ` (field: `, el('code', null, err.field), ')') : null,
  );
  region.hidden = false;
}

function clearAlert(region) {
  region.replaceChildren();
  region.hidden = true;
}

const alertRegion = (id) => el('div', { id, class: 'alert', role: 'alert', hidden: true });

// ---------------------------------------------------------------------------------------------
// Server-sent events over fetch (EventSource cannot send the Authorization header)

/** Reads an SSE response body, calling `onEvent({event, data, id})` per dispatched event. */
async function readSse(res, onEvent) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  let ev = { event: '', data: [], id: null };
  const dispatch = () => {
    if (ev.data.length) onEvent({ event: ev.event || 'message', data: ev.data.join('\n'), id: ev.id });
    ev = { event: '', data: [], id: ev.id };
  };
  const line = (l) => {
    if (l === '') return dispatch();
    if (l.startsWith(':')) return undefined; // comment, e.g. keepalive
    const i = l.indexOf(':');
    const field = i < 0 ? l : l.slice(0, i);
    let value = i < 0 ? '' : l.slice(i + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') ev.event = value;
    else if (field === 'data') ev.data.push(value);
    else if (field === 'id') ev.id = value;
    return undefined;
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let m;
    // Lines end in \n, \r\n or \r; a trailing \r may be the first half of \r\n: wait for more.
    while ((m = /\r\n|\n|\r(?=[^\n])/.exec(buf))) {
      line(buf.slice(0, m.index));
      buf = buf.slice(m.index + m[0].length);
    }
  }
  buf += decoder.decode();
  if (buf.replace(/\r$/, '') !== '') line(buf.replace(/\r$/, ''));
  // An unterminated final event is discarded, as the SSE spec says.
}

// ---------------------------------------------------------------------------------------------
// Page lifecycle and routing

let page = null; // {alive, controller, timers:[], cleanups:[]}

function newPage() {
  const p = {
    alive: true,
    controller: new AbortController(),
    timers: new Set(),
    cleanups: [],
    get signal() { return this.controller.signal; },
    /** Runs `fn` now-ish and then every `ms` after each run completes, while the page lives. */
    every(ms, fn, { immediate = false } = {}) {
      const tick = async () => {
        if (!p.alive) return;
        try { await fn(); } catch (e) { if (!isQuiet(e)) console.warn(e); }
        if (p.alive) schedule();
      };
      const schedule = () => {
        const t = setTimeout(() => { p.timers.delete(t); tick(); }, ms);
        p.timers.add(t);
      };
      if (immediate) tick(); else schedule();
    },
    sleep(ms) {
      return new Promise((resolve) => {
        const t = setTimeout(() => { p.timers.delete(t); resolve(); }, ms);
        p.timers.add(t);
      });
    },
  };
  return p;
}

function leavePage() {
  if (!page) return;
  page.alive = false;
  page.controller.abort();
  for (const t of page.timers) clearTimeout(t);
  for (const f of page.cleanups) { try { f(); } catch { /* ignore */ } }
  page = null;
  hideTooltip();
}

function parseHash() {
  const h = location.hash.replace(/^#/, '');
  const qi = h.indexOf('?');
  const path = (qi < 0 ? h : h.slice(0, qi)) || '/jobs';
  const query = new URLSearchParams(qi < 0 ? '' : h.slice(qi + 1));
  return { path, query };
}

const ROUTES = [
  [/^\/?$/, () => renderJobs()],
  [/^\/jobs\/?$/, () => renderJobs()],
  [/^\/jobs\/(\d+)\/?$/, (m) => renderJob(Number(m[1]))],
  [/^\/jobs\/(\d+)\/generations\/?$/, (m, q) => renderGenerations(Number(m[1]), q)],
  [/^\/generations\/(\d+)\/?$/, (m) => renderGeneration(Number(m[1]))],
  [/^\/new\/?$/, () => renderNewJob()],
];

let authState = 'unknown'; // unknown | open | token | locked

function route() {
  if (authState === 'locked' || authState === 'unknown') return;
  const raw = location.hash;
  if (raw && !raw.startsWith('#/')) return; // in-page anchors such as the skip link
  leavePage();
  page = newPage();
  const { path, query } = parseHash();
  const main = $('#main');
  main.replaceChildren();
  markNav(path);
  for (const [re, render] of ROUTES) {
    const m = re.exec(path);
    if (m) {
      render(m, query);
      return;
    }
  }
  setTitle('Not found');
  main.append(el('h1', { tabindex: '-1' }, 'Page not found'),
    el('p', null, 'Nothing lives at this address. ', el('a', { href: '#/jobs' }, 'Go to the jobs list.')));
}

function markNav(path) {
  const jobs = $('#nav-jobs');
  const neu = $('#nav-new');
  jobs.removeAttribute('aria-current');
  neu.removeAttribute('aria-current');
  if (path.startsWith('/new')) neu.setAttribute('aria-current', 'page');
  else if (path === '/' || path === '/jobs' || path === '/jobs/') jobs.setAttribute('aria-current', 'page');
}

function setTitle(t) {
  document.title = `${t} · distill`;
}

/** The page heading; focused after in-app navigation so screen readers announce the page. */
function heading(text, attrs = {}) {
  return el('h1', { tabindex: '-1', ...attrs }, text);
}

let navigated = false;
function focusHeading() {
  if (!navigated) return;
  const h = $('#main h1');
  if (h && !document.activeElement?.closest?.('#main')) h.focus({ preventScroll: true });
}

// ---------------------------------------------------------------------------------------------
// Authentication

function onUnauthorized() {
  if (authState === 'locked') return; // the form is already up (several calls failed at once)
  const had = getToken();
  sessionStorage.removeItem(TOKEN_KEY);
  showTokenForm(had ? 'The server rejected the saved API token. Enter it again.' : 'This server needs an API token.');
}

function showTokenForm(message) {
  authState = 'locked';
  leavePage();
  $('#site-nav').hidden = true;
  $('#btn-logout').hidden = true;
  setTitle('Sign in');
  const input = el('input', { id: 'token-input', name: 'token', type: 'password', autocomplete: 'current-password', required: true, spellcheck: 'false' });
  const err = alertRegion('token-error');
  const submit = el('button', { type: 'submit', class: 'btn btn-primary', id: 'btn-token' }, 'Continue');
  const form = el('form', { id: 'token-form', class: 'card token-card', 'aria-labelledby': 'token-title' },
    el('h1', { id: 'token-title', tabindex: '-1' }, 'Sign in'),
    el('p', { class: 'muted', id: 'token-message' }, message || 'This server needs an API token.'),
    el('div', { class: 'field' }, el('label', { for: 'token-input' }, 'API token'), input),
    err,
    el('div', { class: 'actions' }, submit));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const tok = input.value.trim();
    clearAlert(err);
    if (!tok) {
      showError(err, new ApiError(0, 'empty', 'Enter the API token.', null));
      input.focus();
      return;
    }
    submit.disabled = true;
    try {
      await api('/v1/jobs', { probeToken: tok });
      sessionStorage.setItem(TOKEN_KEY, tok);
      unlock('token');
    } catch (ex) {
      if (ex instanceof ApiError && ex.status === 401) {
        showError(err, new ApiError(401, 'unauthorized', 'That token was not accepted. Check it and try again.', null));
      } else {
        showError(err, ex);
      }
      input.select();
      input.focus();
    } finally {
      submit.disabled = false;
    }
  });
  replace($('#main'), form);
  input.focus();
}

function unlock(state) {
  authState = state;
  $('#site-nav').hidden = false;
  $('#btn-logout').hidden = state !== 'token';
  route();
}

async function boot() {
  $('#btn-logout').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showTokenForm('Token forgotten. Enter it again to continue.');
  });
  document.querySelector('.skip-link').addEventListener('click', (e) => {
    e.preventDefault();
    const m = $('#main');
    (m.querySelector('h1') || m).focus();
  });
  window.addEventListener('hashchange', () => { navigated = true; route(); });
  const stored = getToken();
  try {
    await api('/v1/jobs', { probeToken: stored || null });
    unlock(stored ? 'token' : 'open');
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      showTokenForm(stored ? 'The saved API token was rejected. Enter it again.' : 'This server needs an API token.');
    } else {
      authState = 'open';
      $('#site-nav').hidden = false;
      const main = $('#main');
      const retry = el('button', { type: 'button', class: 'btn', onclick: () => location.reload() }, 'Retry');
      replace(main, heading('Cannot reach the server'), alertRegion('boot-error'), el('div', { class: 'actions' }, retry));
      showError($('#boot-error'), e);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Jobs list

function renderJobs() {
  setTitle('Jobs');
  const p = page;
  const main = $('#main');
  const alert = alertRegion('jobs-alert');
  const tbody = el('tbody');
  const empty = el('p', { class: 'empty', id: 'jobs-empty', hidden: true }, 'No jobs yet. ', el('a', { href: '#/new' }, 'Start one.'));
  const updated = el('span', { class: 'muted small', id: 'jobs-updated', 'aria-live': 'off' });
  const table = el('table', { id: 'jobs-table', class: 'data' },
    el('caption', { class: 'sr-only' }, 'All jobs, refreshed every 2 seconds'),
    el('thead', null, el('tr', null,
      ['ID', 'Status', 'Progress', 'Done', 'Failed', 'Queued', 'Running', 'Answers/s', 'Tokens/s', 'ETA', 'Teacher', 'Created']
        .map((h, i) => el('th', { scope: 'col', class: i >= 3 && i <= 9 ? 'num' : null }, h)))),
    tbody);
  main.append(
    el('div', { class: 'page-head' }, heading('Jobs'), el('a', { class: 'btn btn-primary', href: '#/new', id: 'link-new-job' }, 'New job')),
    alert,
    el('div', { class: 'table-wrap' }, table),
    empty,
    el('p', { class: 'footnote' }, updated));
  focusHeading();

  const rows = new Map(); // id -> {tr, key}
  const load = async () => {
    const jobs = await api('/v1/jobs', { signal: p.signal });
    if (!p.alive) return;
    clearAlert(alert);
    const list = Array.isArray(jobs) ? [...jobs].sort((a, b) => b.id - a.id) : [];
    const seen = new Set();
    let prev = null;
    for (const job of list) {
      seen.add(job.id);
      const key = JSON.stringify(job);
      let r = rows.get(job.id);
      if (!r || r.key !== key) {
        const tr = jobRow(job);
        if (r) r.tr.replaceWith(tr);
        r = { tr, key };
        rows.set(job.id, r);
      }
      // keep order: newest first
      const want = prev ? prev.nextSibling : tbody.firstChild;
      if (want !== r.tr) tbody.insertBefore(r.tr, want);
      prev = r.tr;
    }
    for (const [id, r] of rows) if (!seen.has(id)) { r.tr.remove(); rows.delete(id); }
    empty.hidden = list.length > 0;
    table.hidden = list.length === 0;
    updated.textContent = `Updated ${new Date().toLocaleTimeString(LOCALE)}`;
  };
  const tick = async () => {
    try { await load(); } catch (e) { if (!isQuiet(e)) showError(alert, e, 'Could not load jobs'); }
  };
  tick();
  p.every(JOBS_POLL_MS, async () => { if (!document.hidden) await tick(); });
}

function jobRow(job) {
  const c = job.counts || {};
  const num = (v) => el('td', { class: 'num' }, v);
  return el('tr', { dataset: { jobId: job.id, status: job.status } },
    el('td', null, el('a', { href: `#/jobs/${Number(job.id)}`, class: 'job-link' }, `#${job.id}`)),
    el('td', null, statusBadge(job.status)),
    el('td', { class: 'cell-progress' }, progressBar(job, { 'aria-label': `Job ${job.id} progress` })),
    num(fmtInt(c.done)), num(fmtInt(c.failed)), num(fmtInt(c.queued)), num(fmtInt(c.running)),
    num(fmtRate(job.answers_per_second)), num(fmtRate(job.tokens_per_second)),
    num(isActive(job) ? fmtDuration(job.eta_seconds) : '—'),
    el('td', { class: 'cell-teacher' }, job.teacher),
    el('td', { class: 'nowrap' }, el('time', { datetime: new Date(Number(job.created_at)).toISOString() }, fmtTime(job.created_at))));
}

const isActive = (job) => job.status === 'queued' || job.status === 'running';

// ---------------------------------------------------------------------------------------------
// Job detail

function renderJob(id) {
  setTitle(`Job ${id}`);
  const p = page;
  const main = $('#main');
  const alert = alertRegion('job-alert');
  const notice = el('div', { id: 'job-notice', class: 'notice', role: 'status', 'aria-live': 'polite' });
  const status = el('span', { id: 'job-status-wrap' });
  const live = el('span', { id: 'live-indicator', class: 'live live-off' }, 'Connecting…');
  const progress = progressBar({ counts: {}, total: 0, status: 'queued' }, { id: 'job-progress', 'aria-label': 'Job progress' });
  const stats = el('dl', { id: 'job-stats', class: 'stats' });
  const btn = (bid, label, action, cls = 'btn') => el('button', { type: 'button', id: bid, class: cls, disabled: true, onclick: () => act(action, label) }, label);
  const bPause = btn('btn-pause', 'Pause', 'pause');
  const bResume = btn('btn-resume', 'Resume', 'resume');
  const bCancel = btn('btn-cancel', 'Cancel', 'cancel', 'btn btn-danger');
  const bRetry = btn('btn-retry', 'Retry failed', 'retry-failed');
  const bJsonl = el('button', { type: 'button', id: 'btn-export-jsonl', class: 'btn', onclick: () => doExport('jsonl', bJsonl) }, 'Export JSONL');
  const bParquet = el('button', { type: 'button', id: 'btn-export-parquet', class: 'btn', onclick: () => doExport('parquet', bParquet) }, 'Export Parquet');
  const chart = el('div', { id: 'throughput-chart', class: 'chart' }, el('p', { class: 'muted' }, 'Loading throughput…'));
  const failures = el('div', { id: 'failures' }, el('p', { class: 'muted' }, 'Loading…'));
  const params = el('dl', { id: 'params', class: 'params' });
  const subtitle = el('p', { class: 'muted subtitle', id: 'job-subtitle' });

  main.append(
    el('p', { class: 'crumbs' }, el('a', { href: '#/jobs' }, 'Jobs'), ' / ', `Job ${id}`),
    el('div', { class: 'page-head' },
      el('div', null, heading(`Job ${id}`, { id: 'job-title' }), subtitle),
      el('div', { class: 'head-status' }, status, live)),
    el('section', { class: 'card', 'aria-labelledby': 'sec-progress' },
      el('h2', { id: 'sec-progress', class: 'sr-only' }, 'Progress'),
      progress,
      stats,
      el('div', { class: 'actions', role: 'group', 'aria-label': 'Job controls' }, bPause, bResume, bCancel, bRetry),
      alert,
      notice),
    el('div', { class: 'grid-2' },
      el('section', { class: 'card', 'aria-labelledby': 'sec-throughput' },
        el('h2', { id: 'sec-throughput' }, 'Throughput over time'), chart),
      el('section', { class: 'card', 'aria-labelledby': 'sec-failures' },
        el('h2', { id: 'sec-failures' }, 'Failures by reason'), failures)),
    el('div', { class: 'grid-2' },
      el('section', { class: 'card', 'aria-labelledby': 'sec-params' },
        el('h2', { id: 'sec-params' }, 'Parameters'), params),
      el('section', { class: 'card', 'aria-labelledby': 'sec-output' },
        el('h2', { id: 'sec-output' }, 'Output'),
        el('p', null, el('a', { href: `#/jobs/${id}/generations`, id: 'link-generations', class: 'btn' }, 'Browse generations')),
        el('p', { class: 'muted small' }, 'Exports contain the done generations (with soft labels when the job recorded them).'),
        el('div', { class: 'actions' }, bJsonl, bParquet))),
  );
  focusHeading();

  let job = null;
  let lastKey = '';
  let lastFailed = -1;
  let lastStatus = null;
  let throughputDue = false; // set by an action: reload at the next tick

  const render = (j) => {
    if (!p.alive || !j) return;
    const key = JSON.stringify(j);
    if (key === lastKey) return;
    lastKey = key;
    job = j;
    const c = j.counts || {};
    replace(status, statusBadge(j.status, { id: 'job-status' }));
    updateProgress(progress, j);
    replace(subtitle, 'Teacher ', el('strong', null, j.teacher), ` · prompt set #${j.prompt_set} · created ${fmtTime(j.created_at)}`);
    // data-value holds the raw number (for scripts and tests); the text is formatted.
    const stat = (label, value, sid, raw) => el('div', { class: 'stat' }, el('dt', null, label), el('dd', { id: sid, dataset: { value: raw } }, value));
    replace(stats,
      stat('Done', fmtInt(c.done), 'count-done', c.done ?? 0),
      stat('Failed', fmtInt(c.failed), 'count-failed', c.failed ?? 0),
      stat('Queued', fmtInt(c.queued), 'count-queued', c.queued ?? 0),
      stat('Running', fmtInt(c.running), 'count-running', c.running ?? 0),
      stat('Cancelled', fmtInt(c.cancelled), 'count-cancelled', c.cancelled ?? 0),
      stat('Total', fmtInt(j.total), 'count-total', j.total ?? 0),
      stat('Answers/s', fmtRate(j.answers_per_second), 'rate-answers', j.answers_per_second),
      stat('Tokens/s', fmtRate(j.tokens_per_second), 'rate-tokens', j.tokens_per_second),
      stat('ETA', isActive(j) ? fmtDuration(j.eta_seconds) : '—', 'job-eta'),
      stat('Tokens in / out', `${fmtInt(j.tokens_in)} / ${fmtInt(j.tokens_out)}`, 'job-tokens'),
      stat('Cache hits', fmtInt(j.cache_hits), 'job-cache-hits'),
      stat('Started', fmtTime(j.started_at), 'job-started'),
      stat('Finished', fmtTime(j.finished_at), 'job-finished'),
    );
    bPause.disabled = !(j.status === 'queued' || j.status === 'running');
    bResume.disabled = j.status !== 'paused';
    bCancel.disabled = j.status === 'done' || j.status === 'cancelled';
    bRetry.disabled = !((c.failed || 0) > 0);
    renderParams(params, j);
    if ((c.failed || 0) !== lastFailed) {
      lastFailed = c.failed || 0;
      loadFailures();
    }
    if (j.status !== lastStatus) {
      if (lastStatus !== null) notice.textContent = ''; // an earlier action's note is stale now
      lastStatus = j.status;
      loadThroughput(); // at once on the first view and on every status change
    }
  };

  const setLive = (on, text) => {
    live.className = `live ${on ? 'live-on' : 'live-off'}`;
    live.textContent = text;
  };

  const act = async (action, label) => {
    if (!job) return;
    if (action === 'cancel' && !window.confirm(`Cancel job ${id}? Its queued items will not be answered.`)) return;
    clearAlert(alert);
    notice.textContent = '';
    const buttons = [bPause, bResume, bCancel, bRetry];
    buttons.forEach((b) => { b.disabled = true; });
    try {
      const j = await api(`/v1/jobs/${id}/${action}`, { method: 'POST', signal: p.signal });
      lastKey = '';
      render(j);
      notice.textContent = `${label} accepted. The job is now ${j.status}.`;
      throughputDue = true;
    } catch (e) {
      showError(alert, e, `Could not ${label === 'Retry failed' ? 'retry the failed items' : label.toLowerCase()}`);
      lastKey = '';
      if (job) render(job);
    }
  };

  const doExport = async (format, button) => {
    clearAlert(alert);
    const label = button.textContent;
    button.disabled = true;
    button.textContent = 'Exporting…';
    try {
      const res = await api(`/v1/jobs/${id}/export${qs({ format })}`, { raw: true, signal: p.signal });
      const blob = await res.blob();
      const url = URL.createObjectURL(blob);
      const a = el('a', { href: url, download: `job-${id}.${format}`, hidden: true });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
      notice.textContent = `Exported ${fmtInt(blob.size)} bytes as job-${id}.${format}.`;
    } catch (e) {
      showError(alert, e, 'Export failed');
    } finally {
      button.disabled = false;
      button.textContent = label;
    }
  };

  const loadFailures = async () => {
    try {
      const f = await api(`/v1/jobs/${id}/failures`, { signal: p.signal });
      if (!p.alive) return;
      renderFailures(failures, f && Array.isArray(f.reasons) ? f.reasons : []);
    } catch (e) {
      if (isQuiet(e)) return;
      const r = alertRegion('failures-alert');
      replace(failures, r);
      showError(r, e, 'Could not load failures');
    }
  };

  const loadThroughput = async () => {
    try {
      const t = await api(`/v1/jobs/${id}/throughput${qs({ buckets: 60 })}`, { signal: p.signal });
      if (!p.alive) return;
      lastThroughput = t;
      renderThroughput(chart, t);
    } catch (e) {
      if (isQuiet(e)) return;
      const r = alertRegion('throughput-alert');
      replace(chart, r);
      showError(r, e, 'Could not load throughput');
    }
  };

  // Live updates: the SSE stream, reconnecting (and polling once) whenever it ends.
  const stream = async () => {
    let first = true;
    while (p.alive) {
      if (!first) {
        try { render(await api(`/v1/jobs/${id}`, { signal: p.signal })); } catch (e) {
          if (isQuiet(e)) return;
          if (e instanceof ApiError && e.status === 404) {
            showError(alert, e);
            setLive(false, 'Not found');
            return;
          }
        }
      }
      first = false;
      try {
        const res = await api(`/v1/jobs/${id}/events`, { raw: true, signal: p.signal, headers: { Accept: 'text/event-stream' } });
        setLive(true, 'Live');
        await readSse(res, (ev) => {
          if (ev.event !== 'job') return;
          try { render(JSON.parse(ev.data)); } catch (err) { console.warn('bad job event', err); }
        });
      } catch (e) {
        if (isQuiet(e)) return;
        if (e instanceof ApiError && e.status === 404 && !job) {
          showError(alert, e);
          setLive(false, 'Not found');
          return;
        }
      }
      if (!p.alive) return;
      setLive(false, job && !isActive(job) && job.status !== 'paused' ? 'Finished' : 'Reconnecting…');
      await p.sleep(SSE_RETRY_MS);
    }
  };

  // The chart is drawn at its real pixel width (readable text on narrow screens).
  let lastThroughput = null;
  let resizeTimer = null;
  let lastWidth = chart.clientWidth;
  const onResize = () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      if (lastThroughput && Math.abs(chart.clientWidth - lastWidth) > 24) {
        lastWidth = chart.clientWidth;
        renderThroughput(chart, lastThroughput);
      }
    }, 150);
  };
  window.addEventListener('resize', onResize);
  p.cleanups.push(() => { window.removeEventListener('resize', onResize); clearTimeout(resizeTimer); });

  stream();
  p.every(THROUGHPUT_MS, async () => {
    if (!job) return;
    if (job.status === 'running' || throughputDue) {
      throughputDue = false;
      await loadThroughput();
    }
  }, { immediate: true });
}

function renderParams(dl, job) {
  const pr = job.params || {};
  const show = (v) => (v == null || v === '' ? el('span', { class: 'muted' }, 'none') : el('span', { class: 'pre' }, String(v)));
  const stop = Array.isArray(pr.stop) && pr.stop.length
    ? el('ul', { class: 'stop-list' }, pr.stop.map((s) => el('li', null, el('code', null, JSON.stringify(s)))))
    : el('span', { class: 'muted' }, 'none');
  const item = (k, v) => [el('dt', null, k), el('dd', { dataset: { param: k } }, v)];
  replace(dl,
    item('endpoint', show(pr.endpoint ?? 'chat')),
    item('max_new_tokens', show(pr.max_new_tokens != null ? fmtInt(pr.max_new_tokens) : null)),
    item('template', show(pr.template)),
    item('system', show(pr.system)),
    item('stop', stop),
    item('seed', show(pr.seed)),
    item('logprobs', show(pr.logprobs ?? 0)),
    item('mode', show(pr.mode ?? 'generate')),
    item('teacher', show(job.teacher)),
    item('prompt_set', show(job.prompt_set)),
  );
}

function renderFailures(root, reasons) {
  if (!reasons.length) {
    replace(root, el('p', { class: 'muted', id: 'failures-empty' }, 'No failures.'));
    return;
  }
  replace(root, el('div', { class: 'table-wrap' },
    el('table', { class: 'data', id: 'failures-table' },
      el('thead', null, el('tr', null, el('th', { scope: 'col' }, 'Reason'), el('th', { scope: 'col', class: 'num' }, 'Count'), el('th', { scope: 'col' }, 'Example'))),
      el('tbody', null, reasons.map((r) => el('tr', null,
        el('td', { class: 'reason' }, r.reason ?? '(no message)'),
        el('td', { class: 'num' }, fmtInt(r.count)),
        el('td', null, r.example != null ? el('a', { href: `#/generations/${Number(r.example)}` }, `#${r.example}`) : '—')))))));
}

/** Bars: answers per bucket (left axis); line: tokens per bucket (right axis). */
function renderThroughput(root, data) {
  const buckets = data && Array.isArray(data.buckets) ? data.buckets : [];
  if (!buckets.length) {
    replace(root, el('p', { class: 'muted', id: 'throughput-empty' }, 'No throughput yet: the job has not started.'));
    return;
  }
  const bucketMs = Number(data.bucket_ms) || 1000;
  const W = Math.max(300, Math.min(900, Math.round(root.clientWidth || 640)));
  const narrow = W < 520;
  const H = narrow ? 220 : 260;
  const m = { l: 48, r: 56, t: 16, b: 44 };
  const iw = W - m.l - m.r; const ih = H - m.t - m.b;
  const maxA = Math.max(1, ...buckets.map((b) => Number(b.answers) || 0));
  const maxT = Math.max(1, ...buckets.map((b) => Number(b.tokens) || 0));
  const niceA = niceMax(maxA); const niceT = niceMax(maxT);
  const n = buckets.length;
  const bw = iw / n;
  const t0 = Number(buckets[0].start);
  const s = svg('svg', {
    viewBox: `0 0 ${W} ${H}`, class: 'chart-svg', role: 'img', 'aria-labelledby': 'chart-title chart-desc',
    preserveAspectRatio: 'xMidYMid meet',
  });
  const totalA = buckets.reduce((a, b) => a + (Number(b.answers) || 0), 0);
  const totalT = buckets.reduce((a, b) => a + (Number(b.tokens) || 0), 0);
  s.append(
    svg('title', { id: 'chart-title' }, 'Throughput over time'),
    svg('desc', { id: 'chart-desc' }, `${n} buckets of ${fmtDuration(bucketMs / 1000)}; ${fmtInt(totalA)} answers and ${fmtInt(totalT)} tokens in all.`));
  const g = svg('g', { transform: `translate(${m.l},${m.t})` });
  s.append(g);
  // grid and left axis ticks
  for (let i = 0; i <= 4; i += 1) {
    const y = ih - (ih * i) / 4;
    g.append(svg('line', { x1: 0, x2: iw, y1: y, y2: y, class: 'grid' }));
    g.append(svg('text', { x: -6, y: y + 4, class: 'tick tick-left', 'text-anchor': 'end' }, fmtTick((niceA * i) / 4)));
    g.append(svg('text', { x: iw + 6, y: y + 4, class: 'tick tick-right', 'text-anchor': 'start' }, fmtTick((niceT * i) / 4)));
  }
  // bars
  buckets.forEach((b, i) => {
    const a = Number(b.answers) || 0;
    const h = (a / niceA) * ih;
    const rect = svg('rect', {
      x: i * bw + bw * 0.12, y: ih - h, width: Math.max(1, bw * 0.76), height: h, class: 'bar',
      'data-answers': a, 'data-tokens': Number(b.tokens) || 0,
    }, svg('title', null, `+${fmtDuration((Number(b.start) - t0) / 1000)}: ${fmtInt(a)} answers, ${fmtInt(b.tokens)} tokens`));
    g.append(rect);
  });
  // tokens line
  const pts = buckets.map((b, i) => `${(i * bw + bw / 2).toFixed(1)},${(ih - ((Number(b.tokens) || 0) / niceT) * ih).toFixed(1)}`);
  g.append(svg('polyline', { points: pts.join(' '), class: 'tokens-line', fill: 'none' }));
  buckets.forEach((b, i) => {
    if (n <= 60) g.append(svg('circle', { cx: i * bw + bw / 2, cy: ih - ((Number(b.tokens) || 0) / niceT) * ih, r: 2.2, class: 'tokens-point' }));
  });
  // x axis
  g.append(svg('line', { x1: 0, x2: iw, y1: ih, y2: ih, class: 'axis' }));
  const span = (n * bucketMs) / 1000;
  const ticks = narrow ? 3 : 5;
  for (let i = 0; i <= ticks; i += 1) {
    const x = (iw * i) / ticks;
    g.append(svg('line', { x1: x, x2: x, y1: ih, y2: ih + 4, class: 'axis' }));
    g.append(svg('text', { x, y: ih + 16, class: 'tick', 'text-anchor': i === 0 ? 'start' : i === ticks ? 'end' : 'middle' }, fmtDuration((span * i) / ticks)));
  }
  g.append(svg('text', { x: iw / 2, y: ih + 36, class: 'axis-label', 'text-anchor': 'middle' }, `time since start (bucket = ${fmtDuration(bucketMs / 1000)})`));
  g.append(svg('text', { class: 'axis-label axis-label-left', 'text-anchor': 'middle', transform: `translate(${-34},${ih / 2}) rotate(-90)` }, 'answers / bucket'));
  g.append(svg('text', { class: 'axis-label axis-label-right', 'text-anchor': 'middle', transform: `translate(${iw + 40},${ih / 2}) rotate(90)` }, 'tokens / bucket'));
  const legend = el('p', { class: 'legend small' },
    el('span', { class: 'legend-entry' }, el('span', { class: 'swatch swatch-bar', 'aria-hidden': 'true' }), ' answers (bars, left axis)'),
    el('span', { class: 'legend-entry' }, el('span', { class: 'swatch swatch-line', 'aria-hidden': 'true' }), ' tokens (line, right axis)'));
  replace(root, s, legend);
  root.dataset.buckets = String(n);
}

function niceMax(v) {
  if (v <= 4) return 4;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const f of [1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (f * p >= v) return f * p;
  return 10 * p;
}

function fmtTick(v) {
  if (v >= 10000) return `${rateFmt.format(v / 1000)}k`;
  return Number.isInteger(v) ? intFmt.format(v) : rateFmt.format(v);
}

// ---------------------------------------------------------------------------------------------
// Generations browser

function renderGenerations(jobId, query) {
  setTitle(`Job ${jobId} generations`);
  const p = page;
  const main = $('#main');
  const state = { q: query.get('q') || '', status: query.get('status') || '', afters: [null], next: null };
  const alert = alertRegion('gen-alert');
  const search = el('input', { id: 'gen-search', type: 'search', name: 'q', value: state.q, autocomplete: 'off', placeholder: 'e.g. photosynthesis' });
  const statusSel = el('select', { id: 'gen-status', name: 'status' },
    el('option', { value: '' }, 'Any status'),
    ITEM_STATUSES.map((s) => el('option', { value: s, selected: s === state.status }, s)));
  const form = el('form', { id: 'gen-filter', class: 'filters', role: 'search' },
    el('div', { class: 'field grow' }, el('label', { for: 'gen-search' }, 'Search prompt and answer text'), search),
    el('div', { class: 'field' }, el('label', { for: 'gen-status' }, 'Status'), statusSel),
    el('div', { class: 'field field-button' }, el('button', { type: 'submit', class: 'btn btn-primary', id: 'gen-search-btn' }, 'Search')));
  const tbody = el('tbody');
  const table = el('table', { id: 'gen-table', class: 'data gen-table' },
    el('caption', { class: 'sr-only' }, `Generations of job ${jobId}`),
    el('thead', null, el('tr', null,
      el('th', { scope: 'col' }, 'ID'), el('th', { scope: 'col' }, 'Status'), el('th', { scope: 'col' }, 'Prompt'),
      el('th', { scope: 'col' }, 'Answer'), el('th', { scope: 'col', class: 'num' }, 'Completion tokens'),
      el('th', { scope: 'col', class: 'num' }, 'Latency'))),
    tbody);
  const prev = el('button', { type: 'button', id: 'gen-prev', class: 'btn', disabled: true }, '← Previous');
  const next = el('button', { type: 'button', id: 'gen-next', class: 'btn', disabled: true }, 'Next →');
  const pageInfo = el('span', { id: 'gen-page', class: 'muted', 'aria-live': 'polite' });
  main.append(
    el('p', { class: 'crumbs' }, el('a', { href: '#/jobs' }, 'Jobs'), ' / ', el('a', { href: `#/jobs/${jobId}`, id: 'link-job' }, `Job ${jobId}`), ' / ', 'Generations'),
    heading(`Generations of job ${jobId}`),
    form,
    alert,
    el('div', { class: 'table-wrap' }, table),
    el('nav', { class: 'pager', 'aria-label': 'Pages' }, prev, pageInfo, next));
  focusHeading();

  let seq = 0;
  const load = async () => {
    const my = ++seq;
    const after = state.afters[state.afters.length - 1];
    table.setAttribute('aria-busy', 'true');
    prev.disabled = true;
    next.disabled = true;
    try {
      const res = await api(`/v1/jobs/${jobId}/generations${qs({ status: state.status, q: state.q.trim(), after, limit: PAGE_SIZE })}`, { signal: p.signal });
      if (!p.alive || my !== seq) return;
      clearAlert(alert);
      const items = res && Array.isArray(res.items) ? res.items : [];
      state.next = res ? res.next_after ?? null : null;
      replace(tbody, ...items.map(genRow));
      if (!items.length) {
        tbody.append(el('tr', { class: 'empty-row' }, el('td', { colspan: '6', class: 'muted' },
          state.q || state.status ? 'No generations match these filters.' : 'No generations.')));
      }
      const n = state.afters.length;
      pageInfo.textContent = `Page ${n} · ${items.length} row${items.length === 1 ? '' : 's'}`;
      table.dataset.rows = String(items.length);
      prev.disabled = n <= 1;
      next.disabled = state.next == null;
    } catch (e) {
      if (isQuiet(e)) return;
      showError(alert, e, 'Could not load generations');
      prev.disabled = state.afters.length <= 1;
    } finally {
      if (my === seq) table.removeAttribute('aria-busy');
    }
  };

  const syncUrl = () => {
    const h = `#/jobs/${jobId}/generations${qs({ q: state.q.trim(), status: state.status })}`;
    if (location.hash !== h) history.replaceState(null, '', h);
  };

  form.addEventListener('submit', (e) => {
    e.preventDefault();
    state.q = search.value;
    state.status = statusSel.value;
    state.afters = [null];
    syncUrl();
    load();
  });
  statusSel.addEventListener('change', () => form.requestSubmit());
  next.addEventListener('click', () => {
    if (state.next == null) return;
    state.afters.push(state.next);
    load();
  });
  prev.addEventListener('click', () => {
    if (state.afters.length <= 1) return;
    state.afters.pop();
    load();
  });
  tbody.addEventListener('click', (e) => {
    const tr = e.target.closest('tr[data-gen-id]');
    if (!tr || e.target.closest('a')) return;
    if (window.getSelection && String(window.getSelection()).length) return; // selecting text
    location.hash = `#/generations/${tr.dataset.genId}`;
  });
  load();
}

function promptText(g) {
  if (g.prompt != null) return g.prompt;
  if (Array.isArray(g.messages)) {
    const users = g.messages.filter((m) => m.role === 'user');
    const m = users.length ? users[users.length - 1] : g.messages[g.messages.length - 1];
    return m ? m.content : '';
  }
  return '';
}

function genRow(g) {
  const pt = promptText(g);
  const ans = g.text ?? (g.last_error ? `error: ${g.last_error}` : '');
  // data-label: the column name, shown beside each cell when narrow screens stack a row.
  return el('tr', { dataset: { genId: Number(g.id), status: g.status }, class: 'clickable' },
    el('td', { dataset: { label: 'ID' } }, el('a', { href: `#/generations/${Number(g.id)}`, class: 'gen-link', 'aria-label': `Open generation ${g.id}` }, `#${g.id}`)),
    el('td', { dataset: { label: 'Status' } }, statusBadge(g.status)),
    el('td', { class: 'cell-text', title: truncate(pt, 600), dataset: { label: 'Prompt' } }, truncate(pt, 110)),
    el('td', { class: ['cell-text', g.text == null ? 'muted' : null], title: truncate(ans, 600), dataset: { label: 'Answer' } }, truncate(ans, 110)),
    el('td', { class: 'num', dataset: { label: 'Tokens' } }, fmtInt(g.completion_tokens)),
    el('td', { class: 'num nowrap', dataset: { label: 'Latency' } }, fmtLatency(g.latency_ms)));
}

// ---------------------------------------------------------------------------------------------
// One generation

function renderGeneration(id) {
  setTitle(`Generation ${id}`);
  const p = page;
  const main = $('#main');
  const alert = alertRegion('generation-alert');
  const body = el('div', { id: 'generation' }, el('p', { class: 'muted' }, 'Loading…'));
  const crumbs = el('p', { class: 'crumbs' }, el('a', { href: '#/jobs' }, 'Jobs'), ' / ', `Generation ${id}`);
  main.append(crumbs, heading(`Generation ${id}`), alert, body);
  focusHeading();
  (async () => {
    try {
      const g = await api(`/v1/generations/${id}${qs({ token_texts: true })}`, { signal: p.signal });
      if (!p.alive) return;
      replace(crumbs, el('a', { href: '#/jobs' }, 'Jobs'), ' / ',
        el('a', { href: `#/jobs/${Number(g.job_id)}`, id: 'link-job' }, `Job ${g.job_id}`), ' / ',
        el('a', { href: `#/jobs/${Number(g.job_id)}/generations`, id: 'link-job-generations' }, 'Generations'), ' / ', `#${id}`);
      replace(body, ...generationView(g));
    } catch (e) {
      if (isQuiet(e)) return;
      body.replaceChildren();
      showError(alert, e, 'Could not load the generation');
    }
  })();
}

function generationView(g) {
  const out = [];
  const item = (k, v, vid) => el('div', { class: 'stat' }, el('dt', null, k), el('dd', { id: vid }, v));
  out.push(el('section', { class: 'card', 'aria-labelledby': 'sec-meta' },
    el('h2', { id: 'sec-meta', class: 'sr-only' }, 'Details'),
    el('dl', { class: 'stats', id: 'gen-meta' },
      item('Status', statusBadge(g.status), 'gen-status-value'),
      item('Job', el('a', { href: `#/jobs/${Number(g.job_id)}` }, `#${g.job_id}`)),
      item('External id', g.external_id ?? '—', 'gen-external-id'),
      item('Prompt tokens', fmtInt(g.prompt_tokens), 'gen-prompt-tokens'),
      item('Completion tokens', fmtInt(g.completion_tokens), 'gen-completion-tokens'),
      item('Latency', fmtLatency(g.latency_ms), 'gen-latency'),
      item('Finish reason', g.finish_reason ?? '—', 'gen-finish-reason'),
      item('Attempts', fmtInt(g.attempts), 'gen-attempts'),
      item('HTTP attempts', fmtInt(g.http_attempts), 'gen-http-attempts'),
      item('Cache hit', g.cache_hit ? 'yes' : 'no', 'gen-cache-hit'),
      item('Model', g.model ?? '—', 'gen-model'),
      item('Started', fmtTime(g.started_at)),
      item('Finished', fmtTime(g.finished_at)))));
  if (g.last_error) {
    out.push(el('div', { class: 'alert alert-static', id: 'gen-last-error' }, el('strong', null, 'Last error: '), el('span', { class: 'pre' }, g.last_error)));
  }
  // prompt
  const prompt = el('section', { class: 'card', 'aria-labelledby': 'sec-prompt' }, el('h2', { id: 'sec-prompt' }, 'Prompt'));
  if (g.system != null && g.system !== '') {
    prompt.append(el('h3', null, 'System'), el('div', { class: 'textblock', id: 'gen-system' }, g.system));
  }
  if (Array.isArray(g.messages) && g.messages.length) {
    prompt.append(el('ol', { class: 'messages', id: 'gen-prompt' }, g.messages.map((m) => el('li', { class: 'message', dataset: { role: m.role } },
      el('span', { class: 'role' }, m.role), el('div', { class: 'textblock' }, m.content)))));
  } else {
    prompt.append(el('div', { class: 'textblock', id: 'gen-prompt' }, g.prompt ?? ''));
  }
  if (g.request != null) {
    const req = Array.isArray(g.request)
      ? el('ol', { class: 'messages' }, g.request.map((m) => el('li', { class: 'message', dataset: { role: m.role } },
        el('span', { class: 'role' }, m.role), el('div', { class: 'textblock' }, m.content))))
      : el('div', { class: 'textblock' }, typeof g.request === 'string' ? g.request : JSON.stringify(g.request, null, 2));
    prompt.append(el('details', { class: 'request' }, el('summary', null, 'What the teacher was sent'), req));
  }
  out.push(prompt);
  // answer
  const answer = el('section', { class: 'card', 'aria-labelledby': 'sec-answer' }, el('h2', { id: 'sec-answer' }, 'Answer'),
    el('div', { class: 'textblock', id: 'gen-answer' }, g.text ?? ''));
  if (g.text == null) answer.lastChild.append(el('span', { class: 'muted' }, 'No answer recorded.'));
  out.push(answer);
  const sl = g.soft_labels;
  if (sl && Array.isArray(g.completion_token_ids)) {
    const sec = el('section', { class: 'card', 'aria-labelledby': 'sec-tokens' }, el('h2', { id: 'sec-tokens' }, 'Answer tokens by teacher probability'));
    if (g.token_texts) {
      sec.append(...tokenView(g));
    } else {
      sec.append(el('p', { class: 'muted', id: 'tokens-unavailable' }, `Soft labels were recorded (top-${sl.k}), but this teacher has no tokenizer to show token texts.`));
    }
    out.push(sec);
  } else if (g.completion_token_ids && g.completion_token_ids.length) {
    out.push(el('p', { class: 'muted small' }, `${fmtInt(g.completion_token_ids.length)} completion token ids recorded; this job recorded no soft labels.`));
  }
  if (g.metadata != null) {
    out.push(el('section', { class: 'card', 'aria-labelledby': 'sec-metadata' }, el('h2', { id: 'sec-metadata' }, 'Metadata'),
      el('div', { class: 'textblock mono' }, JSON.stringify(g.metadata, null, 2))));
  }
  return out;
}

const probColor = (p) => `hsl(${Math.round(120 * Math.min(1, Math.max(0, p)))} 72% ${Math.round(76 + 4 * p)}%)`;

function tokText(texts, id) {
  const t = texts[String(id)];
  return t == null ? null : String(t);
}

function tokenView(g) {
  const sl = g.soft_labels;
  const ids = g.completion_token_ids;
  const texts = g.token_texts || {};
  const lps = Array.isArray(sl.token_logprobs) ? sl.token_logprobs : [];
  const tIds = Array.isArray(sl.target_token_ids) ? sl.target_token_ids : [];
  const tLps = Array.isArray(sl.target_logprobs) ? sl.target_logprobs : [];
  const box = el('div', { id: 'answer-tokens', class: 'tokens', role: 'group', 'aria-label': 'Answer tokens; focus one to see the teacher’s alternatives' });
  let sum = 0; let nLab = 0; let low = 0;
  ids.forEach((tid, i) => {
    const t = tokText(texts, tid);
    const shown = t == null ? `⟨${tid}⟩` : t === '' ? '∅' : t;
    const has = i < lps.length;
    const attrs = { class: ['tok', t == null || t === '' ? 'tok-special' : null, has ? null : 'tok-none'], tabindex: '0', dataset: { i, id: tid } };
    if (has) {
      const lp = lps[i];
      const p = lp == null ? 0 : Math.exp(Number(lp));
      attrs.dataset.p = p.toFixed(6);
      attrs.style = { backgroundColor: probColor(p) };
      sum += p; nLab += 1; if (p < 0.5) low += 1;
    }
    // Newlines stay real (pre-wrap) but get a visible ↵ so the token is not an empty box.
    const parts = shown.split('\n');
    box.append(el('span', attrs, parts.flatMap((part, k) => (k ? [el('span', { class: 'nl', 'aria-hidden': 'true' }, '↵'), '\n', part] : [part]))));
  });
  box._tokens = { ids, texts, lps, tIds, tLps };
  box.addEventListener('mouseover', (e) => { const s = e.target.closest('.tok'); if (s) showTokenTip(box, s); });
  box.addEventListener('mouseout', (e) => { const s = e.target.closest('.tok'); if (s && !s.contains(e.relatedTarget) && document.activeElement !== s) hideTooltip(); });
  box.addEventListener('focusin', (e) => { const s = e.target.closest('.tok'); if (s) showTokenTip(box, s); });
  box.addEventListener('focusout', () => hideTooltip());
  box.addEventListener('keydown', (e) => {
    if (e.key === 'Escape') hideTooltip();
    const s = e.target.closest('.tok');
    if (!s) return;
    if (e.key === 'ArrowRight' && s.nextElementSibling) { e.preventDefault(); s.nextElementSibling.focus(); }
    if (e.key === 'ArrowLeft' && s.previousElementSibling) { e.preventDefault(); s.previousElementSibling.focus(); }
  });
  const legend = el('div', { class: 'prob-legend', id: 'prob-legend' },
    el('span', null, 'Teacher probability of each chosen token:'),
    el('span', { class: 'legend-scale' },
      el('span', { class: 'muted small' }, '0%'),
      el('span', { class: 'legend-gradient', 'aria-hidden': 'true' }),
      el('span', { class: 'muted small' }, '100%')),
    el('span', { class: 'legend-item' }, el('span', { class: 'tok tok-none legend-swatch', 'aria-hidden': 'true' }, 'ab'), ' no soft label'));
  const summary = el('p', { class: 'muted small', id: 'tokens-summary' },
    `${fmtInt(ids.length)} tokens, ${fmtInt(nLab)} with top-${sl.k} soft labels; mean probability ${nLab ? fmtPct(sum / nLab) : '—'}; ${fmtInt(low)} below 50%. Hover or focus a token (arrow keys move) to see the alternatives.`);
  return [legend, box, summary];
}

function showTokenTip(box, span) {
  const tip = $('#token-tooltip');
  const { ids, texts, lps, tIds, tLps } = box._tokens;
  const i = Number(span.dataset.i);
  const tid = ids[i];
  const t = tokText(texts, tid);
  const head = el('div', { class: 'tip-head' },
    el('code', null, t == null ? `id ${tid}` : JSON.stringify(t)),
    i < lps.length ? ` · p = ${fmtPct(lps[i] == null ? 0 : Math.exp(lps[i]))}` : ' · no soft label',
    el('span', { class: 'muted' }, ` · token ${i + 1}, id ${tid}`));
  const alts = [];
  const rowIds = tIds[i] || [];
  const rowLps = tLps[i] || [];
  rowIds.forEach((aid, j) => {
    const lp = rowLps[j];
    if (lp == null) return; // padding (−∞)
    const at = tokText(texts, aid);
    alts.push(el('tr', { class: aid === tid ? 'chosen' : null },
      el('td', null, el('code', null, at == null ? `id ${aid}` : JSON.stringify(at))),
      el('td', { class: 'num' }, fmtPct(Math.exp(Number(lp))))));
  });
  replace(tip, head, alts.length
    ? el('table', { class: 'tip-table' }, el('thead', null, el('tr', null, el('th', { scope: 'col' }, `Top-${alts.length} alternatives`), el('th', { scope: 'col', class: 'num' }, 'p'))), el('tbody', null, alts))
    : el('p', { class: 'muted small' }, 'No alternatives recorded for this token.'));
  tip.hidden = false;
  span.setAttribute('aria-describedby', 'token-tooltip');
  tip._owner = span;
  // position under (or above) the token, inside the viewport
  const r = span.getBoundingClientRect();
  const tw = Math.min(tip.offsetWidth, window.innerWidth - 16);
  const th = tip.offsetHeight;
  let left = r.left + window.scrollX;
  left = Math.max(8 + window.scrollX, Math.min(left, window.scrollX + window.innerWidth - tw - 8));
  let top = r.bottom + window.scrollY + 6;
  if (r.bottom + th + 12 > window.innerHeight && r.top - th - 6 > 0) top = r.top + window.scrollY - th - 6;
  tip.style.left = `${left}px`;
  tip.style.top = `${top}px`;
}

function hideTooltip() {
  const tip = document.getElementById('token-tooltip');
  if (!tip) return;
  if (tip._owner) tip._owner.removeAttribute('aria-describedby');
  tip._owner = null;
  tip.hidden = true;
}

// ---------------------------------------------------------------------------------------------
// New job

function renderNewJob() {
  setTitle('New job');
  const p = page;
  const main = $('#main');
  const alert = alertRegion('newjob-alert');
  const field = (label, control, hint, extra = {}) => el('div', { class: ['field', extra.class] },
    el('label', { for: control.id }, label), control, hint ? el('p', { class: 'hint', id: `${control.id}-hint` }, hint) : null);
  const radio = (id, value, label, checked) => el('label', { class: 'radio', for: id },
    el('input', { type: 'radio', name: 'source', id, value, checked }), ` ${label}`);

  const fileInput = el('input', { type: 'file', id: 'file-input', name: 'file', accept: '.jsonl,.csv,.parquet', 'aria-describedby': 'file-input-hint' });
  const pasteInput = el('textarea', { id: 'paste-input', name: 'prompts', rows: '6', placeholder: 'What is the capital of France?\nExplain photosynthesis in one paragraph.', 'aria-describedby': 'paste-input-hint' });
  const setSelect = el('select', { id: 'set-select', name: 'prompt_set' }, el('option', { value: '' }, 'Loading…'));
  const setName = el('input', { id: 'set-name', name: 'name', type: 'text', autocomplete: 'off', placeholder: 'default: the file name', 'aria-describedby': 'set-name-hint' });
  const teacherSel = el('select', { id: 'teacher-select', name: 'teacher', 'aria-describedby': 'teacher-info' }, el('option', { value: '' }, 'Loading…'));
  const teacherInfo = el('p', { class: 'hint', id: 'teacher-info', 'aria-live': 'polite' });
  const template = el('textarea', { id: 'template-input', name: 'template', rows: '3', placeholder: '{{ prompt }}', spellcheck: 'false' });
  const system = el('textarea', { id: 'system-input', name: 'system', rows: '2', placeholder: 'You are a helpful assistant.' });
  const maxTokens = el('input', { id: 'maxtokens-input', name: 'max_new_tokens', type: 'number', min: '1', step: '1', inputmode: 'numeric', placeholder: '1024' });
  const stop = el('textarea', { id: 'stop-input', name: 'stop', rows: '2', placeholder: 'one stop string per line', spellcheck: 'false' });
  const logprobs = el('input', { id: 'logprobs-input', name: 'logprobs', type: 'number', min: '0', max: '100', step: '1', inputmode: 'numeric', value: '0' });
  const seed = el('input', { id: 'seed-input', name: 'seed', type: 'number', step: '1', inputmode: 'numeric', placeholder: '0' });
  const endpoint = el('select', { id: 'endpoint-select', name: 'endpoint' }, el('option', { value: 'chat' }, 'chat'), el('option', { value: 'completions' }, 'completions'));
  const mode = el('select', { id: 'mode-select', name: 'mode' }, el('option', { value: 'generate' }, 'generate'), el('option', { value: 'rescore' }, 'rescore (teacher-force final assistant turns)'));
  const bPreview = el('button', { type: 'button', id: 'btn-preview', class: 'btn' }, 'Preview');
  const bStart = el('button', { type: 'submit', id: 'btn-start', class: 'btn btn-primary' }, 'Start job');
  const busy = el('span', { id: 'newjob-busy', class: 'muted', role: 'status', 'aria-live': 'polite' });
  const preview = el('section', { id: 'preview', class: 'card preview', 'aria-live': 'polite', 'aria-labelledby': 'preview-title', hidden: true });

  const paneFile = el('div', { class: 'source-pane', id: 'pane-file' },
    field('Prompt file (.jsonl, .csv or .parquet)', fileInput, 'JSONL: one {"prompt": "…"} (or {"messages": […]}) per line; CSV / Parquet: a prompt column.'));
  const panePaste = el('div', { class: 'source-pane', id: 'pane-paste' },
    field('Prompts, one per line', pasteInput, 'Each non-empty line becomes one prompt.'));
  const paneExisting = el('div', { class: 'source-pane', id: 'pane-existing' }, field('Existing prompt set', setSelect));
  const nameField = field('Prompt set name (optional)', setName, 'Used for uploaded or pasted prompts.');

  const form = el('form', { id: 'newjob-form', class: 'form', novalidate: true, 'aria-describedby': 'newjob-alert' },
    el('fieldset', { class: 'card' },
      el('legend', null, 'Prompts'),
      el('div', { class: 'radios', role: 'radiogroup', 'aria-label': 'Prompt source' },
        radio('src-file', 'file', 'Upload a file', true),
        radio('src-paste', 'paste', 'Paste prompts', false),
        radio('src-existing', 'existing', 'Use an existing prompt set', false)),
      paneFile, panePaste, paneExisting, nameField),
    el('fieldset', { class: 'card' },
      el('legend', null, 'Teacher and generation'),
      el('div', { class: 'field' }, el('label', { for: 'teacher-select' }, 'Teacher'), teacherSel, teacherInfo),
      field('Template', template, 'minijinja; variables: prompt, id, metadata. Empty: the prompt as is.'),
      field('System prompt', system, 'For prompts that have none of their own.'),
      el('div', { class: 'row' },
        field('Max tokens', maxTokens, 'Per answer; default 1024.'),
        field('Logprobs k (0–100)', logprobs, 'Top-k soft labels per answer token; 0 = none.'),
        field('Seed', seed, 'Default 0.')),
      field('Stop strings', stop, 'One per line; at most 16.'),
      el('div', { class: 'row' }, field('Endpoint', endpoint), field('Mode', mode))),
    alert,
    el('div', { class: 'actions form-actions' }, bPreview, bStart, busy));

  main.append(el('div', { class: 'page-head' }, heading('New job')), form, preview);
  focusHeading();

  const source = () => form.querySelector('input[name=source]:checked').value;
  const showPanes = () => {
    const s = source();
    paneFile.hidden = s !== 'file';
    panePaste.hidden = s !== 'paste';
    paneExisting.hidden = s !== 'existing';
    nameField.hidden = s === 'existing';
    setName.placeholder = s === 'file' ? 'default: the file name' : 'default: pasted prompts and the time';
  };
  form.addEventListener('change', (e) => { if (e.target.name === 'source') showPanes(); });
  fileInput.addEventListener('change', () => { if (fileInput.files.length) { $('#src-file').checked = true; showPanes(); } });
  pasteInput.addEventListener('input', () => { if (pasteInput.value) { $('#src-paste').checked = true; showPanes(); } });
  showPanes();

  let teachers = [];
  const showTeacher = () => {
    const t = teachers.find((x) => x.name === teacherSel.value);
    teacherInfo.replaceChildren();
    teacherInfo.classList.remove('error-text');
    if (!t) return;
    if (t.error) {
      teacherInfo.classList.add('error-text');
      teacherInfo.append(el('strong', null, 'Not answering: '), t.error);
    } else {
      teacherInfo.append(t.identity, ` · up to ${fmtInt(t.max_in_flight)} requests in flight`);
    }
  };
  teacherSel.addEventListener('change', showTeacher);

  const loadSets = async (selectId) => {
    const sets = await api('/v1/prompt-sets', { signal: p.signal });
    if (!p.alive) return;
    const list = Array.isArray(sets) ? [...sets].sort((a, b) => b.id - a.id) : [];
    replace(setSelect, list.length
      ? el('option', { value: '' }, 'Choose a prompt set…')
      : el('option', { value: '' }, 'No prompt sets yet'),
    ...list.map((s) => el('option', { value: s.id, selected: String(s.id) === String(selectId ?? '') },
      `#${s.id} ${s.name} (${fmtInt(s.count)} prompts, ${s.source})`)));
  };
  (async () => {
    try {
      const ts = await api('/v1/teachers', { signal: p.signal });
      if (!p.alive) return;
      teachers = Array.isArray(ts) ? ts : [];
      replace(teacherSel, ...(teachers.length
        ? teachers.map((t) => el('option', { value: t.name }, t.error ? `${t.name} (not answering)` : t.name))
        : [el('option', { value: '' }, 'No teachers configured')]));
      const ok = teachers.find((t) => !t.error);
      if (ok) teacherSel.value = ok.name;
      showTeacher();
    } catch (e) { showError(alert, e, 'Could not load teachers'); }
  })();
  loadSets().catch((e) => showError(alert, e, 'Could not load prompt sets'));

  // A set created here is reused by Preview and Start while its source is unchanged.
  let created = null; // {key, id}
  const sourceKey = () => {
    const s = source();
    if (s === 'file') {
      const f = fileInput.files[0];
      return f ? `file:${f.name}:${f.size}:${f.lastModified}:${setName.value}` : null;
    }
    if (s === 'paste') return `paste:${pasteInput.value}:${setName.value}`;
    return null;
  };

  const fieldControls = {
    prompt_set: () => (source() === 'existing' ? setSelect : source() === 'file' ? fileInput : pasteInput),
    file: () => fileInput, prompts: () => pasteInput, name: () => setName, format: () => fileInput,
    body: () => (source() === 'file' ? fileInput : source() === 'paste' ? pasteInput : null),
    teacher: () => teacherSel, template: () => template, system: () => system, max_new_tokens: () => maxTokens,
    stop: () => stop, seed: () => seed, logprobs: () => logprobs, endpoint: () => endpoint, mode: () => mode,
  };
  const controlFor = (f) => {
    if (!f) return null;
    const base = String(f).split(/[.[]/)[0];
    const get = fieldControls[base] || (base.startsWith('prompts') ? fieldControls.prompts : null);
    return get ? get() : null;
  };
  const clearInvalid = () => form.querySelectorAll('[aria-invalid]').forEach((n) => n.removeAttribute('aria-invalid'));
  const fail = (e, what) => {
    if (isQuiet(e)) return;
    showError(alert, e, what);
    const c = controlFor(e.field);
    if (c) { c.setAttribute('aria-invalid', 'true'); }
  };
  const localError = (message, fieldName) => new ApiError(0, 'invalid_request', message, fieldName);

  const ensureSet = async () => {
    const s = source();
    if (s === 'existing') {
      if (!setSelect.value) throw localError('Choose a prompt set.', 'prompt_set');
      return Number(setSelect.value);
    }
    const key = sourceKey();
    if (created && created.key === key) return created.id;
    let res;
    if (s === 'file') {
      const f = fileInput.files[0];
      if (!f) throw localError('Choose a prompt file to upload.', 'file');
      const fd = new FormData();
      fd.append('file', f, f.name);
      fd.append('name', setName.value.trim() || f.name);
      busy.textContent = `Uploading ${f.name}…`;
      res = await api('/v1/prompt-sets', { method: 'POST', body: fd, signal: p.signal });
    } else {
      const prompts = pasteInput.value.split(/\r?\n/).filter((l) => l.trim() !== '').map((prompt) => ({ prompt }));
      if (!prompts.length) throw localError('Paste at least one prompt (one per line).', 'prompts');
      const name = setName.value.trim() || `pasted ${new Date().toISOString().slice(0, 19).replace('T', ' ')}`;
      busy.textContent = `Creating a set of ${prompts.length} prompts…`;
      res = await api('/v1/prompt-sets', { method: 'POST', json: { name, prompts }, signal: p.signal });
    }
    created = { key, id: res.id, count: res.count };
    loadSets(res.id).catch(() => {});
    return res.id;
  };

  const numberOf = (input, name, lo, hi) => {
    const raw = input.value.trim();
    if (raw === '') {
      if (input.validity && input.validity.badInput) throw localError(`${name} must be a whole number.`, input.name);
      return undefined;
    }
    const n = Number(raw);
    if (!Number.isInteger(n) || (lo != null && n < lo) || (hi != null && n > hi)) {
      throw localError(`${name} must be a whole number${lo != null ? ` from ${lo}` : ''}${hi != null ? ` to ${hi}` : ''}.`, input.name);
    }
    return n;
  };

  const jobBody = (setId) => {
    if (!teacherSel.value) throw localError('Choose a teacher.', 'teacher');
    const b = { prompt_set: setId, teacher: teacherSel.value };
    const mt = numberOf(maxTokens, 'Max tokens', 1);
    if (mt !== undefined) b.max_new_tokens = mt;
    if (template.value.trim() !== '') b.template = template.value;
    if (system.value.trim() !== '') b.system = system.value;
    const stops = stop.value.split(/\r?\n/).filter((l) => l !== '');
    if (stops.length) b.stop = stops;
    const sd = numberOf(seed, 'Seed');
    if (sd !== undefined) b.seed = sd;
    const lp = numberOf(logprobs, 'Logprobs k', 0, 100);
    if (lp) b.logprobs = lp;
    if (endpoint.value !== 'chat') b.endpoint = endpoint.value;
    if (mode.value !== 'generate') b.mode = mode.value;
    return b;
  };

  let running = false;
  const guard = async (fn) => {
    if (running) return;
    running = true;
    bPreview.disabled = true;
    bStart.disabled = true;
    clearAlert(alert);
    clearInvalid();
    try { await fn(); } finally {
      running = false;
      if (p.alive) {
        bPreview.disabled = false;
        bStart.disabled = false;
        busy.textContent = '';
      }
    }
  };

  bPreview.addEventListener('click', () => guard(async () => {
    try {
      // Check the job fields before uploading anything.
      jobBody(0);
      const setId = await ensureSet();
      busy.textContent = 'Rendering the first prompts…';
      const res = await api(`/v1/jobs/preview${qs({ limit: 3 })}`, { method: 'POST', json: jobBody(setId), signal: p.signal });
      if (!p.alive) return;
      renderPreview(preview, res, created && created.id === setId ? created.count : null);
    } catch (e) {
      fail(e, 'Preview failed');
      const c = controlFor(e.field);
      if (c) c.focus();
    }
  }));

  form.addEventListener('submit', (e) => {
    e.preventDefault();
    guard(async () => {
      try {
        jobBody(0);
        const setId = await ensureSet();
        busy.textContent = 'Starting the job…';
        const res = await api('/v1/jobs', { method: 'POST', json: jobBody(setId), signal: p.signal });
        if (!p.alive) return;
        navigated = true;
        location.hash = `#/jobs/${Number(res.id)}`;
      } catch (ex) {
        fail(ex, 'Could not start the job');
        const c = controlFor(ex.field);
        if (c) c.focus();
      }
    });
  });
}

function renderPreview(root, res, setCount) {
  const items = res && Array.isArray(res.items) ? res.items : [];
  const count = res && res.count != null ? res.count : setCount;
  replace(root,
    el('h2', { id: 'preview-title' }, 'Preview'),
    el('p', { class: 'muted' }, `The first ${items.length} of ${fmtInt(count ?? items.length)} requests the teacher will be sent:`),
    el('ol', { class: 'preview-list' }, items.map((it) => el('li', { class: 'preview-item', dataset: { position: it.position } },
      el('div', { class: 'preview-meta muted small' }, `Prompt ${Number(it.position) + 1}`, it.external_id != null ? ` · id ${it.external_id}` : ''),
      Array.isArray(it.request)
        ? el('ol', { class: 'messages' }, it.request.map((m) => el('li', { class: 'message', dataset: { role: m.role } },
          el('span', { class: 'role' }, `${m.role}:`), el('div', { class: 'textblock' }, m.content))))
        : el('div', { class: 'textblock' }, typeof it.request === 'string' ? it.request : JSON.stringify(it.request, null, 2))))));
  root.hidden = false;
  root.scrollIntoView({ block: 'nearest', behavior: 'smooth' });
}

// ---------------------------------------------------------------------------------------------

if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', boot);
else boot();
