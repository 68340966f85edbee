/**
 * @file A job form generated from the method's JSON Schema (GET api/methods; `$ref`s into other
 * schema files resolved through openapi.json's components). Names, defaults, limits, help text
 * and enums come from the schema: nothing here repeats them. Required fields come first, then the
 * common ones, and the rest are collapsed under "Advanced". Errors from the API
 * (`{field: '/spec/steps', message}`) are shown under the field they name.
 */
import { el } from './dom.js';

/** Shown open under the required fields, when the schema has them; every other field is "advanced". */
const COMMON = ['captionMode', 'classPrompt', 'lora', 'rank', 'alpha', 'steps', 'lr', 'batchSize', 'gradAccum', 'width', 'height', 'initText', 'vectors', 'template', 'layerStructure', 'activation', 'previewEvery', 'saveEvery', 'previewPrompt', 'seed', 'resume', 'overwrite'];

/** Resolve `$ref` (`common.json#/definitions/steps`, `#/definitions/x`) against `components`; the property's own keys win. */
export function resolveProp(prop, components, stem) {
  if (!prop?.$ref) return prop ?? {};
  const [file, pointer = ''] = prop.$ref.split('#');
  const target = file ? file.replace(/\.json$/, '').split('/').pop() : stem;
  let node = components[target];
  for (const part of pointer.split('/').filter(Boolean)) node = node?.[part];
  const { $ref: _ref, ...own } = prop;
  return { ...resolveProp(node, components, target), ...own };
}

/** What the field is, from its name (as bridge/spec.ts roleOf decides) or its `x-sidetrain` tag. */
function roleOf(key, prop) {
  const tag = prop['x-sidetrain'];
  if (typeof tag === 'string') return tag.startsWith('output:') ? 'output' : tag;
  if (/(^images|Images|^dataset|Dataset)(Dir)?$/.test(key)) return 'dataset';
  if (/^model$|Model$/.test(key)) return 'model';
  if (/Dir$/.test(key)) return 'output';
  return undefined;
}

function limits(p) {
  const parts = [];
  if (p.minimum !== undefined) parts.push(`≥ ${p.minimum}`);
  if (p.exclusiveMinimum !== undefined) parts.push(`> ${p.exclusiveMinimum}`);
  if (p.maximum !== undefined) parts.push(`≤ ${p.maximum}`);
  if (p.exclusiveMaximum !== undefined) parts.push(`< ${p.exclusiveMaximum}`);
  if (p.multipleOf !== undefined) parts.push(`multiple of ${p.multipleOf}`);
  return parts.join(', ');
}

/** The input element for one property (select, checkbox, number, list or text). */
function inputFor(id, key, p, role, models, required) {
  if (p.enum) {
    return el('select', { id, name: key }, p.enum.map((v) => el('option', { value: String(v), selected: v === p.default }, String(v))));
  }
  if (p.type === 'boolean') return el('input', { id, name: key, type: 'checkbox', checked: p.default === true });
  if (p.type === 'integer' || p.type === 'number') {
    const step = p.multipleOf ?? (p.type === 'integer' ? 1 : 'any');
    return el('input', { id, name: key, type: 'number', step, min: p.minimum, max: p.maximum, value: p.default ?? '' });
  }
  if (p.type === 'array') return el('input', { id, name: key, type: 'text', value: (p.default ?? []).join(', '), placeholder: 'comma-separated, e.g. 1, 2, 1' });
  if (role === 'model') return modelPicker(id, key, models);
  const listId = p.examples ? `${id}-examples` : undefined;
  const input = el('input', { id, name: key, type: 'text', value: p.default ?? '', list: listId, maxlength: p.maxLength, spellcheck: false, required });
  if (role === 'dataset') input.placeholder = '/path/to/training/images';
  if (role === 'output') input.placeholder = 'default: the configured folder';
  if (!listId) return input;
  return el('span', { class: 'with-list' }, [input, el('datalist', { id: listId }, p.examples.map((v) => el('option', { value: v })))]);
}

/** Checkpoint picker: the server's model list (webui API or checkpoints folder), or a typed path. */
function familyLabel(m) {
  const name = m.title ?? m.name;
  if (!m.family) return name;
  const shown = { sd1: 'SD1', sd2: 'SD2', sdxl: 'SDXL' }[m.family] ?? m.family;
  return `${name} [${shown}]`;
}

function modelPicker(id, key, models) {
  const select = el('select', { id, name: key, class: 'model-select' }, [
    // the family (SD1/SD2/SDXL, or why it cannot be trained) beside each checkpoint's name
    ...models.map((m) => el('option', { value: m.path ?? m.name }, familyLabel(m))),
    el('option', { value: '' }, models.length ? 'Other path…' : 'Type a checkpoint path…'),
  ]);
  const other = el('input', { type: 'text', class: 'model-path', placeholder: '/path/to/model.safetensors', spellcheck: false, 'data-for': key });
  const sync = () => (other.hidden = select.value !== '');
  select.addEventListener('change', sync);
  sync();
  return el('span', { class: 'model-picker' }, [select, other]);
}

