/**
 * @file The training page: loads the methods and their schemas, builds one form per method, shows
 * the estimate before Train, starts jobs, and keeps the job list and the watched job current
 * from the WebSocket (`api/events`: a `state` message per job first, then live events).
 */
import { ApiError, connectEvents, request } from './api.js';
import { bytes, duration, el } from './dom.js';
import { buildForm } from './form.js';
import { createJobList } from './jobs.js';
import { createWatch } from './watch.js';
import { createDatasetPanel } from './dataset.js';

const jobs = new Map();
const $ = (sel) => document.querySelector(sel);
let forms = [];
let current;
let list;
let watch;
let dataset;

/** Fold a live event into the job record, so the list and view update before the next state message. */
function fold(job, m) {
  if (m.type === 'step') Object.assign(job, { step: m.step, totalSteps: m.totalSteps, progress: { ...m } });
  else if (m.type === 'started') Object.assign(job, { totalSteps: m.totalSteps, step: m.startStep, backend: m.backend });
  else if (m.type === 'preview' && !job.previews.some((p) => p.url === m.url)) job.previews = [...job.previews, { step: m.step, path: m.path, url: m.url }];
  else if (m.type === 'snapshot' && !job.snapshots.some((s) => s.path === m.path)) job.snapshots = [...job.snapshots, { step: m.step, path: m.path }];
  else if (m.type === 'queued') job.queuePosition = m.position;
}

function refresh() {
  list.render([...jobs.values()], watch.id);
}

function onMessage(m) {
  if (m.type === 'state') jobs.set(m.jobId, m.job);
  else if (jobs.has(m.jobId)) fold(jobs.get(m.jobId), m);
  const job = jobs.get(m.jobId);
  if (job && m.jobId === watch.id) watch.update(job);
  watch.event(m);
  refresh();
}

function select(id) {
  const job = jobs.get(id);
  if (!job) return;
  void watch.show(job);
  refresh();
}

function onDeleted(job) {
  jobs.delete(job.id);
  refresh();
}

/** "Train again": the job's form, filled with its settings (not resume/overwrite), ready to change and submit. */
function onTrainAgain(job) {
  const form = forms.find((f) => f.type === job.type);
  if (!form) return;
  showMethod(job.type);
  form.fill(job.spec ?? {});
  form.node.scrollIntoView({ block: 'start' });
}

function onChanged(job) {
  jobs.set(job.id, job);
  watch.update(job);
  refresh();
}

/**
 * Estimate → a line and notes. trainers/memory/estimate.ts answers {peakBytes, secondsPerStep, backend,
 * notes, breakdown}; other numbers are shown by their names (bytes and seconds formatted), the
 * breakdown as the line's tooltip.
 */
function describeEstimate(result, spec) {
  if (!result || typeof result !== 'object') return { text: String(result), notes: [], detail: '' };
  const parts = [];
  const notes = [];
  let detail = '';
  const perStep = (v) => (v < 1 ? `${Math.round(v * 1000)} ms/step` : `${v.toFixed(2)} s/step`);
  for (const [k, v] of Object.entries(result)) {
    if (k === 'peakBytes' && typeof v === 'number') parts.push(`peak memory ~${bytes(v)}`);
    else if (k === 'secondsPerStep' && typeof v === 'number') {
      parts.push(perStep(v));
      // the wait before the first step too (bridge/preflight.ts startSeconds)
      if (typeof spec.steps === 'number') parts.push(`~${duration(v * spec.steps + (result.startSeconds ?? 0))} for ${spec.steps} steps with starting and loading`);
    } else if (k === 'startSeconds') continue;
    else if (k === 'backend') parts.push(`on ${v}`);
    else if (Array.isArray(v)) notes.push(...v.map(String));
    else if (v && typeof v === 'object') detail += `${k}: ${JSON.stringify(v, null, 1)}\n`;
    else if (typeof v === 'number' && /bytes|memory/i.test(k)) parts.push(`${k} ${bytes(v)}`);
    else if (typeof v === 'number' && /seconds|time/i.test(k)) parts.push(`${k} ${duration(v)}`);
    else parts.push(`${k} ${v}`);
  }
  return { text: parts.join(' · '), notes, detail };
}

/** The label a person sees for an API field (`/spec/batchSize` → "Batch size"). */
function labelOf(field) {
  const key = /^\/spec\/([^/]+)/.exec(field ?? '')?.[1];
  return (key && current?.props[key]?.title) || key || field;
}

function showEstimate(text, notes = [], detail = '') {
  const box = $('.estimate');
  box.title = detail;
  box.replaceChildren(text, ...(notes.length ? [el('details', {}, [el('summary', {}, `notes (${notes.length})`), el('ul', {}, notes.map((n) => el('li', {}, n)))])] : []));
}

let estimateTimer;
let estimateSeq = 0;

function scheduleEstimate() {
  clearTimeout(estimateTimer);
  estimateTimer = setTimeout(() => {
    void estimate();
    void dataset?.show(current.type, current.read());
  }, 500);
}

