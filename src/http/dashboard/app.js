// vigil's live dashboard: a hosts × services grid fed by the index WebSocket
// (`/index?query=…&subscribe=true&coalesce=250ms`: the current matches, then
// the latest matching event of each series every 250 ms, as it is indexed or
// expires, one Riemann JSON event per text frame).
//
// Built to stay responsive with tens of thousands of entries:
//  - WebSocket messages are only queued; one requestAnimationFrame callback
//    applies as many as fit in a small time budget, then draws once.
//  - The grid is virtualised: only the cells (and labels) in view exist as
//    elements; a sizer element gives the scrollbars the grid's full size.
//  - A cell's element is only touched when its entry changed.

// Geometry, mirrored from style.css (.grid custom properties).
const CELL_W = 112;
const CELL_H = 42;
const HEAD_W = 180;
const HEAD_H = 40;
const OVERSCAN = 2; // extra rows/columns rendered around the view

const HISTORY = 60; // metric values kept per cell for the sparkline
const FRAME_BUDGET_MS = 8; // time per frame spent applying queued messages
const EXPIRED_KEEP_MS = 10 * 60 * 1000; // expired (grey) cells are dropped after this
const RESET_GRACE_MS = 1000; // after a reconnect, keep the old grid this long for the snapshot
const STANDARD_FIELDS = ['host', 'service', 'state', 'description', 'metric', 'tags', 'time', 'ttl'];
const KNOWN_STATES = new Set(['ok', 'warning', 'critical', 'expired']);

const $ = (id) => document.getElementById(id);
const el = {
  form: $('query-form'),
  query: $('query'),
  count: $('count'),
  status: $('status'),
  grid: $('grid'),
  sizer: $('sizer'),
  colhead: $('colhead'),
  rowhead: $('rowhead'),
  cells: $('cells'),
  empty: $('empty'),
  details: $('details'),
  detailsTitle: $('details-title'),
  detailsClose: $('details-close'),
  sparkline: $('sparkline'),
  sparkRange: $('spark-range'),
  fields: $('fields'),
};

const params = new URLSearchParams(location.search);
const token = params.get('token');
let query = params.get('query') || 'true';

// ---------------------------------------------------------------------------
// Model: one entry per (host, service), plus the sorted axes.
// ---------------------------------------------------------------------------

const collator = new Intl.Collator('en', { numeric: true, sensitivity: 'variant' });
const NONE = '\u0001'; // stands for a null host/service inside keys

/** @type {Map<string, {host: ?string, service: ?string, event: object, history: number[], version: number, expiredAt: number}>} */
const entries = new Map();
const hostCounts = new Map(); // host -> number of entries on that row
const serviceCounts = new Map(); // service -> number of entries in that column
let hosts = []; // row order
let services = []; // column order
let axesDirty = false;
let liveCount = 0; // entries whose last event was not `expired`
let carried = new Map(); // key -> metric history kept across a reconnect's reset
let versionSeq = 0; // entry versions are unique, so a recycled cell element is never mistaken as current

const keyOf = (host, service) => (host ?? NONE) + '\u0000' + (service ?? NONE);
const axisCompare = (a, b) => (a === null ? (b === null ? 0 : -1) : b === null ? 1 : collator.compare(a, b));

function countAxis(counts, value, delta) {
  const n = (counts.get(value) ?? 0) + delta;
  if (n > 0) counts.set(value, n);
  else counts.delete(value);
  if (n === 0 || (n === 1 && delta === 1)) axesDirty = true; // an axis value appeared or went
}

