/**
 * @file The page's connection to the sidecar: JSON requests and the event WebSocket, with the
 * token. Every URL is RELATIVE (`api/...`): the page is also served under the webui's
 * `/sidetrain/` reverse proxy (extension/), where an absolute `/api/...` would miss the sidecar.
 *
 * Token: when the API answers 401 the page asks for the token once, keeps it in sessionStorage
 * and sends `Authorization: Bearer`. A browser cannot set headers on a WebSocket, so there it
 * goes as the `bearer.<token>` subprotocol (bridge/security.ts requestToken), or `?token=` when
 * the token has characters a subprotocol cannot carry; <img> URLs use `?token=` too.
 */

const TOKEN_KEY = 'sidetrain.token';

/** An API error: HTTP status, the top-level message and the field-named errors. */
export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error ?? `HTTP ${status}`);
    this.status = status;
    this.body = body ?? {};
    /** [{field: '/spec/steps', message: 'must be >= 1', text}] */
    this.errors = Array.isArray(body?.errors) ? body.errors : [];
  }
}

export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY) ?? '',
  set: (t) => (t ? sessionStorage.setItem(TOKEN_KEY, t) : sessionStorage.removeItem(TOKEN_KEY)),
};

let asking;

/** Show the token dialog (one at a time); resolves with the token typed, or '' if dismissed. */
function askToken(message) {
  asking ??= new Promise((resolve) => {
    const dialog = document.getElementById('token-dialog');
    const input = dialog.querySelector('input');
    dialog.querySelector('.token-message').textContent = message;
    input.value = '';
    dialog.addEventListener('close', () => {
      asking = undefined;
      resolve(dialog.returnValue === 'ok' ? input.value.trim() : '');
    }, { once: true });
    dialog.showModal();
    input.focus();
  });
  return asking;
}

/** Path relative to the page; the server's own URLs start with '/', which would leave a proxy prefix. */
export const rel = (path) => path.replace(/^\/+/, '');

/** A GET URL the browser fetches by itself (<img>, <a>): the token as a query parameter. */
export function authUrl(path) {
  const t = token.get();
  if (!t) return rel(path);
  return `${rel(path)}${path.includes('?') ? '&' : '?'}token=${encodeURIComponent(t)}`;
}

async function parse(res) {
  const text = await res.text();
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

/** Request `api/...`; JSON in and out. Throws ApiError on a non-2xx answer. */
export async function request(path, { method = 'GET', json, raw = false } = {}) {
  for (;;) {
    const headers = {};
    const t = token.get();
    if (t) headers.Authorization = `Bearer ${t}`;
    if (json !== undefined) headers['Content-Type'] = 'application/json';
    const res = await fetch(rel(path), { method, headers, body: json === undefined ? undefined : JSON.stringify(json) });
    if (res.status === 401) {
      const body = await parse(res);
      const typed = await askToken(t ? 'That token was refused. Enter the sidecar token (SIDETRAIN_TOKEN):' : 'This sidecar needs a token (SIDETRAIN_TOKEN):');
      if (!typed) throw new ApiError(401, body);
      token.set(typed);
      continue;
    }
    if (raw) {
      if (!res.ok) throw new ApiError(res.status, await parse(res));
      return res.text();
    }
    const body = res.status === 204 ? null : await parse(res);
    if (!res.ok) throw new ApiError(res.status, typeof body === 'object' ? body : { error: String(body) });
    return body;
  }
}

/** Subprotocol tokens may only hold RFC 7230 token characters. */
const PROTOCOL_SAFE = /^[A-Za-z0-9!#$%&'*+.^_`|~-]+$/;

/**
 * Subscribe to every job's events (`api/events`), reconnecting after a drop. `onMessage(msg)`
 * gets each envelope; `onStatus('open'|'closed')` the connection state. Returns stop().
 */
export function connectEvents(onMessage, onStatus = () => {}) {
  let ws;
  let stopped = false;
  let delay = 500;
  const open = () => {
    const url = new URL('api/events', location.href);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    const t = token.get();
    const protocols = [];
    if (t && PROTOCOL_SAFE.test(t)) protocols.push(`bearer.${t}`);
    else if (t) url.searchParams.set('token', t);
    ws = new WebSocket(url, protocols);
    ws.onopen = () => {
      delay = 500;
      onStatus('open');
    };
    ws.onmessage = (e) => onMessage(JSON.parse(e.data));
    ws.onclose = () => {
      onStatus('closed');
      if (stopped) return;
      setTimeout(open, delay);
      delay = Math.min(delay * 2, 10_000);
    };
  };
  open();
  return () => {
    stopped = true;
    ws?.close();
  };
}
