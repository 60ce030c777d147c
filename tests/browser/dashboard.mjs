// Drives vigil's dashboard in Debian's Chromium (headless, via playwright-core)
// for tests/dashboard.rs:
//
//   node tests/browser/dashboard.mjs <dashboard-url> <artifact-dir>
//
// Environment:
//   DASHBOARD_PLAN      JSON: what the Rust test sent / will send (see below)
//   DASHBOARD_SYNC_DIR  handshake directory shared with the Rust test: this
//                       script writes `ready-<step>`, then waits for the test
//                       to send the step's events and write `sent-<step>`
//   CHROMIUM            the browser (default /usr/bin/chromium)
//
// Plan: { initial: [{host, service, state, metric}], change: {host, service,
// state, metric, description, tags, attributes}, bulk: {count, total, last:
// {host, service, metric}} }.
//
// Exits non-zero (with the reason on stderr) when any check fails; prints one
// `RESULT {...}` line with timings on success.

import { mkdtemp, rm, writeFile, access, mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const [url, artifactDir] = process.argv.slice(2);
if (!url || !artifactDir) {
  console.error('usage: node dashboard.mjs <dashboard-url> <artifact-dir>');
  process.exit(2);
}
const plan = JSON.parse(process.env.DASHBOARD_PLAN ?? 'null');
const syncDir = process.env.DASHBOARD_SYNC_DIR;
if (!plan || !syncDir) {
  console.error('DASHBOARD_PLAN and DASHBOARD_SYNC_DIR must be set (tests/dashboard.rs sets them)');
  process.exit(2);
}
const executablePath = process.env.CHROMIUM ?? '/usr/bin/chromium';

// The flags this machine needs: no sandbox as root, no GPU, and no background
// network traffic (the closed network refuses it).
const CHROMIUM_FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];
const STEP_TIMEOUT = 30_000; // ms: any single wait
const RESPONSIVE_MS = 2_000; // a page.evaluate round trip must finish within this while loading
const LONGEST_TASK_MS = 1_000; // no single main-thread task may block this long (the page budgets ~8 ms per frame)

const log = (...args) => console.log('[dashboard.mjs]', ...args);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function check(ok, message) {
  if (!ok) throw new Error(`check failed: ${message}`);
}

/** Tells the Rust test we are ready for `step`, then waits until it sent it. */
async function handshake(step) {
  await writeFile(join(syncDir, `ready-${step}`), '');
  const deadline = Date.now() + 60_000;
  for (;;) {
    try {
      await access(join(syncDir, `sent-${step}`));
      return;
    } catch {
      if (Date.now() > deadline) throw new Error(`the test did not send step ${step} within 60 s`);
      await sleep(50);
    }
  }
}

const selector = (host, service) =>
  `.cell[data-host=${JSON.stringify(host)}][data-service=${JSON.stringify(service)}]`;

/** What a rendered cell shows: text, classes, computed background, title. */
function cellInfo(page, host, service) {
  return page.evaluate((sel) => {
    const cell = document.querySelector(sel);
    if (!cell) return null;
    return {
      metric: cell.querySelector('.metric').textContent,
      state: cell.querySelector('.state').textContent,
      className: cell.className,
      background: getComputedStyle(cell).backgroundColor,
      title: cell.title,
      tabIndex: cell.tabIndex,
    };
  }, selector(host, service));
}

