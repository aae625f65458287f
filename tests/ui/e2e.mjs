// End-to-end test of the web UI against two running distill servers, driven through the page
// (clicks and typing; the REST API is read only to cross-check numbers).
//
// Environment:
//   DISTILL_URL        base URL of a server without an API token, with a real local teacher
//   DISTILL_TEACHER    that teacher's name
//   DISTILL_TOKEN_URL  base URL of a second server started with --api-token (same teacher)
//   DISTILL_TOKEN      its token
//   DISTILL_PROMPTS    JSONL prompt file to upload (one {"prompt": "..."} per line, ~40 prompts,
//                      some holding HTML and <script>)
//   DISTILL_SHOTS      folder for screenshots (created)
//   CHROMIUM           browser binary (default /usr/bin/chromium)
// Prints `e2e: ok` and exits 0, or prints `e2e: FAILED: <why>`, saves FAIL-*.png and exits 1.
//
// Hooks in the UI (server/ui/app.js) this test relies on:
//   every page   header nav #site-nav (#nav-jobs, #nav-new), <h1> title, #btn-logout (token servers)
//   token form   #token-form, input #token-input (label "API token"), #btn-token, #token-error
//                (role=alert), #token-message
//   jobs         #jobs-table (tr[data-job-id][data-status]), #jobs-empty, #link-new-job
//   job          #job-status (text + data-status), #job-progress (role=progressbar,
//                aria-valuenow 0..100, data-finished, data-total), #live-indicator,
//                #count-done/#count-failed/#count-queued/#count-running/#count-cancelled/
//                #count-total/#rate-answers/#rate-tokens/#job-eta (data-value = raw number),
//                #btn-pause, #btn-resume, #btn-cancel, #btn-retry, #job-alert (role=alert),
//                #job-notice (role=status), #throughput-chart (svg rect.bar[data-answers],
//                polyline.tokens-line, #throughput-empty), #failures (#failures-table,
//                #failures-empty), #params (dd[data-param=endpoint|max_new_tokens|template|
//                system|stop|seed|logprobs|mode|teacher|prompt_set]), #btn-export-jsonl,
//                #btn-export-parquet (downloads job-<id>.jsonl / .parquet), #link-generations
//   generations  #gen-filter, #gen-search (label "Search prompt and answer text"), #gen-status,
//                #gen-search-btn, #gen-table (data-rows; tbody tr[data-gen-id][data-status],
//                a.gen-link), #gen-prev, #gen-next, #gen-page, #gen-alert, #link-job
//   generation   #gen-prompt (text or .message[data-role] list), #gen-system, #gen-answer,
//                #gen-meta with #gen-prompt-tokens, #gen-completion-tokens, #gen-latency,
//                #gen-finish-reason, #gen-status-value, #gen-attempts, #gen-model,
//                #gen-last-error; #answer-tokens (span.tok per completion token, data-p on
//                tokens with a soft label, tabindex=0), #token-tooltip (role=tooltip),
//                #prob-legend, #tokens-summary, #link-job, #link-job-generations
//   new job      #newjob-form, radios #src-file/#src-paste/#src-existing, #file-input,
//                #paste-input, #set-select, #set-name, #teacher-select, #teacher-info,
//                #template-input, #system-input, #maxtokens-input, #stop-input,
//                #logprobs-input, #seed-input, #endpoint-select, #mode-select, #btn-preview,
//                #preview (.preview-item), #btn-start, #newjob-alert (role=alert)

import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';
// Chromium as root, and without its background connections (refused here, many at a time).
const CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'];

const env = (k, d) => {
  const v = process.env[k] ?? d;
  if (v == null || v === '') {
    console.error(`e2e: FAILED: environment variable ${k} is not set`);
    process.exit(1);
  }
  return v;
};
const URL_MAIN = env('DISTILL_URL').replace(/\/+$/, '');
const TEACHER = env('DISTILL_TEACHER');
const URL_TOKEN = env('DISTILL_TOKEN_URL').replace(/\/+$/, '');
const TOKEN = env('DISTILL_TOKEN');
const PROMPTS = path.resolve(env('DISTILL_PROMPTS'));
const SHOTS = path.resolve(env('DISTILL_SHOTS'));
// The same prompts as CSV and Parquet files (a `prompt` column), uploaded and previewed too.
const OTHER_FILES = ['DISTILL_PROMPTS_CSV', 'DISTILL_PROMPTS_PARQUET'].map((k) => process.env[k]).filter(Boolean).map((f) => path.resolve(f));
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
fs.mkdirSync(SHOTS, { recursive: true });

