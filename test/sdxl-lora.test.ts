/**
 * @file LoRA on SDXL: kohya sd-scripts' SDXL key names (lora_unet_* on sgm paths, lora_te1_* on
 * CLIP-L's HF paths, lora_te2_* HF-style names of OpenCLIP-G's resblocks) land by the webui's
 * rules on every targeted module of a full SDXL base; a short run on sdxl-tiny writes them with
 * SDXL metadata and reloads bit-exact; an SD1 LoRA resumed on SDXL is refused by name.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../trainers/backend/index.ts';
import { validate } from '../schemas/index.ts';
import { openSafetensors, writeSafetensors } from '../trainers/io/safetensors.ts';
import { createLora, kohyaName, loraTargets, networkLayerMapping, webuiModuleFor } from '../trainers/nets/lora.ts';
import { loadWeights } from '../trainers/methods/lora/lora-file.ts';
import { runLora, type LoraSpec } from '../trainers/methods/lora/lora.ts';
import type { JobContext } from '../trainers/job.ts';
import { inspectFile } from '../bridge/commands/inspect.ts';

await initBackend();

const keyShapes = (path: string) => new Map(Object.entries(JSON.parse(readFileSync(path, 'utf8')) as Record<string, number[]>));
const ctx: JobContext = { emit: () => {}, signal: new AbortController().signal };

test('full SDXL base: every attn/proj/ff/resnet/text target maps back onto its sgm module by the webui rules', () => {
  const shapes = keyShapes('test/fixtures/sdxl-tiny/keys-sdxl.json');
  const targets = loraTargets(shapes, ['attn', 'proj', 'ff', 'resnet', 'text']);
  const mapping = networkLayerMapping(shapes.keys());
  // the webui's module tree: each name it builds must resolve to a module the checkpoint has
  for (const t of targets) {
    assert.equal(webuiModuleFor(t.name, mapping, false), t.module, t.name);
    assert.equal(kohyaName(t.module), t.name);
    const base = t.rows ? t.module.replace(/\.[qkv]_proj$/, '.in_proj_weight') : `${t.module}.weight`;
    assert.ok(shapes.has(base), `${t.name} → ${base}`);
  }
  assert.equal(new Set(targets.map((t) => t.name)).size, targets.length, 'names are unique');
  const names = targets.map((t) => t.name);
  const count = (re: RegExp) => names.filter((n) => re.test(n)).length;
  // SDXL base: 70 transformer blocks × 8 attention projections; CLIP-L 12 × 6; OpenCLIP-G 32 × 6 (q, k, v, out, fc1, fc2)
  assert.equal(count(/^lora_unet_.*_attn[12]_(to_q|to_k|to_v|to_out_0)$/), 70 * 8);
  assert.equal(count(/^lora_te1_text_model_encoder_layers_\d+_/), 12 * 6);
  assert.equal(count(/^lora_te2_text_model_encoder_layers_\d+_/), 32 * 6);
  assert.ok(names.includes('lora_te2_text_model_encoder_layers_31_self_attn_q_proj'));
  assert.ok(names.includes('lora_te1_text_model_encoder_layers_11_mlp_fc2'));
  assert.ok(names.includes('lora_unet_output_blocks_0_1_transformer_blocks_9_attn2_to_k'));
  // every OpenCLIP-G attention has q, k, v AND out_proj (the webui applies the fused delta only then)
  for (let i = 0; i < 32; i++) for (const p of ['q', 'k', 'v', 'out']) assert.ok(names.includes(`lora_te2_text_model_encoder_layers_${i}_self_attn_${p}_proj`));
});

test('sdxl-tiny: a LoRA run (UNet + both encoders) writes kohya SDXL keys and metadata, reloads bit-exact; an SD1 LoRA is refused', async () => {
  const tmp = mkdtempSync(join(tmpdir(), 'sidetrain-xllora-'));
  const images = join(tmp, 'images');
  mkdirSync(images);
  for (const f of ['01-orange cat.png', 'green_triangle.png']) copyFileSync(join('test/fixtures/images', f), join(images, f));
  const raw: Record<string, unknown> = {
    model: 'test/fixtures/sdxl-tiny/model.safetensors', images, name: 'xl', instancePrompt: 'a photo of sks cat', width: 64, height: 64,
    steps: 3, lr: '0.01', rank: 4, alpha: 2, previewEvery: 3, previewSteps: 2, saveEvery: 0, targets: ['attn', 'text'], trainTextEncoder: true,
    loraDir: join(tmp, 'Lora'), logDir: join(tmp, 'logs'),
  };
  assert.deepEqual(validate('lora', raw), []);
  const spec = raw as unknown as LoraSpec;
  const result = await runLora(spec, ctx);
  const file = await openSafetensors(result.output);
  const meta = file.metadata();
  const stems = [...new Set(file.keys().map((k) => k.replace(/\.(lora_down\.weight|lora_up\.weight|alpha)$/, '')))];
  assert.ok(stems.some((s) => s.startsWith('lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q')));
  assert.ok(stems.includes('lora_te1_text_model_encoder_layers_0_self_attn_q_proj'));
  assert.ok(stems.includes('lora_te2_text_model_encoder_layers_2_self_attn_v_proj'));
  const shapes = new Map(file.keys().map((k) => [k, file.info(k).shape] as [string, number[]]));
  const model = keyShapes('test/fixtures/sdxl-tiny/keys-sdxl.json');
  const mapping = networkLayerMapping(model.keys());
  for (const s of stems) assert.ok(webuiModuleFor(s, mapping, false), s);
  assert.equal(meta.ss_base_model_version, 'sdxl_base_v1-0');
  assert.equal(meta['modelspec.architecture'], 'stable-diffusion-xl-v1-base/lora');
  assert.equal(meta.ss_v2, 'False');
  for (const v of Object.values(meta)) assert.equal(typeof v, 'string');
  const report = await inspectFile(result.output);
  assert.equal(report.kind, 'lora');
  assert.equal(report.family, 'sdxl');
  assert.deepEqual(report.modules, { unet: stems.filter((x) => x.startsWith('lora_unet_')).length, textEncoder: 0, textEncoder1: 18, textEncoder2: 18 });
  // reload bit-exact into a fresh network of the same targets
  const ckptShapes = new Map([...(await openSafetensors('test/fixtures/sdxl-tiny/model.safetensors').then(async (f) => {
    const m = new Map(f.keys().map((k) => [k, f.info(k).shape] as [string, number[]]));
    await f.close();
    return m;
  }))]);
  const net = createLora(loraTargets(ckptShapes, ['attn', 'text']), { rank: 4, alpha: 2, seed: 1 });
  assert.equal(await loadWeights(result.output, net), 3);
  for (const [k, v] of net.weights) assert.deepEqual(await v.data(), await file.read(k), k);
  assert.equal(net.weights.size, shapes.size * 2 / 3);
  await file.close();
  // an SD1 LoRA (lora_te_*) given to an SDXL run: refused, naming the file and the key
  const sd1 = join(tmp, 'Lora', 'sd1.safetensors');
  await writeSafetensors(sd1, [{ name: 'lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight', dtype: 'F32', shape: [4, 32], data: new Float32Array(128) }], { ss_base_model_version: 'sd_v1' });
  await assert.rejects(loadWeights(sd1, net, 'sdxl'), /sd1\.safetensors: a LoRA for sd_v1 \(ss_base_model_version\), this model is sdxl_base_v1-0/);
  await assert.rejects(loadWeights(sd1, net), /sd1\.safetensors: no 'lora_/);
  // and an SDXL LoRA resumed on an SD1 model
  await assert.rejects(loadWeights(result.output, net, 'sd1'), /xl\.safetensors: a LoRA for sdxl_base_v1-0 \(ss_base_model_version\), this model is sd_v1/);
});

test('sdxl-tiny, UNet-only LoRA: prompts encoded once and both encoders released; the same adapters as encoding every batch', async () => {
  const tmp = mkdtempSync(join(tmpdir(), 'sidetrain-xllora-cache-'));
  const images = join(tmp, 'images');
  mkdirSync(images);
  for (const f of ['01-orange cat.png', 'green_triangle.png']) copyFileSync(join('test/fixtures/images', f), join(images, f));
  const run = async (name: string, extra: Record<string, unknown>) => {
    const raw: Record<string, unknown> = {
      model: 'test/fixtures/sdxl-tiny/model.safetensors', images, name, instancePrompt: 'a photo of sks cat', width: 64, height: 64,
      steps: 2, lr: '0.01', rank: 4, alpha: 2, previewEvery: 2, previewSteps: 2, saveEvery: 0, captionMode: 'ignore',
      loraDir: join(tmp, 'Lora'), logDir: join(tmp, 'logs'), ...extra,
    };
    assert.deepEqual(validate('lora', raw), []);
    const logs: string[] = [];
    const result = await runLora(raw as unknown as LoraSpec, { emit: (e) => e.type === 'log' && logs.push(e.message), signal: new AbortController().signal });
    const file = await openSafetensors(result.output);
    const weights = new Map(await Promise.all(file.keys().map(async (k) => [k, Array.from(await file.read(k))] as const)));
    await file.close();
    return { weights, logs };
  };
  const cached = await run('cached', {});
  assert.ok(cached.logs.some((m) => /SDXL text encoders: 2 prompt\(s\) encoded once; the encoders are released/.test(m)), cached.logs.join('\n'));
  // tag shuffling makes prompts per use (here: a one-tag prompt, so the same text): the encoders stay and run every batch
  const live = await run('live', { shuffleTags: true });
  assert.ok(!live.logs.some((m) => /SDXL text encoders/.test(m)));
  assert.deepEqual([...cached.weights.keys()], [...live.weights.keys()]);
  for (const [k, v] of cached.weights) assert.deepEqual(v, live.weights.get(k), k);
});
