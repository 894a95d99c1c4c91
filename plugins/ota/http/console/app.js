// The operator's console of ota-broker: a client of the management API (/api/v1) and nothing else.
// No framework and no build step. Pages are routed by the location hash (#/jobs/3); every text that
// comes from the API is inserted as text (never as HTML), because device names and task
// descriptions come from devices. The admin token lives in sessionStorage only.
'use strict';

const API = '/api/v1';
const TOKEN_KEY = 'ota-broker.token';
const SESSION_KEY = 'ota-broker.session'; // signed in with an account's password: the HttpOnly cookie does the rest
const CSRF = { 'X-Requested-With': 'ota-console' }; // what a change made with the session cookie must carry
const TERMINAL = new Set(['succeeded', 'failed', 'timed_out', 'cancelled', 'skipped']);
const UNFINISHED = new Set(['confirm', 'queued', 'notified', 'in_progress']);
const TASK_STATES = ['confirm', 'queued', 'notified', 'in_progress', 'succeeded', 'failed',
  'timed_out', 'cancelled', 'skipped'];

// ------------------------------------------------------------------------------------------ DOM

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  add(el, children);
  return el;
}

function svg(tag, attrs) {
  const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
  setAttrs(el, attrs);
  return el;
}

function setAttrs(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else if (key === 'class') el.setAttribute('class', value);
    else el.setAttribute(key, value === true ? '' : String(value));
  }
}

function add(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

// Replaces an element's children; like h(), it flattens lists and drops null, undefined and false.
function fill(el, ...children) {
  el.replaceChildren();
  add(el, children);
  return el;
}

const $ = (selector, root = document) => root.querySelector(selector);

function time(iso) {
  if (!iso) return '—';
  return h('time', { datetime: iso }, new Date(iso).toLocaleString());
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ['KiB', 'MiB', 'GiB'];
  let value = n / 1024;
  let i = 0;
  while (value >= 1024 && i < units.length - 1) { value /= 1024; i += 1; }
  return `${value.toFixed(1)} ${units[i]}`;
}

function deviceLink(ref) {
  const [pk, ...rest] = ref.split('/');
  const dn = rest.join('/');
  return h('a', { href: `#/devices/${encodeURIComponent(pk)}/${encodeURIComponent(dn)}` }, ref);
}

function stateBadge(state) {
  return h('span', { class: `badge state-${state}` }, state.replace('_', ' '));
}

let sayTimer = null;
let showTimer = null;

// A message said on one page and then navigated away from (an action that moves to another page) is kept
// for that next page only; any other navigation starts with an empty message bar.
let saidSinceRoute = false;

function quiet() {
  window.clearTimeout(sayTimer);
  window.clearTimeout(showTimer);
  $('#status').textContent = '';
}

function say(text) {
  const status = $('#status');
  saidSinceRoute = true;
  status.textContent = '';
  window.clearTimeout(sayTimer);
  window.clearTimeout(showTimer);
  // Set after a tick, so that screen readers announce the same message twice in a row too.
  showTimer = window.setTimeout(() => { status.textContent = text; }, 50);
  sayTimer = window.setTimeout(() => { status.textContent = ''; }, 8000);
}

function errorText(error) {
  if (error instanceof ApiError) return `${error.message} (HTTP ${error.status})`;
  return String(error.message || error);
}

function table(caption, headers, rows, attrs) {
  return h('table', attrs,
    h('caption', {}, caption),
    h('thead', {}, h('tr', {}, headers.map((text) => h('th', { scope: 'col' }, text)))),
    h('tbody', {}, rows));
}

// ------------------------------------------------------------------------------------------ API

class ApiError extends Error {
  constructor(status, doc) {
    super((doc && doc.message) || `request failed with HTTP ${status}`);
    this.status = status;
    this.code = doc && doc.error;
  }
}

class SignedOut extends Error {}

const token = () => sessionStorage.getItem(TOKEN_KEY);
const signedIn = () => Boolean(token() || sessionStorage.getItem(SESSION_KEY));
const authHeaders = () => (token() ? { ...CSRF, Authorization: `Bearer ${token()}` } : { ...CSRF });

// `meta`, when given, receives `total`: the whole list's size (X-Total-Count) of a paged answer.
async function api(method, path, body, meta) {
  const headers = authHeaders();
  const init = { method, headers, credentials: 'same-origin' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const response = await fetch(API + path, init);
  if (response.status === 401) throw signOut('The sign-in was not accepted any more; sign in again.');
  const text = await response.text();
  let doc = null;
  if (text && (response.headers.get('Content-Type') || '').includes('json')) doc = JSON.parse(text);
  if (!response.ok) throw new ApiError(response.status, doc);
  if (meta && response.headers.get('X-Total-Count') !== null) meta.total = Number(response.headers.get('X-Total-Count'));
  return doc === null ? text : doc;
}

// Multipart upload with progress events (fetch has no upload progress).
function upload(form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('POST', `${API}/firmware`);
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.responseType = 'json';
    xhr.upload.addEventListener('progress', (event) => {
      if (event.lengthComputable) onProgress(event.loaded, event.total);
    });
    xhr.addEventListener('load', () => {
      if (xhr.status === 401) reject(signOut('The token was not accepted any more; sign in again.'));
      else if (xhr.status === 201) resolve(xhr.response);
      else reject(new ApiError(xhr.status, xhr.response));
    });
    xhr.addEventListener('error', () => reject(new Error('the upload failed (network error)')));
    xhr.addEventListener('abort', () => reject(new Error('the upload was cancelled')));
    xhr.send(form);
  });
}

// A job's server-sent events. EventSource cannot send an Authorization header, so each connection
// first gets a 60-second ticket (POST /tickets) and passes it as ?ticket=. On an error the source is
// closed and reopened with a fresh ticket after a growing delay (1 s .. 30 s); `end` means the job is
// final and nothing more will come.
function liveJob(jobId, onSnapshot, onState) {
  let source = null;
  let timer = null;
  let stopped = false;
  let delay = 1000;

  function close() {
    if (source) { source.close(); source = null; }
  }
  function later() {
    if (stopped) return;
    timer = window.setTimeout(open, delay);
    delay = Math.min(delay * 2, 30000);
  }
  async function open() {
    if (stopped) return;
    let ticket;
    try {
      ticket = (await api('POST', '/tickets')).ticket;
    } catch (error) {
      if (!(error instanceof SignedOut)) { onState('reconnecting'); later(); }
      return;
    }
    if (stopped) return;
    source = new EventSource(`${API}/jobs/${jobId}/events?ticket=${encodeURIComponent(ticket)}`);
    source.addEventListener('open', () => { delay = 1000; onState('live'); });
    source.addEventListener('snapshot', (event) => onSnapshot(JSON.parse(event.data)));
    source.addEventListener('end', () => { close(); onState('final'); });
    source.addEventListener('error', () => { close(); onState('reconnecting'); later(); });
  }
  open();
  return () => { stopped = true; window.clearTimeout(timer); close(); };
}

// --------------------------------------------------------------------------------------- sign-in

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(SESSION_KEY);
  stopPage();
  showSignIn(message);
  return new SignedOut(message);
}

function showSignIn(message) {
  $('#nav').hidden = true;
  $('#sign-out').hidden = true;
  document.title = 'Sign in · ota-broker';
  const error = h('p', { id: 'signin-error', class: 'error', role: 'alert' }, message || '');
  const input = h('input', {
    id: 'token', name: 'token', type: 'password', required: true, autocomplete: 'current-password',
    'aria-describedby': 'token-help signin-error', spellcheck: 'false',
  });
  const form = h('form', { class: 'card narrow', novalidate: true },
    h('h1', {}, 'Sign in'),
    h('p', { id: 'token-help' }, 'Enter the admin token: the broker generates it into ',
      h('code', {}, 'data/admin.token'), ' unless ', h('code', {}, 'admin_token'), ' is configured. ',
      'It is kept for this browser tab only.'),
    h('label', { for: 'token' }, 'Admin token'),
    input,
    h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Sign in')),
    error);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const given = input.value.trim();
    if (!given) { error.textContent = 'Enter the token.'; input.focus(); return; }
    error.textContent = '';
    try {
      const response = await fetch(`${API}/overview`, { headers: { Authorization: `Bearer ${given}` } });
      if (response.status === 401) {
        error.textContent = 'Wrong token: the broker did not accept it.';
        input.select();
        input.focus();
        return;
      }
      if (!response.ok) throw new Error(`the broker answered HTTP ${response.status}`);
    } catch (failure) {
      error.textContent = `Could not reach the broker: ${errorText(failure)}`;
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, given);
    quiet(); // "Signed out." belongs to the sign-in page
    route(true); // the page the hash names, or the overview
  });
  // An operator account's name and password: the broker answers with its session cookie (HttpOnly).
  const accountError = h('p', { id: 'account-error', class: 'error', role: 'alert' });
  const nameInput = h('input', { id: 'account-name', name: 'name', required: true, autocomplete: 'username', spellcheck: 'false' });
  const passwordInput = h('input', { id: 'account-password', name: 'password', type: 'password', required: true, autocomplete: 'current-password' });
  const accountForm = h('form', { class: 'card narrow', novalidate: true },
    h('h2', {}, 'Or with your account'),
    h('label', { for: 'account-name' }, 'Account'), nameInput,
    h('label', { for: 'account-password' }, 'Password'), passwordInput,
    h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Use this account')),
    accountError);
  accountForm.addEventListener('submit', async (event) => {
    event.preventDefault();
    accountError.textContent = '';
    try {
      const response = await fetch(`${API}/session`, {
        method: 'POST', credentials: 'same-origin', headers: { ...CSRF, 'Content-Type': 'application/json' },
        body: JSON.stringify({ name: nameInput.value.trim(), password: passwordInput.value }),
      });
      if (response.status === 401 || response.status === 422) {
        accountError.textContent = 'Wrong account or password, or the account is disabled.';
        passwordInput.select();
        passwordInput.focus();
        return;
      }
      if (!response.ok) throw new Error(`the broker answered HTTP ${response.status}`);
      sessionStorage.setItem(SESSION_KEY, (await response.json()).name);
    } catch (failure) {
      accountError.textContent = `Could not reach the broker: ${errorText(failure)}`;
      return;
    }
    quiet();
    route(true);
  });
  fill($('#main'), form, accountForm);
  input.focus();
}