const TOTAL_LIMIT_MS = 14 * 60_000;
const JOB_DONE_MS = 5 * 60_000;
const PAGE_SIZE = 50;

const prompts = fs.readFileSync(PROMPTS, 'utf8').split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l).prompt);
if (!prompts.length) {
  console.error(`e2e: FAILED: no prompts in ${PROMPTS}`);
  process.exit(1);
}

let step = 'start';
const log = (m) => console.log(`e2e: ${m}`);
const fail = (m) => { throw new Error(m); };
const check = (cond, m) => { if (!cond) fail(m); };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function apiJson(p) {
  const r = await fetch(`${URL_MAIN}${p}`);
  if (!r.ok) fail(`API cross-check ${p}: HTTP ${r.status}`);
  return r.json();
}

// Accessible basics on every page shot: each visible form control has a label (or an
// aria-label), each button and link has a name, nothing interactive is taken out of the tab order.
async function accessible(page, name) {
  const bad = await page.evaluate(() => {
    const out = [];
    const visible = (e) => e.offsetParent !== null || e.getClientRects().length > 0;
    const desc = (e) => `${e.tagName.toLowerCase()}${e.id ? `#${e.id}` : ''}`;
    for (const e of document.querySelectorAll('input, select, textarea')) {
      if (e.type === 'hidden' || !visible(e)) continue;
      if (!(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.getAttribute('aria-labelledby')) out.push(`${desc(e)} has no label`);
    }
    for (const e of document.querySelectorAll('button, a[href]')) {
      if (!visible(e)) continue;
      if (!(e.textContent.trim() || e.getAttribute('aria-label') || e.getAttribute('title'))) out.push(`${desc(e)} has no name`);
      if (e.tabIndex < 0) out.push(`${desc(e)} is out of the tab order`);
    }
    return out;
  });
  check(!bad.length, `${name}: ${bad.join('; ')}`);
}

let shotN = 0;
async function shot(page, name, fullPage = true) {
  await accessible(page, name);
  const file = path.join(SHOTS, `${String(++shotN).padStart(2, '0')}-${name}.png`);
  await page.screenshot({ path: file, fullPage });
  log(`screenshot ${file}`);
  return file;
}

const problems = [];
function instrument(page, label) {
  page.setDefaultTimeout(30_000);
  page.on('pageerror', (e) => problems.push(`[${label}] page error: ${e.message}`));
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    const t = msg.text();
    // The browser logs 4xx responses; the wrong token (401) and refused actions (409) are expected.
    if (/Failed to load resource: the server responded with a status of (401|409)/.test(t)) return;
    problems.push(`[${label}] console error: ${t}`);
  });
  page.on('dialog', (d) => d.accept());
}

async function notPwned(page, where) {
  const v = await page.evaluate(() => window.__pwned);
  check(v === undefined, `${where}: window.__pwned was set (${v}): markup from the server ran`);
  const n = await page.evaluate(() => document.querySelectorAll('main img, main script, #token-tooltip img').length);
  check(n === 0, `${where}: ${n} <img>/<script> elements from data reached the page`);
}

async function noOverflow(page, where) {
  const o = await page.evaluate(() => ({ sw: document.documentElement.scrollWidth, cw: document.documentElement.clientWidth }));
  check(o.sw <= o.cw + 1, `${where}: the page overflows horizontally (${o.sw}px > ${o.cw}px)`);
}

/** page.waitForFunction with a readable failure message. */
async function waitUntil(page, what, fn, arg, timeout = 30_000) {
  try {
    await page.waitForFunction(fn, arg, { timeout, polling: 100 });
  } catch (e) {
    fail(`timed out after ${timeout / 1000}s waiting for ${what}`);
  }
}

const hasTeacher = (t) => [...document.querySelectorAll('#teacher-select option')].some((o) => o.value === t);