/** Applies one WebSocket message (a JSON event). */
function apply(text) {
  let ev;
  try {
    ev = JSON.parse(text);
  } catch {
    return; // not an event: ignore
  }
  if (ev === null || typeof ev !== 'object') return;
  const host = typeof ev.host === 'string' ? ev.host : null;
  const service = typeof ev.service === 'string' ? ev.service : null;
  const key = keyOf(host, service);
  const expired = ev.state === 'expired';
  let entry = entries.get(key);
  if (!entry) {
    entry = { host, service, event: ev, history: carried.get(key) ?? [], version: 0, expiredAt: 0 };
    carried.delete(key);
    entries.set(key, entry);
    countAxis(hostCounts, host, 1);
    countAxis(serviceCounts, service, 1);
  } else if (!entry.expiredAt) {
    liveCount--; // counted again below unless it expired now
  }
  entry.event = ev;
  entry.version = ++versionSeq;
  entry.expiredAt = expired ? Date.now() : 0;
  if (!expired) liveCount++;
  if (typeof ev.metric === 'number' && !expired) {
    entry.history.push(ev.metric);
    if (entry.history.length > HISTORY) entry.history.shift();
  }
  needsRender = true;
}

function removeEntry(key) {
  const entry = entries.get(key);
  if (!entry) return;
  entries.delete(key);
  if (!entry.expiredAt) liveCount--;
  countAxis(hostCounts, entry.host, -1);
  countAxis(serviceCounts, entry.service, -1);
  needsRender = true;
}

function clearModel() {
  entries.clear();
  hostCounts.clear();
  serviceCounts.clear();
  hosts = [];
  services = [];
  liveCount = 0;
  axesDirty = true;
  needsRender = true;
}

let hostRow = new Map();
let serviceCol = new Map();

function rebuildAxes() {
  hosts = [...hostCounts.keys()].sort(axisCompare);
  services = [...serviceCounts.keys()].sort(axisCompare);
  hostRow = new Map(hosts.map((h, i) => [h, i]));
  serviceCol = new Map(services.map((s, i) => [s, i]));
  el.sizer.style.width = `${HEAD_W + services.length * CELL_W}px`;
  el.sizer.style.height = `${HEAD_H + hosts.length * CELL_H}px`;
  el.rowhead.style.height = `${hosts.length * CELL_H}px`;
  axesDirty = false;
  labelsKey = ''; // force the labels to be redrawn
}

// Expired cells stay grey for a while, then go (the index no longer has them).
setInterval(() => {
  const cutoff = Date.now() - EXPIRED_KEEP_MS;
  for (const [key, entry] of entries) {
    if (entry.expiredAt && entry.expiredAt < cutoff) removeEntry(key);
  }
  if (needsRender) schedule();
}, 30_000);

// ---------------------------------------------------------------------------
// Frame loop: apply queued messages within a budget, then draw once.
// ---------------------------------------------------------------------------

let queue = []; // raw WebSocket texts not yet applied
let head = 0; // index of the next one in `queue`
let frameScheduled = false;
let needsRender = true;
let resetAfter = 0; // when set: clear the model before applying (after a reconnect)

function schedule() {
  if (!frameScheduled) {
    frameScheduled = true;
    requestAnimationFrame(frame);
  }
}

function frame() {
  frameScheduled = false;
  const start = performance.now();
  // After a reconnect the server resends every match: start over, but only
  // once the snapshot begins arriving (or after a grace period), so the grid
  // does not flash empty.
  if (resetAfter && (head < queue.length || Date.now() >= resetAfter)) {
    carried = new Map([...entries].map(([key, entry]) => [key, entry.history])); // sparklines survive
    clearModel();
    resetAfter = 0;
  }
  while (head < queue.length) {
    apply(queue[head++]);
    if ((head & 63) === 0 && performance.now() - start > FRAME_BUDGET_MS) break;
  }
  if (head >= queue.length) {
    queue = [];
    head = 0;
  } else if (head > 65536) {
    queue = queue.slice(head); // keep the backlog from growing without bound
    head = 0;
  }
  if (axesDirty) rebuildAxes();
  if (needsRender) render();
  if (head < queue.length) schedule(); // more next frame: the page stays interactive
}

// ---------------------------------------------------------------------------
// Rendering the visible window of the grid.
// ---------------------------------------------------------------------------

const cellEls = new Map(); // key -> element currently shown
const spare = []; // detached cell elements for reuse
let labelsKey = ''; // the label range last drawn
let selectedKey = null;
let selectedVersion = -1;