// ---------------------------------------------------------------------------------------- router

let cleanup = null;
let generation = 0;

function stopPage() {
  generation += 1;
  if (cleanup) { cleanup(); cleanup = null; }
}

// Who is signed in, and what their role lets them see (the audit log is the admins').
async function showWho() {
  try {
    const who = await api('GET', '/whoami');
    $('#who').textContent = `${who.name} (${who.role})`;
    $('#nav-audit').hidden = who.role !== 'admin';
    $('#nav-accounts').hidden = who.role !== 'admin';
  } catch (failure) {
    if (!(failure instanceof SignedOut)) $('#who').textContent = '';
  }
}

async function auditPage(main, _params, query, alive) {
  const offset = Number(query.get('offset') || 0);
  const meta = {};
  const entries = await api('GET', `/audit?limit=100&offset=${offset}`, undefined, meta);
  if (!alive()) return;
  const rows = entries.map((e) => h('tr', { class: e.status >= 400 ? 'refused' : '' },
    h('td', {}, time(e.at)), h('td', {}, e.actor), h('td', {}, e.role), h('td', {}, e.action),
    h('td', { class: 'reason' }, e.target), h('td', { class: 'num' }, String(e.status)), h('td', {}, e.remote)));
  const older = offset + entries.length < meta.total
    ? h('a', { href: `#/audit?offset=${offset + entries.length}` }, 'Older changes') : null;
  fill(main, h('h1', {}, 'Audit log'),
    h('p', { class: 'muted' }, `Every change made through the API, and every one refused, newest first: ${meta.total} in all.`),
    rows.length ? table('Changes, newest first', ['When', 'Who', 'Role', 'What', 'On', 'Status', 'From'], rows)
      : h('p', { class: 'muted' }, 'No change yet.'),
    older);
}

// Accounts (admins): who may use the console and the API, with which role, and their API tokens.
async function accountsPage(main, _params, _query, alive) {
  const accounts = await api('GET', '/accounts');
  if (!alive()) return;
  const error = h('p', { class: 'error', role: 'alert' });
  const shown = h('div', { id: 'account-token' });
  const act = async (method, path, body, done) => {
    error.textContent = '';
    try {
      const answer = await api(method, path, body);
      done(answer);
    } catch (failure) {
      if (!(failure instanceof SignedOut)) error.textContent = errorText(failure);
    }
  };
  const rows = accounts.map((a) => {
    const enc = encodeURIComponent(a.name);
    const role = h('select', { 'aria-label': `Role of ${a.name}` },
      ['viewer', 'operator', 'admin'].map((r) => h('option', { value: r, selected: r === a.role }, r)));
    role.addEventListener('change', () => act('PATCH', `/accounts/${enc}`, { role: role.value },
      (made) => say(`${made.name} is ${made.role} now.`)));
    const toggle = h('button', { type: 'button', class: 'quiet' },
      a.disabled ? `Enable ${a.name}` : `Disable ${a.name}`);
    toggle.addEventListener('click', () => act('PATCH', `/accounts/${enc}`, { disabled: !a.disabled },
      (made) => { say(`${made.name} ${made.disabled ? 'disabled: its tokens and sign-ins stop' : 'enabled'}.`); route(false); }));
    const issue = h('button', { type: 'button', class: 'quiet' }, `New token for ${a.name}`);
    issue.addEventListener('click', () => act('POST', `/accounts/${enc}/tokens`, { label: 'console' }, (made) => {
      fill(shown, h('div', { class: 'secret', role: 'status' },
        h('p', {}, `API token ${made.id} of ${a.name}, shown this once (use it as Authorization: Bearer):`),
        h('code', { class: 'hash', 'data-account': a.name }, made.token)));
    }));
    const remove = h('button', { type: 'button', class: 'danger' }, `Delete ${a.name}`);
    remove.addEventListener('click', () => {
      if (!window.confirm(`Delete the account ${a.name} and its tokens?`)) return;
      act('DELETE', `/accounts/${enc}`, undefined, () => { say(`${a.name} deleted.`); route(false); });
    });
    return h('tr', { 'data-account': a.name },
      h('th', { scope: 'row' }, a.name), h('td', {}, role),
      h('td', {}, a.has_password ? 'yes' : 'no'), h('td', {}, a.disabled ? 'disabled' : 'enabled'),
      h('td', {}, time(a.created_at)), h('td', { class: 'row-actions' }, issue, toggle, remove));
  });
  const name = h('input', { id: 'new-account-name', required: true, spellcheck: 'false', autocomplete: 'off' });
  const roleNew = h('select', { id: 'new-account-role' },
    ['viewer', 'operator', 'admin'].map((r) => h('option', { value: r }, r)));
  const password = h('input', { id: 'new-account-password', type: 'password', autocomplete: 'new-password' });
  const form = h('form', { class: 'card', 'aria-labelledby': 'new-account-h' },
    h('h2', { id: 'new-account-h' }, 'Add an account'),
    h('div', { class: 'grid' },
      h('div', { class: 'field' }, h('label', { for: 'new-account-name' }, 'Account name'), name),
      h('div', { class: 'field' }, h('label', { for: 'new-account-role' }, 'Role'), roleNew),
      h('div', { class: 'field' }, h('label', { for: 'new-account-password' }, 'Password (for the console)'), password,
        h('small', {}, 'At least 10 characters; empty: the account uses API tokens only.'))),
    h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Add account')));
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const body = { name: name.value.trim(), role: roleNew.value };
    if (password.value) body.password = password.value;
    act('POST', '/accounts', body, (made) => { say(`${made.name} (${made.role}) added.`); route(false); });
  });
  fill(main, h('h1', {}, 'Accounts'),
    h('p', { class: 'muted' }, 'A viewer reads; an operator also runs firmware and jobs; an admin also manages devices, their secrets and accounts.'),
    error, shown,
    rows.length ? table('Accounts', ['Account', 'Role', 'Password', 'State', 'Created', 'Actions'], rows)
      : h('p', { class: 'muted' }, 'No account yet: the admin token is the only way in.'),
    form);
}

const ROUTES = [
  [/^overview$/, overviewPage, 'Overview'],
  [/^audit$/, auditPage, 'Audit log'],
  [/^accounts$/, accountsPage, 'Accounts'],
  [/^firmware$/, firmwarePage, 'Firmware'],
  [/^jobs$/, jobsPage, 'Jobs'],
  [/^jobs\/new$/, newJobPage, 'New job'],
  [/^jobs\/(\d+)$/, jobPage, 'Job'],
  [/^devices$/, devicesPage, 'Devices'],
  [/^devices\/([^/]+)\/([^/]+)$/, devicePage, 'Device'],
];

function parseHash() {
  const raw = location.hash.startsWith('#/') ? location.hash.slice(2) : 'overview';
  const [path, query] = raw.split('?');
  return { path: path || 'overview', query: new URLSearchParams(query || '') };
}