const num = async (page, sel) => Number(await page.locator(sel).getAttribute('data-value'));
const text = async (page, sel) => ((await page.locator(sel).textContent()) || '').trim();
const collapse = (s) => String(s).replace(/\s+/g, ' ').trim();

// ------------------------------------------------------------------------------------------------

async function tokenServer(browser) {
  step = '1 token server';
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await ctx.newPage();
  current = page;
  instrument(page, 'token');
  const requests = [];
  page.on('request', (r) => {
    const u = new URL(r.url());
    if (u.pathname.startsWith('/v1/')) requests.push({ url: u.pathname + u.search, headers: r.allHeaders() });
  });
  try {
    await page.goto(`${URL_TOKEN}/`);
    await page.locator('#token-form').waitFor();
    check(await page.locator('#jobs-table').count() === 0, 'token server: the jobs table is shown before logging in');
    check(await page.locator('#site-nav').isHidden(), 'token server: the nav is shown before logging in');
    const mainKids = await page.evaluate(() => [...document.querySelector('#main').children].map((c) => c.id));
    check(mainKids.length === 1 && mainKids[0] === 'token-form', `token server: the page shows more than the token form (${mainKids})`);
    const input = page.getByLabel('API token', { exact: true });
    check(await input.getAttribute('type') === 'password', 'token input is not a password input');
    await shot(page, 'token-form');

    await input.fill(`${TOKEN}-wrong`);
    await page.click('#btn-token');
    await page.locator('#token-error').waitFor();
    check(/not accepted/i.test(await text(page, '#token-error')), 'wrong token: no error message');
    check(await page.locator('#jobs-table').count() === 0, 'wrong token: the jobs table appeared');
    await shot(page, 'token-wrong');

    const loginAt = requests.length;
    await input.fill(TOKEN);
    await page.click('#btn-token');
    await page.locator('h1', { hasText: 'Jobs' }).waitFor();
    await page.locator('#jobs-table:visible, #jobs-empty:visible').first().waitFor();
    check(await page.locator('#site-nav').isVisible(), 'after login: nav not visible');
    // More calls: one jobs poll, then the new-job page (teachers, prompt sets).
    await page.waitForTimeout(2500);
    await page.click('#nav-new');
    await waitUntil(page, `teacher "${TEACHER}" in the teacher list of the token server`, hasTeacher, TEACHER);
    await page.click('#nav-jobs');
    await page.locator('h1', { hasText: 'Jobs' }).waitFor();
    await shot(page, 'token-logged-in');
    const after = requests.slice(loginAt);
    check(after.length >= 4, `after login: only ${after.length} /v1 requests recorded`);
    for (const r of after) {
      const h = await r.headers;
      check(h.authorization === `Bearer ${TOKEN}`, `after login: ${r.url} was sent without the bearer token (${h.authorization ?? 'none'})`);
    }
    log(`token server: ${after.length} requests after login all carried the token`);
    await notPwned(page, 'token server');
  } catch (e) {
    await page.screenshot({ path: path.join(SHOTS, 'FAIL-1-token-server.png'), fullPage: true }).catch(() => {});
    console.error(`e2e: failure screenshot ${path.join(SHOTS, 'FAIL-1-token-server.png')}`);
    throw e;
  } finally {
    current = null;
    await ctx.close();
  }
}

