// Drives the real page over a large job and reports how long each API call the browser made
// took (Playwright's request timing: request start to response end). Run by
// `cargo bench -p distill-tests --bench ui_pages`, which builds the 100,000-generation job.
//
// Env: DISTILL_URL (server), DISTILL_JOB (job id), DISTILL_SEARCH (a word matching one row),
// CHROMIUM (default /usr/bin/chromium).

import { chromium } from 'playwright-core';
// Chromium as root, and without its background connections (refused here, many at a time).
const CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'];

const base = process.env.DISTILL_URL;
const job = process.env.DISTILL_JOB;
const word = process.env.DISTILL_SEARCH || 'zeppelin';
const calls = [];

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: CHROMIUM_ARGS,
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('requestfinished', (req) => {
    const url = new URL(req.url());
    if (!url.pathname.startsWith('/v1/')) return;
    const t = req.timing();
    if (t.responseEnd >= 0) calls.push({ path: url.pathname + url.search, ms: t.responseEnd });
  });
  const rows = () => page.locator('#gen-table tbody tr[data-gen-id]');
  const firstRowText = async () => (await rows().count()) ? rows().first().innerText() : '';
  const step = async (name, fn) => {
    const t0 = Date.now();
    await fn();
    console.log(`${name}: ${Date.now() - t0} ms`);
  };

  await step('jobs page', async () => {
    await page.goto(`${base}/#/jobs`);
    await page.locator(`a[href="#/jobs/${job}"]`).first().waitFor();
    await page.waitForTimeout(2500); // one poll of the list
  });
  await step('job page', async () => {
    await page.goto(`${base}/#/jobs/${job}`);
    await page.locator('#job-status').waitFor();
    await page.locator('#throughput-chart rect.bar').first().waitFor({ state: 'attached' });
    await page.waitForTimeout(1000); // the event stream and failures load
  });
  await step('generations browser, first page', async () => {
    await page.goto(`${base}/#/jobs/${job}/generations`);
    await rows().first().waitFor();
  });
  // Clicks Next or Previous and waits until the table shows another page.
  const turn = async (button) => {
    const before = await firstRowText();
    await page.locator(button).click();
    await page.waitForFunction(
      (b) => { const r = document.querySelector('#gen-table tbody tr[data-gen-id]'); return r && r.innerText !== b; },
      before,
    );
  };
  for (let i = 0; i < 10; i++) await turn('#gen-next');
  console.log('ten pages forward: done');
  for (let i = 0; i < 3; i++) await turn('#gen-prev');
  await step(`search "${word}"`, async () => {
    await page.locator('#gen-search').fill(word);
    await page.locator('#gen-search').press('Enter');
    await page.waitForFunction(() => document.querySelectorAll('#gen-table tbody tr[data-gen-id]').length === 1
      && !document.querySelector('#gen-table').hasAttribute('aria-busy'));
  });
  await step('status filter failed', async () => {
    await page.locator('#gen-search').fill('');
    await page.locator('#gen-search').press('Enter');
    await page.locator('#gen-status').selectOption('failed');
    await page.waitForFunction(() => {
      const r = document.querySelectorAll('#gen-table tbody tr[data-gen-id]');
      return r.length > 0 && [...r].every((x) => /failed/.test(x.innerText));
    });
  });
  await step('open a generation', async () => {
    await rows().first().locator('a').first().click();
    await page.waitForURL(/#\/generations\/\d+/);
    await page.locator('h1').waitFor();
    await page.waitForTimeout(500);
  });
  if (errors.length) throw new Error(`page errors: ${errors.join('; ')}`);

  const byKind = new Map();
  for (const c of calls) {
    const kind = c.path.replace(/\d+/g, 'N').replace(/q=[^&]*/, 'q=…');
    const k = byKind.get(kind) || { n: 0, worst: 0, total: 0 };
    k.n += 1; k.total += c.ms; k.worst = Math.max(k.worst, c.ms);
    byKind.set(kind, k);
  }
  console.log('\n| call made by the page | count | mean ms | worst ms |\n|---|---|---|---|');
  for (const [kind, k] of [...byKind].sort((a, b) => b[1].worst - a[1].worst)) {
    console.log(`| \`${kind}\` | ${k.n} | ${(k.total / k.n).toFixed(1)} | ${k.worst.toFixed(1)} |`);
  }
  const slowest = calls.reduce((a, b) => (b.ms > a.ms ? b : a), { ms: 0, path: '' });
  console.log(`\n${calls.length} API calls; slowest in the browser: ${slowest.path} at ${slowest.ms.toFixed(1)} ms`);
} finally {
  await browser.close();
}