async function route(focus) {
  stopPage();
  if (!saidSinceRoute) quiet();
  saidSinceRoute = false;
  if (!signedIn()) { showSignIn(); return; }
  $('#nav').hidden = false;
  $('#sign-out').hidden = false;
  showWho();
  const { path, query } = parseHash();
  let found = ROUTES.find(([pattern]) => pattern.test(path));
  if (!found) found = ROUTES[0];
  const [pattern, page, title] = found;
  const params = path.match(pattern).slice(1).map(decodeURIComponent);
  const section = path.split('/')[0];
  for (const link of document.querySelectorAll('#nav a')) {
    if (link.getAttribute('href') === `#/${section}`) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  document.title = `${title} · ota-broker`;
  const main = $('#main');
  const mine = generation;
  fill(main, h('p', { class: 'muted' }, 'Loading…'));
  const alive = () => mine === generation;
  try {
    const stop = await page(main, params, query, alive);
    if (alive()) cleanup = stop || null;
    else if (stop) stop();
  } catch (error) {
    if (error instanceof SignedOut || !alive()) return;
    fill(main, h('h1', {}, title), h('p', { class: 'error', role: 'alert' }, errorText(error)));
  }
  if (focus && alive()) main.focus();
}

// -------------------------------------------------------------------------------------- overview

async function overviewPage(main, _params, _query, alive) {
  const data = await api('GET', '/overview');
  if (!alive()) return;
  const { devices, versions, jobs } = data;
  const stat = (label, value, cls) => h('div', { class: `stat ${cls || ''}` },
    h('dt', {}, label), h('dd', {}, String(value)));
  const groups = new Map();
  for (const v of versions) {
    const key = `${v.product_key} / ${v.module}`;
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(v);
  }
  const overTime = new Map(); // product / module -> the figure its versions over time are drawn into
  const charts = [...groups].map(([key, rows]) => {
    const later = h('div', { class: 'over-time' });
    overTime.set(key, later);
    return [versionChart(key, rows), later];
  }).map(([chart, later]) => { chart.append(later); return chart; });
  // Versions over the last 30 days, asked once the page is up (from the upgrades' history).
  api('GET', '/overview/versions?days=30').then((doc) => {
    if (!alive()) return;
    for (const s of doc.series) {
      const place = overTime.get(`${s.product_key} / ${s.module}`);
      if (place) fill(place, versionsOverTime(s));
    }
  }).catch((failure) => { if (!(failure instanceof SignedOut)) console.warn(failure); });
  const active = jobs.active.map((job) => h('tr', {},
    h('td', {}, h('a', { href: `#/jobs/${job.id}` }, `#${job.id}`)),
    h('td', {}, job.type),
    h('td', {}, stateBadge(job.state)),
    h('td', {}, stackedBar(job.counts, `Job ${job.id}`),
      ` ${job.counts.succeeded} of ${job.total - job.counts.skipped} succeeded`)));
  const failures = data.recent_failures.map((t) => h('tr', {},
    h('td', {}, h('a', { href: `#/jobs/${t.job_id}` }, `#${t.job_id}`)),
    h('td', {}, deviceLink(t.device)),
    h('td', {}, stateBadge(t.state)),
    h('td', { class: 'reason' }, t.desc || '—'),
    h('td', {}, time(t.updated_at))));
  const refresh = h('button', { type: 'button', class: 'quiet' }, 'Refresh');
  refresh.addEventListener('click', () => route(false));
  fill(main,
    h('div', { class: 'title-row' }, h('h1', {}, 'Overview'), refresh),
    h('section', { 'aria-labelledby': 'fleet-h' },
      h('h2', { id: 'fleet-h' }, 'Fleet'),
      h('dl', { class: 'stats' },
        stat('Devices online', devices.online, 'good'),
        stat('Devices offline', devices.offline),
        stat('Devices in all', devices.total),
        stat('Jobs running', jobs.by_state.running || 0),
        stat('Jobs paused', jobs.by_state.paused || 0),
        stat('Jobs scheduled', jobs.by_state.scheduled || 0)),
      data.partial ? h('p', { class: 'muted' }, 'Counted the first 200,000 devices only.') : null),
    h('section', { 'aria-labelledby': 'versions-h' },
      h('h2', { id: 'versions-h' }, 'Versions per product and module'),
      charts.length ? h('div', { class: 'charts' }, charts)
        : h('p', { class: 'muted' }, 'No device has reported a version yet.')),
    h('section', { 'aria-labelledby': 'active-h' },
      h('h2', { id: 'active-h' }, 'Jobs running'),
      active.length ? table('Unfinished jobs', ['Job', 'Type', 'State', 'Tasks'], active)
        : h('p', { class: 'muted' }, 'No job is running.')),
    h('section', { 'aria-labelledby': 'failures-h' },
      h('h2', { id: 'failures-h' }, 'Recent failures'),
      failures.length ? table('Newest failed or timed-out tasks',
        ['Job', 'Device', 'State', 'Reason', 'When'], failures)
        : h('p', { class: 'muted' }, 'No recent failures.')));
}

function versionChart(title, rows) {
  const most = Math.max(...rows.map((r) => r.devices));
  const width = 240;
  const body = rows.map((r) => {
    const bar = svg('svg', { width, height: 16, 'aria-hidden': 'true', focusable: 'false', class: 'bar' });
    bar.append(svg('rect', { x: 0, y: 2, height: 12, width: Math.max(2, Math.round((r.devices / most) * width)) }));
    return h('tr', {},
      h('th', { scope: 'row' }, r.version),
      h('td', { class: 'num' }, String(r.devices)),
      h('td', {}, bar));
  });
  return h('figure', { class: 'chart' },
    table(title, ['Version', 'Devices', 'Share'], body, { class: 'chart-table' }));
}

// The devices on each version over time, one line per version (the others together in grey).
function versionsOverTime(series) {
  const points = series.points;
  const names = Object.keys(points[points.length - 1].versions);
  if (names.length < 2 && names[0] === 'others') return null; // nothing upgraded in the window: flat
  const W = 320;
  const H = 120;
  const pad = { left: 34, right: 8, top: 8, bottom: 22 };
  const top = Math.max(1, ...points.map((p) => Object.values(p.versions).reduce((a, b) => a + b, 0)));
  const t0 = Date.parse(points[0].at);
  const t1 = Math.max(Date.parse(points[points.length - 1].at), t0 + 1);
  const x = (at) => pad.left + ((Date.parse(at) - t0) / (t1 - t0)) * (W - pad.left - pad.right);
  const y = (n) => H - pad.bottom - (n / top) * (H - pad.top - pad.bottom);
  const last = points[points.length - 1].versions;
  const said = names.map((n) => `${n}: ${last[n]}`).join(', ');
  const chart = svg('svg', {
    viewBox: `0 0 ${W} ${H}`, role: 'img', class: 'timeline versions',
    'aria-label': `Devices per version of ${series.product_key} / ${series.module} over 30 days, now ${said}`,
  });
  chart.append(svg('line', { x1: pad.left, y1: y(0), x2: W - pad.right, y2: y(0), class: 'axis' }));
  names.forEach((name, i) => {
    const line = points.map((p) => `${x(p.at).toFixed(1)},${y(p.versions[name] || 0).toFixed(1)}`).join(' ');
    chart.append(svg('polyline', { points: line, class: name === 'others' ? 'series-others' : `series-${i % 4}` }));
  });
  const text = (attrs, words) => { const el = svg('text', attrs); el.textContent = words; return el; };
  chart.append(
    text({ x: pad.left - 4, y: y(top) + 4, 'text-anchor': 'end', class: 'tick' }, String(top)),
    text({ x: pad.left, y: H - 6, class: 'tick' }, '30 days ago'),
    text({ x: W - pad.right, y: H - 6, 'text-anchor': 'end', class: 'tick' }, 'now'));
  return [chart, h('p', { class: 'legend' }, names.map((n, i) =>
    h('span', { class: `key ${n === 'others' ? 'key-others' : `key-${i % 4}`}` }, `${n}: ${last[n]}`)))];
}

// -------------------------------------------------------------------------------------- firmware

async function firmwarePage(main, _params, _query, alive) {
  const list = await api('GET', '/firmware');
  if (!alive()) return;
  const field = (id, label, input, help) => h('div', { class: 'field' },
    h('label', { for: id }, label), input, help ? h('small', { id: `${id}-help` }, help) : null);
  const progress = h('progress', { id: 'upload-progress', max: 100, value: 0, 'aria-label': 'Upload progress' });
  const progressText = h('span', { id: 'upload-percent' }, '');
  const error = h('p', { class: 'error', role: 'alert' });
  const result = h('div', { id: 'upload-result' });
  const form = h('form', { class: 'card', id: 'upload-form' },
    h('h2', {}, 'Upload firmware'),
    h('div', { class: 'grid' },
      field('fw-file', 'Firmware file(s)', h('input', { id: 'fw-file', name: 'file', type: 'file', multiple: true, required: true, 'aria-describedby': 'fw-file-help' }), 'Several files (up to 20) make one multi-file package.'),
      field('fw-product', 'Product key', h('input', { id: 'fw-product', name: 'product_key', required: true, maxlength: 64 })),
      field('fw-version', 'Version', h('input', { id: 'fw-version', name: 'version', required: true, maxlength: 64 })),
      field('fw-module', 'Module', h('input', { id: 'fw-module', name: 'module', placeholder: 'default', 'aria-describedby': 'fw-module-help' }), 'Empty: the default module.'),
      field('fw-sign', 'Sign method', h('select', { id: 'fw-sign', name: 'sign_method' },
        h('option', { value: 'Md5' }, 'Md5'), h('option', { value: 'SHA256' }, 'SHA256'))),
      field('fw-src', 'Source version (differential)', h('input', { id: 'fw-src', name: 'src_version', 'aria-describedby': 'fw-src-help' }), 'Only for a differential package.'),
      field('fw-desc', 'Description', h('input', { id: 'fw-desc', name: 'description', maxlength: 1000 }))),
    h('div', { class: 'check' },
      h('input', { id: 'fw-verify', name: 'verify', type: 'checkbox', value: 'true' }),
      h('label', { for: 'fw-verify' }, 'Needs verification: batch jobs wait for a passed verify job')),
    h('div', { class: 'actions' },
      h('button', { type: 'submit' }, 'Upload'), progress, progressText),
    error, result);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (!form.reportValidity()) return;
    error.textContent = '';
    fill(result);
    const data = new FormData();
    for (const [name, value] of new FormData(form)) {
      if (name !== 'file' && value !== '') data.append(name, value);
    }
    for (const file of $('#fw-file').files) data.append('file', file, file.name); // the files last, in order
    const button = $('button[type=submit]', form);
    button.disabled = true;
    try {
      const fw = await upload(data, (loaded, total) => {
        const percent = Math.floor((loaded / total) * 100);
        progress.value = percent;
        progressText.textContent = `${percent} %`;
      });
      progress.value = 100;
      progressText.textContent = '100 %';
      say(`Firmware ${fw.id} uploaded.`);
      fill(result, firmwareDetails(fw, 'Uploaded'));
      if (alive()) await renderFirmwareList(main, await api('GET', '/firmware'));
    } catch (failure) {
      if (!(failure instanceof SignedOut)) {
        quiet(); // an earlier "uploaded" must not stand beside this failure
        error.textContent = `Upload failed: ${errorText(failure)}`;
      }
    } finally {
      button.disabled = false;
    }
  });
  fill(main, h('h1', {}, 'Firmware'), form, h('section', { id: 'firmware-list', 'aria-labelledby': 'fwlist-h' }));
  await renderFirmwareList(main, list);
}

function firmwareDetails(fw, heading) {
  return h('section', { class: 'card', 'aria-label': `${heading} firmware ${fw.id}` },
    h('h3', {}, `${heading}: firmware #${fw.id}`),
    h('dl', { class: 'pairs' },
      h('dt', {}, 'Product / module'), h('dd', {}, `${fw.product_key} / ${fw.module}`),
      h('dt', {}, 'Version'), h('dd', {}, fw.version),
      h('dt', {}, 'Size'), h('dd', {}, `${bytes(fw.size)} (${fw.size} bytes)`),
      h('dt', {}, 'MD5'), h('dd', {}, h('code', { class: 'hash' }, fw.md5)),
      h('dt', {}, 'SHA-256'), h('dd', {}, h('code', { class: 'hash' }, fw.sha256)),
      h('dt', {}, `Sign (${fw.sign_method})`), h('dd', {}, h('code', { class: 'hash' }, fw.sign)),
      h('dt', {}, 'Status'), h('dd', {}, statusText(fw.status))),
    fw.files.length > 1 ? packageFiles(fw) : null);
}