async function newJob(page) {
  step = '2 new job';
  await page.goto(`${URL_MAIN}/#/new`);
  await page.locator('#newjob-form').waitFor();
  await waitUntil(page, `teacher "${TEACHER}" in the teacher list`, hasTeacher, TEACHER);
  // CSV and Parquet files: each upload makes a set of every prompt, and the preview shows it.
  for (const file of OTHER_FILES) {
    const before = (await apiJson('/v1/prompt-sets')).length;
    await page.setInputFiles('#file-input', file);
    await page.selectOption('#teacher-select', TEACHER);
    await page.click('#btn-preview');
    const deadline = Date.now() + 30_000;
    let sets = [];
    while ((sets = await apiJson('/v1/prompt-sets')).length === before) {
      if (Date.now() > deadline) fail(`uploading ${path.basename(file)} made no prompt set (${await text(page, '#newjob-alert')})`);
      await sleep(200);
    }
    const set = sets[sets.length - 1];
    const ext = path.extname(file).slice(1);
    check(set.source === ext && set.count === prompts.length, `${path.basename(file)}: set ${JSON.stringify(set)}, expected ${prompts.length} ${ext} prompts`);
    await waitUntil(page, `the preview of ${path.basename(file)}`, (p0) => {
      const item = document.querySelector('#preview .preview-item');
      return item && item.textContent.includes(p0);
    }, prompts[0]);
    log(`${ext} upload: set ${set.id} with ${set.count} prompts, previewed`);
  }
  await page.setInputFiles('#file-input', PROMPTS);
  await page.selectOption('#teacher-select', TEACHER);
  await page.fill('#maxtokens-input', '24');
  await page.fill('#logprobs-input', '5');
  await page.click('#btn-preview');
  await page.locator('#preview .preview-item').first().waitFor({ timeout: 60_000 }).catch(async () => {
    const a = await page.locator('#newjob-alert').textContent().catch(() => '');
    fail(`preview did not render${a ? `: ${a}` : ''}`);
  });
  const first = await page.locator('#preview .preview-item').first().textContent();
  check(first.includes(prompts[0]), `preview does not show the first prompt's text literally (${JSON.stringify(prompts[0].slice(0, 80))})`);
  await notPwned(page, 'preview');
  await shot(page, 'newjob-preview');
  await page.click('#btn-start');
  await page.waitForFunction(() => /^#\/jobs\/\d+$/.test(location.hash), null, { timeout: 60_000 }).catch(async () => {
    const a = await page.locator('#newjob-alert').textContent().catch(() => '');
    fail(`start did not open the job page${a ? `: ${a}` : ''}`);
  });
  const id = Number((await page.evaluate(() => location.hash)).split('/')[2]);
  log(`job ${id} started`);
  return id;
}

async function watchJob(page, id) {
  step = '3 job page';
  await page.locator('#job-status').waitFor();
  check(await text(page, '#job-title') === `Job ${id}`, 'job page h1');
  // As soon as something is done while running: pause.
  await page.waitForFunction(() => {
    const s = document.querySelector('#job-status')?.textContent;
    const d = Number(document.querySelector('#count-done')?.dataset.value || 0);
    return (s === 'running' && d >= 1) || s === 'done' || s === 'cancelled';
  }, null, { timeout: 180_000, polling: 100 });
  const st = await text(page, '#job-status');
  check(st === 'running', `job ${id} was ${st} before it could be paused (too few prompts or too fast a teacher for the pause check)`);
  await page.click('#btn-pause', { timeout: 5000 });
  await waitUntil(page, 'the status to show paused', () => document.querySelector('#job-status')?.textContent === 'paused', null, 15_000);
  check(await page.locator('#btn-resume').isEnabled(), 'paused: Resume is not enabled');
  check(await page.locator('#btn-pause').isDisabled(), 'paused: Pause is still enabled');
  await waitUntil(page, 'the running count to drain to 0 after the pause', () => document.querySelector('#count-running')?.dataset.value === '0', null, 120_000);
  const done0 = await num(page, '#count-done');
  await sleep(3000);
  const done1 = await num(page, '#count-done');
  check(done1 === done0, `paused: done grew from ${done0} to ${done1}`);
  check(await text(page, '#job-status') === 'paused', 'paused: status changed by itself');
  const api = await apiJson(`/v1/jobs/${id}`);
  check(api.status === 'paused' && api.counts.done === done1 && api.counts.running === 0,
    `paused: the UI (done ${done1}) disagrees with the API (${api.status}, done ${api.counts.done}, running ${api.counts.running})`);
  log(`paused at ${done1}/${api.total} done`);
  await shot(page, 'job-paused');

  await page.click('#btn-resume');
  await waitUntil(page, 'the status to leave paused after Resume', () => ['running', 'done'].includes(document.querySelector('#job-status')?.textContent), null, 15_000);
  await page.waitForFunction(() => document.querySelector('#job-status')?.textContent === 'done'
    && document.querySelector('#job-progress')?.getAttribute('aria-valuenow') === '100', null, { timeout: JOB_DONE_MS, polling: 500 })
    .catch(async () => fail(`job ${id} did not finish within ${JOB_DONE_MS / 1000}s (progress ${await page.locator('#job-progress').getAttribute('aria-valuenow')}%, status ${await text(page, '#job-status')})`));
  const fin = await apiJson(`/v1/jobs/${id}`);
  check(await num(page, '#count-done') === fin.counts.done, `done: UI count ${await num(page, '#count-done')} != API ${fin.counts.done}`);
  check(fin.counts.done >= 1, 'done: nothing was answered');
  for (const b of ['#btn-pause', '#btn-resume', '#btn-cancel']) check(await page.locator(b).isDisabled(), `done: ${b} is enabled`);
  // the chart refreshes after the status change
  await page.waitForFunction(() => [...document.querySelectorAll('#throughput-chart rect.bar')].some((r) => Number(r.dataset.answers) > 0), null, { timeout: 20_000 })
    .catch(() => fail('throughput chart has no bars with answers'));
  check(await page.locator('#throughput-chart .axis-label').count() >= 2, 'throughput chart has no axis labels');
  const params = await page.locator('#params').textContent();
  check((await text(page, '#params [data-param="max_new_tokens"]')) === '24', 'params: max_new_tokens is not 24');
  check((await text(page, '#params [data-param="logprobs"]')) === '5', 'params: logprobs is not 5');
  check(params.includes(TEACHER), 'params: teacher missing');
  await notPwned(page, 'job page');
  log(`job ${id} done: ${fin.counts.done} done, ${fin.counts.failed} failed`);
  await shot(page, 'job-done');
  await page.setViewportSize({ width: 400, height: 800 });
  await page.waitForTimeout(400);
  await noOverflow(page, 'job page at 400px');
  await shot(page, 'job-done-narrow');
  await page.setViewportSize({ width: 1280, height: 800 });
  // The jobs list shows the finished job, then its link leads back.
  await page.click('#nav-jobs');
  const row = page.locator(`#jobs-table tr[data-job-id="${id}"]`);
  await row.waitFor();
  check((await row.getAttribute('data-status')) === 'done', `jobs page: job ${id} is not shown as done`);
  check((await row.textContent()).includes(TEACHER), 'jobs page: the teacher is missing');
  await shot(page, 'jobs');
  await row.locator(`a[href="#/jobs/${id}"]`).first().click();
  await page.locator('#link-generations').waitFor();
  return fin;
}