function fieldRow(method, key, p, required, role, models) {
  const range = limits(p);
  // ids carry the method: every method's form is in the page at once, and a label must focus its own field
  const id = `f-${method}-${key}`;
  return el('div', { class: `field${required ? ' required' : ''}`, 'data-field': key }, [
    // the schema's title is the label (words, not the field name); the field name stays as the tooltip for API and job-file users
    el('label', { for: id, title: `${key} (--${key.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)})` }, [
      p.title ?? key, required ? el('span', { class: 'req', title: 'required' }, ' *') : null, range ? el('small', { class: 'limits' }, range) : null,
    ]),
    inputFor(id, key, p, role, models, required),
    el('div', { class: 'field-error', role: 'alert' }),
    p.description ? el('small', { class: 'help', title: p.description }, p.description) : null,
    p.default !== undefined && p.default !== '' && p.type !== 'boolean' ? el('small', { class: 'default muted' }, `default: ${Array.isArray(p.default) ? p.default.join(', ') : p.default}`) : null,
  ]);
}

/**
 * Build the form for one method. Returns {node, read(), showErrors(errors), clearErrors()}:
 * read() gives the spec to send (empty optional fields left out, so the server's defaults apply).
 */
export function buildForm(method, components, models) {
  const schema = method.jsonSchema ?? {};
  const stem = method.schema;
  const props = Object.fromEntries(Object.entries(schema.properties ?? {}).map(([k, v]) => [k, resolveProp(v, components, stem)]));
  const required = (schema.required ?? []).filter((k) => k in props);
  const common = COMMON.filter((k) => k in props && !required.includes(k));
  const rest = Object.keys(props).filter((k) => !required.includes(k) && !common.includes(k));
  const row = (k) => fieldRow(method.type, k, props[k], required.includes(k), roleOf(k, props[k]), models);
  const advanced = el('details', { class: 'advanced' }, [el('summary', {}, `Advanced (${rest.length})`), ...rest.map(row)]);
  const node = el('div', { class: 'schema-form', 'data-method': method.type }, [
    schema.description ? el('p', { class: 'method-help' }, schema.description) : null,
    ...required.map(row),
    ...common.map(row),
    rest.length ? advanced : null,
  ]);
  const read = () => readSpec(node, props, required);
  const clearErrors = () => {
    for (const e of node.querySelectorAll('.field-error')) e.textContent = '';
    for (const f of node.querySelectorAll('.field.invalid')) f.classList.remove('invalid');
  };
  /** Put each error under its field; returns the ones that name no field of this form. */
  const showErrors = (errors) => {
    clearErrors();
    const unplaced = [];
    for (const e of errors) {
      const key = /^\/spec\/([^/]+)/.exec(e.field ?? '')?.[1];
      const row = key && node.querySelector(`.field[data-field="${CSS.escape(key)}"]`);
      if (!row) {
        unplaced.push(e);
        continue;
      }
      row.classList.add('invalid');
      const box = row.querySelector('.field-error');
      box.textContent = [box.textContent, e.message].filter(Boolean).join('; ');
      if (row.closest('details')) row.closest('details').open = true;
    }
    const first = node.querySelector('.field.invalid');
    first?.scrollIntoView({ block: 'center' });
    first?.querySelector('input, select')?.focus({ preventScroll: true });
    return unplaced;
  };
  /** Put a job's settings into the form (its output folders and resume/overwrite left as they are). */
  const fill = (spec) => {
    for (const [key, value] of Object.entries(spec)) {
      const p = props[key];
      const input = node.querySelector(`[name="${CSS.escape(key)}"]`);
      if (!p || !input || ['resume', 'overwrite', 'dryRun'].includes(key) || roleOf(key, p) === 'output') continue;
      if (p.type === 'boolean') input.checked = value === true;
      else if (input.classList.contains('model-select')) {
        input.value = [...input.options].some((o) => o.value === value) ? String(value) : '';
        const other = node.querySelector(`.model-path[data-for="${CSS.escape(key)}"]`);
        other.value = input.value ? '' : String(value);
        other.hidden = input.value !== '';
      } else input.value = Array.isArray(value) ? value.join(', ') : String(value);
    }
    node.dispatchEvent(new Event('change', { bubbles: true }));
  };
  return { node, read, showErrors, clearErrors, props, fill };
}

function parseList(text, p) {
  const items = text.split(/[,\s]+/).filter(Boolean);
  const itemType = p.items?.type;
  return items.map((s) => (itemType === 'integer' || itemType === 'number' ? Number(s) : s));
}

/** The spec as typed. Invalid numbers go as they are so that the server names the field. */
function readSpec(node, props, required) {
  const spec = {};
  for (const [key, p] of Object.entries(props)) {
    const input = node.querySelector(`[name="${CSS.escape(key)}"]`);
    if (!input) continue;
    if (p.type === 'boolean') {
      if (input.checked !== (p.default ?? false)) spec[key] = input.checked;
      continue;
    }
    let value = input.value;
    if (input.classList.contains('model-select') && value === '') value = node.querySelector(`.model-path[data-for="${CSS.escape(key)}"]`).value.trim();
    if (value === '' && !required.includes(key)) continue;
    if (p.enum) spec[key] = p.enum.find((v) => String(v) === value) ?? value;
    else if (p.type === 'integer' || p.type === 'number') spec[key] = value === '' || Number.isNaN(Number(value)) ? value : Number(value);
    else if (p.type === 'array') spec[key] = parseList(value, p);
    else spec[key] = value;
  }
  return spec;
}