function packageFiles(fw) {
  return h('table', { class: 'files', 'aria-label': `Files of firmware ${fw.id}` },
    h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'File'), h('th', { scope: 'col' }, 'Size'),
      h('th', { scope: 'col' }, 'MD5 / SHA-256'))),
    h('tbody', {}, ...fw.files.map((f) => h('tr', {},
      h('td', {}, f.name), h('td', { class: 'num' }, bytes(f.size)),
      h('td', {}, h('code', { class: 'hash' }, f.md5), h('br'), h('code', { class: 'hash' }, f.sha256))))));
}

function statusText(status) {
  const words = {
    no_verify_needed: 'no verification needed', unverified: 'not verified', verifying: 'verifying',
    verified: 'verified', verify_failed: 'verification failed',
  };
  return h('span', { class: `badge fw-${status}` }, words[status] || status);
}

async function renderFirmwareList(main, list) {
  const section = $('#firmware-list', main);
  if (!section) return;
  const rows = list.map((fw) => {
    const remove = h('button', { type: 'button', class: 'danger', 'aria-label': `Delete firmware ${fw.id}` }, 'Delete');
    remove.addEventListener('click', async () => {
      if (!window.confirm(`Delete firmware #${fw.id} (${fw.product_key} ${fw.module} ${fw.version})?`)) return;
      try {
        await api('DELETE', `/firmware/${fw.id}`);
        say(`Firmware ${fw.id} deleted.`);
        await renderFirmwareList(main, await api('GET', '/firmware'));
      } catch (failure) {
        if (!(failure instanceof SignedOut)) say(`Could not delete firmware ${fw.id}: ${errorText(failure)}`);
      }
    });
    return h('tr', {},
      h('td', {}, `#${fw.id}`),
      h('td', {}, fw.product_key),
      h('td', {}, fw.module),
      h('td', {}, fw.version, fw.src_version ? ` (from ${fw.src_version})` : ''),
      h('td', { class: 'num' }, fw.files.length > 1
        ? `${fw.files.length} files, ${bytes(fw.files.reduce((sum, f) => sum + f.size, 0))}` : bytes(fw.size)),
      h('td', {}, h('code', { class: 'hash', title: `MD5 ${fw.md5}` }, fw.md5), h('br'),
        h('code', { class: 'hash', title: `SHA-256 ${fw.sha256}` }, fw.sha256)),
      h('td', {}, statusText(fw.status)),
      h('td', { class: 'row-actions' },
        h('a', { href: `#/jobs/new?firmware=${fw.id}&type=verify`, 'aria-label': `Verify firmware ${fw.id}` }, 'Verify'),
        h('a', { href: `#/jobs/new?firmware=${fw.id}`, 'aria-label': `New job for firmware ${fw.id}` }, 'New job'),
        remove));
  });
  fill(section, h('h2', { id: 'fwlist-h' }, 'Stored firmware'),
    rows.length ? table('All firmware, newest last',
      ['Id', 'Product', 'Module', 'Version', 'Size', 'MD5 / SHA-256', 'Status', 'Actions'], rows)
      : h('p', { class: 'muted' }, 'No firmware yet.'));
}

// ------------------------------------------------------------------------------------------ jobs

// The parts of a job's stacked bar, in the order they are drawn: what ended well, what ended badly, what
// was stopped, what is under way, what waits. Skipped tasks (the device was already up to date) are left out.
const PARTS = [
  ['succeeded', 'succeeded', ['succeeded']],
  ['failed', 'failed', ['failed', 'timed_out']],
  ['cancelled', 'cancelled', ['cancelled']],
  ['running', 'in progress', ['notified', 'in_progress']],
  ['waiting', 'waiting', ['queued', 'confirm']],
];

// A job's tasks as one bar of coloured parts (hawkBit's rollout bars): a failure is never hidden inside a
// full bar. Its text (role img) says the same in words, and a legend names every part that is not empty.
function stackedBar(counts, label, id) {
  const parts = PARTS.map(([key, words, states]) => [key, words, states.reduce((n, s) => n + (counts[s] || 0), 0)]);
  const total = parts.reduce((n, [, , count]) => n + count, 0);
  const said = parts.filter(([, , count]) => count).map(([, words, count]) => `${count} ${words}`);
  const bar = h('div', { class: 'stack', role: 'img', id, 'aria-label': `${label}: ${said.join(', ') || 'no tasks'}` },
    parts.filter(([, , count]) => count).map(([key, words, count]) => {
      const part = h('span', { class: `part part-${key}`, 'data-part': key, 'data-count': count, title: `${count} ${words}` });
      part.style.width = `${((count / total) * 100).toFixed(2)}%`; // CSSOM: the CSP refuses style attributes
      return part;
    }));
  const legend = h('span', { class: 'legend', 'aria-hidden': 'true' },
    parts.filter(([, , count]) => count).map(([key, words, count]) =>
      h('span', { class: `key key-${key}` }, `${count} ${words}`)));
  return h('span', { class: 'stacked' }, bar, legend);
}

function done(job) {
  const total = job.total - (job.counts.skipped || 0);
  const finished = TASK_STATES.filter((s) => TERMINAL.has(s) && s !== 'skipped')
    .reduce((sum, s) => sum + (job.counts[s] || 0), 0);
  return { total, finished, percent: total ? Math.floor((finished / total) * 100) : 0 };
}

async function jobsPage(main, _params, _query, alive) {
  const [jobs, firmware] = await Promise.all([api('GET', '/jobs'), api('GET', '/firmware?limit=10000')]);
  if (!alive()) return;
  const names = new Map(firmware.map((fw) => [fw.id, `${fw.product_key} / ${fw.module} ${fw.version}`]));
  const rows = jobs.map((job) => {
    const d = done(job);
    return h('tr', {},
      h('td', {}, h('a', { href: `#/jobs/${job.id}` }, `Job #${job.id}`)),
      h('td', {}, job.type),
      h('td', {}, names.get(job.firmware_id) || `#${job.firmware_id} (deleted)`),
      h('td', {}, stateBadge(job.state)),
      h('td', {}, stackedBar(job.counts, `Job ${job.id}`), ` ${d.finished} of ${d.total} finished`),
      h('td', {}, job.success_rate === null ? '—' : `${Math.round(job.success_rate * 100)} %`),
      h('td', {}, time(job.created_at)));
  });
  fill(main,
    h('div', { class: 'title-row' }, h('h1', {}, 'Jobs'), h('a', { href: '#/jobs/new', class: 'button' }, 'New job')),
    rows.length ? table('Jobs, newest first',
      ['Job', 'Type', 'Firmware', 'State', 'Finished', 'Success rate', 'Created'], rows)
      : h('p', { class: 'muted' }, 'No jobs yet.'));
}