async function browseGenerations(page, id, fin) {
  step = '4 generations';
  await page.click('#link-generations');
  await page.waitForFunction(() => document.querySelector('#gen-table')?.dataset.rows !== undefined && !document.querySelector('#gen-table').hasAttribute('aria-busy'));
  const total = fin.total;
  const rows1 = Number(await page.locator('#gen-table').getAttribute('data-rows'));
  check(rows1 === Math.min(PAGE_SIZE, total), `first page has ${rows1} rows, expected ${Math.min(PAGE_SIZE, total)}`);
  check(await page.locator('#gen-prev').isDisabled(), 'Previous is enabled on the first page');
  if (total > PAGE_SIZE) {
    const lastId = Number(await page.locator('#gen-table tbody tr').last().getAttribute('data-gen-id'));
    await page.click('#gen-next');
    await page.waitForFunction(() => document.querySelector('#gen-page')?.textContent.startsWith('Page 2') && !document.querySelector('#gen-table').hasAttribute('aria-busy'));
    const firstId = Number(await page.locator('#gen-table tbody tr').first().getAttribute('data-gen-id'));
    check(firstId > lastId, `page 2 starts at ${firstId}, not after ${lastId}`);
    check(await page.locator('#gen-prev').isEnabled(), 'Previous is disabled on page 2');
    await page.click('#gen-prev');
    await page.waitForFunction(() => document.querySelector('#gen-page')?.textContent.startsWith('Page 1') && !document.querySelector('#gen-table').hasAttribute('aria-busy'));
  } else {
    check(await page.locator('#gen-next').isDisabled(), `only ${total} rows but Next is enabled`);
  }
  // HTML / script prompts on the first page appear literally.
  const cells = await page.locator('#gen-table tbody tr td:nth-child(3)').allTextContents();
  const htmlPrompts = prompts.slice(0, PAGE_SIZE).filter((p) => /<[a-z/!]/i.test(p));
  for (const p of htmlPrompts) {
    const want = collapse(p).slice(0, 100);
    check(cells.some((c) => c.startsWith(want)), `prompt ${JSON.stringify(want)} is not shown literally in the table`);
  }
  await notPwned(page, 'generations');

  // Search for a rare word of one prompt.
  const freq = new Map();
  prompts.forEach((p, i) => {
    for (const w of new Set(p.toLowerCase().split(/[^\p{L}\p{N}]+/u).filter((x) => x.length >= 5 && /^\p{L}+$/u.test(x)))) {
      if (!freq.has(w)) freq.set(w, []);
      freq.get(w).push(i);
    }
  });
  // the word must be in the first 100 characters of a prompt, so the truncated cell shows it
  const visible = ([w, idx]) => idx.some((i) => collapse(prompts[i]).slice(0, 100).toLowerCase().includes(w));
  const [word] = [...freq.entries()].filter(visible).sort((a, b) => a[1].length - b[1].length || b[0].length - a[0].length)[0] || [];
  check(word, 'no word to search for in the prompts');
  await page.getByLabel('Search prompt and answer text').fill(word);
  await page.getByLabel('Search prompt and answer text').press('Enter');
  await page.waitForFunction((w) => location.hash.includes(`q=${encodeURIComponent(w)}`) && !document.querySelector('#gen-table').hasAttribute('aria-busy'), word);
  await page.waitForFunction(() => document.querySelector('#gen-page')?.textContent.startsWith('Page 1'));
  const uiIds = (await page.locator('#gen-table tbody tr[data-gen-id]').evaluateAll((rs) => rs.map((r) => Number(r.dataset.genId)))).sort((a, b) => a - b);
  const apiIds = (await apiJson(`/v1/jobs/${id}/generations?q=${encodeURIComponent(word)}&limit=1000`)).items.map((g) => g.id).sort((a, b) => a - b);
  check(uiIds.length >= 1, `search for "${word}" shows no rows`);
  check(uiIds.length < Math.min(total, PAGE_SIZE) || total === 1, `search for "${word}" did not narrow the table (${uiIds.length} rows)`);
  check(JSON.stringify(uiIds) === JSON.stringify(apiIds.slice(0, PAGE_SIZE)), `search rows ${uiIds} differ from the API's ${apiIds}`);
  const shown = (await page.locator('#gen-table tbody tr').allTextContents()).join('\n').toLowerCase();
  check(shown.includes(word), `the search word "${word}" is not visible in the result rows`);
  log(`search "${word}": ${uiIds.length} row(s)`);

  // Status filter: done.
  await page.getByLabel('Search prompt and answer text').fill('');
  await page.selectOption('#gen-status', 'done');
  await page.waitForFunction(() => location.hash.includes('status=done') && !location.hash.includes('q=') && !document.querySelector('#gen-table').hasAttribute('aria-busy'));
  await page.waitForFunction(() => document.querySelector('#gen-page')?.textContent.startsWith('Page 1'));
  const statuses = await page.locator('#gen-table tbody tr[data-gen-id]').evaluateAll((rs) => rs.map((r) => r.dataset.status));
  check(statuses.length === Math.min(PAGE_SIZE, fin.counts.done), `status=done shows ${statuses.length} rows, expected ${Math.min(PAGE_SIZE, fin.counts.done)}`);
  check(statuses.every((s) => s === 'done'), `status=done shows other statuses: ${[...new Set(statuses)]}`);
  await notPwned(page, 'generations filtered');
  await shot(page, 'generations-done');
  await page.setViewportSize({ width: 400, height: 800 });
  await page.waitForTimeout(300);
  await noOverflow(page, 'generations at 400px');
  await shot(page, 'generations-narrow', false);
  await page.setViewportSize({ width: 1280, height: 800 });
}

