// GPU page: history + live charts (uPlot) of one GPU's four main metrics.
'use strict';

(() => {
  const { METRICS, DASH, $, showError, clearError, fetchJSON, parseMicros, formatValue } = window.telemetryUi;
  const HISTORY_LIMIT = 1000;
  const MAX_POINTS = 5000;
  const REDRAW_MS = 250;
  const CHART_HEIGHT = 220;

  const uuid = new URLSearchParams(location.search).get('uuid') || '';
  const page = (window.gpuPage = { uuid, updates: 0, ws: 'connecting', points: {} });

  // metric -> { meta, el, latest, plot, xs, ys, ids, idSet, dirty }
  const series = new Map();
  let redrawTimer = null;
  let lastRedraw = 0;

  // RFC 3339 → seconds since the epoch (uPlot's x axis), keeping the sub-millisecond part.
  const parseSeconds = (text) => parseMicros(text) / 1e6;

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

  // ---- start --------------------------------------------------------------------------------

  const feed = window.telemetryUi.liveFeed({
    params: { uuid },
    onRecords: (records) => {
      let added = 0;
      for (const rec of records) if (addRecord(rec)) added += 1;
      if (added) {
        page.updates += added;
        scheduleRedraw();
      }
    },
    onResync: loadHistory, // merges by record id
    onState: (text) => {
      page.ws = text;
    },
  });

  function start() {
    initCharts();
    if (!uuid) {
      showError('info', 'No GPU selected: open this page as /gpu?uuid=GPU-… (pick one on the overview).');
      return;
    }
    $('gpu-uuid').textContent = uuid;
    loadInfo();
    feed.connect(); // live first; history is merged in by record id
    loadHistory().catch((err) => showError('history', `History failed to load: ${err.message}`));
  }

  window.telemetryUi.onReady(start);
})();
