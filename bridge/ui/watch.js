/**
 * @file Watching one job live: state, progress bar with step, it/s and ETA, the loss chart, the
 * latest preview image with a strip of the earlier ones, snapshots saved, the event log, and
 * cancel / resume buttons. History comes from the API (loss.csv, the events as jsonl) when a job
 * is opened; after that the WebSocket's events keep it current (deduplicated by their seq).
 */
import { ApiError, authUrl, request } from './api.js';
import { createLossChart, parseLossCsv } from './chart.js';
import { basename, duration, el } from './dom.js';
import { badge, jobName, promptBox } from './jobs.js';

const MAX_LOG_LINES = 400;
const RESUMABLE = new Set(['failed', 'cancelled', 'interrupted']);
const CANCELLABLE = new Set(['queued', 'running']);

/** One event as a log line (the server's /log text format, shortened). */
export function logLine(m) {
  const time = String(m.time ?? '').slice(11, 19);
  let text;
  if (m.type === 'step') text = `step ${m.step}/${m.totalSteps} loss ${Number(m.loss).toFixed(5)} lr ${m.learnRate} ${Number(m.itPerSec).toFixed(2)} it/s`;
  // started's message is the backend line (adapter, skipped ones)
  else if (m.type === 'started') text = `${m.totalSteps} steps from ${m.startStep} on ${m.message ?? m.backend}`;
  else if (typeof m.message === 'string') text = `${m.level ?? m.action ?? ''} ${m.message}`.trim();
  else if (m.type === 'preview' || m.type === 'snapshot') text = `step ${m.step}: ${basename(m.path)}`;
  else if (m.type === 'finished') text = `step ${m.step}: ${m.output}`;
  else if (m.type === 'lossLog') text = m.path;
  else if (m.type === 'queued') text = `position ${m.position}`;
  else text = m.step !== undefined ? `step ${m.step}` : '';
  return `${time} [${m.type}] ${text}`;
}

