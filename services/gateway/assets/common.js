// What both pages share: the metrics shown, the error banner, JSON fetches (with the API token
// of auth.js), RFC 3339 parsing, value formatting, and the live feed (the WebSocket with resume
// from the last revision, and a fresh start plus a re-read over REST after a gap).
'use strict';

(() => {
  const METRICS = [
    { name: 'DCGM_FI_DEV_GPU_UTIL', label: 'util', unit: '%', color: '#4cc9f0' },
    { name: 'DCGM_FI_DEV_GPU_TEMP', label: 'temp', unit: '°C', color: '#f8961e' },
    { name: 'DCGM_FI_DEV_POWER_USAGE', label: 'power', unit: 'W', color: '#f94144' },
    { name: 'DCGM_FI_DEV_FB_USED', label: 'mem used', unit: 'MiB', color: '#90be6d' },
  ];
  const RECONNECT_MS = 1000;
  const DASH = '–';

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

  window.addEventListener('unhandledrejection', (ev) => {
    showError('unexpected', `Unexpected error: ${ev.reason && ev.reason.message ? ev.reason.message : ev.reason}`);
    ev.preventDefault();
  });

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

  // RFC 3339 → integer microseconds since the epoch (keeps the sub-millisecond part that
  // Date.parse drops). NaN if unparsable.
  function parseMicros(text) {
    if (typeof text !== 'string') return NaN;
    const m = /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:?\d\d)?$/i.exec(text.trim());
    if (!m) {
      const ms = Date.parse(text);
      return Number.isNaN(ms) ? NaN : ms * 1000;
    }
    const ms = Date.parse(m[1] + (m[3] ? m[3].toUpperCase() : 'Z'));
    if (Number.isNaN(ms)) return NaN;
    const frac = m[2] ? Math.round(Number('0' + m[2]) * 1e6) : 0;
    return ms * 1000 + frac;
  }

  function formatValue(v) {
    if (Number.isInteger(v)) return String(v);
    return String(Math.round(v * 10) / 10);
  }

  // Runs `start` once the document is parsed.
  function onReady(start) {
    const run = () => Promise.resolve().then(start).catch(() => {});
    if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', run);
    else run();
  }

  // ---- live feed ----------------------------------------------------------------------------

  // Follows /api/v1/ws/telemetry with `params` (a URLSearchParams of filters), resuming from the
  // last revision received after a disconnect. `onRecords(records)` gets each telemetry frame's
  // records; `onResync()` runs after a gap (compaction, a refused resume), once a fresh
  // subscription is up, to re-read what was missed over REST; `onState('live' | 'reconnecting')`
  // follows the connection. The status element `#live-status` is kept up to date.
  function liveFeed({ params, onRecords, onResync, onState }) {
    let lastRevision = null; // last revision received, for ?since_revision=
    let resync = false; // history was lost: reconnect fresh and re-read over REST
    let failedAttempts = 0;

    function setLive(open) {
      const text = open ? 'live' : 'reconnecting';
      if (onState) onState(text);
      const el = $('live-status');
      if (!el) return;
      el.textContent = text;
      el.dataset.state = open ? 'up' : 'down';
    }

    function restart() {
      resync = true;
      lastRevision = null;
    }

    function connect() {
      // Waiting for the user to enter an API token (the page reloads with it).
      if (window.telemetryAuth.waiting()) return;
      const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
      const query = new URLSearchParams(params || {});
      const resuming = lastRevision !== null && !resync;
      if (resuming) query.set('since_revision', String(lastRevision));
      const qs = query.toString();
      const url = `${proto}//${location.host}/api/v1/ws/telemetry${qs ? '?' + qs : ''}`;
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
            // When resuming, the replay continues from our own revision; keep it.
            if (!resuming && typeof msg.revision === 'number') lastRevision = msg.revision;
            if (resync) {
              resync = false;
              Promise.resolve().then(onResync).catch((err) => showError('ws', `Re-reading after a live-feed gap failed: ${err.message}`));
            }
          } else if (msg.type === 'telemetry') {
            if (typeof msg.revision === 'number') lastRevision = msg.revision;
            onRecords(msg.records || []);
          } else if (msg.type === 'error') {
            if (msg.error === 'compacted' || msg.error === 'gap') restart();
            showError('ws', `Live feed closed (${msg.error}); reconnecting…`);
          }
        } catch (err) {
          showError('ws', `Live update failed: ${err.message}`);
        }
      };

      ws.onclose = (ev) => {
        if (ev.code === 4002 || ev.code === 4003) restart();
        // The resume keeps being refused: start fresh and re-read over REST.
        if (!opened && ++failedAttempts >= 5 && lastRevision !== null) restart();
        setLive(false);
        setTimeout(connect, RECONNECT_MS);
      };

      ws.onerror = () => { /* onclose follows */ };
    }

    setLive(false);
    return { connect };
  }

  window.telemetryUi = {
    METRICS,
    DASH,
    $,
    showError,
    clearError,
    fetchJSON,
    parseMicros,
    formatValue,
    onReady,
    liveFeed,
  };
})();
