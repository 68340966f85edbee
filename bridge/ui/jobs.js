/**
 * @file The job list: every job the server knows (running, queued, finished, failed, cancelled,
 * interrupted), kept current from the WebSocket, with a state filter, and for a finished job the
 * output's name and the prompt that uses it, with a copy button.
 */
import { basename, copyText, el } from './dom.js';

export const STATES = ['running', 'queued', 'finished', 'failed', 'cancelled', 'interrupted'];

/** How to use a job's output in a prompt: `a photo of pallas_cat` for embeddings, `<hypernet:name:1>` as is. */
export function promptOf(job) {
  if (!job.usage) return '';
  return job.kind === 'embedding' ? `a photo of ${job.usage}` : job.usage;
}

export const jobName = (job) => job.spec?.name ?? job.id;

const ORDER = { running: 0, queued: 1 };

function sorted(jobs) {
  return [...jobs].sort((a, b) => {
    const oa = ORDER[a.state] ?? 2;
    const ob = ORDER[b.state] ?? 2;
    if (oa !== ob) return oa - ob;
    if (a.state === 'queued') return (a.queuePosition ?? 0) - (b.queuePosition ?? 0);
    return String(b.createdAt).localeCompare(String(a.createdAt));
  });
}

/** A prompt with a copy button (used in the list and in the job view). */
export function promptBox(job) {
  const prompt = promptOf(job);
  if (!prompt) return null;
  const button = el('button', { type: 'button', class: 'copy', title: 'Copy the prompt' }, 'Copy');
  button.addEventListener('click', async (e) => {
    e.stopPropagation();
    const ok = await copyText(prompt);
    button.textContent = ok ? 'Copied' : 'Copy failed';
    setTimeout(() => (button.textContent = 'Copy'), 1500);
  });
  return el('span', { class: 'prompt' }, [el('code', {}, prompt), button]);
}

export const badge = (state) => el('span', { class: `badge state-${state}` }, state);

/** The list widget: render(jobs, selectedId) redraws; onSelect(id) is called on a click. */
export function createJobList(root, onSelect) {
  let filter = 'all';
  let last = { jobs: [], selected: undefined };
  const tabs = el('div', { class: 'filters', role: 'tablist' });
  const table = el('div', { class: 'job-rows' });
  root.replaceChildren(tabs, table);

  const row = (job, selected) => {
    const progress = job.totalSteps ? `${job.step} / ${job.totalSteps}` : `${job.step}`;
    const detail = job.state === 'finished' ? promptBox(job)
      : job.state === 'failed' ? el('span', { class: 'error-text' }, job.error ?? 'failed')
        : job.state === 'queued' ? el('span', { class: 'muted' }, `#${(job.queuePosition ?? 0) + 1} in queue`) : null;
    return el('div', {
      class: `job-row${selected ? ' selected' : ''}`, 'data-job': job.id, 'data-state': job.state, tabindex: 0,
      onclick: () => onSelect(job.id), onkeydown: (e) => e.key === 'Enter' && onSelect(job.id),
    }, [
      badge(job.state),
      el('span', { class: 'job-name', title: job.output ?? '' }, [jobName(job), job.output ? el('small', { class: 'muted' }, ` ${basename(job.output)}`) : null]),
      el('span', { class: 'job-type muted' }, job.type),
      el('span', { class: 'job-steps muted' }, progress),
      el('span', { class: 'job-detail' }, detail),
    ]);
  };

  const render = (jobs = last.jobs, selected = last.selected) => {
    last = { jobs, selected };
    const counts = Object.fromEntries(STATES.map((s) => [s, jobs.filter((j) => j.state === s).length]));
    tabs.replaceChildren(...['all', ...STATES].map((s) => el('button', {
      type: 'button', role: 'tab', class: `filter${filter === s ? ' active' : ''}`, 'aria-selected': String(filter === s), 'data-filter': s,
      onclick: () => ((filter = s), render()),
    }, `${s} ${s === 'all' ? jobs.length : counts[s]}`)));
    const shown = sorted(jobs).filter((j) => filter === 'all' || j.state === filter);
    table.replaceChildren(...(shown.length ? shown.map((j) => row(j, j.id === selected)) : [el('p', { class: 'muted empty' }, filter === 'all' ? 'No jobs yet.' : `No ${filter} jobs.`)]));
  };
  return { render };
}