export function createWatch(root, { onChanged, onDeleted, onTrainAgain }) {
  let job;
  let seen = new Set();
  let logLines = [];
  const $ = (sel) => root.querySelector(sel);
  const chart = createLossChart($('.loss-chart'));
  const flash = (text) => ($('.watch-error').textContent = text);

  async function act(what) {
    flash('');
    try {
      onChanged(await request(`api/jobs/${job.id}/${what}`, { method: 'POST' }));
    } catch (err) {
      flash(err instanceof ApiError ? err.message : String(err));
    }
  }
  $('.cancel').addEventListener('click', () => act('cancel'));
  $('.resume').addEventListener('click', () => act('resume'));
  $('.again').addEventListener('click', () => onTrainAgain?.(job));
  $('.delete').addEventListener('click', async () => {
    if (!window.confirm(`Remove job '${jobName(job)}' from the list? Its output file is kept.`)) return;
    flash('');
    try {
      await request(`api/jobs/${job.id}`, { method: 'DELETE' });
      const gone = job;
      job = undefined;
      root.hidden = true;
      onDeleted?.(gone);
    } catch (err) {
      flash(err instanceof ApiError ? err.message : String(err));
    }
  });

  function renderHead() {
    $('.watch-title').replaceChildren(el('strong', {}, jobName(job)), ' ', el('span', { class: 'muted' }, job.type), ' ', badge(job.state));
    $('.cancel').disabled = !CANCELLABLE.has(job.state);
    $('.resume').disabled = !RESUMABLE.has(job.state);
    $('.delete').disabled = CANCELLABLE.has(job.state);
    $('.watch-usage').replaceChildren(...(job.state === 'finished' && job.usage ? ['Use it: ', promptBox(job), job.output ? el('small', { class: 'muted' }, ` ${job.output}`) : null] : []));
    $('.watch-usage').hidden = !(job.state === 'finished' && job.usage);
    $('.watch-failure').textContent = job.state === 'failed' ? job.error ?? 'failed' : '';
  }

  function renderProgress() {
    const total = job.totalSteps || job.progress?.totalSteps || 0;
    const step = job.step ?? 0;
    const p = job.progress;
    $('.bar-fill').style.width = `${total ? Math.min(100, (100 * step) / total) : 0}%`;
    const parts = [`step ${step} / ${total || '?'}`];
    if (p && job.state === 'running') parts.push(`${p.itPerSec.toFixed(2)} it/s`, `ETA ${duration(p.etaSeconds)}`);
    if (p) parts.push(`loss ${p.loss.toFixed(4)}`, `lr ${p.learnRate}`);
    if (job.state === 'queued') parts.push(`queued, #${(job.queuePosition ?? 0) + 1}`);
    $('.progress-text').textContent = parts.join(' · ');
  }

  function renderFiles() {
    const previews = job.previews ?? [];
    const latest = previews.at(-1);
    const main = $('.preview-main');
    main.replaceChildren(latest ? figure(latest, 'preview-latest') : el('p', { class: 'muted' }, 'No preview yet (previewEvery).'));
    $('.preview-strip').replaceChildren(...previews.slice(0, -1).reverse().map((p) => el('button', {
      type: 'button', class: 'thumb', title: `step ${p.step}`, onclick: () => main.replaceChildren(figure(p, 'preview-latest')),
    }, el('img', { src: authUrl(p.url), alt: `preview at step ${p.step}`, loading: 'lazy' }))));
    const snaps = job.snapshots ?? [];
    $('.snapshots').replaceChildren(...(snaps.length ? snaps.slice().reverse().map((s) => el('li', { title: s.path }, [el('span', { class: 'muted' }, `step ${s.step}`), ' ', basename(s.path)])) : [el('li', { class: 'muted' }, 'None yet (saveEvery).')]));
  }

  const figure = (p, cls) => el('figure', { class: cls }, [el('img', { src: authUrl(p.url), alt: `preview at step ${p.step}` }), el('figcaption', {}, `step ${p.step}`)]);

  function pushLog(lines) {
    logLines.push(...lines);
    if (logLines.length > MAX_LOG_LINES) logLines = logLines.slice(-MAX_LOG_LINES);
    const pre = $('.log');
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 20;
    pre.textContent = logLines.join('\n');
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  }

  function event(m) {
    if (m.type === 'state' || seen.has(m.seq)) return;
    seen.add(m.seq);
    if (m.type === 'step') chart.add([{ step: m.step, loss: m.loss }]);
    pushLog([logLine(m)]);
  }

  async function loadHistory(id) {
    const [csv, jsonl] = await Promise.all([
      request(`api/jobs/${id}/loss.csv`, { raw: true }).catch(() => ''),
      request(`api/jobs/${id}/log?format=jsonl`, { raw: true }).catch(() => ''),
    ]);
    if (job?.id !== id) return;
    chart.add(parseLossCsv(csv));
    const past = jsonl.split('\n').filter(Boolean).map((l) => JSON.parse(l)).filter((m) => !seen.has(m.seq));
    for (const m of past) seen.add(m.seq);
    // History first, then whatever arrived live while it loaded (kept in logLines).
    logLines = [...past.map(logLine), ...logLines];
    pushLog([]);
  }

  return {
    get id() {
      return job?.id;
    },
    /** Open a job (history loads in the background). */
    show(record) {
      job = record;
      seen = new Set();
      logLines = [];
      chart.reset();
      root.hidden = false;
      flash('');
      $('.log').textContent = '';
      this.update(record);
      return loadHistory(record.id);
    },
    /** The record changed (state message or folded event). */
    update(record) {
      if (record.id !== job?.id) return;
      job = record;
      renderHead();
      renderProgress();
      renderFiles();
    },
    event(m) {
      if (m.jobId === job?.id) event(m);
    },
  };
}
