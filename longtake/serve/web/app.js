/* longtake serve monitor: login, jobs list, new job form, job page (hash routing). */
'use strict';
(function () {
  const { $, api, el } = LT;
  const LIST_POLL_MS = 3000;
  const MAX_LIST_STREAMS = 3;
  const ACTIVE = new Set(['queued', 'running', 'paused']);

  let view = null; // {abort: AbortController, timers: [], stop()} of the shown route

  function showError(node, msg) {
    node.textContent = msg || '';
    node.hidden = !msg;
  }

  /* ---------- session ---------- */

  async function verifyKey(key) {
    return api('/v1/me', { key });
  }

  function setWhoami(me) {
    $('#whoami').textContent = (me && me.name ? me.name : '?') + (me && me.admin ? ' (admin)' : '');
  }

  function loggedIn(me) {
    setWhoami(me);
    LT.showApp();
    route();
  }

  function logout() {
    stopView();
    LT.clearKey();
    $('#whoami').textContent = '';
    LT.showLogin();
  }

  LT.onAuthFail = logout;

  /* ---------- routing ---------- */

  function stopView() {
    if (!view) return;
    view.abort.abort();
    view.timers.forEach(clearTimeout);
    if (view.stop) view.stop();
    view = null;
  }

  function newView() {
    stopView();
    view = { abort: new AbortController(), timers: [], stop: null };
    return view;
  }

  function route() {
    if (!LT.getKey()) { logout(); return; }
    const hash = location.hash || '#/';
    let m;
    for (const id of ['jobs-view', 'new-view', 'job-view']) $('#' + id).hidden = true;
    $('#nav-jobs').classList.toggle('active', hash === '#/' || hash === '#');
    $('#nav-new').classList.toggle('active', hash === '#/new');
    if (hash === '#/new') showNew();
    else if ((m = hash.match(/^#\/jobs\/([^/?#]+)$/))) showJob(decodeURIComponent(m[1]));
    else showJobs();
  }

  /* ---------- jobs list ---------- */

  function rowFor(job) {
    const tbody = $('#jobs tbody');
    let tr = tbody.querySelector(`tr[data-id="${CSS.escape(job.id)}"]`);
    if (!tr) {
      const link = el('a', { className: 'job-link', href: '#/jobs/' + encodeURIComponent(job.id), textContent: job.id });
      tr = el('tr', { 'data-id': job.id },
        el('td', { className: 'id' }, link),
        el('td', { className: 'status' }),
        el('td', { className: 'prompt' }),
        el('td', { className: 'prog' }, el('progress', { className: 'progress', max: 100, value: 0 }), ' ', el('span', { className: 'percent' })),
        el('td', { className: 'eta' }),
        el('td', { className: 'created' }));
    }
    return tr;
  }

  function updateRow(tr, job) {
    LT.setStatus(tr.querySelector('td.status'), job.status);
    if (job.request) {
      const prompt = LT.shotLabel(job) + LT.firstPrompt(job.request);
      const td = tr.querySelector('td.prompt');
      td.textContent = LT.truncate(prompt, 60);
      td.title = prompt;
    }
    LT.showProgress(tr.querySelector('progress.progress'), tr.querySelector('span.percent'), job.progress, job.status);
    tr.querySelector('td.eta').textContent = LT.eta(job.progress, job.status);
    if (job.created) {
      const td = tr.querySelector('td.created');
      td.textContent = LT.date(job.created);
      td.title = job.created;
    }
  }

  function showJobs() {
    const v = newView();
    $('#jobs-view').hidden = false;
    const streams = new Map(); // job id -> AbortController
    v.stop = () => streams.forEach(c => c.abort());

    const openStream = id => {
      const ctl = new AbortController();
      streams.set(id, ctl);
      LT.sse(`/v1/videos/${encodeURIComponent(id)}/events`, (event, data) => {
        const tr = $('#jobs tbody').querySelector(`tr[data-id="${CSS.escape(id)}"]`);
        if (!tr || !data || typeof data !== 'object') return;
        if (event === 'progress') updateRow(tr, { ...data, id });
        else if (event === 'end') {
          LT.setStatus(tr.querySelector('td.status'), data.status);
          tr.querySelector('td.eta').textContent = '-';
          if (data.status === 'done') { tr.querySelector('progress.progress').value = 100; tr.querySelector('span.percent').textContent = '100 %'; }
          LT.barStatus(tr.querySelector('progress.progress'), data.status);
        }
        else if (event === 'deleted') LT.setStatus(tr.querySelector('td.status'), 'deleted');
      }, { signal: ctl.signal }).catch(() => {}).finally(() => {
        if (streams.get(id) === ctl) streams.delete(id);
      });
    };

    const poll = async () => {
      try {
        const workers = api('/v1/workers', { signal: v.abort.signal });
        workers.catch(() => {}); // (the list's error is the one shown)
        const page = await api('/v1/videos?limit=50&offset=0', { signal: v.abort.signal });
        if (v !== view) return;
        const replicas = (await workers).workers || [];
        LT.renderWorkers($('#workers tbody'), replicas);
        $('#no-workers').hidden = replicas.length > 0;
        const jobs = Array.isArray(page.data) ? page.data : [];
        const tbody = $('#jobs tbody');
        const keep = new Set();
        for (const job of jobs) {
          const tr = rowFor(job);
          updateRow(tr, job);
          tbody.appendChild(tr); // (re)orders as the server does: newest first
          keep.add(job.id);
        }
        for (const tr of [...tbody.rows]) if (!keep.has(tr.dataset.id)) tr.remove();
        $('#no-jobs').hidden = jobs.length > 0;
        $('#jobs-total').textContent = jobs.length ? `showing ${jobs.length} of ${page.total ?? jobs.length}` : '';
        showError($('#jobs-error'), '');
        // live streams only for running jobs, at most MAX_LIST_STREAMS
        const running = jobs.filter(j => j.status === 'running').map(j => j.id);
        for (const [id, ctl] of streams) if (!running.includes(id)) { ctl.abort(); streams.delete(id); }
        for (const id of running) {
          if (streams.size >= MAX_LIST_STREAMS) break;
          if (!streams.has(id)) openStream(id);
        }
      } catch (e) {
        if (e.name === 'AbortError' || v !== view) return;
        showError($('#jobs-error'), e.message);
      }
      if (v === view) v.timers.push(setTimeout(poll, LIST_POLL_MS));
    };
    poll();
  }

  /* ---------- new job ---------- */

  function syncMode() {
    const timeline = $('#mode-timeline').checked;
    $('#prompt-field').hidden = timeline;
    $('#timeline-field').hidden = !timeline;
  }

  function parseTimeline(text) {
    const keys = [];
    const lines = text.split('\n');
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i].trim();
      if (!line) continue;
      const m = line.match(/^(\d+(?:\.\d*)?|\.\d+)\s*:\s*(.*)$/);
      if (!m || !m[2].trim()) {
        throw new Error(`timeline: line ${i + 1} should look like "SECONDS: prompt" (got "${LT.truncate(line, 40)}")`);
      }
      keys.push({ at: Number(m[1]), prompt: m[2].trim() });
    }
    if (!keys.length) throw new Error('timeline: enter at least one line "SECONDS: prompt"');
    return keys;
  }

  function buildBody() {
    const body = {};
    if ($('#mode-timeline').checked) body.timeline = parseTimeline($('#timeline').value);
    else body.prompt = $('#prompt').value.trim();
    for (const name of ['seconds', 'fps', 'steps', 'seed', 'width', 'height']) {
      const raw = $('#' + name).value.trim();
      if (raw === '') continue;
      const n = Number(raw);
      if (!Number.isFinite(n)) throw new Error(`${name}: not a number`);
      body[name] = n;
    }
    return body;
  }

  function showNew() {
    newView();
    $('#new-view').hidden = false;
    syncMode();
  }

  async function submitJob(ev) {
    ev.preventDefault();
    const err = $('#submit-error'), btn = $('#submit');
    showError(err, '');
    let body;
    try { body = buildBody(); } catch (e) { showError(err, e.message); return; }
    btn.disabled = true;
    try {
      const res = await api('/v1/videos', { method: 'POST', body });
      location.hash = '#/jobs/' + encodeURIComponent(res.id);
    } catch (e) {
      showError(err, e.message);
    } finally {
      btn.disabled = false;
    }
  }

  /* ---------- job page ---------- */

  function resetJobView() {
    $('#job-id').textContent = '';
    LT.setStatus($('#job-status'), '');
    LT.showProgress($('#job-progress'), $('#job-percent'), null, '');
    $('#job-eta').textContent = '-';
    $('#job-phase').textContent = '';
    $('#job-grid-block').hidden = $('#job-workers-block').hidden = true;
    $('#job-grid').replaceChildren();
    delete $('#job-grid').dataset.shape;
    showError($('#job-error'), '');
    const player = $('#player');
    player.pause();
    player.removeAttribute('src');
    player.load(); // releases the connection
    player.hidden = true;
    $('#download').hidden = true;
    $('#download').removeAttribute('href');
    $('#preview').hidden = true;
    $('#preview').removeAttribute('src');
    $('#job-request').textContent = '';
    $('#job-summary').textContent = '';
    $('#summary-block').hidden = true;
    $('#job-log').textContent = '';
    $('#cancel').hidden = true;
    $('#delete').hidden = false;
    disarmDelete();
  }

  let deleteTimer = null;
  function disarmDelete() {
    clearTimeout(deleteTimer);
    deleteTimer = null;
    const b = $('#delete');
    b.textContent = 'Delete';
    b.classList.remove('armed');
  }

  function showJob(id) {
    const v = newView();
    resetJobView();
    $('#job-view').hidden = false;
    $('#job-id').textContent = id;
    const base = '/v1/videos/' + encodeURIComponent(id);
    const s = { job: null, linked: false, streaming: false, lastLog: 0, logKey: '' };
    v.stop = disarmDelete;
    v.jobId = id;
    v.base = base;

    const alive = () => v === view;

    const renderProgress = (status, progress, error) => {
      LT.setStatus($('#job-status'), status);
      LT.showProgress($('#job-progress'), $('#job-percent'), progress, status);
      $('#job-eta').textContent = LT.eta(progress, status);
      const p = progress || {};
      const bits = [];
      if (p.phase) bits.push(p.phase);
      if (p.step !== null && p.step !== undefined) bits.push('step ' + LT.steps(p));
      if (p.frames_done !== null && p.frames_done !== undefined) bits.push(`frames ${p.frames_done}/${p.frames ?? '?'}`);
      $('#job-phase').textContent = bits.join(' \u00b7 ');
      LT.renderGrid($('#job-grid'), p);
      $('#job-grid-block').hidden = $('#job-grid').hidden;
      const workers = Array.isArray(p.workers) ? p.workers : [];
      $('#job-workers-block').hidden = !workers.length || !ACTIVE.has(status);
      if (workers.length) LT.renderWorkers($('#job-workers tbody'), workers);
      $('#cancel').hidden = !ACTIVE.has(status);
      if (status === 'failed' || error) showError($('#job-error'), error ? 'failed: ' + error : 'failed');
      // refresh the log when the job changes (status or phase), and every 5 s while it runs
      const logKey = status + '|' + (p.phase || '');
      if (logKey !== s.logKey || Date.now() - s.lastLog > 5000) { s.logKey = logKey; loadLog(); }
    };

    const loadLog = async () => {
      s.lastLog = Date.now();
      try {
        const text = await api(base + '/log', { text: true, signal: v.abort.signal });
        if (!alive()) return;
        const pre = $('#job-log');
        const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
        pre.textContent = text;
        if (atBottom) pre.scrollTop = pre.scrollHeight;
      } catch (_) { /* the log is best effort */ }
    };

    const loadLinks = async () => {
      if (s.linked) return;
      s.linked = true;
      try {
        const links = await api(base + '/links', { method: 'POST', signal: v.abort.signal });
        if (!alive()) return;
        const player = $('#player');
        player.src = links.content;
        player.hidden = false;
        const dl = $('#download');
        dl.href = links.content;
        dl.setAttribute('download', id + '.mp4');
        dl.hidden = false;
        const img = $('#preview');
        img.src = links.preview;
        img.hidden = false;
      } catch (e) {
        if (e.name !== 'AbortError' && alive()) { s.linked = false; showError($('#job-error'), 'links: ' + e.message); }
      }
    };

    const render = job => {
      s.job = job;
      renderProgress(job.status, job.progress, job.error);
      $('#job-request').textContent = JSON.stringify(job.request ?? {}, null, 2);
      if (job.result) {
        $('#job-summary').textContent = JSON.stringify(job.result, null, 2);
        $('#summary-block').hidden = false;
      }
      if (job.status === 'done') loadLinks();
      if (job.status === 'deleted') gone('job deleted');
    };

    const gone = msg => {
      LT.setStatus($('#job-status'), 'deleted');
      showError($('#job-error'), msg);
      $('#cancel').hidden = true;
      $('#delete').hidden = true;
    };

    const stream = async () => {
      if (s.streaming) return;
      s.streaming = true;
      let ended = false;
      try {
        await LT.sse(base + '/events', (event, data) => {
          if (!alive() || !data || typeof data !== 'object') return;
          if (event === 'progress') renderProgress(data.status, data.progress, data.error);
          else if (event === 'end') { ended = true; LT.setStatus($('#job-status'), data.status); LT.barStatus($('#job-progress'), data.status); }
          else if (event === 'deleted') { ended = true; gone('job deleted'); }
        }, { signal: v.abort.signal });
      } catch (_) { /* reconnect below */ }
      s.streaming = false;
      if (!alive()) return;
      // the stream ended (or broke): re-fetch the job; reconnect if it is still active
      v.timers.push(setTimeout(load, ended ? 0 : 2000));
    };

    const load = async () => {
      try {
        const job = await api(base, { signal: v.abort.signal });
        if (!alive()) return;
        render(job);
        if (ACTIVE.has(job.status)) stream();
        else loadLog();
      } catch (e) {
        if (e.name === 'AbortError' || !alive()) return;
        if (e.status === 404) gone('not found: ' + e.message);
        else if (e.status === 410) gone('deleted: ' + e.message);
        else {
          showError($('#job-error'), e.message);
          v.timers.push(setTimeout(load, 3000));
        }
      }
    };
    load();
  }

  async function cancelJob() {
    const v = view;
    if (!v || !v.jobId) return;
    const btn = $('#cancel');
    btn.disabled = true;
    try {
      const res = await api(v.base + '/cancel', { method: 'POST' });
      if (v === view) LT.setStatus($('#job-status'), res.status);
    } catch (e) {
      if (v === view) showError($('#job-error'), e.message);
    } finally {
      btn.disabled = false;
    }
  }

  async function deleteJob() {
    const v = view;
    if (!v || !v.jobId) return;
    const btn = $('#delete');
    if (!deleteTimer) { // first click: ask again
      btn.textContent = 'Confirm delete';
      btn.classList.add('armed');
      deleteTimer = setTimeout(disarmDelete, 5000);
      return;
    }
    disarmDelete();
    btn.disabled = true;
    try {
      await api(v.base, { method: 'DELETE' });
      if (v === view) location.hash = '#/';
    } catch (e) {
      if (v === view) showError($('#job-error'), e.message);
    } finally {
      btn.disabled = false;
    }
  }

  /* ---------- boot ---------- */

  function boot() {
    LT.setupLogin(verifyKey, loggedIn);
    $('#logout').addEventListener('click', logout);
    $('#mode-prompt').addEventListener('change', syncMode);
    $('#mode-timeline').addEventListener('change', syncMode);
    $('#submit-form').addEventListener('submit', submitJob);
    $('#cancel').addEventListener('click', cancelJob);
    $('#delete').addEventListener('click', deleteJob);
    window.addEventListener('hashchange', () => { if (LT.getKey()) route(); });
    syncMode();
    if (!LT.getKey()) { LT.showLogin(); return; }
    api('/v1/me').then(loggedIn).catch(e => {
      if (e.status === 401 || e.status === 403) return; // onAuthFail already showed the login form
      LT.showLogin();
      showError($('#login-error'), 'cannot reach the server: ' + e.message);
    });
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', boot);
  else boot();
})();