/** `rgb(r, g, b)` → [r, g, b]. */
function rgb(css) {
  const m = /rgba?\((\d+),\s*(\d+),\s*(\d+)/.exec(css);
  check(m, `a colour, got ${css}`);
  return m.slice(1, 4).map(Number);
}

const entriesShown = (page) => page.evaluate(() => Number(document.getElementById('count').dataset.entries));

async function main(page) {
  const errors = [];
  page.on('pageerror', (e) => errors.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error') errors.push(`console error: ${m.text()}`);
  });

  // Every WebSocket the page opens, and when: to close them and time the
  // reconnects.
  await page.addInitScript(() => {
    const Native = window.WebSocket;
    window.__sockets = [];
    window.WebSocket = class extends Native {
      constructor(...args) {
        super(...args);
        window.__sockets.push({ ws: this, at: performance.now() });
      }
    };
  });

  // --- 1. The grid shows what the test sent --------------------------------
  await page.goto(url);
  await page.waitForSelector('#status[data-status="live"]', { timeout: STEP_TIMEOUT });
  await page.waitForFunction(
    (n) => Number(document.getElementById('count').dataset.entries) === n,
    plan.initial.length,
    { timeout: STEP_TIMEOUT },
  );
  for (const ev of plan.initial) {
    const info = await cellInfo(page, ev.host, ev.service);
    check(info, `a cell for ${ev.host} / ${ev.service}`);
    check(info.metric === String(ev.metric), `${ev.host}/${ev.service} shows metric ${ev.metric}, got ${info.metric}`);
    check(info.state === ev.state, `${ev.host}/${ev.service} says ${ev.state} as text, got ${info.state}`);
    check(info.className.includes(`state-${ev.state}`), `${ev.host}/${ev.service} has class state-${ev.state}: ${info.className}`);
    check(info.title.includes(ev.state), `the title names the state: ${info.title}`);
    check(info.tabIndex === 0, 'cells are focusable');
  }
  const labels = await page.evaluate(() =>
    [...document.querySelectorAll('#rowhead .label, #colhead .label')].map((e) => e.textContent),
  );
  for (const ev of plan.initial) {
    check(labels.includes(ev.host) && labels.includes(ev.service), `labels for ${ev.host} and ${ev.service} in ${labels}`);
  }
  log(`initial grid ok: ${plan.initial.length} cells`);

  // --- 1b. A connection that worked reconnects at once, however often ----
  // (a backoff grown by earlier closes kept a dashboard under load waiting
  // up to 30 s while every connection succeeded).
  const waits = [];
  for (let i = 0; i < 4; i++) {
    const closedAt = await page.evaluate(() => {
      window.__sockets.at(-1).ws.close(4000, 'test');
      return performance.now();
    });
    await page.waitForFunction((n) => window.__sockets.length > n, i + 1, { timeout: STEP_TIMEOUT });
    waits.push(Math.round((await page.evaluate(() => window.__sockets.at(-1).at)) - closedAt));
    await page.waitForSelector('#status[data-status="live"]', { timeout: STEP_TIMEOUT });
    await page.waitForFunction(
      (n) => Number(document.getElementById('count').dataset.entries) === n,
      plan.initial.length,
      { timeout: STEP_TIMEOUT },
    );
  }
  check(waits.every((ms) => ms < 1_500), `each reconnect within 1.5 s of its close: ${waits} ms`);
  log(`reconnects ok: ${waits} ms`);

  // --- 2. A state change recolours the cell ---------------------------------
  const { change } = plan;
  const before = await cellInfo(page, change.host, change.service);
  check(before && before.className.includes('state-ok'), `the cell to change starts ok: ${JSON.stringify(before)}`);
  const [r0, g0, b0] = rgb(before.background);
  check(g0 > r0 && g0 > b0, `an ok cell is green, got ${before.background}`);

  await handshake('change');
  await page.waitForSelector(`${selector(change.host, change.service)}[data-state="${change.state}"]`, {
    timeout: STEP_TIMEOUT,
  });
  const after = await cellInfo(page, change.host, change.service);
  check(after.className.includes('state-critical'), `class state-critical after the change: ${after.className}`);
  const [r1, g1, b1] = rgb(after.background);
  check(after.background !== before.background, 'the colour changed');
  check(r1 > g1 && r1 > b1, `a critical cell is red, got ${after.background}`);
  check(after.metric === String(change.metric), `the new metric ${change.metric} shows, got ${after.metric}`);
  log(`state change ok: ${before.background} -> ${after.background}`);

  // --- 3. Clicking a cell shows its event -----------------------------------
  await page.click(selector(change.host, change.service));
  await page.waitForSelector('#details:not([hidden])', { timeout: STEP_TIMEOUT });
  const details = await page.evaluate(() => {
    const fields = {};
    for (const dd of document.querySelectorAll('#fields dd')) fields[dd.dataset.field] = dd.textContent;
    return {
      title: document.getElementById('details-title').textContent,
      fields,
      points: Number(document.getElementById('sparkline').dataset.points),
      polyline: document.querySelector('#sparkline polyline')?.getAttribute('points') ?? '',
    };
  });
  const f = details.fields;
  check(details.title.includes(change.host) && details.title.includes(change.service), `details title: ${details.title}`);
  check(f.host === change.host && f.service === change.service, `host/service fields: ${JSON.stringify(f)}`);
  check(f.state === change.state, `state field: ${f.state}`);
  check(f.metric === String(change.metric), `metric field: ${f.metric}`);
  check(f.description === change.description, `description field: ${f.description}`);
  for (const tag of change.tags) check(f.tags.includes(tag), `tag ${tag} in ${f.tags}`);
  for (const [k, v] of Object.entries(change.attributes)) check(f[k] === v, `attribute ${k}=${v}, got ${f[k]}`);
  check(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z/.test(f.time), `an ISO 8601 time: ${f.time}`);
  check(details.points >= 2, `the sparkline has both metric values, got ${details.points}`);
  check(details.polyline.split(' ').length === details.points, 'one sparkline point per value');
  await mkdir(artifactDir, { recursive: true });
  await page.screenshot({ path: join(artifactDir, 'dashboard-small.png') });
  log(`details ok: ${JSON.stringify(f)}`);

  // --- 4. 10 000 entries: the page stays responsive ------------------------
  const { bulk } = plan;
  await page.evaluate(() => {
    // Record main-thread tasks over 50 ms while the bulk arrives.
    window.__longTasks = [];
    new PerformanceObserver((list) => window.__longTasks.push(...list.getEntries().map((e) => e.duration))).observe({
      type: 'longtask',
      buffered: false,
    });
  });
  const loadStart = Date.now();
  await writeFile(join(syncDir, 'ready-bulk'), '');
  let maxRoundTrip = 0;
  let probes = 0;
  let shown = 0;
  while (shown !== bulk.total) {
    check(Date.now() - loadStart < 90_000, `${bulk.total} entries within 90 s (showing ${shown})`);
    const t0 = performance.now();
    shown = await entriesShown(page);
    const rtt = performance.now() - t0;
    maxRoundTrip = Math.max(maxRoundTrip, rtt);
    probes++;
    check(rtt < RESPONSIVE_MS, `page.evaluate answered in ${rtt.toFixed(0)} ms (limit ${RESPONSIVE_MS})`);
    await sleep(25);
  }
  const loadMs = Date.now() - loadStart;
  await handshake('bulk'); // already sent: returns at once
  const countText = await page.textContent('#count');
  check(countText.startsWith(`${bulk.total} entries`), `the count label says ${bulk.total} entries: ${countText}`);
  const rendered = await page.evaluate(() => document.querySelectorAll('.cell').length);
  check(rendered > 0 && rendered < 2_000, `the grid is virtualised: ${rendered} cell elements for ${bulk.total} entries`);

  // Still interactive: scroll to the far corner and find the last cell drawn.
  await page.evaluate(() => {
    const g = document.getElementById('grid');
    g.scrollTop = g.scrollHeight;
    g.scrollLeft = g.scrollWidth;
  });
  await page.waitForSelector(selector(bulk.last.host, bulk.last.service), { timeout: STEP_TIMEOUT });
  const last = await cellInfo(page, bulk.last.host, bulk.last.service);
  check(last.metric === String(bulk.last.metric), `the last cell shows ${bulk.last.metric}, got ${last.metric}`);
  const t0 = performance.now();
  await page.click(selector(bulk.last.host, bulk.last.service));
  await page.waitForFunction(
    (h) => document.getElementById('details').dataset.host === h,
    bulk.last.host,
    { timeout: STEP_TIMEOUT },
  );
  const clickMs = performance.now() - t0;

  // Back to the top-left with the changed cell selected, for the screenshot.
  await page.evaluate(() => {
    const g = document.getElementById('grid');
    g.scrollTop = 0;
    g.scrollLeft = 0;
  });
  await page.click(selector(change.host, change.service));
  await page.waitForFunction(
    (h) => document.getElementById('details').dataset.host === h,
    change.host,
    { timeout: STEP_TIMEOUT },
  );
  await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
  await page.screenshot({ path: join(artifactDir, 'dashboard.png') });

  const longTasks = await page.evaluate(() => window.__longTasks);
  const longest = Math.max(0, ...longTasks);
  check(longest < LONGEST_TASK_MS, `no main-thread task over ${LONGEST_TASK_MS} ms while loading, saw ${longest.toFixed(0)} ms`);
  check(errors.length === 0, `no page errors: ${errors.join('; ')}`);
  const result = {
    entries: bulk.total,
    loadMs,
    probes,
    maxRoundTripMs: Math.round(maxRoundTrip),
    longestTaskMs: Math.round(longest),
    longTasks: longTasks.length,
    renderedCells: rendered,
    clickToDetailsMs: Math.round(clickMs),
  };
  console.log(`RESULT ${JSON.stringify(result)}`);
}

const userDataDir = await mkdtemp(join(tmpdir(), 'vigil-dashboard-chromium-'));
let context;
let failed = false;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    args: CHROMIUM_FLAGS,
    viewport: { width: 1400, height: 820 },
  });
  const page = context.pages()[0] ?? (await context.newPage());
  try {
    await main(page);
  } catch (e) {
    failed = true;
    console.error(e.stack ?? String(e));
    await mkdir(artifactDir, { recursive: true });
    await page.screenshot({ path: join(artifactDir, 'dashboard-failure.png') }).catch(() => {});
  }
} catch (e) {
  failed = true;
  console.error(`cannot launch ${executablePath}: ${e.stack ?? e}`);
} finally {
  await context?.close().catch(() => {});
  await rm(userDataDir, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