async function openGeneration(page) {
  step = '5 generation';
  // The done row with the most completion tokens (a long answer gives varied probabilities).
  const rows = await page.locator('#gen-table tbody tr[data-gen-id]').evaluateAll((rs) => rs.map((r) => ({
    id: Number(r.dataset.genId), toks: Number((r.children[4]?.textContent || '0').replace(/\D/g, '')) || 0,
  })));
  check(rows.length > 0, 'no done generations to open');
  rows.sort((a, b) => b.toks - a.toks);
  const gid = rows[0].id;
  await page.locator(`#gen-table tr[data-gen-id="${gid}"] a.gen-link`).focus();
  await page.keyboard.press('Enter');
  await page.waitForFunction((g) => location.hash === `#/generations/${g}`, gid);
  await page.locator('#gen-answer').waitFor();
  const g = await apiJson(`/v1/generations/${gid}?token_texts=true`);
  const promptText = await text(page, '#gen-prompt');
  check(promptText.length > 0, 'generation: prompt is empty');
  if (g.prompt) check(collapse(promptText).includes(collapse(g.prompt)), 'generation: the prompt is not shown literally');
  check((await page.locator('#gen-answer').textContent()) === g.text, 'generation: the answer differs from the API');
  const digits = async (sel) => (await text(page, sel)).replace(/\D/g, '');
  check(g.prompt_tokens != null && await digits('#gen-prompt-tokens') === String(g.prompt_tokens), `generation: prompt tokens ${await text(page, '#gen-prompt-tokens')} (API ${g.prompt_tokens})`);
  check(g.completion_tokens != null && await digits('#gen-completion-tokens') === String(g.completion_tokens), `generation: completion tokens ${await text(page, '#gen-completion-tokens')} (API ${g.completion_tokens})`);
  check(g.latency_ms != null && /\d/.test(await text(page, '#gen-latency')), 'generation: latency missing');
  check((await text(page, '#gen-finish-reason')) === String(g.finish_reason ?? '—') && g.finish_reason, `generation: finish reason ${await text(page, '#gen-finish-reason')} (API ${g.finish_reason})`);
  check((await text(page, '#gen-status-value')) === 'done', 'generation: status');
  check(g.soft_labels && g.token_texts, 'generation: the API has no soft labels / token texts for a logprobs=5 job');
  await page.locator('#answer-tokens').waitFor();
  const spans = page.locator('#answer-tokens span.tok');
  const n = await spans.count();
  check(n === g.completion_token_ids.length, `#answer-tokens has ${n} spans for ${g.completion_token_ids.length} tokens`);
  const withP = await page.locator('#answer-tokens span.tok[data-p]').count();
  check(withP >= Math.max(1, n - 1) && withP === Math.min(n, g.soft_labels.token_logprobs.length), `${withP} of ${n} tokens have data-p`);
  const colours = new Set(await page.locator('#answer-tokens span.tok[data-p]').evaluateAll((s) => s.map((x) => getComputedStyle(x).backgroundColor)));
  const ps = new Set(await page.locator('#answer-tokens span.tok[data-p]').evaluateAll((s) => s.map((x) => x.dataset.p)));
  check(colours.size >= 2, `token colours do not differ: ${withP} tokens, probabilities ${[...ps].slice(0, 8)}, colours ${[...colours].slice(0, 4)}`);
  // hover: the tooltip lists alternatives
  const target = page.locator('#answer-tokens span.tok[data-p]').first();
  await target.hover();
  await page.locator('#token-tooltip').waitFor({ state: 'visible' });
  const tip = await page.locator('#token-tooltip').textContent();
  check(/%/.test(tip) && await page.locator('#token-tooltip .tip-table tbody tr').count() >= 1, `tooltip shows no alternatives: ${tip}`);
  await notPwned(page, 'generation');
  await shot(page, 'generation-tokens');
  // keyboard focus shows it too
  await page.mouse.move(0, 0);
  await page.locator('#answer-tokens span.tok[data-p]').last().focus();
  await page.waitForFunction(() => !document.querySelector('#token-tooltip').hidden);
  await page.keyboard.press('Escape');
  // an HTML prompt's own page shows it literally
  const htmlIdx = prompts.findIndex((p) => /<script|<img/i.test(p));
  if (htmlIdx >= 0) {
    const page1 = (await apiJson(`/v1/jobs/${g.job_id}/generations?limit=1000`)).items;
    const hg = page1.find((x) => x.prompt === prompts[htmlIdx]);
    if (hg) {
      await page.evaluate((h) => { location.hash = h; }, `#/generations/${hg.id}`);
      await page.locator('#gen-prompt').waitFor();
      await page.waitForFunction((gid2) => document.querySelector('h1')?.textContent === `Generation ${gid2}` && document.querySelector('#gen-prompt'), hg.id);
      check((await page.locator('#gen-prompt').textContent()) === prompts[htmlIdx], 'an HTML prompt is not shown literally on its page');
      await notPwned(page, 'HTML prompt page');
    }
  }
  return g.job_id;
}

