// vllm-gateway status page. Reads /gateway/events (one JSON snapshot per
// change) through fetch(), so that keys travel in a header, never in a URL.
// It never polls: between snapshots only the local clock moves the
// countdowns. Controls call the admin endpoints with the admin key.
'use strict';

const EVENTS = '/gateway/events';
const KEY = 'vllm-gateway-key';
const RETRY_MAX_MS = 30000;

const page = {
  snap: null, // the last snapshot
  offset: 0, // server clock minus ours, in seconds
  key: sessionStorage.getItem(KEY) || '',
  needsKey: false, // the stream asked for a key
  abort: null,
  retryMs: 1000,
  retryTimer: 0,
  idle: false, // the stream ended while every engine was stopped
  exiting: false, // the shim said that it exits
};

// ---- small helpers ----

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children) el.append(c);
  return el;
}

function now() { return Date.now() / 1000 + page.offset; }

function duration(s) {
  if (s === null || s === undefined) return '–';
  s = Math.max(0, s);
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 60) return `${Math.round(s)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(Math.floor(s % 60)).padStart(2, '0')}s`;
  return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, '0')}m`;
}

function size(n) {
  if (n === null || n === undefined) return 'n/a';
  if (n >= 2 ** 30) return `${(n / 2 ** 30).toFixed(1)} GiB`;
  return `${Math.round(n / 2 ** 20)} MiB`;
}

function clock(epoch) {
  return new Date((epoch - page.offset) * 1000).toLocaleTimeString([], { hour12: false });
}

function ago(epoch) { return `${clock(epoch)} (${duration(now() - epoch)} ago)`; }

const STATE_WORDS = {
  stopped: 'stopped', starting: 'starting', ready: 'ready', going_to_sleep: 'going to sleep',
  sleeping: 'sleeping', waking: 'waking', stopping: 'stopping', failed: 'failed',
};

// ---- the stream ----

function setConnection(text, cls) {
  const el = document.getElementById('connection');
  el.textContent = text;
  el.className = `connection ${cls || ''}`;
}

function authHeaders(key) {
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function connect() {
  clearTimeout(page.retryTimer);
  if (page.abort) page.abort.abort();
  const abort = new AbortController();
  page.abort = abort;
  page.idle = false;
  page.exiting = false;
  setConnection('connecting…', 'lost');
  let resp;
  try {
    resp = await fetch(EVENTS, { headers: authHeaders(page.key), signal: abort.signal, cache: 'no-store' });
  } catch (e) {
    if (!abort.signal.aborted) lost('the gateway does not answer');
    return;
  }
  if (resp.status === 401) {
    page.needsKey = true;
    if (page.key) sessionStorage.removeItem(KEY);
    const had = page.key;
    page.key = '';
    setConnection('a key is needed', 'lost');
    renderAccess(had ? 'That key was refused. ' : '');
    return;
  }
  if (!resp.ok || !resp.body) {
    lost(`the stream answered ${resp.status}`);
    return;
  }
  setConnection('live', 'live');
  page.retryMs = 1000;
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let end;
      while ((end = buf.indexOf('\n\n')) >= 0) {
        onEvent(buf.slice(0, end));
        buf = buf.slice(end + 2);
      }
    }
  } catch (e) {
    if (abort.signal.aborted) return;
  }
  if (!abort.signal.aborted) lost(page.exiting ? 'the gateway exited' : 'the stream ended');
}

function onEvent(block) {
  let name = 'message';
  const data = [];
  for (const line of block.split('\n')) {
    if (line.startsWith(':')) continue; // a keep-alive comment
    if (line.startsWith('event:')) name = line.slice(6).trim();
    else if (line.startsWith('data:')) data.push(line.slice(5).trimStart());
  }
  if (name === 'exit') {
    page.exiting = true; // the shim exits: the stream's end is no fault
    return;
  }
  if (name !== 'status' || !data.length) return;
  const snap = JSON.parse(data.join('\n'));
  page.offset = snap.now - Date.now() / 1000;
  page.snap = snap;
  render();
}

function lost(why) {
  const snap = page.snap;
  const engines = snap ? Object.values(snap.status.engines) : [];
  if (engines.length && engines.every((e) => e.state === 'stopped')) {
    // The shim exits when nothing runs: wait to be looked at again rather
    // than start it again by reconnecting.
    page.idle = true;
    setConnection('gateway idle: it exits when nothing runs and starts again with the next request; '
      + 'this page reconnects when you come back to it', 'lost');
    return;
  }
  setConnection(`reconnecting (${why})…`, 'lost');
  page.retryTimer = setTimeout(connect, page.retryMs);
  page.retryMs = Math.min(RETRY_MAX_MS, page.retryMs * 2);
}

function wakeUp() {
  if (page.idle && document.visibilityState === 'visible') connect();
}
document.addEventListener('visibilitychange', wakeUp);
window.addEventListener('focus', wakeUp);

// ---- keys and controls ----

function renderAccess(prefix) {
  const snap = page.snap;
  const section = document.getElementById('access');
  const controls = snap ? snap.controls : false;
  // before the first snapshot: the key to read; after it: the admin key, if there is one
  const show = snap ? controls : page.needsKey;
  section.hidden = !show;
  document.getElementById('readonly').hidden = !snap || controls;
  if (!show) return;
  const text = document.getElementById('access-text');
  const forget = document.getElementById('key-forget');
  forget.hidden = !page.key;
  if (page.needsKey && !snap) {
    text.textContent = `${prefix || ''}This gateway needs a key to show its status: an API key, or the admin key.`;
    document.getElementById('key-label').textContent = 'Key';
  } else if (page.key) {
    text.textContent = `${prefix || ''}A key is entered: the controls are on.`;
    document.getElementById('key-label').textContent = 'Another key';
  } else {
    text.textContent = `${prefix || ''}Enter the admin key to start, stop, put to sleep or wake engines, `
      + 'and to release holds.';
    document.getElementById('key-label').textContent = 'Admin key';
  }
}

document.getElementById('key-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const input = document.getElementById('key-input');
  page.key = input.value.trim();
  input.value = '';
  if (page.key) sessionStorage.setItem(KEY, page.key);
  say('');
  if (page.needsKey && !page.snap) connect();
  else render();
});

document.getElementById('key-forget').addEventListener('click', () => {
  page.key = '';
  sessionStorage.removeItem(KEY);
  say('The key is forgotten.');
  if (page.needsKey) connect();
  else render();
});

function say(text, bad) {
  const el = document.getElementById('action');
  el.textContent = text;
  el.className = bad ? 'action bad' : 'action';
}

async function control(path, what) {
  say(`${what}…`);
  let resp;
  try {
    resp = await fetch(path, { method: 'POST', headers: authHeaders(page.key), cache: 'no-store' });
  } catch (e) {
    say(`${what}: the gateway does not answer`, true);
    return;
  }
  if (resp.ok) {
    say(`${what}: done.`);
    return;
  }
  let message = `HTTP ${resp.status}`;
  try { message = (await resp.json()).error.message; } catch (e) { /* not JSON */ }
  if (resp.status === 401) {
    message = `refused: the admin key is wrong (${message})`;
  }
  say(`${what}: ${message}`, true);
}

function canControl() { return Boolean(page.snap && page.snap.controls && page.key); }

// ---- rendering ----

function render() {
  const focused = document.activeElement && document.activeElement.dataset
    ? document.activeElement.dataset.key : undefined;
  renderAccess();
  const snap = page.snap;
  if (!snap) return;
  const names = Object.keys(snap.status.engines);
  document.getElementById('engines').replaceChildren(...names.map((n) => engineCard(n, snap)));
  document.getElementById('gateway-body').replaceChildren(gatewayFacts(snap));
  document.getElementById('requests-body').replaceChildren(requestTable(snap.requests, names.length > 1));
  if (focused) {
    const again = document.querySelector(`[data-key="${CSS.escape(focused)}"]`);
    if (again) again.focus();
  }
  tick();
}

function engineCard(name, snap) {
  const st = snap.status.engines[name];
  const more = snap.engines[name] || {};
  const state = st.state;
  const phase = state === 'starting' && st.start_phase ? ` (${st.start_phase})` : '';
  const busy = st.in_flight > 0;
  const facts = [
    ['State', h('span', {}, STATE_WORDS[state] || state, phase, ' for ',
      h('span', { 'data-since': st.state_since }, duration(snap.now - st.state_since)))],
    ['Idle', busy ? 'busy' : h('span', { 'data-since': snap.now - st.idle_s }, duration(st.idle_s))],
    ['Next sleep', countdown(st.sleep_after_s, st, ['ready'], 'sleeping', snap)],
    ['Next stop', countdown(st.stop_after_s, st,
      ['ready', 'going_to_sleep', 'sleeping', 'waking'], 'stopped', snap)],
    ['Requests', `${st.in_flight - st.waiting} in flight, ${st.waiting} waiting`],
    ['Memory', memory(name, snap)],
    ['Cold start', timings(more.cold_starts, st.last_cold_start_s, 'cold')],
    ['Wake', st.sleep_after_s === null ? 'sleep is off' : timings(more.wakes, st.last_wake_s, 'wake')],
    ['Last error', lastError(st, more)],
  ];
  const card = h('section', { class: 'engine', 'aria-label': `engine ${name}`, 'data-engine': name, 'data-state': state },
    h('div', { class: 'engine-head' },
      h('h2', {}, name),
      h('span', { class: `badge ${state}`, 'data-role': 'state' }, STATE_WORDS[state] || state),
      h('span', { class: 'sub' }, `${st.unit} · port ${st.port}${st.models.length ? ` · ${st.models.join(', ')}` : ''}`)),
    h('dl', { class: 'facts' }, facts.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)])));
  if (canControl()) card.append(engineControls(name, st));
  return card;
}

function countdown(after, st, applies, done, snap) {
  if (after === null || after === undefined) return 'off';
  if (st.state === done) return done === 'sleeping' ? 'asleep' : '–';
  if (!applies.includes(st.state)) return '–';
  if (st.in_flight > 0) return `after ${duration(after)} idle`;
  return h('span', { 'data-due': snap.now - st.idle_s + after }, '');
}

function memory(name, snap) {
  const st = snap.status.engines[name];
  const more = snap.engines[name] || {};
  const total = snap.gpu_total_bytes;
  const ram = more.memory_current_bytes;
  const ramText = ram === null || ram === undefined ? '' : `RAM ${size(ram)}`;
  if (!total) {
    const need = st.memory_bytes ? ` · needs ${size(st.memory_bytes)}` : '';
    return h('span', {}, (ramText || 'not running') + need,
      h('span', { class: 'sub' }, ' · no GPU reading (nvidia-ml-py not installed)'));
  }
  const mine = more.gpu_bytes || 0;
  let others = 0;
  for (const [n, e] of Object.entries(snap.engines)) if (n !== name) others += e.gpu_bytes || 0;
  const used = snap.gpu ? snap.gpu.total_bytes - snap.gpu.free_bytes : mine + others;
  const programs = Math.max(0, used - mine - others);
  const free = Math.max(0, total - mine - others - programs);
  const pct = (n) => `${Math.min(100, (100 * n) / total).toFixed(2)}%`;
  const bar = h('div', {
    class: 'bar', role: 'img',
    'aria-label': `GPU memory: this engine ${size(mine)}, other engines ${size(others)}, `
      + `other programs ${size(programs)}, free ${size(free)} of ${size(total)}`,
  });
  for (const [cls, n] of [['seg-engine', mine], ['seg-others', others], ['seg-programs', programs]]) {
    if (n <= 0) continue;
    const seg = h('span', { class: cls, title: size(n) });
    seg.style.width = pct(n); // CSSOM, allowed by the page's style-src 'self'
    bar.append(seg);
  }
  const legend = h('div', { class: 'legend' },
    h('span', {}, h('i', { class: 'seg-engine' }), `this engine ${size(mine)}`),
    others ? h('span', {}, h('i', { class: 'seg-others' }), `other engines ${size(others)}`) : null,
    h('span', {}, h('i', { class: 'seg-programs' }), `other programs ${size(programs)}`),
    h('span', {}, h('i', { class: 'seg-free' }), `free ${size(free)} of ${size(total)}`));
  const source = snap.gpu ? snap.gpu.source : 'gpu_memory in the configuration';
  return h('div', {}, bar, legend, h('div', { class: 'sub' }, [ramText, source].filter(Boolean).join(' · ')));
}

function timings(list, last, kind) {
  list = list || [];
  const text = last === null || last === undefined ? 'none yet' : `last ${duration(last)}`;
  if (!list.length) return text;
  const width = 120;
  const height = 26;
  const max = Math.max(...list.map((t) => t[1]), 0.001);
  const step = width / Math.max(list.length, 10);
  const chart = svg('svg', {
    class: 'chart', width, height, viewBox: `0 0 ${width} ${height}`, role: 'img',
    'aria-label': `${list.length} recent: ${list.map((t) => duration(t[1])).join(', ')}`,
  });
  list.forEach(([at, s], i) => {
    const bh = Math.max(1.5, (s / max) * (height - 2));
    const rect = svg('rect', {
      class: kind, x: (i * step + 1).toFixed(1), y: (height - 1 - bh).toFixed(1),
      width: Math.max(2, step - 2).toFixed(1), height: bh.toFixed(1), rx: 1,
    });
    const title = svg('title');
    title.textContent = `${clock(at)}: ${duration(s)}`;
    rect.append(title);
    chart.append(rect);
  });
  chart.append(svg('line', { class: 'base', x1: 0, y1: height - 0.5, x2: width, y2: height - 0.5 }));
  return h('div', {}, `${text} · max ${duration(max)} of ${list.length}`, chart);
}

function lastError(st, more) {
  const message = st.last_error || st.last_sleep_error;
  if (!message) return 'none';
  const at = st.last_error && more.last_error_at ? h('div', { class: 'sub' }, ago(more.last_error_at)) : null;
  return h('div', {}, h('span', { class: 'error' }, message), at);
}

function engineControls(name, st) {
  const q = `?engine=${encodeURIComponent(name)}`;
  const button = (action, label, enabled) => h('button', {
    type: 'button', 'data-key': `${name}:${action}`, 'data-action': action, disabled: !enabled,
    onclick: () => control(`/gateway/${action}${q}`, `${label} ${name}`),
  }, label);
  const s = st.state;
  return h('div', { class: 'controls', role: 'group', 'aria-label': `control engine ${name}` },
    button('start', 'Start', s === 'stopped' || s === 'failed'),
    button('stop', 'Stop', s !== 'stopped'),
    button('sleep', 'Sleep', s === 'ready' && st.sleep_enabled),
    button('wake', 'Wake', s === 'sleeping'));
}

function gatewayFacts(snap) {
  const st = snap.status;
  const holds = Object.entries(st.holds || {});
  const holdList = holds.length
    ? h('ul', { class: 'holds' }, holds.map(([who, since]) => h('li', {},
      h('code', {}, who), ` since ${ago(since)} `,
      canControl() ? h('button', {
        type: 'button', 'data-key': `release:${who}`,
        onclick: () => control(`/gateway/release?by=${encodeURIComponent(who)}`, `Release ${who}`),
      }, 'Release') : null)))
    : 'none: engines may start';
  const gpu = snap.gpu
    ? `${size(snap.gpu.free_bytes)} free of ${size(snap.gpu.total_bytes)} (${snap.gpu.source})`
    : (snap.gpu_total_bytes ? `${size(snap.gpu_total_bytes)} (configured)` : 'no reading');
  const facts = [
    ['GPU held for', holdList],
    ['Swaps', String(st.swaps)],
    ['GPU', gpu],
    ['Shim', `pid ${st.gateway_pid}, up ${duration(st.gateway_uptime_s)}`],
  ];
  return h('dl', { class: 'facts' }, facts.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
}

function requestTable(requests, showModel) {
  if (!requests.length) return h('p', { class: 'sub' }, 'No requests since the gateway started.');
  const head = ['Time', 'Model', 'Route', 'Status', 'Duration', 'Cold-start wait'];
  return h('table', {},
    h('thead', {}, h('tr', {}, head.map((t, i) => h('th', { scope: 'col', class: i >= 4 ? 'num' : null }, t)))),
    h('tbody', {}, requests.map((r) => h('tr', {},
      h('td', {}, clock(r.at)),
      h('td', {}, r.model || (showModel ? '–' : '')),
      h('td', {}, `${r.method} ${r.route}`),
      h('td', { class: r.status < 400 ? 'status-ok' : 'status-bad' }, String(r.status)),
      h('td', { class: 'num' }, `${r.duration_ms < 1000 ? `${r.duration_ms.toFixed(0)} ms` : duration(r.duration_ms / 1000)}`),
      h('td', { class: 'num' }, r.cold_start_ms === null ? '' : duration(r.cold_start_ms / 1000))))));
}

// The clock moves the ages and countdowns between snapshots; no request is made.
function tick() {
  const t = now();
  for (const el of document.querySelectorAll('[data-since]')) {
    el.textContent = duration(t - Number(el.dataset.since));
  }
  for (const el of document.querySelectorAll('[data-due]')) {
    const left = Number(el.dataset.due) - t;
    el.textContent = left > 0 ? `in ${duration(left)}` : 'due (at the next idle check)';
  }
}
setInterval(tick, 1000);

connect();
