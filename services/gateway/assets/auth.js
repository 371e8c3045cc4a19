// The API token, for a gateway started with GATEWAY_API_TOKENS_FILE: asked for when the API
// answers 401, kept in sessionStorage (this tab only, gone when it closes), and sent as
// `Authorization: Bearer <token>` on REST and as the WebSocket subprotocol `bearer.<token>`
// (offered beside `telemetry`, which the server selects), since a browser WebSocket cannot set
// headers. A gateway without tokens never answers 401, and the form never shows.
'use strict';

(() => {
  const KEY = 'telemetry.apiToken';

  function token() {
    try {
      return sessionStorage.getItem(KEY);
    } catch (_) {
      return null;
    }
  }

  function withToken(headers) {
    const out = Object.assign({}, headers);
    const t = token();
    if (t) out.Authorization = `Bearer ${t}`;
    return out;
  }

  let asking = false;

  // Shows the token form above the page (once), saying why.
  function ask() {
    if (asking) return;
    asking = true;
    const form = document.createElement('form');
    form.id = 'token-form';
    form.className = 'token-form';
    const label = document.createElement('label');
    label.htmlFor = 'token-input';
    label.textContent = token()
      ? 'The gateway refused the API token of this tab. Enter another:'
      : 'This gateway needs an API token:';
    const input = document.createElement('input');
    input.id = 'token-input';
    input.type = 'password';
    input.autocomplete = 'off';
    input.required = true;
    const button = document.createElement('button');
    button.type = 'submit';
    button.textContent = 'Use token';
    form.append(label, input, button);
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const value = input.value.trim();
      if (!value) return;
      try {
        sessionStorage.setItem(KEY, value);
      } catch (_) { /* storage disabled: nothing to keep it in */ }
      location.reload();
    });
    const header = document.querySelector('header');
    if (header) header.after(form);
    else document.body.prepend(form);
    input.focus();
  }

  // fetch() with the token; a 401 brings up the form (the caller still sees the response).
  async function apiFetch(url, options = {}) {
    const resp = await fetch(url, Object.assign({}, options, { headers: withToken(options.headers) }));
    if (resp.status === 401) ask();
    return resp;
  }

  // The subprotocols for `new WebSocket(url, protocols)`; none without a token.
  function wsProtocols() {
    const t = token();
    return t ? ['telemetry', `bearer.${t}`] : [];
  }

  window.telemetryAuth = { fetch: apiFetch, wsProtocols, ask, token, waiting: () => asking };
})();
