/**
 * @file The dataset panel's routes (and what `sidetrain dataset` prints): a training folder as a
 * method will use it — every image with its size, training size, caption and the prompt it trains
 * with, the files skipped and why, and a warning where captions replace the trigger word — plus
 * thumbnails and caption editing (`<stem>.txt`, atomic). Nothing here loads TF.js or decodes more
 * than an image header (trainers/data/dataset-preview.ts).
 */
import type { Request } from 'express';
import { getSchema } from '../schemas/index.ts';
import { previewDataset, thumbnail, writeCaption, type DatasetPreview } from '../trainers/data/dataset-preview.ts';
import { loadTemplate } from '../trainers/text/templates.ts';
import { captionOverrideWarning, fixedTemplate, instanceTemplates, type CaptionMode } from '../trainers/train/instance-prompts.ts';
import { PathError, checkReadableDir } from '../trainers/io/paths.ts';
import { headerFamily, nativeResolution } from '../trainers/io/checkpoint.ts';
import { RequestError, fieldError } from './spec.ts';
import type { MethodEntry } from '../trainers/job.ts';
import type { RouteDef } from './routes.ts';

export type DatasetView = DatasetPreview & { warnings: string[] };

/** The spec's value, else the method schema's default. */
function option<T>(spec: Record<string, unknown>, props: Record<string, { default?: unknown }>, key: string): T | undefined {
  return (spec[key] ?? props[key]?.default) as T | undefined;
}

/** The folder `spec.images` as method `type` will train on it. */
export async function datasetView(methods: Record<string, MethodEntry>, type: string, spec: Record<string, unknown>): Promise<DatasetView> {
  const entry = methods[type];
  if (!entry) throw new RequestError([fieldError('/type', `must be one of: ${Object.keys(methods).join(', ')}`)]);
  const props = (getSchema(entry.schema)?.properties ?? {}) as Record<string, { default?: unknown }>;
  const field = '/spec/images';
  if (typeof spec.images !== 'string' || !spec.images) throw new RequestError([fieldError(field, 'is required')]);
  let dir: string;
  try {
    dir = await checkReadableDir(spec.images, field);
  } catch (err) {
    if (err instanceof PathError) throw new RequestError([fieldError(field, err.message)]);
    throw err;
  }
  const warnings: string[] = [];
  const instancePrompt = option<string>(spec, props, 'instancePrompt');
  const captionMode = option<CaptionMode>(spec, props, 'captionMode');
  const template = option<string>(spec, props, 'template');
  const resolution = option<number>(spec, props, 'resolution');
  const templates = captionMode && !template
    ? instanceTemplates(instancePrompt || '[filewords]', captionMode) // Dreambooth, LoRA
    : template ? { template: await loadTemplate(template) } : { template: fixedTemplate('[filewords]') }; // TI, hypernetwork; fine-tune
  if (captionMode && !template && !instancePrompt) warnings.push('no instance prompt yet: it is required, and it carries the trigger word');
  // the size and cut the run will use (train/prepare.ts): an SDXL model's 1024 and aspect buckets,
  // from its header as the model list reads it
  const family = typeof spec.model === 'string' && spec.model && !resolution ? await headerFamily(spec.model) : undefined;
  const side = nativeResolution(family ?? 'sd1');
  const prior = !!option<string>(spec, props, 'classPrompt') && (option<number>(spec, props, 'classImages') ?? 0) > 0;
  const view = await previewDataset({
    dir, name: String(spec.name || '[name]'), ...templates,
    width: resolution ?? option<number>(spec, props, 'width') ?? side, height: resolution ?? option<number>(spec, props, 'height') ?? side,
    doNotResize: option<boolean>(spec, props, 'doNotResize'), fit: family === 'sdxl' ? (prior ? 'crop' : 'buckets') : 'stretch',
    filenameWordRegex: option<string>(spec, props, 'filenameWordRegex'), filenameJoinString: option<string>(spec, props, 'filenameJoinString'),
  });
  if (resolution) warnings.push(`fine-tune puts each image into the aspect-ratio bucket nearest its shape, at most ${resolution}² pixels`);
  const override = captionMode && instancePrompt && !template ? captionOverrideWarning(view, captionMode, instancePrompt) : undefined;
  if (override) warnings.push(override);
  if (!view.items.length) warnings.push(`no usable image in ${dir}: put the training images there (png, jpg, jpeg, webp, bmp, gif, tiff, avif)`);
  return { ...view, warnings };
}

/** `{dir, file}` of a request, the folder checked. */
async function imageIn(req: Request, from: 'query' | 'body'): Promise<{ dir: string; file: string }> {
  const src = (from === 'query' ? req.query : req.body) as Record<string, unknown>;
  if (typeof src.dir !== 'string' || typeof src.file !== 'string') throw new RequestError([fieldError(`/${typeof src.dir !== 'string' ? 'dir' : 'file'}`, 'is required')]);
  try {
    return { dir: await checkReadableDir(src.dir, '/dir'), file: src.file };
  } catch (err) {
    if (err instanceof PathError) throw new RequestError([fieldError('/dir', err.message)]);
    throw err;
  }
}

const asRequestError = (field: string) => (err: unknown): never => {
  throw new RequestError([fieldError(field, (err as Error).message)]);
};

export const datasetRoutes: RouteDef[] = [
  {
    method: 'post', path: '/api/dataset', tag: 'jobs', summary: "A job's training images as it will use them: sizes, captions, prompts, skipped files (no model loaded)",
    handler: async (req, _res, ctx) => {
      const { type, spec } = req.body as { type?: string; spec?: Record<string, unknown> };
      return datasetView(ctx.manager.methods, String(type ?? ''), spec ?? {});
    },
  },
  {
    method: 'get', path: '/api/dataset/thumbnail', tag: 'jobs', summary: 'A small JPEG of one training image (?dir=&file=)', response: 'image/jpeg',
    handler: async (req, res) => {
      const { dir, file } = await imageIn(req, 'query');
      res.type('jpeg').set('Cache-Control', 'no-cache').send(await thumbnail(dir, file).catch(asRequestError('/file')));
    },
  },
  {
    method: 'post', path: '/api/dataset/caption', tag: 'jobs', summary: "Write one image's caption as <stem>.txt beside it ({dir, file, caption})",
    handler: async (req) => {
      const { dir, file } = await imageIn(req, 'body');
      const caption = (req.body as { caption?: unknown }).caption;
      if (typeof caption !== 'string' || caption.length > 10_000) throw new RequestError([fieldError('/caption', 'must be text (at most 10000 characters)')]);
      return { path: await writeCaption(dir, file, caption).catch(asRequestError('/file')) };
    },
  },
];