async function newJobPage(main, _params, query, alive) {
  const firmware = await api('GET', '/firmware');
  if (!alive()) return;
  const id = (name) => `job-${name}`;
  const help = (name, text) => h('small', { id: `${id(name)}-help` }, text);
  const input = (name, attrs) => h('input', { id: id(name), name, 'aria-describedby': `${id(name)}-help`, ...attrs });
  const field = (name, label, control, helpText, wide) => {
    if (!helpText) control.removeAttribute('aria-describedby');
    return h('div', { class: wide ? 'field wide' : 'field' }, h('label', { for: id(name) }, label), control,
      helpText ? help(name, helpText) : null);
  };
  const check = (name, label) => h('div', { class: 'check' },
    h('input', { id: id(name), name, type: 'checkbox' }), h('label', { for: id(name) }, label));
  const chosen = query.get('firmware');
  const fwSelect = h('select', { id: id('firmware'), name: 'firmware_id', required: true },
    firmware.map((fw) => h('option', { value: fw.id, selected: String(fw.id) === chosen },
      `#${fw.id} ${fw.product_key} / ${fw.module} ${fw.version} (${fw.status.replace(/_/g, ' ')})`)));
  const typeSelect = h('select', { id: id('type'), name: 'type', 'aria-describedby': `${id('type')}-help` },
    ['static', 'dynamic', 'verify'].map((t) => h('option', { value: t, selected: t === (query.get('type') || 'static') }, t)));
  const error = h('p', { class: 'error', role: 'alert', id: 'job-error' });
  const devicesBox = h('textarea', { id: id('devices'), name: 'devices', rows: 4, 'aria-describedby': `${id('devices')}-help`, spellcheck: 'false' });
  const devicesFile = input('devices_file', { type: 'file', accept: '.csv,.txt,text/csv,text/plain' });
  devicesFile.removeAttribute('name'); // read here, not sent
  devicesFile.addEventListener('change', async () => {
    const [file] = devicesFile.files;
    if (!file) return;
    const listed = deviceLines(await file.text());
    devicesBox.value = [devicesBox.value.trim(), ...listed].filter(Boolean).join('\n');
    say(`${listed.length} device(s) added from ${file.name}.`);
  });
  // Devices found by a search over the firmware's product (the broker's, not this page's), added to the list.
  const findInput = h('input', { id: id('find'), type: 'search', spellcheck: 'false', 'aria-describedby': `${id('find')}-help` });
  const findButton = h('button', { type: 'button', class: 'quiet' }, 'Add matching devices');
  const addMatching = async () => {
    const fw = firmware.find((f) => String(f.id) === fwSelect.value);
    const part = findInput.value.trim();
    if (!fw || !part) return;
    error.textContent = '';
    try {
      const meta = {};
      const found = await api('GET', `/devices?${new URLSearchParams({ product_key: fw.product_key, name: part, limit: '10000' })}`, undefined, meta);
      const names = found.map((d) => `${d.product_key}/${d.device_name}`);
      const have = new Set(devicesBox.value.split(/[\s,]+/).filter(Boolean));
      const added = names.filter((n) => !have.has(n));
      devicesBox.value = [devicesBox.value.trim(), ...added].filter(Boolean).join('\n');
      say(`${added.length} device(s) of ${fw.product_key} matching “${part}” added${meta.total > found.length ? ` (the first ${found.length} of ${meta.total})` : ''}.`);
    } catch (failure) {
      if (!(failure instanceof SignedOut)) error.textContent = errorText(failure);
    }
  };
  findButton.addEventListener('click', addMatching);
  findInput.addEventListener('keydown', (event) => { if (event.key === 'Enter') { event.preventDefault(); addMatching(); } });
  const preview = h('section', { class: 'card', id: 'job-preview', 'aria-labelledby': 'job-preview-h', hidden: true });
  const previewButton = h('button', { type: 'button', class: 'quiet' }, 'Preview');
  const form = h('form', { class: 'card', id: 'job-form' },
    h('fieldset', {}, h('legend', {}, 'What'),
      h('div', { class: 'grid' },
        field('firmware', 'Firmware', fwSelect, null, 'wide'),
        field('type', 'Type', typeSelect,
          'static: the devices matching now; dynamic: also devices that report a matching version later, until cancelled; verify: 1–10 listed devices, all must succeed.'),
        field('download_protocol', 'Download over', h('select', { id: id('download_protocol'), name: 'download_protocol', 'aria-describedby': `${id('download_protocol')}-help` },
          h('option', { value: 'https' }, 'HTTPS'), h('option', { value: 'mqtt' }, 'MQTT')),
          'MQTT: devices with no HTTP stack fetch the firmware in blocks over their MQTT connection (files up to 16 MB).'))),
    h('fieldset', {}, h('legend', {}, 'Targets'),
      h('div', { class: 'grid' },
        field('devices', 'Devices', devicesBox,
          'One product_key/device_name per line (or separated by commas). Empty: every device of the firmware’s product.'),
        h('div', { class: 'field' }, h('label', { for: id('find') }, 'Find devices (name contains)'),
          h('div', { class: 'inline' }, findInput, findButton),
          help('find', 'Searched by the broker over the firmware’s product; the matches are added to the list above.')),
        field('devices_file', 'Devices from a file', devicesFile,
          'A CSV or text file: product_key,device_name or product_key/device_name per line (a header line is skipped); added to the list above.'),
        field('group', 'Device group', input('group', { spellcheck: 'false' }), 'Instead of a list: the product’s devices in this group.'),
        field('src_versions', 'Only from versions', input('src_versions', {}), 'Comma-separated, e.g. 1.0.0, 1.0.1. Empty: any version.'),
        field('gray_percent', 'Gray release (% of matched devices)', input('gray_percent', { type: 'number', min: 0.01, max: 100, step: 'any' }), 'A deterministic sample. Empty: all of them.'))),
    h('fieldset', {}, h('legend', {}, 'When and how fast'),
      h('div', { class: 'grid' },
        field('schedule_at', 'Start at', input('schedule_at', { type: 'datetime-local' }), 'Your local time. Empty: now.'),
        field('end_at', 'End at', input('end_at', { type: 'datetime-local' }), 'Unfinished tasks are cancelled then.'),
        field('rate_per_minute', 'Notices per minute', input('rate_per_minute', { type: 'number', min: 1, max: 100000, step: 1 }), 'Empty: no limit.'),
        field('timeout_minutes', 'Timeout (minutes)', input('timeout_minutes', { type: 'number', min: 0.001, step: 'any' }), 'No success that long after the first progress report: timed out.'),
        field('notify_timeout_minutes', 'Timeout after the notice (minutes)', input('notify_timeout_minutes', { type: 'number', min: 0, max: 43200, step: 'any', placeholder: '1440' }), 'No progress report that long after the notice: timed out. Empty: a day; 0: never.'),
        field('retry_count', 'Retries', input('retry_count', { type: 'number', min: 0, max: 10, step: 1 }), 'A failed task is notified again, up to this many times.'),
        field('retry_interval_minutes', 'Retry after (minutes)', input('retry_interval_minutes', { type: 'number', min: 0, max: 1440, step: 'any' }), ''))),
    h('fieldset', {}, h('legend', {}, 'Phased rollout'),
      h('div', { class: 'grid' },
        field('phases', 'Phases (% of devices)', input('phases', { placeholder: '10, 30, 60' }), 'Comma-separated, adding up to 100. Empty: one phase.'),
        field('success_threshold', 'Next phase at success (%)', input('success_threshold', { type: 'number', min: 0, max: 100, step: 'any' }), 'Default 100.'),
        field('error_threshold_count', 'Pause after failures (count)', input('error_threshold_count', { type: 'number', min: 1, step: 1 }), ''),
        field('error_threshold_percent', 'Pause after failures (%)', input('error_threshold_percent', { type: 'number', min: 0.01, max: 100, step: 'any' }), ''))),
    h('fieldset', {}, h('legend', {}, 'Options'),
      check('overwrite', 'Overwrite: cancel devices’ tasks in other unfinished jobs instead of skipping them'),
      check('force', 'Force: run firmware that has not passed verification'),
      check('need_confirm', 'Tasks wait for confirmation before notices are sent'),
      field('tags', 'Tags', h('textarea', { id: id('tags'), name: 'tags', rows: 2, 'aria-describedby': `${id('tags')}-help`, spellcheck: 'false' }),
        'Up to 10 key=value lines, delivered in the notice’s extData.')),
    h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Start job'), previewButton),
    error);

  // Whom the job touches, asked of the broker with the form as it is (nothing starts): shown before every
  // start, and confirmed by the operator when it is the whole product or more than CONFIRM_ABOVE devices.
  async function previewed() {
    error.textContent = '';
    let spec;
    try {
      spec = jobSpec(new FormData(form));
    } catch (failure) {
      error.textContent = failure.message;
      return null;
    }
    try {
      const p = await api('POST', '/jobs/preview', spec);
      showPreview(preview, p);
      return { spec, p };
    } catch (failure) {
      if (!(failure instanceof SignedOut)) error.textContent = `The job cannot start: ${errorText(failure)}`;
      preview.hidden = true;
      return null;
    }
  }
  previewButton.addEventListener('click', previewed);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const planned = await previewed();
    if (!planned) return;
    const { spec, p } = planned;
    if (p.whole_product || p.tasks > CONFIRM_ABOVE) {
      const whom = p.whole_product ? ` (every device of product ${p.firmware.product_key})` : '';
      if (!window.confirm(`Start this job? It notifies ${p.tasks} device(s)${whom} with ${p.firmware.module} ${p.firmware.version}.`)) {
        say('The job was not started.');
        return;
      }
    }
    try {
      const job = await api('POST', '/jobs', { ...spec, seed: p.seed }); // exactly the devices previewed
      say(`Job ${job.id} started.`);
      location.hash = `#/jobs/${job.id}`;
    } catch (failure) {
      if (!(failure instanceof SignedOut)) error.textContent = `The job was not created: ${errorText(failure)}`;
    }
  });
  fill(main, h('h1', {}, 'New job'),
    firmware.length ? [form, preview] : h('p', {}, 'Upload firmware first: ', h('a', { href: '#/firmware' }, 'Firmware'), '.'));
}

const CONFIRM_ABOVE = 25; // devices a job may notify without the operator confirming it

function showPreview(section, p) {
  const whom = p.whole_product ? `every device of product ${p.firmware.product_key}`
    : p.group ? `the devices of product ${p.firmware.product_key} in group ${p.group}` : 'the devices listed';
  const skipped = Object.entries(p.skipped_reasons).map(([why, n]) => `${n} ${why.replace(/_/g, ' ')}`);
  section.hidden = false;
  fill(section,
    h('h2', { id: 'job-preview-h' }, 'Whom this job notifies'),
    h('p', { id: 'job-preview-count' },
      `${p.tasks} device(s) of ${p.devices} matched (${whom}) get ${p.firmware.module} ${p.firmware.version}.`),
    skipped.length ? h('p', {}, `Skipped: ${skipped.join(', ')}.`) : null,
    p.phases.length > 1 ? h('p', {}, `Phases: ${p.phases.join(', ')} device(s).`) : null,
    p.sample.length ? table(`A sample of ${p.sample.length} of ${p.devices}`, ['Device', 'State', 'Phase', 'Why skipped'],
      p.sample.map((t) => h('tr', {}, h('td', {}, t.device), h('td', {}, stateBadge(t.state)),
        h('td', { class: 'num' }, String(t.phase + 1)), h('td', {}, t.desc.replace(/_/g, ' ') || '—')))) : null);
}

// Device names from a CSV or text file: `pk,dn` or `pk/dn` per line, a header line and blank lines skipped.
function deviceLines(text) {
  return text.replace(/^\uFEFF/, '').split(/\r?\n/).map((line) => line.trim())
    .filter((line) => line && !line.toLowerCase().startsWith('product_key'))
    .map((line) => {
      if (!line.includes(',')) return line;
      const [pk, dn] = line.split(',');
      return `${pk.trim()}/${(dn || '').trim()}`;
    });
}

function optionText(value) {
  if (Array.isArray(value)) return value.join(', ');
  if (value && typeof value === 'object') {
    return Object.entries(value).filter(([, v]) => v !== null)
      .map(([k, v]) => `${k}=${Array.isArray(v) ? v.join('/') : v}`).join(', ');
  }
  return String(value);
}

