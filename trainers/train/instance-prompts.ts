/**
 * @file The prompt each instance image trains with under Dreambooth and LoRA, and the warning that
 * keeps it from being silently wrong. The instance prompt ("a photo of sks dog") carries the
 * trigger word; an image with its own `<stem>.txt` caption can train with the caption alone, the
 * instance prompt and the caption, or the instance prompt alone (`captionMode`). kohya-ss
 * sd-scripts does the same with a caption file per image and `--caption_prefix` /
 * `--caption_suffix` for the trigger word; diffusers' train_dreambooth uses the instance prompt
 * for every image.
 */
import type { Template } from '../text/templates.ts';

/**
 * - `caption`: an image with a `<stem>.txt` trains with its caption alone, the others with the instance prompt;
 * - `prepend` / `append`: the instance prompt before / after the caption (`sks dog, on a beach`);
 * - `ignore`: every image trains with the instance prompt (`[filewords]` in it is the caption).
 */
export type CaptionMode = 'caption' | 'prepend' | 'append' | 'ignore';

export const fixedTemplate = (prompt: string): Template => ({ name: 'prompt', path: '', lines: [prompt], usesName: false, usesFilewords: prompt.includes('[filewords]') });

/** The templates of the images without and with a caption file. */
export function instanceTemplates(instancePrompt: string, mode: CaptionMode): { template: Template; captionedTemplate: Template } {
  const captioned = { caption: '[filewords]', prepend: `${instancePrompt}, [filewords]`, append: `[filewords], ${instancePrompt}`, ignore: instancePrompt }[mode];
  return { template: fixedTemplate(instancePrompt), captionedTemplate: fixedTemplate(captioned) };
}

/** Images whose caption file replaces the instance prompt, named in a warning; undefined when none does. */
export function captionOverrideWarning(ds: { items: { file: string; captionSource: string }[] }, mode: CaptionMode, instancePrompt: string): string | undefined {
  if (mode !== 'caption') return undefined;
  const files = ds.items.filter((it) => it.captionSource === 'txt').map((it) => it.file);
  if (!files.length) return undefined;
  const shown = files.length > 10 ? `${files.slice(0, 10).join(', ')} and ${files.length - 10} more` : files.join(', ');
  return `${files.length} of ${ds.items.length} image(s) train with their own .txt caption instead of the instance prompt '${instancePrompt}': ${shown}. ` +
    'Put the trigger word in those captions, or pass --caption-mode prepend (or append) to add the instance prompt to them, or ignore to use it alone.';
}
