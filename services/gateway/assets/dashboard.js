// Overview page: one card per GPU grouped by host, live values over the WebSocket.
'use strict';

(() => {
  const { METRICS, DASH, $, showError, clearError, fetchJSON, parseMicros, formatValue } = window.telemetryUi;
  const METRIC_NAMES = new Set(METRICS.map((m) => m.name));
  const STATS_INTERVAL_MS = 2000;
  const REFRESH_DEBOUNCE_MS = 1000;
  const UNKNOWN_RETRY_MS = 10000;

  const state = (window.dashboard = { updates: 0, gpus: 0, ws: 'connecting' });

  const cards = new Map(); // uuid -> { card, spans: Map(metric -> span) }
  const lastTs = new Map(); // `${uuid} ${metric}` -> microseconds since epoch
  const pending = new Map(); // unknown uuid -> [record] waiting for its card
  const missingSince = new Map(); // uuid not in the list after a refresh -> Date.now()
  const flashQueue = new Set();
  let flashScheduled = false;
  let refreshTimer = null;

  // ---- cards --------------------------------------------------------------------------------

  function hostSection(hostname) {
    const main = $('hosts');
    for (const s of main.querySelectorAll('section.host')) {
      if (s.dataset.host === hostname) return s;
    }
    const section = document.createElement('section');
    section.className = 'host';
    section.dataset.host = hostname;
    const h2 = document.createElement('h2');
    h2.textContent = hostname;
    const grid = document.createElement('div');
    grid.className = 'gpu-grid';
    section.append(h2, grid);
    main.append(section);
    return section;
  }

  function buildCard(gpu) {
    const card = document.createElement('a');
    card.className = 'gpu';
    card.dataset.uuid = gpu.uuid;
    card.href = `/gpu?uuid=${encodeURIComponent(gpu.uuid)}`;
    card.title = gpu.uuid;

    const head = document.createElement('div');
    head.className = 'gpu-head';
    const id = document.createElement('span');
    id.className = 'gpu-id';
    id.textContent = `GPU ${gpu.gpu_id}`;
    const model = document.createElement('span');
    model.className = 'gpu-model';
    model.textContent = gpu.model || gpu.device || '';
    head.append(id, model);

    const values = document.createElement('div');
    values.className = 'gpu-values';
    const spans = new Map();
    for (const m of METRICS) {
      const cell = document.createElement('div');
      cell.className = 'metric';
      const label = document.createElement('span');
      label.className = 'label';
      label.textContent = m.label;
      const value = document.createElement('span');
      value.className = 'value';
      value.dataset.metric = m.name;
      value.textContent = DASH;
      const unit = document.createElement('span');
      unit.className = 'unit';
      unit.textContent = m.unit;
      cell.append(label, value, unit);
      values.append(cell);
      spans.set(m.name, value);
    }
    card.append(head, values);
    card.addEventListener('animationend', () => card.classList.remove('flash'));
    return { card, spans };
  }

  // Adds cards for GPUs not yet shown and keeps hosts and cards in list order (host, gpu_id).
  // Returns the uuids that were added.
  function renderGpus(gpus) {
    const main = $('hosts');
    const loading = $('loading');
    if (loading) loading.remove();
    const added = [];
    const byHost = new Map();
    for (const gpu of gpus) {
      if (!gpu || !gpu.uuid) continue;
      if (!byHost.has(gpu.hostname)) byHost.set(gpu.hostname, []);
      byHost.get(gpu.hostname).push(gpu);
    }
    const frag = document.createDocumentFragment();
    for (const [hostname, list] of byHost) {
      const section = hostSection(hostname);
      const grid = section.querySelector('.gpu-grid');
      for (const gpu of list) {
        let entry = cards.get(gpu.uuid);
        if (!entry) {
          entry = buildCard(gpu);
          cards.set(gpu.uuid, entry);
          added.push(gpu.uuid);
        }
        grid.append(entry.card); // appending an existing node moves it into order
      }
      frag.append(section);
    }
    // Sections of hosts missing from this list stay, after the listed ones.
    main.prepend(frag);
    state.gpus = cards.size;
    $('gpu-count').textContent = String(cards.size);
    if (cards.size === 0) {
      const p = document.createElement('p');
      p.id = 'loading';
      p.className = 'muted';
      p.textContent = 'No GPUs reported yet.';
      main.append(p);
    }
    return added;
  }

  function flash(card) {
    flashQueue.add(card);
    if (flashScheduled) return;
    flashScheduled = true;
    requestAnimationFrame(() => {
      flashScheduled = false;
      const list = [...flashQueue];
      flashQueue.clear();
      for (const c of list) c.classList.remove('flash');
      void document.body.offsetWidth; // restart the animation with one reflow
      for (const c of list) c.classList.add('flash');
    });
  }

  // Shows a value if it is not older than the one shown. Returns true when applied.
  function applyValue(uuid, metric, value, micros, live) {
    const entry = cards.get(uuid);
    if (!entry) return false;
    const span = entry.spans.get(metric);
    if (!span) return false;
    const key = `${uuid} ${metric}`;
    const prev = lastTs.get(key);
    if (prev !== undefined && micros < prev) return false;
    lastTs.set(key, micros);
    span.textContent = formatValue(value);
    span.dataset.updatedAt = String(Date.now());
    if (live) {
      state.updates += 1;
      flash(entry.card);
    }
    return true;
  }

  // Extracts (uuid, metric, value, micros) from a v1 record, or null if unusable.
  function readRecord(rec) {
    const f = rec && rec.fields;
    if (!f || !METRIC_NAMES.has(f.metric_name) || !f.uuid) return null;
    if (f.value === null || f.value === undefined || f.value === '') return null;
    const value = Number(f.value);
    if (Number.isNaN(value)) return null;
    const micros = parseMicros(rec.timestamp);
    if (Number.isNaN(micros)) return null;
    return { uuid: f.uuid, metric: f.metric_name, value, micros };
  }

  // ---- REST loading -------------------------------------------------------------------------

  async function loadGpus() {
    const body = await fetchJSON('/api/v1/gpus');
    clearError('gpus');
    return renderGpus(Array.isArray(body.gpus) ? body.gpus : []);
  }

  // The latest value of every GPU's metrics in one request (/api/v1/gpus/latest), instead of
  // one request per GPU. While the gateway's window is still loading it answers 503 with
  // Retry-After: try again a few times.
  async function fillAll(uuids) {
    const wanted = new Set(uuids);
    for (let attempt = 0; attempt < 20; attempt += 1) {
      let body;
      try {
        body = await fetchJSON('/api/v1/gpus/latest');
      } catch (err) {
        if (/ 503 /.test(err.message) && attempt < 19) {
          await new Promise((r) => setTimeout(r, 500));
          continue;
        }
        showError('fill', `Latest values failed to load (${err.message})`);
        return;
      }
      for (const gpu of body.gpus || []) {
        if (!wanted.has(gpu.uuid)) continue;
        for (const [metric, latest] of Object.entries(gpu.metrics || {})) {
          if (!METRIC_NAMES.has(metric)) continue;
          const value = Number(latest.value);
          const micros = parseMicros(latest.timestamp);
          if (Number.isNaN(value) || Number.isNaN(micros)) continue;
          applyValue(gpu.uuid, metric, value, micros, false);
        }
      }
      clearError('fill');
      return;
    }
  }

  // Re-fetches the GPU list (debounced) when live records name GPUs without a card.
  function scheduleRefresh() {
    if (refreshTimer) return;
    refreshTimer = setTimeout(async () => {
      refreshTimer = null;
      try {
        const added = await loadGpus();
        const waiting = [...pending.entries()];
        pending.clear();
        for (const [uuid, recs] of waiting) {
          if (!cards.has(uuid)) {
            missingSince.set(uuid, Date.now());
            continue;
          }
          missingSince.delete(uuid);
          for (const rec of recs) applyLive(rec);
        }
        if (added.length) await fillAll(added);
      } catch (err) {
        showError('gpus', `Cannot load the GPU list: ${err.message}`);
      }
    }, REFRESH_DEBOUNCE_MS);
  }

  function applyLive(rec) {
    const r = readRecord(rec);
    if (!r) return;
    if (cards.has(r.uuid)) {
      applyValue(r.uuid, r.metric, r.value, r.micros, true);
      return;
    }
    const missing = missingSince.get(r.uuid);
    if (missing !== undefined && Date.now() - missing < UNKNOWN_RETRY_MS) return;
    if (!pending.has(r.uuid) && pending.size >= 500) return;
    const list = pending.get(r.uuid) || [];
    if (list.length < 50) list.push(rec);
    pending.set(r.uuid, list);
    scheduleRefresh();
  }

  // ---- stats --------------------------------------------------------------------------------

  let prevStats = null; // { total, at }

  async function pollStats() {
    try {
      const s = await fetchJSON('/api/v1/stats');
      const now = Date.now();
      $('total-records').textContent = String(s.total_records ?? DASH);
      $('queue-depth').textContent = String(s.queue_depth ?? DASH);
      $('dead-letters').textContent = String(s.dead_letters ?? DASH);
      const total = Number(s.total_records);
      if (prevStats && Number.isFinite(total) && now > prevStats.at) {
        const rate = Math.max(0, (total - prevStats.total) / ((now - prevStats.at) / 1000));
        $('ingest-rate').textContent = rate >= 100 ? String(Math.round(rate)) : rate.toFixed(1);
      }
      if (Number.isFinite(total)) prevStats = { total, at: now };
      const latest = s.latest_timestamp ? parseMicros(s.latest_timestamp) : NaN;
      $('lag').textContent = Number.isNaN(latest)
        ? DASH
        : `${Math.max(0, (now * 1000 - latest) / 1e6).toFixed(1)} s`;
      clearError('stats');
    } catch (err) {
      showError('stats', `Cannot load pipeline stats: ${err.message}`);
    } finally {
      setTimeout(pollStats, STATS_INTERVAL_MS);
    }
  }

  async function resyncOverRest() {
    try {
      await loadGpus();
      await fillAll([...cards.keys()]);
    } catch (err) {
      showError('gpus', `Cannot reload after a live-feed gap: ${err.message}`);
    }
  }

  // ---- start --------------------------------------------------------------------------------

  const feed = window.telemetryUi.liveFeed({
    onRecords: (records) => {
      for (const rec of records) applyLive(rec);
    },
    onResync: resyncOverRest,
    onState: (text) => {
      state.ws = text;
    },
  });

  async function start() {
    pollStats();
    let uuids = [];
    try {
      await loadGpus();
      uuids = [...cards.keys()];
    } catch (err) {
      showError('gpus', `Cannot load the GPU list: ${err.message}`);
    }
    feed.connect();
    if (uuids.length) await fillAll(uuids);
  }

  window.telemetryUi.onReady(start);
})();