async function exportFiles(page, id, fin) {
  step = '6 export';
  await page.click('#link-job');
  await page.locator('#job-status').waitFor();
  const [dl] = await Promise.all([page.waitForEvent('download', { timeout: 60_000 }), page.click('#btn-export-jsonl')]);
  check(dl.suggestedFilename() === `job-${id}.jsonl`, `JSONL download is named ${dl.suggestedFilename()}`);
  const jp = path.join(SHOTS, `job-${id}.jsonl`);
  await dl.saveAs(jp);
  const lines = fs.readFileSync(jp, 'utf8').split('\n').filter((l) => l.trim());
  check(lines.length === fin.counts.done, `JSONL has ${lines.length} lines for ${fin.counts.done} done generations`);
  lines.forEach((l, i) => {
    let o;
    try { o = JSON.parse(l); } catch (e) { fail(`JSONL line ${i + 1} is not JSON: ${e.message}`); }
    check(Array.isArray(o.completion_token_ids), `JSONL line ${i + 1} has no completion_token_ids`);
    check(Array.isArray(o.target_logprobs), `JSONL line ${i + 1} has no target_logprobs`);
  });
  const [dp] = await Promise.all([page.waitForEvent('download', { timeout: 60_000 }), page.click('#btn-export-parquet')]);
  check(dp.suggestedFilename() === `job-${id}.parquet`, `Parquet download is named ${dp.suggestedFilename()}`);
  const pp = path.join(SHOTS, `job-${id}.parquet`);
  await dp.saveAs(pp);
  const pq = fs.readFileSync(pp);
  check(pq.length >= 8 && pq.subarray(0, 4).toString('latin1') === 'PAR1' && pq.subarray(pq.length - 4).toString('latin1') === 'PAR1',
    `the Parquet file (${pq.length} bytes) does not start and end with PAR1`);
  check(await page.locator('#job-alert').isHidden(), `export showed an error: ${await page.locator('#job-alert').textContent()}`);
  log(`exports: ${lines.length} JSONL lines, ${pq.length} Parquet bytes`);
}