function jobSpec(form) {
  const text = (name) => (form.get(name) || '').trim();
  const number = (name) => {
    const value = text(name);
    if (value === '') return undefined;
    const parsed = Number(value);
    if (!Number.isFinite(parsed)) throw new Error(`${name}: must be a number`);
    return parsed;
  };
  const list = (name) => text(name).split(/[\s,]+/).filter(Boolean);
  const when = (name) => {
    const value = text(name);
    if (!value) return undefined;
    const date = new Date(value);
    if (Number.isNaN(date.getTime())) throw new Error(`${name}: not a valid time`);
    return date.toISOString();
  };
  const spec = {
    firmware_id: Number(text('firmware_id')), type: text('type') || 'static',
    download_protocol: text('download_protocol') || 'https',
  };
  const devices = list('devices');
  if (devices.length) spec.devices = devices;
  if (text('group')) spec.group = text('group');
  const srcVersions = list('src_versions');
  if (srcVersions.length) spec.src_versions = srcVersions;
  for (const name of ['gray_percent', 'rate_per_minute', 'timeout_minutes', 'notify_timeout_minutes', 'retry_count', 'retry_interval_minutes']) {
    const value = number(name);
    if (value !== undefined) spec[name] = value;
  }
  for (const name of ['schedule_at', 'end_at']) {
    const value = when(name);
    if (value !== undefined) spec[name] = value;
  }
  for (const name of ['overwrite', 'force', 'need_confirm']) {
    if (form.get(name)) spec[name] = true;
  }
  const phases = list('phases').map(Number);
  if (phases.length) {
    if (phases.some((p) => !Number.isFinite(p))) throw new Error('phases: must be numbers such as 10, 30, 60');
    spec.rollout = { phases };
    for (const name of ['success_threshold', 'error_threshold_count', 'error_threshold_percent']) {
      const value = number(name);
      if (value !== undefined) spec.rollout[name] = value;
    }
  } else if (['success_threshold', 'error_threshold_count', 'error_threshold_percent'].some((n) => text(n))) {
    throw new Error('phases: give the phases (e.g. 100) to use thresholds');
  }
  const tags = {};
  for (const line of text('tags').split('\n').map((l) => l.trim()).filter(Boolean)) {
    const at = line.indexOf('=');
    if (at < 1) throw new Error(`tags: "${line}" is not key=value`);
    tags[line.slice(0, at).trim()] = line.slice(at + 1).trim();
  }
  if (Object.keys(tags).length) spec.tags = tags;
  return spec;
}

async function jobPage(main, [jobId], _query, alive) {
  const first = await api('GET', `/jobs/${jobId}`);
  const fw = await api('GET', `/firmware/${first.firmware_id}`).catch((failure) => {
    if (failure instanceof SignedOut) throw failure;
    return null; // deleted since
  });
  if (!alive()) return undefined;
  const fwName = fw ? `${fw.product_key} / ${fw.module} ${fw.version} (#${fw.id})` : `#${first.firmware_id} (deleted)`;
  const chart = h('figure', { class: 'chart', id: 'job-chart' });
  const drawChart = async () => {
    try {
      const timeline = await api('GET', `/jobs/${jobId}/timeline`);
      fill(chart, timelineChart(timeline, first.total - (first.counts.skipped || 0)));
    } catch (failure) {
      if (!(failure instanceof SignedOut)) fill(chart, h('p', { class: 'muted' }, `No chart: ${errorText(failure)}`));
    }
  };
  const liveState = h('span', { id: 'live-state', class: 'live' }, 'connecting…');
  const overall = h('span', { class: 'overall-bar' });
  const overallText = h('span', { id: 'job-percent' });
  const summary = h('dl', { class: 'pairs', id: 'job-summary' });
  const counts = h('dl', { class: 'stats', id: 'job-counts' });
  const error = h('p', { class: 'error', role: 'alert' });
  const tbody = h('tbody');
  const note = h('p', { class: 'muted' });
  const rows = new Map();
  let latest = first;
  let stopLive = null;

  const button = (label, action, confirmText, kind = '') => {
    const b = h('button', { type: 'button', class: kind }, label);
    b.addEventListener('click', async () => {
      if (confirmText && !window.confirm(confirmText)) return;
      error.textContent = '';
      try {
        const job = await api('POST', `/jobs/${jobId}/${action}`);
        say(`Job ${jobId}: ${label.toLowerCase()} done.`);
        renderJob(job);
        startLive(); // the job may run again (re-run, resume)
      } catch (failure) {
        if (!(failure instanceof SignedOut)) error.textContent = `${label}: ${errorText(failure)}`;
      }
    });
    return b;
  };
  const buttons = {
    pause: button('Pause', 'pause'),
    resume: button('Resume', 'resume'),
    confirm: button('Confirm waiting', 'confirm'),
    rerun: button('Re-run failed', 'rerun'),
    cancel: button('Cancel job', 'cancel', `Cancel every unfinished task of job #${jobId}?`, 'danger'),
  };
  const report = h('button', { type: 'button', class: 'quiet' }, 'Download CSV report');
  report.addEventListener('click', async () => {
    try {
      const csv = await api('GET', `/jobs/${jobId}/report.csv`);
      const link = h('a', { href: URL.createObjectURL(new Blob([csv], { type: 'text/csv' })), download: `job-${jobId}.csv` });
      link.click();
      window.setTimeout(() => URL.revokeObjectURL(link.href), 1000);
    } catch (failure) {
      if (!(failure instanceof SignedOut)) error.textContent = `Report: ${errorText(failure)}`;
    }
  });

  function renderJob(job) {
    latest = job;
    const d = done(job);
    fill(overall, stackedBar(job.counts, `Tasks of job ${jobId}`, 'job-bar'));
    overallText.textContent = `${d.percent} % (${d.finished} of ${d.total} finished)`;
    const opts = Object.entries(job.options || {}).filter(([, v]) => !(Array.isArray(v) && !v.length)
      && !(v && typeof v === 'object' && !Array.isArray(v) && !Object.keys(v).length));
    fill(summary,
      h('dt', {}, 'State'), h('dd', { id: 'job-state' }, stateBadge(job.state),
        job.pause_reason ? ` — ${job.pause_reason}` : ''),
      h('dt', {}, 'Type'), h('dd', {}, job.type),
      h('dt', {}, 'Firmware'), h('dd', { id: 'job-firmware' }, fwName),
      h('dt', {}, 'Phase'), h('dd', {}, String(job.current_phase)),
      h('dt', {}, 'Success rate'), h('dd', {}, job.success_rate === null ? '—' : `${Math.round(job.success_rate * 100)} %`),
      h('dt', {}, 'Throughput'), h('dd', {}, `${job.throughput_per_minute} per minute`),
      job.eta ? [h('dt', {}, 'Expected end'), h('dd', { id: 'job-eta' }, `${time(job.eta)} (at the pace so far)`)] : null,
      job.waiting_for_capacity ? [h('dt', {}, 'Waiting'), h('dd', { id: 'job-waiting' },
        `${job.waiting_for_capacity} queued waiting for download capacity`)] : null,
      h('dt', {}, 'Created'), h('dd', {}, time(job.created_at)),
      job.schedule_at ? [h('dt', {}, 'Starts'), h('dd', {}, time(job.schedule_at))] : null,
      job.end_at ? [h('dt', {}, 'Ends'), h('dd', {}, time(job.end_at))] : null,
      opts.length ? [h('dt', {}, 'Options'), h('dd', {}, h('ul', { class: 'plain' },
        opts.map(([k, v]) => h('li', {}, `${k}: ${optionText(v)}`))))] : null);
    fill(counts, ...TASK_STATES.map((s) => h('div', { class: `stat ${job.counts[s] ? '' : 'zero'}` },
      h('dt', {}, s.replace('_', ' ')), h('dd', { 'data-state': s }, String(job.counts[s] || 0)))));
    const running = job.state === 'running' || job.state === 'scheduled';
    buttons.pause.hidden = !running;
    buttons.resume.hidden = job.state !== 'paused';
    buttons.confirm.hidden = !(job.counts.confirm > 0);
    buttons.rerun.hidden = !((job.counts.failed || 0) + (job.counts.timed_out || 0));
    buttons.cancel.hidden = job.state === 'cancelled' || (job.state === 'completed' && job.type !== 'dynamic');
  }

  function renderTasks(tasks, total) {
    const seen = new Set();
    for (const task of tasks) {
      seen.add(task.id);
      let row = rows.get(task.id);
      if (!row) {
        // Tasks come ordered by id, so new ones belong at the end; rows already shown are updated in
        // place and never moved, which would take the keyboard focus away from their buttons.
        row = taskRow(jobId, task, error);
        rows.set(task.id, row);
        tbody.append(row.tr, row.detail);
      }
      row.update(task);
    }
    for (const [id, row] of rows) {
      if (!seen.has(id)) { row.tr.remove(); row.detail.remove(); rows.delete(id); }
    }
    note.textContent = total > tasks.length ? `Showing the first ${tasks.length} of ${total} tasks.` : '';
  }

  function startLive() {
    if (stopLive) return;
    stopLive = liveJob(jobId, (snapshot) => {
      renderJob(snapshot.job);
      renderTasks(snapshot.tasks, snapshot.tasks_total);
    }, (state) => {
      const words = { live: 'live', reconnecting: 'reconnecting…', final: 'final: no more changes' };
      liveState.textContent = words[state] || state;
      if (state === 'final') {
        stopLive = null;
        drawChart(); // the whole of it, once the job is over
        say(`Job ${jobId} is ${latest.state}.`);
      }
    });
  }

  fill(main,
    h('div', { class: 'title-row' }, h('h1', {}, `Job #${jobId}`),
      h('p', { class: 'muted' }, 'Updates: ', liveState)),
    h('section', { class: 'card', 'aria-labelledby': 'job-progress-label' },
      h('h2', { id: 'job-progress-label' }, 'Progress'),
      h('p', { class: 'overall' }, overall, ' ', overallText),
      summary,
      h('div', { class: 'actions' }, Object.values(buttons), report),
      error),
    h('section', { 'aria-labelledby': 'counts-h' }, h('h2', { id: 'counts-h' }, 'Tasks per state'), counts),
    h('section', { 'aria-labelledby': 'chart-h' }, h('h2', { id: 'chart-h' }, 'Upgrades over time'), chart),
    h('section', { 'aria-labelledby': 'tasks-h' },
      h('h2', { id: 'tasks-h' }, 'Devices'),
      note,
      h('table', { id: 'tasks' },
        h('caption', {}, 'One row per device; failures show their reason'),
        h('thead', {}, h('tr', {}, ['Device', 'State', 'Progress', 'Attempts', 'Reason / last report', 'Updated', 'Actions']
          .map((t) => h('th', { scope: 'col' }, t)))),
        tbody)));
  renderJob(first);
  drawChart();
  startLive(); // its first snapshot brings the tasks

  return () => { if (stopLive) stopLive(); stopLive = null; };
}

