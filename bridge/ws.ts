/**
 * @file Live progress over WebSocket on the HTTP server's port: `/api/jobs/:id/events` for one job,
 * `/api/events` for all. The upgrade passes the same Host/Origin/token checks as HTTP (a browser
 * page on another site could otherwise read a localhost WebSocket). A client that connects late
 * first gets a `state` message per job (the current record), then live events.
 */
import type { IncomingMessage, Server } from 'node:http';
import type { Duplex } from 'node:stream';
import { WebSocketServer, type WebSocket } from 'ws';
import type { JobManager } from './jobs.ts';
import type { Envelope } from './hub.ts';
import { present } from './routes.ts';
import { check, type SecurityOptions } from './security.ts';

/** Past this many buffered bytes, step events are dropped for that client (the rest still go). */
const MAX_BUFFERED = 4 * 1024 * 1024;
const ALL_JOBS_STATE_LIMIT = 100;

function refuse(socket: Duplex, status: number, message: string): void {
  const body = JSON.stringify({ error: message });
  socket.end(`HTTP/1.1 ${status} ${status === 401 ? 'Unauthorized' : 'Refused'}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
}

function sendTo(ws: WebSocket, msg: Envelope): void {
  if (ws.readyState !== ws.OPEN) return;
  if (msg.type === 'step' && ws.bufferedAmount > MAX_BUFFERED) return;
  ws.send(JSON.stringify(msg));
}

export function attachEvents(server: Server, manager: JobManager, security: SecurityOptions): WebSocketServer {
  const wss = new WebSocketServer({
    noServer: true,
    maxPayload: 64 * 1024,
    // Echo the `bearer.<token>` subprotocol back so browsers accept the handshake.
    handleProtocols: (protocols) => [...protocols].find((p) => p.startsWith('bearer.')) ?? false,
  });
  server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    // Host, Origin and token before anything about the path: an upgrade to any path, however it
    // is spelled, is answered 401 without the token (the same check as every HTTP route).
    const v = check(req, security);
    if (!v.ok) return refuse(socket, v.status, v.message);
    const path = new URL(req.url ?? '/', 'http://x').pathname;
    const m = /^\/api\/jobs\/([0-9a-f]{8,32})\/events$/.exec(path);
    if (!m && path !== '/api/events' && path !== '/ws') return refuse(socket, 404, 'no WebSocket here');
    const jobId = m?.[1] ?? '*';
    if (jobId !== '*' && !manager.get(jobId)) return refuse(socket, 404, `no job '${jobId}'`);
    wss.handleUpgrade(req, socket, head, (ws) => subscribe(ws, manager, jobId));
  });
  return wss;
}

function subscribe(ws: WebSocket, manager: JobManager, jobId: string): void {
  // State first, then subscribe, in the same tick: nothing can slip in between.
  const jobs = jobId === '*' ? manager.list().slice(0, ALL_JOBS_STATE_LIMIT) : [manager.get(jobId)!];
  for (const job of jobs) {
    sendTo(ws, { type: 'state', job: present(job), jobId: job.id, seq: manager.hub.seq(job.id), time: new Date().toISOString() });
  }
  const off = manager.hub.subscribe(jobId, (msg) => sendTo(ws, msg.type === 'state' ? { ...msg, job: present(msg.job) } : msg));
  ws.on('close', off);
  ws.on('error', off);
  // Clients only listen; anything they send is ignored.
  ws.on('message', () => {});
}