const numberFormat = new Intl.NumberFormat('en-US', { maximumFractionDigits: 3, useGrouping: false });
const compactFormat = new Intl.NumberFormat('en-US', { notation: 'compact', maximumSignificantDigits: 4 });

function formatMetric(m) {
  if (typeof m !== 'number') return '–';
  return Math.abs(m) >= 1e7 ? compactFormat.format(m) : numberFormat.format(m);
}

const stateClass = (state) => `state-${KNOWN_STATES.has(state) ? state : 'other'}`;
const label = (v, what) => v ?? `(no ${what})`;

function visibleRange() {
  const g = el.grid;
  const r0 = Math.max(0, Math.floor(g.scrollTop / CELL_H) - OVERSCAN);
  const r1 = Math.min(hosts.length, Math.ceil((g.scrollTop + g.clientHeight - HEAD_H) / CELL_H) + OVERSCAN);
  const c0 = Math.max(0, Math.floor(g.scrollLeft / CELL_W) - OVERSCAN);
  const c1 = Math.min(services.length, Math.ceil((g.scrollLeft + g.clientWidth - HEAD_W) / CELL_W) + OVERSCAN);
  return { r0, r1, c0, c1 };
}

function render() {
  needsRender = false;
  const { r0, r1, c0, c1 } = visibleRange();
  renderLabels(r0, r1, c0, c1);

  const shown = new Map();
  for (let r = r0; r < r1; r++) {
    for (let c = c0; c < c1; c++) {
      const key = keyOf(hosts[r], services[c]);
      const entry = entries.get(key);
      if (!entry) continue;
      let cell = cellEls.get(key);
      if (cell) cellEls.delete(key);
      else cell = spare.pop() ?? newCell();
      const stale = cell._key !== key || cell._version !== entry.version;
      if (stale || cell.classList.contains('selected') !== (key === selectedKey)) fillCell(cell, key, entry);
      if (cell._r !== r || cell._c !== c) {
        cell.style.transform = `translate(${c * CELL_W}px, ${r * CELL_H}px)`;
        cell._r = r;
        cell._c = c;
      }
      if (!cell.isConnected) el.cells.append(cell);
      shown.set(key, cell);
    }
  }
  // Whatever is left scrolled out of view (or went away): detach for reuse.
  for (const cell of cellEls.values()) {
    cell.remove();
    if (spare.length < 512) spare.push(cell);
  }
  cellEls.clear();
  for (const [k, v] of shown) cellEls.set(k, v);

  el.empty.hidden = entries.size > 0;
  const expired = entries.size - liveCount;
  el.count.dataset.entries = String(entries.size);
  el.count.textContent =
    `${entries.size} entries · ${hosts.length} hosts × ${services.length} services` +
    (expired ? ` · ${expired} expired` : '');

  if (selectedKey !== null) {
    const entry = entries.get(selectedKey);
    if (entry && entry.version !== selectedVersion) renderDetails();
  }
}

function newCell() {
  const cell = document.createElement('button');
  cell.type = 'button';
  cell.className = 'cell';
  const metric = document.createElement('span');
  metric.className = 'metric';
  const state = document.createElement('span');
  state.className = 'state';
  cell.append(metric, state);
  return cell;
}

function fillCell(cell, key, entry) {
  const ev = entry.event;
  const state = typeof ev.state === 'string' ? ev.state : '';
  const metric = formatMetric(ev.metric);
  cell._key = key;
  cell._version = entry.version;
  cell.className = `cell ${stateClass(state)}${key === selectedKey ? ' selected' : ''}`;
  cell.dataset.host = entry.host ?? '';
  cell.dataset.service = entry.service ?? '';
  cell.dataset.state = state;
  cell.firstChild.textContent = metric;
  cell.lastChild.textContent = state || 'no state';
  const text = `${label(entry.host, 'host')} · ${label(entry.service, 'service')}: ${state || 'no state'}, metric ${metric}`;
  cell.title = text;
  cell.setAttribute('aria-label', text);
}