// ------------------------------------------------------------------------------------------------

let browser;
let current;
const killer = setTimeout(async () => {
  console.error(`e2e: FAILED: overall time limit of ${TOTAL_LIMIT_MS / 60000} min reached in step ${step}`);
  try { if (current) await current.screenshot({ path: path.join(SHOTS, 'FAIL-timeout.png'), fullPage: true }); } catch { /* ignore */ }
  try { await browser?.close(); } catch { /* ignore */ }
  process.exit(1);
}, TOTAL_LIMIT_MS);

let ok = false;
try {
  browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
  await tokenServer(browser);
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 }, acceptDownloads: true });
  const page = await ctx.newPage();
  current = page;
  instrument(page, 'main');
  const id = await newJob(page);
  const fin = await watchJob(page, id);
  await browseGenerations(page, id, fin);
  await openGeneration(page);
  await exportFiles(page, id, fin);
  await notPwned(page, 'end');
  step = '7 page errors';
  check(problems.length === 0, `errors in the page:\n  ${problems.join('\n  ')}`);
  ok = true;
} catch (e) {
  console.error(`e2e: FAILED in step ${step}: ${e && e.message ? e.message : e}`);
  if (problems.length) console.error(`e2e: page problems:\n  ${problems.join('\n  ')}`);
  if (current) {
    try {
      const f = path.join(SHOTS, `FAIL-${step.replace(/[^a-z0-9]+/gi, '-')}.png`);
      await current.screenshot({ path: f, fullPage: true });
      console.error(`e2e: failure screenshot ${f}`);
    } catch { /* ignore */ }
  }
} finally {
  clearTimeout(killer);
  try { await browser?.close(); } catch { /* ignore */ }
}
console.log(`e2e: screenshots in ${SHOTS}`);
if (!ok) process.exit(1);
console.log('e2e: ok');