// Succeeded and failed tasks over time, cumulative, as an SVG chart (drawn with attributes only: the CSP
// refuses inline styles); its label says the same in words.
function timelineChart(timeline, total) {
  const points = timeline.points;
  const W = 640;
  const H = 180;
  const pad = { left: 44, right: 12, top: 10, bottom: 28 };
  const t0 = Date.parse(points[0].at);
  const t1 = Math.max(Date.parse(points[points.length - 1].at), t0 + 1000);
  const top = Math.max(total, 1);
  const x = (at) => pad.left + ((Date.parse(at) - t0) / (t1 - t0)) * (W - pad.left - pad.right);
  const y = (n) => H - pad.bottom - (n / top) * (H - pad.top - pad.bottom);
  const line = (key) => points.map((p) => `${x(p.at).toFixed(1)},${y(p[key]).toFixed(1)}`).join(' ');
  const last = points[points.length - 1];
  const minutes = Math.round((t1 - t0) / 60000);
  const label = `Upgrades over time: ${last.succeeded} succeeded and ${last.failed} failed of ${total}, over ${minutes} minute(s)`;
  const chart = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': label, class: 'timeline' });
  chart.append(
    svg('line', { x1: pad.left, y1: y(0), x2: W - pad.right, y2: y(0), class: 'axis' }),
    svg('line', { x1: pad.left, y1: y(top), x2: W - pad.right, y2: y(top), class: 'grid-line' }),
    svg('polyline', { points: line('succeeded'), class: 'series-succeeded' }),
    svg('polyline', { points: line('failed'), class: 'series-failed' }));
  const text = (attrs, words) => { const el = svg('text', attrs); el.textContent = words; return el; };
  chart.append(
    text({ x: pad.left - 6, y: y(top) + 4, 'text-anchor': 'end', class: 'tick' }, String(top)),
    text({ x: pad.left - 6, y: y(0) + 4, 'text-anchor': 'end', class: 'tick' }, '0'),
    text({ x: pad.left, y: H - 8, class: 'tick' }, new Date(t0).toLocaleTimeString()),
    text({ x: W - pad.right, y: H - 8, 'text-anchor': 'end', class: 'tick' }, new Date(t1).toLocaleTimeString()));
  return [chart, h('figcaption', { class: 'legend' },
    h('span', { class: 'key key-succeeded' }, `${last.succeeded} succeeded`),
    h('span', { class: 'key key-failed' }, `${last.failed} failed or timed out`))];
}

function taskRow(jobId, task, error) {
  const state = h('td');
  const bar = h('progress', { max: 100, value: 0, 'aria-label': `Progress of ${task.device}` });
  const percent = h('span', { class: 'num' });
  const attempts = h('td', { class: 'num' });
  const desc = h('td', { class: 'reason' });
  const updated = h('td');
  const [pk, ...rest] = task.device.split('/');
  const dn = rest.join('/');
  const path = `/jobs/${jobId}/tasks/${encodeURIComponent(pk)}/${encodeURIComponent(dn)}`;
  const cancel = h('button', { type: 'button', class: 'quiet', 'aria-label': `Cancel the task of ${task.device}` }, 'Cancel');
  const history = h('button', { type: 'button', class: 'quiet', 'aria-expanded': 'false', 'aria-label': `History of ${task.device}` }, 'History');
  const detail = h('tr', { class: 'detail', hidden: true }, h('td', { colspan: 7 }));
  cancel.addEventListener('click', async () => {
    try {
      await api('POST', `${path}/cancel`);
      say(`The task of ${task.device} was cancelled.`);
    } catch (failure) {
      if (!(failure instanceof SignedOut)) error.textContent = `Cancel ${task.device}: ${errorText(failure)}`;
    }
  });
  history.addEventListener('click', () => toggleHistory(history, detail, path));
  const tr = h('tr', { 'data-device': task.device },
    h('th', { scope: 'row' }, deviceLink(task.device)), state,
    h('td', { class: 'bar-cell' }, bar, ' ', percent), attempts, desc, updated,
    h('td', { class: 'row-actions' }, history, cancel));
  return {
    tr,
    detail,
    update(t) {
      fill(state, stateBadge(t.state));
      bar.value = t.progress;
      bar.setAttribute('class', `task-${t.state}`); // a failed task's bar is not a blue one
      percent.textContent = `${t.progress} %`;
      attempts.textContent = String(t.attempts);
      desc.textContent = t.desc || '—';
      fill(updated, time(t.updated_at));
      cancel.hidden = !UNFINISHED.has(t.state);
    },
  };
}

async function toggleHistory(button, detail, path) {
  const open = button.getAttribute('aria-expanded') === 'true';
  button.setAttribute('aria-expanded', String(!open));
  detail.hidden = open;
  if (open) return;
  const cell = detail.firstChild;
  fill(cell, h('p', { class: 'muted' }, 'Loading…'));
  try {
    const { history } = await api('GET', `${path}/history`);
    fill(cell, table('State changes and progress reports',
      ['When', 'State', 'Progress', 'Note'],
      history.map((e) => h('tr', {}, h('td', {}, time(e.at)), h('td', {}, stateBadge(e.state)),
        h('td', { class: 'num' }, `${e.progress} %`), h('td', { class: 'reason' }, e.desc || '—'))),
      { class: 'history' }));
  } catch (failure) {
    if (!(failure instanceof SignedOut)) fill(cell, h('p', { class: 'error' }, errorText(failure)));
  }
}

// --------------------------------------------------------------------------------------- devices

const DEVICE_PAGE = 500; // devices a page of the console shows

async function devicesPage(main, _params, query, alive) {
  const filters = {};
  for (const name of ['product_key', 'module', 'version', 'online', 'group']) {
    if (query.get(name)) filters[name] = query.get(name);
  }
  // Searched by the broker over every device: "part" of a name, or "pk/part" for one product's.
  const search = (query.get('q') || '').trim();
  if (search) {
    const [product, part] = search.includes('/') ? search.split('/', 2) : ['', search];
    if (product && !filters.product_key) filters.product_key = product;
    if (part) filters.name = part;
  }
  const offset = Math.max(0, Number(query.get('offset')) || 0);
  const params = new URLSearchParams({ ...filters, limit: String(DEVICE_PAGE), offset: String(offset) });
  const meta = {};
  const shown = await api('GET', `/devices?${params}`, undefined, meta);
  if (!alive()) return;
  const total = meta.total ?? shown.length;
  // Pages of the broker's answer: the same search, another offset.
  const pageLink = (to, words) => {
    const next = new URLSearchParams(query);
    if (to) next.set('offset', String(to)); else next.delete('offset');
    return h('a', { href: `#/devices?${next}`, class: 'button quiet' }, words);
  };
  const paging = h('nav', { class: 'actions', 'aria-label': 'Pages of devices' },
    offset > 0 ? pageLink(Math.max(0, offset - DEVICE_PAGE), 'Previous page') : null,
    offset + shown.length < total ? pageLink(offset + shown.length, 'Next page') : null);
  const field = (name, label, control) => h('div', { class: 'field' }, h('label', { for: `dev-${name}` }, label), control);
  const text = (name) => h('input', { id: `dev-${name}`, name, value: query.get(name) || '' });
  const online = h('select', { id: 'dev-online', name: 'online' },
    [['', 'any'], ['true', 'online'], ['false', 'offline']].map(([value, label]) =>
      h('option', { value, selected: (query.get('online') || '') === value }, label)));
  const form = h('form', { role: 'search', class: 'card', 'aria-label': 'Search devices' },
    h('div', { class: 'grid' },
      field('q', 'Name contains', h('input', { id: 'dev-q', name: 'q', type: 'search', value: query.get('q') || '' })),
      field('product_key', 'Product key', text('product_key')),
      field('module', 'Module', text('module')),
      field('version', 'Version', text('version')),
      field('group', 'Group', text('group')),
      field('online', 'Connection', online)),
    h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Search')));
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const next = new URLSearchParams();
    for (const [name, value] of new FormData(form)) if (value) next.set(name, value);
    location.hash = `#/devices${next.toString() ? `?${next}` : ''}`;
  });
  const rows = shown.map((d) => {
    const ref = `${d.product_key}/${d.device_name}`;
    return h('tr', {},
      h('th', { scope: 'row' }, deviceLink(ref)),
      h('td', {}, h('span', { class: d.online ? 'online' : 'offline' }, d.online ? 'online' : 'offline')),
      h('td', {}, h('ul', { class: 'plain' }, Object.entries(d.modules).map(([m, v]) => h('li', {}, `${m}: ${v}`)))),
      h('td', {}, (d.groups || []).join(', ') || '—'),
      h('td', {}, d.enabled ? 'enabled' : 'disabled'),
      h('td', {}, time(d.last_seen)));
  });
  fill(main, h('h1', {}, 'Devices'), form,
    h('p', { class: 'muted', role: 'status', id: 'devices-count' }, total > shown.length
      ? `${total} device(s); ${offset + 1} to ${offset + shown.length} shown.` : `${total} device(s).`),
    rows.length ? table('Devices', ['Device', 'Connection', 'Module versions', 'Groups', 'Login', 'Last seen'], rows, { id: 'devices' }) : null,
    paging,
    addDeviceCard(), importDevicesCard());
}

// A device's secret is shown once, when it is made: the broker keeps it for the device's logins only.
function secretShown(ref, secret) {
  return h('div', { class: 'secret', role: 'status' },
    h('p', {}, `The secret of ${ref}, shown this once: give it to the device (its DeviceSecret).`),
    h('code', { class: 'hash', 'data-device': ref }, secret));
}