function renderLabels(r0, r1, c0, c1) {
  const key = `${r0}:${r1}:${c0}:${c1}`;
  if (key === labelsKey) return;
  labelsKey = key;
  const cols = document.createDocumentFragment();
  for (let c = c0; c < c1; c++) {
    const d = document.createElement('div');
    d.className = 'label';
    d.style.left = `${HEAD_W + c * CELL_W}px`;
    const text = document.createElement('span');
    text.textContent = d.title = label(services[c], 'service');
    d.append(text);
    cols.append(d);
  }
  const rows = document.createDocumentFragment();
  for (let r = r0; r < r1; r++) {
    const d = document.createElement('div');
    d.className = 'label';
    d.style.top = `${r * CELL_H}px`;
    d.textContent = d.title = label(hosts[r], 'host');
    rows.append(d);
  }
  el.colhead.replaceChildren(el.colhead.firstElementChild, cols); // keep the corner
  el.rowhead.replaceChildren(rows);
}

// ---------------------------------------------------------------------------
// Details panel: every field of the selected entry's last event, and a
// sparkline of its recent metrics.
// ---------------------------------------------------------------------------

function select(key) {
  const previous = cellEls.get(selectedKey);
  if (previous) previous.classList.remove('selected');
  selectedKey = key;
  const cell = cellEls.get(key);
  if (cell) cell.classList.add('selected');
  renderDetails();
  if (cell) reveal(cell._r, cell._c); // the panel may have narrowed the grid over it
}

function closeDetails() {
  const cell = cellEls.get(selectedKey);
  if (cell) cell.classList.remove('selected');
  selectedKey = null;
  el.details.hidden = true;
  if (cell) cell.focus();
}

function renderDetails() {
  const entry = entries.get(selectedKey);
  if (!entry) {
    el.details.hidden = true;
    return;
  }
  selectedVersion = entry.version;
  const ev = entry.event;
  el.details.hidden = false;
  el.details.dataset.host = entry.host ?? '';
  el.details.dataset.service = entry.service ?? '';
  el.detailsTitle.textContent = `${label(entry.host, 'host')} · ${label(entry.service, 'service')}`;

  // Built with textContent only: event data is never parsed as HTML.
  const rows = [];
  const add = (name, value, cls) => {
    const dt = document.createElement('dt');
    dt.textContent = name;
    if (cls) dt.className = cls;
    rows.push(dt);
    if (value === undefined) return;
    const dd = document.createElement('dd');
    dd.dataset.field = name;
    if (value instanceof Node) dd.append(value);
    else dd.textContent = value;
    rows.push(dd);
  };
  const show = (v) => (v === null || v === undefined ? '–' : String(v));

  const badge = document.createElement('span');
  badge.className = `badge ${stateClass(ev.state)}`;
  badge.textContent = show(ev.state);
  add('host', show(ev.host));
  add('service', show(ev.service));
  add('state', badge);
  add('metric', show(ev.metric));
  add('description', show(ev.description));
  add('time', describeTime(ev.time));
  add('ttl', ev.ttl === null || ev.ttl === undefined ? '–' : `${ev.ttl} s`);
  const tags = document.createDocumentFragment();
  for (const t of Array.isArray(ev.tags) ? ev.tags : []) {
    const span = document.createElement('span');
    span.className = 'tag';
    span.textContent = String(t);
    tags.append(span);
  }
  add('tags', tags.childNodes.length ? tags : '–');
  const attributes = Object.keys(ev).filter((k) => !STANDARD_FIELDS.includes(k)).sort();
  add('attributes', undefined, 'section');
  if (!attributes.length) add('(none)', '');
  for (const k of attributes) add(k, show(ev[k]));
  el.fields.replaceChildren(...rows);
  drawSparkline(entry.history);
}

