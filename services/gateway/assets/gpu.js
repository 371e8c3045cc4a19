// GPU page: history + live charts (uPlot) of one GPU's four main metrics.
'use strict';

(() => {
  const METRICS = [
    { name: 'DCGM_FI_DEV_GPU_UTIL', label: 'util', unit: '%', color: '#4cc9f0' },
    { name: 'DCGM_FI_DEV_GPU_TEMP', label: 'temp', unit: '°C', color: '#f8961e' },
    { name: 'DCGM_FI_DEV_POWER_USAGE', label: 'power', unit: 'W', color: '#f94144' },
    { name: 'DCGM_FI_DEV_FB_USED', label: 'mem used', unit: 'MiB', color: '#90be6d' },
  ];
  const HISTORY_LIMIT = 1000;
  const MAX_POINTS = 5000;
  const REDRAW_MS = 250;
  const RECONNECT_MS = 1000;
  const CHART_HEIGHT = 220;
  const DASH = '–';

  const uuid = new URLSearchParams(location.search).get('uuid') || '';
  const page = (window.gpuPage = { uuid, updates: 0, ws: 'connecting', points: {} });

  // metric -> { meta, el, latest, plot, xs, ys, ids, idSet, dirty }
  const series = new Map();
  let redrawTimer = null;
  let lastRedraw = 0;

  const $ = (id) => document.getElementById(id);

  // ---- errors -------------------------------------------------------------------------------

  const errors = new Map();
  function showError(key, message) {
    errors.set(key, message);
    renderErrors();
  }
  function clearError(key) {
    if (errors.delete(key)) renderErrors();
  }
  function renderErrors() {
    const el = $('error');
    if (!el) return;
    el.textContent = [...errors.values()].join(' · ');
    el.hidden = errors.size === 0;
  }

  // ---- helpers ------------------------------------------------------------------------------

  async function fetchJSON(url) {
    const resp = await window.telemetryAuth.fetch(url, { headers: { Accept: 'application/json' } });
    if (!resp.ok) {
      let detail = resp.statusText;
      try {
        const body = await resp.json();
        detail = body.detail || body.message || body.error || JSON.stringify(body);
      } catch (_) { /* not JSON */ }
      throw new Error(`GET ${url} → ${resp.status} ${detail}`);
    }
    return resp.json();
  }

  // RFC 3339 → seconds since the epoch, keeping the sub-millisecond part. NaN if unparsable.
  function parseSeconds(text) {
    if (typeof text !== 'string') return NaN;
    const m = /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:?\d\d)?$/i.exec(text.trim());
    if (!m) {
      const ms = Date.parse(text);
      return Number.isNaN(ms) ? NaN : ms / 1000;
    }
    const ms = Date.parse(m[1] + (m[3] ? m[3].toUpperCase() : 'Z'));
    if (Number.isNaN(ms)) return NaN;
    return ms / 1000 + (m[2] ? Number('0' + m[2]) : 0);
  }

  function formatValue(v) {
    if (Number.isInteger(v)) return String(v);
    return String(Math.round(v * 10) / 10);
  }

  // ---- charts -------------------------------------------------------------------------------

  function chartWidth(el) {
    return Math.max(200, Math.floor(el.clientWidth || el.parentElement.clientWidth || 600));
  }

  function makeChart(meta, el) {
    const axis = {
      stroke: '#9aa4b2',
      grid: { stroke: 'rgba(255,255,255,0.07)', width: 1 },
      ticks: { stroke: 'rgba(255,255,255,0.12)', width: 1 },
    };
    const opts = {
      width: chartWidth(el),
      height: CHART_HEIGHT,
      scales: {
        x: {
          time: true,
          // A single point (or none) would give a degenerate range: show a minute around it.
          range: (u, min, max) => (min == null || min === max ? [(min ?? Date.now() / 1000) - 60, (max ?? Date.now() / 1000) + 60] : [min, max]),
        },
      },
      series: [
        {},
        {
          label: `${meta.label} (${meta.unit})`,
          stroke: meta.color,
          fill: meta.color + '22',
          width: 1.5,
          // uPlot's default shows points only while the data is sparse (a lone point stays visible).
          points: { size: 5 },
          value: (u, v) => (v == null ? DASH : formatValue(v)),
        },
      ],
      axes: [axis, { ...axis, size: 56 }],
      legend: { live: true },
    };
    return new uPlot(opts, [[], []], el);
  }

  function initCharts() {
    for (const meta of METRICS) {
      const el = document.querySelector(`.chart[data-metric="${meta.name}"]`);
      const latest = document.querySelector(`.latest[data-metric="${meta.name}"]`);
      const s = { meta, el, latest, plot: null, xs: [], ys: [], ids: [], idSet: new Set(), dirty: false };
      if (el && typeof uPlot === 'function') {
        try {
          s.plot = makeChart(meta, el);
        } catch (err) {
          showError('chart', `Cannot draw charts: ${err.message}`);
        }
      }
      series.set(meta.name, s);
      page.points[meta.name] = 0;
    }
    if (typeof uPlot !== 'function') showError('chart', 'Charting library failed to load (/assets/uplot.iife.min.js).');
  }

  // Index of the first x strictly greater than `x` (insert position keeping ties in arrival order).
  function upperBound(xs, x) {
    let lo = 0;
    let hi = xs.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (xs[mid] <= x) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  // Adds one record to its chart (deduplicated by record id). Returns true when added.
  function addRecord(rec) {
    const f = rec && rec.fields;
    if (!f || (f.uuid && f.uuid !== uuid)) return false;
    const s = series.get(f.metric_name);
    if (!s) return false;
    if (f.value === null || f.value === undefined || f.value === '') return false;
    const y = Number(f.value);
    if (Number.isNaN(y)) return false;
    const x = parseSeconds(rec.timestamp);
    if (Number.isNaN(x)) return false;
    const id = rec.id || `${rec.timestamp}|${f.metric_name}|${f.value}`;
    if (s.idSet.has(id)) return false;

    const n = s.xs.length;
    if (n === 0 || x >= s.xs[n - 1]) {
      s.xs.push(x);
      s.ys.push(y);
      s.ids.push(id);
    } else {
      const i = upperBound(s.xs, x);
      s.xs.splice(i, 0, x);
      s.ys.splice(i, 0, y);
      s.ids.splice(i, 0, id);
    }
    s.idSet.add(id);
    if (s.xs.length > MAX_POINTS) {
      const drop = s.xs.length - MAX_POINTS;
      s.xs.splice(0, drop);
      s.ys.splice(0, drop);
      for (const old of s.ids.splice(0, drop)) s.idSet.delete(old);
    }
    s.dirty = true;
    return true;
  }

  function scheduleRedraw() {
    if (redrawTimer) return;
    const wait = Math.max(0, lastRedraw + REDRAW_MS - Date.now());
    redrawTimer = setTimeout(redraw, wait);
  }

  function redraw() {
    redrawTimer = null;
    lastRedraw = Date.now();
    for (const s of series.values()) {
      if (!s.dirty) continue;
      s.dirty = false;
      page.points[s.meta.name] = s.xs.length;
      const n = s.ys.length;
      if (s.latest) {
        s.latest.textContent = n ? formatValue(s.ys[n - 1]) : DASH;
        if (n) s.latest.dataset.updatedAt = String(Date.now());
      }
      if (s.plot) {
        try {
          s.plot.setData([s.xs, s.ys]);
        } catch (err) {
          showError('chart', `Chart update failed: ${err.message}`);
        }
      }
    }
  }

  function resizeCharts() {
    for (const s of series.values()) {
      if (s.plot && s.el) s.plot.setSize({ width: chartWidth(s.el), height: CHART_HEIGHT });
    }
  }

  let resizeFrame = 0;
  window.addEventListener('resize', () => {
    if (resizeFrame) return;
    resizeFrame = requestAnimationFrame(() => {
      resizeFrame = 0;
      resizeCharts();
    });
  });

  // ---- REST ---------------------------------------------------------------------------------

  async function loadInfo() {
    try {
      const body = await fetchJSON('/api/v1/gpus');
      const gpu = (body.gpus || []).find((g) => g.uuid === uuid);
      if (!gpu) {
        showError('info', `GPU ${uuid} is not in the GPU list (no telemetry received for it yet?).`);
        $('gpu-uuid').textContent = uuid;
        return;
      }
      clearError('info');
      $('gpu-title').textContent = `${gpu.hostname} / GPU ${gpu.gpu_id}`;
      $('gpu-host').textContent = gpu.hostname;
      $('gpu-id').textContent = String(gpu.gpu_id);
      $('gpu-model').textContent = gpu.model || gpu.device || DASH;
      $('gpu-uuid').textContent = gpu.uuid;
      document.title = `${gpu.hostname} / GPU ${gpu.gpu_id} – telemetry`;
    } catch (err) {
      showError('info', `Cannot load the GPU list: ${err.message}`);
    }
  }

  async function loadHistory() {
    const base = `/api/v1/gpus/${encodeURIComponent(uuid)}/telemetry`;
    const results = await Promise.allSettled(
      METRICS.map(async (meta) => {
        const body = await fetchJSON(`${base}?metric=${encodeURIComponent(meta.name)}&limit=${HISTORY_LIMIT}`);
        const items = Array.isArray(body.items) ? body.items.slice() : [];
        if (body.order !== 'asc') items.reverse(); // newest first → ascending
        for (const rec of items) addRecord(rec);
        // Mark even an empty series dirty so its latest text and point count refresh.
        series.get(meta.name).dirty = true;
      }),
    );
    const failed = results.filter((r) => r.status === 'rejected');
    if (failed.length) showError('history', `History failed to load: ${failed[0].reason.message}`);
    else clearError('history');
    scheduleRedraw();
  }

  // ---- WebSocket ----------------------------------------------------------------------------

  let lastRevision = null;
  let resync = false;
  let failedAttempts = 0;

  function setLive(open) {
    page.ws = open ? 'live' : 'reconnecting';
    const el = $('live-status');
    el.textContent = open ? 'live' : 'reconnecting';
    el.dataset.state = open ? 'up' : 'down';
  }

  function connect() {
    // Waiting for the user to enter an API token (the page reloads with it).
    if (window.telemetryAuth.waiting()) return;
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const params = new URLSearchParams({ uuid });
    const resuming = lastRevision !== null && !resync;
    if (resuming) params.set('since_revision', String(lastRevision));
    const url = `${proto}//${location.host}/api/v1/ws/telemetry?${params}`;
    let ws;
    try {
      ws = new WebSocket(url, window.telemetryAuth.wsProtocols());
    } catch (err) {
      showError('ws', `WebSocket failed: ${err.message}`);
      setTimeout(connect, RECONNECT_MS);
      return;
    }
    let opened = false;

    ws.onopen = () => {
      opened = true;
      failedAttempts = 0;
      setLive(true);
      clearError('ws');
    };

    ws.onmessage = (ev) => {
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch (_) {
        return;
      }
      try {
        if (msg.type === 'hello') {
          if (!resuming && typeof msg.revision === 'number') lastRevision = msg.revision;
          if (resync) {
            resync = false;
            loadHistory().catch(() => {}); // merges by record id
          }
        } else if (msg.type === 'telemetry') {
          if (typeof msg.revision === 'number') lastRevision = msg.revision;
          let added = 0;
          for (const rec of msg.records || []) if (addRecord(rec)) added += 1;
          if (added) {
            page.updates += added;
            scheduleRedraw();
          }
        } else if (msg.type === 'error') {
          if (msg.error === 'compacted' || msg.error === 'gap') {
            resync = true;
            lastRevision = null;
          }
          showError('ws', `Live feed closed (${msg.error}); reconnecting…`);
        }
      } catch (err) {
        showError('ws', `Live update failed: ${err.message}`);
      }
    };

    ws.onclose = (ev) => {
      if (ev.code === 4002 || ev.code === 4003) {
        resync = true;
        lastRevision = null;
      }
      if (!opened && ++failedAttempts >= 5 && lastRevision !== null) {
        resync = true;
        lastRevision = null;
      }
      setLive(false);
      setTimeout(connect, RECONNECT_MS);
    };

    ws.onerror = () => { /* onclose follows */ };
  }

  // ---- start --------------------------------------------------------------------------------

  function start() {
    setLive(false);
    initCharts();
    if (!uuid) {
      showError('info', 'No GPU selected: open this page as /gpu?uuid=GPU-… (pick one on the overview).');
      return;
    }
    $('gpu-uuid').textContent = uuid;
    loadInfo();
    connect(); // live first; history is merged in by record id
    loadHistory().catch((err) => showError('history', `History failed to load: ${err.message}`));
  }

  window.addEventListener('unhandledrejection', (ev) => {
    showError('unexpected', `Unexpected error: ${ev.reason && ev.reason.message ? ev.reason.message : ev.reason}`);
    ev.preventDefault();
  });

  if (document.readyState === 'loading') {
    document.addEventListener('DOMContentLoaded', start);
  } else {
    start();
  }
})();
