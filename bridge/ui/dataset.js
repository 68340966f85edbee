/**
 * @file The dataset panel: the images folder of the form, as the job will use it (POST
 * api/dataset): a thumbnail per image with its size, its caption — editable in place, saved as
 * `<stem>.txt` beside the image (POST api/dataset/caption) — and the prompt it trains with; the
 * files skipped and why; warnings (captions that replace the trigger word, an empty folder).
 * It refreshes when the folder or a prompt option changes, so mistakes show before Train.
 */
import { ApiError, authUrl, request } from './api.js';
import { el } from './dom.js';

/** The panel widget: show(type, spec) loads the folder; usable() says whether the last folder had images. */
export function createDatasetPanel(root) {
  let last = { key: '', view: undefined, error: '' };
  let seq = 0;
  const head = el('p', { class: 'dataset-head muted' }, 'Fill in the images folder to see the images.');
  const warnings = el('ul', { class: 'dataset-warnings' });
  const grid = el('div', { class: 'dataset-grid' });
  const skipped = el('ul', { class: 'dataset-skipped muted' });
  root.replaceChildren(el('h3', {}, 'Training images'), head, warnings, grid, skipped);

  const thumb = (dir, file) => authUrl(`api/dataset/thumbnail?dir=${encodeURIComponent(dir)}&file=${encodeURIComponent(file)}`);

  function card(view, it, reload) {
    const caption = el('textarea', { class: 'caption', rows: 2, 'aria-label': `caption of ${it.file}`, spellcheck: true }, it.caption);
    const save = el('button', { type: 'button', class: 'save-caption', disabled: true }, 'Save caption');
    const status = el('small', { class: 'muted caption-status' }, it.captionSource === 'txt' ? 'from .txt' : 'from the file name');
    caption.addEventListener('input', () => (save.disabled = caption.value.trim() === it.caption));
    save.addEventListener('click', async () => {
      save.disabled = true;
      try {
        await request('api/dataset/caption', { method: 'POST', json: { dir: view.dir, file: it.file, caption: caption.value } });
        status.textContent = 'saved';
        reload();
      } catch (err) {
        status.textContent = err instanceof ApiError ? err.message : String(err);
        save.disabled = false;
      }
    });
    const size = it.width === it.sourceWidth && it.height === it.sourceHeight ? `${it.width}×${it.height}` : `${it.sourceWidth}×${it.sourceHeight} → ${it.width}×${it.height}`;
    return el('figure', { class: 'dataset-item', 'data-file': it.file }, [
      el('img', { src: thumb(view.dir, it.file), alt: it.file, loading: 'lazy' }),
      el('figcaption', {}, [
        el('strong', { class: 'file' }, it.file), ' ', el('small', { class: 'muted' }, size),
        caption, el('span', { class: 'caption-actions' }, [save, ' ', status]),
        el('small', { class: 'prompt-line' }, ['trains with: ', el('code', { class: 'final-prompt' }, it.prompt)]),
      ]),
    ]);
  }

  function render(view, reload) {
    head.textContent = `${view.items.length} image(s) in ${view.dir}${view.skipped.length ? `, ${view.skipped.length} skipped` : ''}`;
    warnings.replaceChildren(...view.warnings.map((w) => el('li', { class: 'error-text' }, w)));
    grid.replaceChildren(...view.items.map((it) => card(view, it, reload)));
    skipped.replaceChildren(...view.skipped.map((s) => el('li', {}, `skipped ${s.file}: ${s.reason}`)));
  }

  /** Load the folder of `spec.images` for method `type` (only when it or a prompt option changed, unless forced). */
  async function show(type, spec, force = false) {
    const key = JSON.stringify([type, spec.images, spec.instancePrompt, spec.captionMode, spec.template, spec.name, spec.width, spec.height, spec.resolution]);
    if (!spec.images) {
      last = { key, view: undefined, error: '' };
      head.textContent = 'Fill in the images folder to see the images.';
      warnings.replaceChildren();
      grid.replaceChildren();
      skipped.replaceChildren();
      return;
    }
    if (key === last.key && !force) return;
    const mine = ++seq;
    head.textContent = 'Reading the folder…';
    try {
      const view = await request('api/dataset', { method: 'POST', json: { type, spec } });
      if (mine !== seq) return;
      last = { key, view, error: '' };
      render(view, () => show(type, spec, true));
    } catch (err) {
      if (mine !== seq) return;
      const message = err instanceof ApiError ? (err.errors[0]?.message ?? err.message) : String(err);
      last = { key, view: undefined, error: message };
      head.textContent = `The images folder ${message}`;
      warnings.replaceChildren();
      grid.replaceChildren();
      skipped.replaceChildren();
    }
  }

  return {
    show,
    /** Why the folder cannot train (no usable image, unreadable), or '' when it can or is not known yet. */
    problem(spec) {
      if (!spec.images || last.key === '' || !last.key.includes(JSON.stringify(spec.images))) return '';
      if (last.error) return last.error;
      return last.view && !last.view.items.length ? 'has no usable images' : '';
    },
  };
}