async function estimate() {
  const spec = current.read();
  const missing = current.required.filter((k) => spec[k] === undefined || spec[k] === '');
  if (missing.length) return showEstimate(`Estimate: fill in ${missing.map((k) => labelOf(`/spec/${k}`)).join(', ')} first.`);
  const seq = ++estimateSeq;
  showEstimate('Estimate: …');
  let shown;
  try {
    const e = describeEstimate(await request('api/estimate', { method: 'POST', json: { type: current.type, spec } }), spec);
    shown = [`Estimate: ${e.text}`, e.notes, e.detail];
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    if (err.status === 501) shown = ['Estimate: not available on this server.'];
    else if (err.errors.length) shown = [`Estimate: first fix ${err.errors.map((e) => `${labelOf(e.field)} (${e.message})`).join('; ')}`];
    else shown = [`Estimate: not available (${err.message}).`];
  }
  if (seq === estimateSeq) showEstimate(...shown);
}

async function train(event) {
  event.preventDefault();
  const button = $('.train');
  const errorBox = $('.form-error');
  errorBox.textContent = '';
  current.clearErrors();
  const spec = current.read();
  // a required field left empty is answered here, before anything is sent (the Dreambooth instance prompt above all)
  const missing = current.required.filter((k) => spec[k] === undefined || spec[k] === '');
  const folder = dataset?.problem(spec);
  if (missing.length || folder) {
    const errors = missing.map((k) => ({ field: `/spec/${k}`, message: 'is required', text: `${k} is required` }));
    if (folder) errors.push({ field: '/spec/images', message: folder, text: `images ${folder}` });
    current.showErrors(errors);
    errorBox.textContent = 'Fill in the fields marked in red.';
    return;
  }
  button.disabled = true;
  try {
    const job = await request('api/jobs', { method: 'POST', json: { type: current.type, spec } });
    jobs.set(job.id, job);
    select(job.id);
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    const unplaced = current.showErrors(err.errors);
    errorBox.textContent = unplaced.length ? unplaced.map((e) => `${labelOf(e.field)} ${e.message}`).join('; ') : err.errors.length ? 'Fix the fields marked in red.' : err.message;
  } finally {
    button.disabled = false;
  }
}

function showMethod(type) {
  current = forms.find((f) => f.type === type);
  for (const f of forms) f.node.hidden = f !== current;
  for (const b of document.querySelectorAll('.method-tab')) b.classList.toggle('active', b.dataset.method === type);
  // e.g. Forge ignores hypernetworks: said before anything is trained (GET /api/methods webuiNote)
  $('.webui-note').textContent = current?.webuiNote ?? '';
  $('.webui-note').hidden = !current?.webuiNote;
  // the previous method's numbers must not stay up, nor its answer still in flight land here
  estimateSeq++;
  showEstimate('Estimate: …');
  scheduleEstimate();
}

function buildForms(methods, components, models) {
  forms = methods.map((m) => ({ ...buildForm(m, components, models), type: m.type, required: m.jsonSchema?.required ?? [], webuiNote: m.webuiNote }));
  const label = (m) => (m.jsonSchema?.title ?? m.type).replace(/ job$/i, '');
  $('.method-tabs').replaceChildren(...methods.map((m) => el('button', { type: 'button', class: 'method-tab', 'data-method': m.type, onclick: () => showMethod(m.type) }, label(m))));
  $('.forms').replaceChildren(...forms.map((f) => f.node));
  if (!methods.length) $('.forms').textContent = 'This server has no training methods.';
  else showMethod(methods[0].type);
}

function showHealth(h) {
  // --webui-dir (or explicit folders) configures a webui without a URL: its folders say which
  const root = /^(.*)[\\/]models[\\/]Stable-diffusion$/.exec(h.folders?.checkpoints ?? '')?.[1];
  const webui = h.webui?.url ? `${h.webui.flavour ?? 'webui'} ${h.webui.up ? 'up' : 'down'} (${h.webui.url})` : root ? `webui folder ${root}` : `no webui set up: outputs in ${h.folders?.lora?.replace(/[\\/]lora$/, '') ?? 'the state folder'}`;
  $('.health').textContent = `v${h.version} · backend ${h.backend ?? '(first job decides)'} · ${webui}`;
  // the GPU adapter (vendor, architecture, limits) or why webgpu is skipped, on hover
  if (h.webgpu) $('.health').title = `webgpu: ${h.webgpu}`;
}

async function main() {
  showHealth(await request('api/health'));
  const [{ methods }, openapi, models, { jobs: list0 }] = await Promise.all([
    request('api/methods'),
    request('openapi.json'),
    request('api/webui/models').catch(() => ({ items: [] })),
    request('api/jobs'),
  ]);
  buildForms(methods, openapi.components?.schemas ?? {}, models.items ?? []);
  const form = $('#job-form');
  form.addEventListener('submit', train);
  form.addEventListener('input', scheduleEstimate);
  form.addEventListener('change', scheduleEstimate);
  list = createJobList($('.job-list'), select);
  dataset = createDatasetPanel($('.dataset-panel'));
  watch = createWatch($('.watch'), { onChanged, onDeleted, onTrainAgain });
  for (const j of list0) jobs.set(j.id, j);
  refresh();
  const first = list0.find((j) => j.state === 'running') ?? list0[0];
  if (first) select(first.id);
  connectEvents(onMessage, (status) => {
    $('.live').textContent = status === 'open' ? 'live' : 'reconnecting…';
    $('.live').classList.toggle('down', status !== 'open');
  });
}

main().catch((err) => {
  $('.fatal').hidden = false;
  $('.fatal').textContent = `Could not load the page: ${err.message}`;
});
