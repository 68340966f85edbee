/**
 * @file Who may talk to the server. A training sidecar on localhost is reachable by every web page
 * the user opens, so: requests whose Host is not one of our own names are refused (DNS
 * rebinding), requests whose Origin is a foreign site are refused (cross-site requests; the
 * WebSocket has no CORS at all), and with a token configured every route and the WebSocket need
 * `Authorization: Bearer <token>` (compared in constant time).
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import type { NextFunction, Request, Response } from 'express';

export interface SecurityOptions {
  /** Bearer token; undefined = no token needed. */
  token?: string;
  /** The host the server is bound to (added to the allowed Host names unless it is a wildcard). */
  host: string;
  /** More Host names to accept (e.g. the machine's LAN name when bound to 0.0.0.0). */
  allowedHosts?: string[];
  /** More Origins to accept besides our own (the webui's origin is added by the server). */
  allowedOrigins?: string[];
}

export type Verdict = { ok: true } | { ok: false; status: number; message: string };

const LOOPBACK = ['localhost', '127.0.0.1', '[::1]', '::1'];

/** Hostname of a Host header, lower-cased, IPv6 kept in brackets; undefined when malformed. */
export function hostname(hostHeader: string | undefined): string | undefined {
  if (!hostHeader) return undefined;
  try {
    const url = new URL(`http://${hostHeader}`);
    if (url.username || url.password || url.pathname !== '/') return undefined;
    return url.hostname.toLowerCase();
  } catch {
    return undefined;
  }
}

export function hostAllowed(hostHeader: string | undefined, opts: SecurityOptions): boolean {
  const name = hostname(hostHeader);
  if (!name) return false;
  const own = [...LOOPBACK, ...(opts.allowedHosts ?? []).map((h) => h.toLowerCase())];
  if (!['0.0.0.0', '::', ''].includes(opts.host)) own.push(opts.host.includes(':') && !opts.host.startsWith('[') ? `[${opts.host}]` : opts.host.toLowerCase());
  return own.includes(name);
}

/** No Origin (curl, scripts, same-origin GET), our own origin, or an explicitly allowed one. */
export function originAllowed(origin: string | undefined, hostHeader: string | undefined, opts: SecurityOptions): boolean {
  if (origin === undefined) return true;
  let parsed: URL;
  try {
    parsed = new URL(origin);
  } catch {
    return false; // includes 'null' (sandboxed frames, file://)
  }
  if ((parsed.protocol === 'http:' || parsed.protocol === 'https:') && parsed.host === hostHeader?.toLowerCase()) return true;
  return (opts.allowedOrigins ?? []).some((o) => {
    try {
      return new URL(o).origin === parsed.origin;
    } catch {
      return false;
    }
  });
}

/** Constant-time token comparison (hashing first makes the lengths equal). */
export function tokenMatches(given: string | undefined, token: string): boolean {
  if (given === undefined) return false;
  const a = createHash('sha256').update(given).digest();
  const b = createHash('sha256').update(token).digest();
  return timingSafeEqual(a, b);
}

/** The token a request carries: Authorization header, or `?token=` (WebSocket, <img> URLs). */
export function requestToken(req: IncomingMessage, allowQuery: boolean): string | undefined {
  const auth = req.headers.authorization;
  if (auth?.startsWith('Bearer ')) return auth.slice('Bearer '.length).trim();
  if (allowQuery) {
    const q = new URL(req.url ?? '/', 'http://x').searchParams.get('token');
    if (q !== null) return q;
  }
  // Browsers cannot set headers on a WebSocket; the subprotocol `bearer.<token>` carries it.
  const proto = req.headers['sec-websocket-protocol'];
  const bearer = proto?.split(',').map((s) => s.trim()).find((s) => s.startsWith('bearer.'));
  return bearer?.slice('bearer.'.length);
}

/** The checks shared by HTTP requests and WebSocket upgrades. */
export function check(req: IncomingMessage, opts: SecurityOptions): Verdict {
  if (!hostAllowed(req.headers.host, opts)) return { ok: false, status: 421, message: `Host '${req.headers.host ?? ''}' is not this server's name` };
  if (!originAllowed(req.headers.origin, req.headers.host, opts)) return { ok: false, status: 403, message: `Origin '${req.headers.origin}' is not allowed` };
  if (opts.token) {
    const allowQuery = req.method === 'GET';
    const given = requestToken(req, allowQuery);
    if (given === undefined) return { ok: false, status: 401, message: 'a token is required: Authorization: Bearer <SIDETRAIN_TOKEN>' };
    if (!tokenMatches(given, opts.token)) return { ok: false, status: 401, message: 'wrong token' };
  }
  return { ok: true };
}

/**
 * Host and Origin, for every request (the public page too: a rebinding page must not even read it).
 * The token is a separate middleware so the app can mount it after the few public handlers.
 */
export function originMiddleware(opts: SecurityOptions) {
  return (req: Request, res: Response, next: NextFunction): void => {
    const v = check(req, { ...opts, token: undefined });
    if (v.ok) return next();
    res.status(v.status).json({ error: v.message });
  };
}

/**
 * The token, for whatever reaches it. The app mounts it after the public handlers (docs, the
 * page's static files), so what is public is decided by the handler the router actually ran —
 * never by comparing the path as a string, which Express matches case-insensitively and
 * serve-static percent-decodes (`/API/jobs`, `/api%2Fjobs`, `//api/jobs` all reach routes).
 */
export function tokenMiddleware(opts: SecurityOptions) {
  return (req: Request, res: Response, next: NextFunction): void => {
    const v = check(req, opts);
    if (v.ok) return next();
    if (v.status === 401) res.setHeader('WWW-Authenticate', 'Bearer');
    res.status(v.status).json({ error: v.message });
  };
}
