/* longtake web monitors: shared helpers (no modules, exposed as window.LT). */
'use strict';
(function () {
  const KEY = 'longtake.key';
  const TERMINAL = new Set(['done', 'failed', 'cancelled', 'deleted']);

  const $ = (sel, root = document) => root.querySelector(sel);

  function getKey() {
    try { return sessionStorage.getItem(KEY) || ''; } catch (_) { return ''; }
  }
  function setKey(k) { try { sessionStorage.setItem(KEY, k); } catch (_) { /* private mode */ } }
  function clearKey() { try { sessionStorage.removeItem(KEY); } catch (_) { /* ignore */ } }

  /* An HTTP error; message is "field: error" from {"detail": {"field", "error"}} when present. */
  class ApiError extends Error {
    constructor(status, message, field) {
      super(message);
      this.status = status;
      this.field = field || null;
    }
  }

  function detailText(body) {
    const d = body && typeof body === 'object' ? body.detail : null;
    if (!d) return '';
    if (typeof d === 'string') return d;
    if (Array.isArray(d)) { // FastAPI's default validation list
      return d.map(x => (x && x.loc ? x.loc.slice(1).join('.') + ': ' : '') + (x && x.msg ? x.msg : String(x))).join('; ');
    }
    if (typeof d === 'object') return (d.field ? d.field + ': ' : '') + (d.error || '');
    return String(d);
  }

  async function toError(res) {
    let body = null;
    try { body = await res.json(); } catch (_) { /* not JSON */ }
    const field = body && body.detail && typeof body.detail === 'object' ? body.detail.field : null;
    return new ApiError(res.status, detailText(body) || ('HTTP ' + res.status + (res.statusText ? ' ' + res.statusText : '')), field);
  }

  const LT = {
    KEY, TERMINAL, $, getKey, setKey, clearKey, ApiError,
    onAuthFail: null, // set by the page: called after a stored key got 401/403
  };

  function headersFor(opts) {
    const h = {};
    const key = opts.key !== undefined ? opts.key : getKey();
    if (key) h.Authorization = 'Bearer ' + key;
    if (opts.body !== undefined) h['Content-Type'] = 'application/json';
    if (opts.accept) h.Accept = opts.accept;
    return h;
  }

  function authFailed(res, opts) {
    if ((res.status === 401 || res.status === 403) && opts.key === undefined) {
      clearKey();
      if (typeof LT.onAuthFail === 'function') LT.onAuthFail();
    }
  }

  /* fetch(path) with the bearer key. Returns parsed JSON (or text when opts.text). Throws ApiError. */
  LT.api = async function api(path, opts = {}) {
    const res = await fetch(path, {
      method: opts.method || (opts.body !== undefined ? 'POST' : 'GET'),
      headers: headersFor(opts),
      body: opts.body !== undefined ? JSON.stringify(opts.body) : undefined,
      signal: opts.signal,
      cache: 'no-store',
      credentials: 'omit',
    });
    if (!res.ok) {
      authFailed(res, opts);
      throw await toError(res);
    }
    if (opts.text) return res.text();
    const type = res.headers.get('content-type') || '';
    return type.includes('json') ? res.json() : res.text();
  };

  /* Server-sent events over fetch (EventSource cannot send Authorization).
     Calls onEvent(name, data) per frame (data JSON-parsed when possible). Resolves when the stream
     closes, quietly when aborted through opts.signal; throws ApiError on a non-2xx answer. */
  LT.sse = async function sse(path, onEvent, opts = {}) {
    let res;
    try {
      res = await fetch(path, {
        headers: headersFor({ key: opts.key, accept: 'text/event-stream' }),
        signal: opts.signal, cache: 'no-store', credentials: 'omit',
      });
    } catch (e) {
      if (e.name === 'AbortError') return;
      throw e;
    }
    if (!res.ok) {
      authFailed(res, opts);
      throw await toError(res);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = '';
    const dispatch = frame => {
      let event = 'message';
      const data = [];
      for (const line of frame.split('\n')) {
        if (!line || line.startsWith(':')) continue;
        const i = line.indexOf(':');
        const name = i < 0 ? line : line.slice(0, i);
        let value = i < 0 ? '' : line.slice(i + 1);
        if (value.startsWith(' ')) value = value.slice(1);
        if (name === 'event') event = value;
        else if (name === 'data') data.push(value);
      }
      if (!data.length) return;
      const text = data.join('\n');
      let parsed = text;
      try { parsed = JSON.parse(text); } catch (_) { /* keep text */ }
      onEvent(event, parsed);
    };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, '\n');
        let cut;
        while ((cut = buf.indexOf('\n\n')) >= 0) {
          const frame = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          dispatch(frame);
        }
      }
      if (buf.trim()) dispatch(buf);
    } catch (e) {
      if (e.name !== 'AbortError') throw e;
    } finally {
      try { reader.releaseLock(); } catch (_) { /* ignore */ }
    }
  };

  /* Login form (#login, #key, #login-submit, #login-error). verify(key) must resolve when the key
     works (it is passed the key explicitly) and throw ApiError otherwise. */
  LT.setupLogin = function setupLogin(verify, onSuccess) {
    const form = $('#login'), input = $('#key'), err = $('#login-error'), btn = $('#login-submit');
    form.addEventListener('submit', async ev => {
      ev.preventDefault();
      const key = input.value.trim();
      err.hidden = true;
      if (!key) { err.textContent = 'enter a key'; err.hidden = false; return; }
      btn.disabled = true;
      try {
        const info = await verify(key);
        setKey(key);
        input.value = '';
        onSuccess(info);
      } catch (e) {
        err.textContent = e.status === 401 || e.status === 403 ? 'wrong key' : 'login failed: ' + e.message;
        err.hidden = false;
      } finally {
        btn.disabled = false;
      }
    });
  };

  LT.showLogin = function showLogin() {
    $('#login-view').hidden = false;
    $('#app').hidden = true;
    const session = $('#session');
    if (session) session.hidden = true;
    $('#key').focus();
  };
  LT.showApp = function showApp() {
    $('#login-view').hidden = true;
    $('#login-error').hidden = true;
    $('#app').hidden = false;
    const session = $('#session');
    if (session) session.hidden = false;
  };

  /* ---- formatting ---- */
  LT.percent = function percent(progress, status) {
    if (status === 'done') return 100;
    const p = progress || {};
    const done = Number(p.window_steps_done), total = Number(p.window_steps_total);
    if (!Number.isFinite(done) || !Number.isFinite(total) || total <= 0) return 0;
    return Math.max(0, Math.min(100, Math.round((100 * done) / total)));
  };

  /* A job's <progress> bar and its "N %" label at the share it reached. A failed job's bar is red (class
     bar-failed), a cancelled one's grey (bar-cancelled): a job that failed in its last phase has every window
     step done, and must not look like a finished one. */
  LT.showProgress = function showProgress(bar, label, progress, status) {
    const pct = LT.percent(progress, status);
    bar.value = pct;
    label.textContent = pct + ' %';
    LT.barStatus(bar, status);
  };

  LT.barStatus = function barStatus(bar, status) {
    bar.classList.toggle('bar-failed', status === 'failed');
    bar.classList.toggle('bar-cancelled', status === 'cancelled');
  };

  LT.eta = function eta(progress, status) {
    const s = progress ? progress.eta_s : null;
    if (s === null || s === undefined || !Number.isFinite(Number(s)) || TERMINAL.has(status)) return '-';
    const t = Math.max(0, Math.round(Number(s)));
    if (t < 60) return t + ' s';
    const h = Math.floor(t / 3600), m = Math.floor((t % 3600) / 60), sec = t % 60;
    return (h ? h + ' h ' : '') + m + ' min ' + String(sec).padStart(2, '0') + ' s';
  };

  LT.date = function date(iso) {
    if (!iso) return '-';
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    const p = n => String(n).padStart(2, '0');
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  };

  // a story's shot, before its prompt in a job list: "STORY:SHOT after JOB " ('' for a job of no story)
  LT.shotLabel = function shotLabel(job) {
    if (!job.story) return '';
    const after = Array.isArray(job.depends) && job.depends.length ? ` after ${job.depends[0].slice(0, 8)}` : '';
    return `${job.story.film}:${job.story.shot}${after} `;
  };

  LT.firstPrompt = function firstPrompt(request) {
    const r = request || {};
    if (typeof r.prompt === 'string') return r.prompt;
    if (Array.isArray(r.timeline) && r.timeline.length) {
      const k = r.timeline[0];
      return k && typeof k.prompt === 'string' ? k.prompt : '';
    }
    return '';
  };

  LT.truncate = (s, n = 80) => (s.length > n ? s.slice(0, n - 1) + '\u2026' : s);

  LT.steps = function steps(progress) {
    const p = progress || {};
    return p.step === null || p.step === undefined ? '-' : p.step + '/' + (p.steps === null || p.steps === undefined ? '?' : p.steps);
  };

  /* createElement shorthand: el('td', {className: 'x', textContent: 'y'}, child...) */
  LT.el = function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
      if (k.startsWith('data-')) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) node.append(c);
    return node;
  };

  LT.setStatus = function setStatus(node, status) {
    node.textContent = status || '-';
    node.className = node.className.split(' ').filter(c => !c.startsWith('st-')).join(' ');
    if (status) node.classList.add('st-' + status);
  };

  /* The window x step grid of a job's progress ({windows: steps predicted per window, running: windows
     predicting now, steps}): a row per window, a cell per step, filled as the wavefront advances. Rebuilt
     only when its shape changes; the cells' classes (done, running) are set on every poll. */
  LT.renderGrid = function renderGrid(node, progress) {
    const p = progress || {};
    const windows = Array.isArray(p.windows) ? p.windows : [];
    const steps = p.steps || 0;
    node.hidden = !windows.length || !steps;
    if (node.hidden) return;
    if (node.dataset.shape !== windows.length + 'x' + steps) {
      node.dataset.shape = windows.length + 'x' + steps;
      node.replaceChildren();
      node.style.gridTemplateColumns = `repeat(${steps}, minmax(3px, 14px))`;
      for (let w = 0; w < windows.length; w++) {
        for (let s = 0; s < steps; s++) {
          node.append(LT.el('span', { className: 'cell', title: `window ${w + 1}, step ${s + 1}`, 'data-w': w, 'data-s': s }));
        }
      }
    }
    const running = new Set(Array.isArray(p.running) ? p.running : []);
    for (const cell of node.children) {
      const win = +cell.dataset.w, step = +cell.dataset.s;
      const done = step < windows[win];
      cell.classList.toggle('done', done);
      cell.classList.toggle('running', !done && running.has(win) && step === windows[win]);
    }
  };

  function bytes(n) {
    if (!n) return '0';
    const units = ['B', 'KB', 'MB', 'GB', 'TB'];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return (i ? n.toFixed(1) : n) + ' ' + units[i];
  }
  LT.bytes = bytes;

  // the workers table's columns after the leading ones (`heads`: a farm's runner, job and worker; serve's replica)
  const WORKER_HEADS = ['Node', 'State', 'Now', 'Utilisation (5 min)', 'Window-steps', 'Busy s', 'Bytes',
    'Failed tasks', 'Restarts'];

  /* A table body of workers (pool.WorkerBook's snapshot), each row {worker or replica, node, state, now, window,
     step, busy_s, utilisation, window_steps, bytes, failures, restarts} with `extra` (e.g. the job) first; the
     table's header, once, from `heads` and WORKER_HEADS. */
  LT.renderWorkers = function renderWorkers(tbody, workers, heads = ['Replica'], extra = () => []) {
    const thead = tbody.parentElement.tHead;
    if (thead && !thead.rows.length) {
      const tr = LT.el('tr');
      for (const h of [...heads, ...WORKER_HEADS]) tr.append(LT.el('th', { textContent: h }));
      thead.append(tr);
    }
    tbody.replaceChildren();
    for (const w of workers) {
      const now = w.window === null || w.window === undefined ? (w.now || '-')
        : `window ${w.window + 1}, step ${w.step + 1}`;
      const util = Math.round(100 * (w.utilisation || 0));
      const cells = [...extra(w), w.replica ?? w.worker, w.node || '-', w.state, now,
        LT.el('span', {}, LT.el('meter', { className: 'util', min: 0, max: 100, value: util }), ` ${util} %`),
        w.window_steps ?? 0, (w.busy_s ?? 0).toFixed(1), bytes(w.bytes), w.failures ?? 0, w.restarts ?? 0];
      const tr = LT.el('tr', { className: 'worker st-' + (w.state || '') });
      for (const c of cells) tr.append(LT.el('td', {}, c instanceof Node ? c : String(c)));
      tbody.append(tr);
    }
  };

  window.LT = LT;
})();
