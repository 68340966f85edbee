/**
 * @file Tiny DOM helpers: `el(tag, attrs, children)` (text is always set as text, never as HTML,
 * so job names and log lines cannot inject markup) and formatting of durations and sizes.
 */

/** Create an element. attrs: `class`, `on<event>` handlers, booleans as properties, the rest as attributes. */
export function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') node.addEventListener(k.slice(2), v);
    else if (k === 'checked' || k === 'selected' || k === 'disabled' || k === 'hidden') node[k] = Boolean(v);
    else if (k === 'value') node.value = String(v);
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of [children].flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

/** 3725 → "1h 02m", 95 → "1m 35s", 7.2 → "7s". */
export function duration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return '—';
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, '0')}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

/** Bytes → "1.5 GB". */
export function bytes(n) {
  if (!Number.isFinite(n)) return String(n);
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

/** The file name of a path (either separator). */
export const basename = (p) => String(p ?? '').split(/[\\/]/).pop();

/** Copy text; falls back to a selected textarea where the Clipboard API is refused (plain http, iframes). */
export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const ta = el('textarea', { style: 'position:fixed;opacity:0' }, text);
    document.body.append(ta);
    ta.select();
    const ok = document.execCommand('copy');
    ta.remove();
    return ok;
  }
}