function describeTime(iso) {
  if (typeof iso !== 'string') return '–';
  const ms = Date.parse(iso);
  if (Number.isNaN(ms)) return iso;
  const ago = Math.round((Date.now() - ms) / 1000);
  return ago >= 0 ? `${iso} (${ago} s ago)` : iso;
}

function drawSparkline(values) {
  const svg = el.sparkline;
  const NS = 'http://www.w3.org/2000/svg';
  svg.replaceChildren();
  svg.dataset.points = String(values.length);
  if (!values.length) {
    el.sparkRange.textContent = 'no metric values yet';
    return;
  }
  const W = 300;
  const H = 60;
  const PAD = 4;
  const min = Math.min(...values);
  const max = Math.max(...values);
  const span = max - min || 1;
  const x = (i) => (values.length === 1 ? W / 2 : PAD + (i / (values.length - 1)) * (W - 2 * PAD));
  const y = (v) => (max === min ? H / 2 : H - PAD - ((v - min) / span) * (H - 2 * PAD));
  const line = document.createElementNS(NS, 'polyline');
  line.setAttribute('points', values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(' '));
  const last = document.createElementNS(NS, 'circle');
  last.setAttribute('cx', x(values.length - 1).toFixed(1));
  last.setAttribute('cy', y(values[values.length - 1]).toFixed(1));
  last.setAttribute('r', '2.5');
  svg.append(line, last);
  el.sparkRange.textContent =
    `last ${values.length} value${values.length === 1 ? '' : 's'} · min ${formatMetric(min)} · max ${formatMetric(max)}`;
}

// Keep "N s ago" current while the panel is open (only that text: a
// selection elsewhere in the panel survives).
setInterval(() => {
  const entry = selectedKey !== null && !el.details.hidden && entries.get(selectedKey);
  const dd = el.fields.querySelector('dd[data-field="time"]');
  if (entry && dd) dd.textContent = describeTime(entry.event.time);
}, 1000);

// ---------------------------------------------------------------------------
// Interaction: scrolling, clicks, keyboard.
// ---------------------------------------------------------------------------

el.grid.addEventListener('scroll', () => {
  needsRender = true;
  schedule();
}, { passive: true });
new ResizeObserver(() => {
  needsRender = true;
  schedule();
}).observe(el.grid);

el.cells.addEventListener('click', (e) => {
  const cell = e.target.closest('.cell');
  if (cell) select(cell._key);
});
el.detailsClose.addEventListener('click', closeDetails);
document.addEventListener('keydown', (e) => {
  if (e.key === 'Escape' && selectedKey !== null) closeDetails();
});

// Arrow keys move to the nearest entry in that direction.
const MOVES = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
el.cells.addEventListener('keydown', (e) => {
  const move = MOVES[e.key];
  const cell = e.target.closest('.cell');
  if (!move || !cell) return;
  e.preventDefault();
  let r = cell._r;
  let c = cell._c;
  for (;;) {
    r += move[0];
    c += move[1];
    if (r < 0 || c < 0 || r >= hosts.length || c >= services.length) return;
    if (entries.has(keyOf(hosts[r], services[c]))) break;
  }
  reveal(r, c);
  cellEls.get(keyOf(hosts[r], services[c]))?.focus();
});

/** Scrolls so cell (r, c) is in view and draws it right away. */
function reveal(r, c) {
  const g = el.grid;
  const top = r * CELL_H;
  const left = c * CELL_W;
  if (top < g.scrollTop) g.scrollTop = top;
  else if (top + CELL_H > g.scrollTop + g.clientHeight - HEAD_H) g.scrollTop = top + CELL_H - (g.clientHeight - HEAD_H);
  if (left < g.scrollLeft) g.scrollLeft = left;
  else if (left + CELL_W > g.scrollLeft + g.clientWidth - HEAD_W) g.scrollLeft = left + CELL_W - (g.clientWidth - HEAD_W);
  render();
}

// ---------------------------------------------------------------------------
// The WebSocket subscription, reconnected with exponential backoff.
// ---------------------------------------------------------------------------