function addDeviceCard() {
  const result = h('div', { id: 'add-device-result' });
  const error = h('p', { class: 'error', role: 'alert' });
  const pk = h('input', { id: 'add-pk', name: 'product_key', required: true, spellcheck: 'false' });
  const dn = h('input', { id: 'add-dn', name: 'device_name', required: true, spellcheck: 'false' });
  const form = h('form', { class: 'card', 'aria-labelledby': 'add-device-h' },
    h('h2', { id: 'add-device-h' }, 'Add a device'),
    h('div', { class: 'grid' },
      h('div', { class: 'field' }, h('label', { for: 'add-pk' }, 'Product'), pk),
      h('div', { class: 'field' }, h('label', { for: 'add-dn' }, 'Device name'), dn)),
    h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Add device')), error, result);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    error.textContent = '';
    try {
      const made = await api('POST', '/devices', { product_key: pk.value.trim(), device_name: dn.value.trim() });
      const ref = `${made.product_key}/${made.device_name}`;
      fill(result, secretShown(ref, made.device_secret), h('p', {}, deviceLink(ref)));
      say(`${ref} added.`);
    } catch (failure) {
      if (!(failure instanceof SignedOut)) error.textContent = `Not added: ${errorText(failure)}`;
    }
  });
  return form;
}

function importDevicesCard() {
  const report = h('div', { id: 'import-report' });
  const error = h('p', { class: 'error', role: 'alert' });
  const file = h('input', { id: 'import-file', type: 'file', accept: '.csv,.txt,text/csv,text/plain' });
  const card = h('section', { class: 'card', 'aria-labelledby': 'import-h' },
    h('h2', { id: 'import-h' }, 'Import devices'),
    h('div', { class: 'field' }, h('label', { for: 'import-file' }, 'CSV file of devices'), file,
      h('small', {}, 'product_key,device_name[,device_secret] per line; a header line is skipped. Devices that exist are left as they are.')),
    error, report);
  file.addEventListener('change', async () => {
    const [chosen] = file.files;
    if (!chosen) return;
    error.textContent = '';
    try {
      const response = await fetch(`${API}/devices/import`, {
        method: 'POST', credentials: 'same-origin', headers: { ...authHeaders(), 'Content-Type': 'text/csv' },
        body: await chosen.text(),
      });
      if (response.status === 401) throw signOut('The sign-in was not accepted any more; sign in again.');
      const doc = await response.json();
      if (!response.ok) throw new ApiError(response.status, doc);
      showImport(report, chosen.name, doc);
      say(`${chosen.name}: ${doc.created.length} created, ${doc.existing} existed, ${doc.errors.length} refused.`);
    } catch (failure) {
      if (!(failure instanceof SignedOut)) error.textContent = `Not imported: ${errorText(failure)}`;
    } finally {
      file.value = '';
    }
  });
  return card;
}

function showImport(report, name, doc) {
  const secrets = ['product_key,device_name,device_secret',
    ...doc.created.map((d) => `${d.product_key},${d.device_name},${d.device_secret}`)].join('\n');
  const link = doc.created.length ? h('a', {
    href: URL.createObjectURL(new Blob([`${secrets}\n`], { type: 'text/csv' })), download: `secrets-${name}`,
  }, `Download the ${doc.created.length} new secret(s) (CSV, shown this once)`) : null;
  fill(report,
    h('p', { id: 'import-summary' }, `${name}: ${doc.rows} row(s); ${doc.created.length} created, ${doc.existing} existed, ${doc.errors.length} refused.`),
    link,
    doc.errors.length ? table('Refused lines', ['Line', 'Why'],
      doc.errors.map((e) => h('tr', {}, h('td', { class: 'num' }, String(e.line)), h('td', { class: 'reason' }, e.message)))) : null);
}

async function devicePage(main, [pk, dn], _query, alive) {
  const path = `/devices/${encodeURIComponent(pk)}/${encodeURIComponent(dn)}`;
  const device = await api('GET', path);
  if (!alive()) return;
  const ref = `${pk}/${dn}`;
  const error = h('p', { class: 'error', role: 'alert' });
  const toggle = h('button', { type: 'button', class: device.enabled ? 'danger' : '' },
    device.enabled ? 'Disable login' : 'Enable login');
  toggle.addEventListener('click', async () => {
    try {
      await api('PATCH', path, { enabled: !device.enabled });
      say(`${ref} ${device.enabled ? 'disabled' : 'enabled'}.`);
      route(false);
    } catch (failure) {
      if (!(failure instanceof SignedOut)) error.textContent = errorText(failure);
    }
  });
  const groupsInput = h('input', { id: 'device-groups', value: (device.groups || []).join(', '), spellcheck: 'false', 'aria-describedby': 'device-groups-help' });
  const saveGroups = h('button', { type: 'button', class: 'quiet' }, 'Save groups');
  saveGroups.addEventListener('click', async () => {
    try {
      const groups = groupsInput.value.split(/[\s,]+/).filter(Boolean);
      const made = await api('PATCH', path, { groups });
      groupsInput.value = made.groups.join(', ');
      say(`${ref} is in ${made.groups.length ? `group(s) ${made.groups.join(', ')}` : 'no group'}.`);
    } catch (failure) {
      if (!(failure instanceof SignedOut)) error.textContent = errorText(failure);
    }
  });
  const shownSecret = h('div', { id: 'device-secret' });
  const reveal = h('button', { type: 'button', class: 'quiet' }, 'Show secret');
  reveal.addEventListener('click', async () => {
    try {
      const got = await api('GET', `${path}/secret`);
      fill(shownSecret, h('div', { class: 'secret', role: 'status' },
        h('p', {}, `The secret of ${ref} (your reading it is in the audit log):`),
        h('code', { class: 'hash', 'data-device': ref }, got.device_secret)));
    } catch (failure) {
      if (!(failure instanceof SignedOut)) error.textContent = errorText(failure);
    }
  });
  const rotate = h('button', { type: 'button', class: 'quiet' }, 'Rotate secret');
  rotate.addEventListener('click', async () => {
    if (!window.confirm(`Give ${ref} a new secret? Its current one stops working for new logins at once.`)) return;
    try {
      const made = await api('POST', `${path}/secret`);
      fill(shownSecret, secretShown(ref, made.device_secret));
      say(`${ref} has a new secret.`);
    } catch (failure) {
      if (!(failure instanceof SignedOut)) error.textContent = errorText(failure);
    }
  });
  const remove = h('button', { type: 'button', class: 'danger' }, 'Delete device');
  remove.addEventListener('click', async () => {
    if (!window.confirm(`Delete ${ref}? Its login stops, and its versions and upgrade history go.`)) return;
    try {
      await api('DELETE', path);
      say(`${ref} deleted.`);
      location.hash = '#/devices';
    } catch (failure) {
      if (!(failure instanceof SignedOut)) error.textContent = errorText(failure);
    }
  });
  const modules = Object.entries(device.modules).map(([m, v]) => h('tr', {}, h('th', { scope: 'row' }, m), h('td', {}, v)));
  const tasks = device.tasks.flatMap((t) => {
    const history = h('button', { type: 'button', class: 'quiet', 'aria-expanded': 'false', 'aria-label': `History of the task in job ${t.job_id}` }, 'History');
    const detail = h('tr', { class: 'detail', hidden: true }, h('td', { colspan: 8 }));
    history.addEventListener('click', () => toggleHistory(history, detail,
      `/jobs/${t.job_id}/tasks/${encodeURIComponent(pk)}/${encodeURIComponent(dn)}`));
    return [h('tr', {},
      h('td', {}, h('a', { href: `#/jobs/${t.job_id}` }, `Job #${t.job_id}`)),
      h('td', {}, t.module),
      h('td', {}, t.target_version),
      h('td', {}, stateBadge(t.state)),
      h('td', { class: 'bar-cell' }, h('progress', { max: 100, value: t.progress, class: `task-${t.state}`, 'aria-label': `Progress in job ${t.job_id}` }), ` ${t.progress} %`),
      h('td', { class: 'reason' }, t.desc || '—'),
      h('td', {}, time(t.updated_at)),
      h('td', {}, history)), detail];
  });
  fill(main,
    h('h1', {}, ref),
    h('dl', { class: 'pairs card' },
      h('dt', {}, 'Connection'), h('dd', {}, h('span', { class: device.online ? 'online' : 'offline' }, device.online ? 'online' : 'offline')),
      h('dt', {}, 'Last seen'), h('dd', {}, time(device.last_seen)),
      h('dt', {}, 'Login'), h('dd', {}, device.enabled ? 'enabled' : 'disabled', ' ', toggle),
      h('dt', {}, h('label', { for: 'device-groups' }, 'Groups')),
      h('dd', {}, groupsInput, ' ', saveGroups,
        h('small', { id: 'device-groups-help', class: 'muted' }, ' Comma-separated; a job may target a group.'))),
    h('div', { class: 'actions' }, reveal, rotate, remove),
    shownSecret,
    error,
    h('section', { 'aria-labelledby': 'modules-h' }, h('h2', { id: 'modules-h' }, 'Module versions'),
      modules.length ? table('Versions the device reported', ['Module', 'Version'], modules, { id: 'modules' })
        : h('p', { class: 'muted' }, 'The device has not reported a version.')),
    h('section', { 'aria-labelledby': 'device-tasks-h' }, h('h2', { id: 'device-tasks-h' }, 'Upgrade history'),
      tasks.length ? table('Tasks, newest first', ['Job', 'Module', 'Target', 'State', 'Progress', 'Reason / last report', 'Updated', 'Details'], tasks, { id: 'device-tasks' })
        : h('p', { class: 'muted' }, 'No upgrade tasks yet.')));
}

// ------------------------------------------------------------------------------------------ start

window.addEventListener('hashchange', () => route(true));
document.addEventListener('DOMContentLoaded', () => {
  // The skip link moves the focus without touching the hash, which names the page.
  $('.skip').addEventListener('click', (event) => {
    event.preventDefault();
    $('#main').focus();
  });
  $('#sign-out').addEventListener('click', async () => {
    if (sessionStorage.getItem(SESSION_KEY)) {
      // the cookie is HttpOnly: the broker clears it
      await fetch(`${API}/session`, { method: 'DELETE', credentials: 'same-origin', headers: CSRF }).catch(() => null);
    }
    signOut('Signed out.');
    say('Signed out.');
  });
  route(false);
});
