/* longtake farm monitor (read-only): workers and job tables polled every 2 s, detail card (with the window x
   step grid) for #/jobs/ID. */
'use strict';
(function () {
  const { $, api, el } = LT;
  const POLL_MS = 2000;
  let timer = null;
  let abort = null;
  let running = false;

  function showError(node, msg) {
    node.textContent = msg || '';
    node.hidden = !msg;
  }

  function stop() {
    clearTimeout(timer);
    timer = null;
    if (abort) abort.abort();
    abort = null;
    running = false;
  }

  function selectedId() {
    const m = (location.hash || '').match(/^#\/jobs\/([^/?#]+)$/);
    return m ? decodeURIComponent(m[1]) : null;
  }

  function rowFor(tbody, job) {
    let tr = tbody.querySelector(`tr[data-id="${CSS.escape(job.id)}"]`);
    if (tr) return tr;
    const link = el('a', { className: 'job-link', href: '#/jobs/' + encodeURIComponent(job.id), textContent: job.id });
    tr = el('tr', { 'data-id': job.id, className: 'clickable' },
      el('td', { className: 'id' }, link),
      el('td', { className: 'priority' }),
      el('td', { className: 'state' }),
      el('td', { className: 'steps' }),
      el('td', { className: 'prog' }, el('progress', { className: 'progress', max: 100, value: 0 }), ' ', el('span', { className: 'percent' })),
      el('td', { className: 'retries' }),
      el('td', { className: 'blocklist' }),
      el('td', { className: 'prompt' }));
    tr.addEventListener('click', ev => {
      if (ev.target.closest('a')) return; // the link navigates by itself
      location.hash = '#/jobs/' + encodeURIComponent(job.id);
    });
    return tr;
  }

  function renderList(data) {
    const jobs = Array.isArray(data.jobs) ? data.jobs : [];
    const tbody = $('#farm-jobs tbody');
    const keep = new Set();
    const sel = selectedId();
    for (const job of jobs) {
      const tr = rowFor(tbody, job);
      tr.querySelector('td.priority').textContent = job.priority ?? '-';
      LT.setStatus(tr.querySelector('td.state'), job.state);
      tr.querySelector('td.steps').textContent = LT.steps(job.progress);
      LT.showProgress(tr.querySelector('progress.progress'), tr.querySelector('span.percent'), job.progress, job.state);
      tr.querySelector('td.retries').textContent = job.retries ?? 0;
      tr.querySelector('td.blocklist').textContent = (job.blocklist || []).join(', ');
      const prompt = LT.shotLabel(job) + LT.firstPrompt(job.request);
      const td = tr.querySelector('td.prompt');
      td.textContent = LT.truncate(prompt, 60);
      td.title = prompt;
      tr.classList.toggle('selected', job.id === sel);
      tbody.appendChild(tr);
      keep.add(job.id);
    }
    for (const tr of [...tbody.rows]) if (!keep.has(tr.dataset.id)) tr.remove();
    $('#no-jobs').hidden = jobs.length > 0;
    $('#farm-dir').textContent = data.farm_dir || '';
  }

  function renderWorkers(data) {
    const rows = Array.isArray(data.workers) ? data.workers : [];
    // a runner's id is host:pid:token:boot:pidns (cluster/jobs.py): its host and process shown, all of it on hover
    const runner = id => id ? el('span', { title: id, textContent: id.split(':').slice(0, 2).join(':') }) : '-';
    LT.renderWorkers($('#workers tbody'), rows, ['Runner', 'Job', 'Worker'], w => [runner(w.runner),
      el('a', { href: '#/jobs/' + encodeURIComponent(w.job), textContent: w.job })]);
    $('#no-workers').hidden = rows.length > 0;
  }

  function renderDetail(job) {
    $('#farm-job-id').textContent = job.id;
    const p = job.progress || {};
    const bits = [`state ${job.state}`, `priority ${job.priority ?? '-'}`, `step ${LT.steps(p)}`,
      `${LT.percent(p, job.state)} %`, `ETA ${LT.eta(p, job.state)}`, `retries ${job.retries ?? 0}`];
    if (job.story) bits.push(`story ${job.story.film}, shot ${job.story.shot} (${job.story.begin})`);
    if (job.depends && job.depends.length) bits.push(`waits for ${job.depends.join(', ')}`);
    if (job.runner) bits.push(`runner ${job.runner}`);
    if (job.blocklist && job.blocklist.length) bits.push(`blocklist ${job.blocklist.join(', ')}`);
    if (p.phase) bits.push(`phase ${p.phase}`);
    bits.push(`updated ${LT.date(job.updated)}`);
    $('#farm-job-meta').textContent = bits.join(' \u00b7 ');
    showError($('#farm-job-error'), job.error || '');
    LT.renderGrid($('#farm-grid'), p);
    $('#farm-job-request').textContent = JSON.stringify(job.request ?? {}, null, 2);
    const pre = $('#farm-log');
    const text = typeof job.log === 'string' ? job.log : '';
    if (pre.textContent !== text) {
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.textContent = text;
      if (atBottom) pre.scrollTop = pre.scrollHeight;
    }
  }

  async function poll() {
    if (running) return;
    running = true;
    clearTimeout(timer);
    const ctl = new AbortController();
    abort = ctl;
    const id = selectedId();
    const card = $('#farm-job');
    if (!id) card.hidden = true;
    try {
      const list = api('/api/jobs', { signal: ctl.signal });
      const workers = api('/api/workers', { signal: ctl.signal });
      workers.catch(() => {}); // (the list's error is the one shown)
      const detail = id ? api('/api/jobs/' + encodeURIComponent(id), { signal: ctl.signal }) : null;
      if (detail) detail.catch(() => {}); // handled below; avoids an unhandled rejection if the list fails
      renderList(await list);
      renderWorkers(await workers);
      showError($('#farm-error'), '');
      if (detail) {
        try {
          const job = await detail;
          if (selectedId() === id) { renderDetail(job); card.hidden = false; }
        } catch (e) {
          if (e.name === 'AbortError' || e.status === 401 || e.status === 403) throw e;
          if (selectedId() === id) {
            $('#farm-job-id').textContent = id;
            showError($('#farm-job-error'), (e.status === 404 ? 'not found: ' : '') + e.message);
            card.hidden = false;
          }
        }
      }
    } catch (e) {
      if (e.name === 'AbortError' || abort !== ctl) return;
      if (e.status === 401 || e.status === 403) return; // login shown by onAuthFail
      showError($('#farm-error'), e.message);
    } finally {
      if (abort === ctl) {
        running = false;
        abort = null;
        timer = setTimeout(poll, POLL_MS);
      }
    }
  }

  function start() {
    stop();
    LT.showApp();
    $('#logout').hidden = !LT.getKey();
    poll();
  }

  function onHash() {
    if ($('#app').hidden) return;
    const id = selectedId();
    if (!id) $('#farm-job').hidden = true;
    else if ($('#farm-job-id').textContent !== id) {
      // clear the old job's details while the new one loads
      $('#farm-job-id').textContent = id;
      $('#farm-job-meta').textContent = '';
      $('#farm-job-request').textContent = '';
      $('#farm-log').textContent = '';
      showError($('#farm-job-error'), '');
      $('#farm-job').hidden = false;
      $('#farm-job').scrollIntoView({ block: 'start' });
    }
    stop();
    poll();
  }

  function boot() {
    LT.onAuthFail = () => { stop(); LT.showLogin(); };
    LT.setupLogin(key => api('/api/jobs', { key }), start);
    $('#logout').addEventListener('click', () => { stop(); LT.clearKey(); LT.showLogin(); });
    window.addEventListener('hashchange', onHash);
    start(); // works without a key when the farm needs none; a 401 shows the login form
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', boot);
  else boot();
})();