let socket = null;
let attempt = 0; // consecutive failed connections
let retryTimer = 0;

function setStatus(status, text) {
  el.status.dataset.status = status;
  el.status.textContent = text;
}

function indexUrl(q, extra) {
  const url = new URL('index', location.href);
  url.searchParams.set('query', q);
  for (const [k, v] of Object.entries(extra)) url.searchParams.set(k, v);
  if (token) url.searchParams.set('token', token);
  return url;
}

function connect() {
  clearTimeout(retryTimer);
  // Coalesced: each series' latest event four times a second, however busy
  // the index; every event of a busy one is more than a browser can take.
  const url = indexUrl(query, { subscribe: 'true', coalesce: '250ms' });
  url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const ws = new WebSocket(url);
  socket = ws;
  let opened = false;
  setStatus('connecting', attempt ? `reconnecting… (attempt ${attempt + 1})` : 'connecting…');
  ws.onopen = () => {
    opened = true;
    setStatus('live', 'live');
    // Messages still queued from an earlier connection are superseded by
    // the snapshot this one sends.
    queue = [];
    head = 0;
    if (entries.size) {
      resetAfter = Date.now() + RESET_GRACE_MS;
      setTimeout(schedule, RESET_GRACE_MS);
    }
  };
  ws.onmessage = (e) => {
    if (socket !== ws) return;
    // The server is up and takes the query: a later close (e.g. "subscriber
    // too slow" under a burst) reconnects at once, not after a backoff that
    // kept growing while every connection worked and the grid went stale.
    attempt = 0;
    queue.push(e.data);
    schedule();
  };
  ws.onclose = (e) => {
    if (socket !== ws) return; // replaced by a newer connection on purpose
    socket = null;
    if (!opened) {
      diagnose(); // the browser hides why an upgrade failed: ask over plain HTTP
    }
    retry(e.reason);
  };
}

function retry(reason) {
  // Jittered, then capped: the README promises at most 30 s.
  const delay = Math.min(30_000, 500 * 2 ** attempt * (0.75 + Math.random() * 0.5));
  attempt++;
  const why = reason ? `${reason}; ` : '';
  if (el.status.dataset.status !== 'error') setStatus('connecting', `${why}reconnecting in ${Math.ceil(delay / 1000)} s`);
  retryTimer = setTimeout(connect, delay);
}

/** Explains a failed upgrade: a bad token, a bad query or no server. */
async function diagnose() {
  const q = query;
  const abort = new AbortController();
  try {
    // The same request without the upgrade; only its status (and a 400's
    // message) matters, so a successful answer's body is not downloaded.
    const res = await fetch(indexUrl(q, {}), { signal: abort.signal });
    if (res.ok) abort.abort();
    if (q !== query) return;
    if (res.status === 401) {
      setStatus('error', token ? 'unauthorized: wrong token' : 'unauthorized: open this page with ?token=…');
    } else if (res.status === 400) {
      const body = await res.json().catch(() => ({}));
      const where = body.column ? ` (column ${body.column})` : '';
      setStatus('error', `query error: ${body.message ?? body.error ?? res.statusText}${where}`);
      clearTimeout(retryTimer); // retrying cannot fix the query
    }
  } catch {
    if (q === query && !abort.signal.aborted) setStatus('error', 'server unreachable; retrying');
  }
}

/** Subscribes to a new query: a fresh grid, and the query kept in the URL. */
function subscribe(q) {
  query = q.trim() || 'true';
  el.query.value = query;
  const url = new URL(location.href);
  url.searchParams.set('query', query);
  history.replaceState(null, '', url);
  const old = socket;
  socket = null;
  if (old) old.close(1000, 'query changed');
  queue = [];
  head = 0;
  resetAfter = 0;
  carried = new Map();
  selectedKey = null;
  el.details.hidden = true;
  clearModel();
  attempt = 0;
  schedule();
  connect();
}

el.form.addEventListener('submit', (e) => {
  e.preventDefault();
  subscribe(el.query.value);
});

subscribe(query);
