/**
 * @file `sidetrain inspect FILE [--json]`: what a checkpoint / embedding / hypernetwork file is,
 * found without executing anything (restricted unpickler, validated safetensors header). Prints
 * the format, the detected model family, parameterisation and head split (from the config beside
 * it or the family's release config; refused when a job could not load it) or the embedding/hypernetwork
 * layout, a LoRA's modules, rank and alpha, sidetrain's optimizer state, tensor count, parameters,
 * dtypes — or the error, with exit code 1.
 */
import type { Command } from 'commander';
import { basename, extname } from 'node:path';
import { openTensorFile, detectFamily, openCheckpoint } from '../../trainers/io/checkpoint.ts';
import { readEmbedding } from '../../trainers/io/pt-embedding.ts';
import { readHypernetwork } from '../../trainers/io/pt-hypernet.ts';
import { readOptim } from '../../trainers/io/optim-file.ts';
import { openTorchZip } from '../../trainers/io/torchzip.ts';
import { numel } from '../../trainers/io/dtypes.ts';
import type { TensorSource } from '../../trainers/io/types.ts';
import { modelConfig } from '../model-config.ts';

type Report = Record<string, unknown>;

function tensorStats(src: TensorSource): Report {
  const dtypes: Record<string, number> = {};
  let params = 0;
  for (const k of src.keys()) {
    const { dtype, shape } = src.info(k);
    dtypes[dtype] = (dtypes[dtype] ?? 0) + 1;
    params += numel(shape);
  }
  return { tensors: src.keys().length, parameters: params, dtypes };
}

/** What kind of torch file: checkpoint, hypernetwork, optimizer state or embedding. */
async function torchKind(path: string): Promise<'checkpoint' | 'hypernetwork' | 'optim' | 'embedding'> {
  const zip = await openTorchZip(path);
  await zip.close();
  const top = zip.value instanceof Map ? zip.value : new Map();
  if (top.has('optimizer_state_dict')) return 'optim';
  if ([...top.keys()].some((k) => typeof k === 'number')) return 'hypernetwork';
  const sd = top.get('state_dict') instanceof Map ? (top.get('state_dict') as Map<unknown, unknown>) : top;
  if ([...sd.keys()].some((k) => typeof k === 'string' && k.startsWith('model.diffusion_model.'))) return 'checkpoint';
  return 'embedding';
}

async function inspectCheckpoint(path: string, format: string): Promise<Report> {
  const ck = await openCheckpoint(path);
  try {
    const shapes = new Map(ck.source.keys().map((k) => [k, ck.source.info(k).shape] as [string, number[]]));
    const { config, heads } = modelConfig(path, ck.family, shapes);
    return {
      file: path, format, kind: 'checkpoint', family: ck.family, prediction: ck.prediction ?? null, predictionFrom: ck.predictionFrom,
      config, heads, ...tensorStats(ck.source), metadata: ck.source.metadata(),
    };
  } finally {
    await ck.source.close();
  }
}

async function inspectEmbedding(path: string, format: string): Promise<Report> {
  const e = await readEmbedding(path);
  const vectors = Object.fromEntries(Object.entries(e.vectors).map(([k, v]) => [k, { vectors: v.shape[0], width: v.shape[1] }]));
  return { file: path, format, kind: 'embedding', layout: e.layout, name: e.name, vectors, step: e.step, sdCheckpoint: e.sdCheckpoint, sdCheckpointName: e.sdCheckpointName };
}

async function inspectHypernetwork(path: string): Promise<Report> {
  const hn = await readHypernetwork(path);
  let params = 0;
  const sizes = [...hn.modules.keys()];
  for (const pair of hn.modules.values()) for (const m of pair) for (const t of m.values()) params += numel(t.shape);
  return { file: path, format: 'torch zip-pickle', kind: 'hypernetwork', sizes, parameters: params, ...hn.meta, missingKeys: hn.missing };
}

/**
 * A kohya-format LoRA: its family from `ss_base_model_version` (what the webui's Lora tab reads),
 * else from the text-encoder key stems (lora_te1_/lora_te2_: SDXL), modules, rank and alpha.
 */
async function inspectLora(path: string, format: string): Promise<Report> {
  const src = await openTensorFile(path);
  try {
    const keys = src.keys();
    const stems = [...new Set(keys.filter((k) => k.endsWith('.lora_down.weight')).map((k) => k.slice(0, -'.lora_down.weight'.length)))];
    const meta = src.metadata();
    const byKeys = stems.some((k) => /^lora_te[12]_/.test(k)) ? 'sdxl' : undefined;
    const base = meta.ss_base_model_version;
    const family = base ? (base.startsWith('sdxl') ? 'sdxl' : base === 'sd_v2' ? 'sd2' : base === 'sd_v1' ? 'sd1' : base) : byKeys ?? 'sd1/sd2 (no ss_base_model_version)';
    const count = (re: RegExp) => stems.filter((k) => re.test(k)).length;
    const rank = stems[0] ? src.info(`${stems[0]}.lora_down.weight`).shape[0] : undefined;
    return {
      file: path, format, kind: 'lora', family, baseModelVersion: base, architecture: meta['modelspec.architecture'],
      modules: { unet: count(/^lora_unet_/), textEncoder: count(/^lora_te_/), textEncoder1: count(/^lora_te1_/), textEncoder2: count(/^lora_te2_/) },
      rank, alpha: meta.ss_network_alpha ? Number(meta.ss_network_alpha) : undefined, steps: meta.ss_steps ? Number(meta.ss_steps) : undefined,
      // how to use it, and what sidetrain recorded of its training
      usage: `<lora:${meta.ss_output_name || basename(path, extname(path))}:1>`, trainedBy: meta.ss_sidetrain_method ? `sidetrain ${meta.ss_sidetrain_method}` : undefined,
      instancePrompt: meta.ss_sidetrain_instance_prompt || undefined,
    };
  } finally {
    await src.close();
  }
}

/** sidetrain's own optimizer state beside a LoRA or a Dreambooth snapshot (optim/trainable.ts layout). */
async function inspectOptimizerState(path: string): Promise<Report> {
  const src = await openTensorFile(path);
  try {
    const meta = src.metadata();
    const groups = Object.keys(meta).filter((k) => k.endsWith('.optimizer')).map((k) => k.slice(0, -'.optimizer'.length));
    return { file: path, format: 'safetensors', kind: 'optimizer state', groups: Object.fromEntries(groups.map((g) => [g, meta[`${g}.optimizer`]])), step: meta.sidetrain_step, ...tensorStats(src) };
  } finally {
    await src.close();
  }
}

export async function inspectFile(path: string): Promise<Report> {
  const src = await openTensorFile(path);
  const isSafetensors = !('zip' in src);
  const format = isSafetensors ? 'safetensors' : 'torch zip-pickle';
  const keys = src.keys();
  await src.close();
  if (isSafetensors) {
    const hasUnet = keys.includes('model.diffusion_model.input_blocks.0.0.weight');
    if (hasUnet || keys.some((k) => k.startsWith('conditioner.'))) return inspectCheckpoint(path, format);
    if (keys.length && keys.every((k) => /^[^:]+:.+#\w+$/.test(k))) return inspectOptimizerState(path);
    if (keys.length <= 2 || keys.includes('emb_params')) return inspectEmbedding(path, format);
    if (keys.some((k) => k.endsWith('.lora_down.weight'))) return inspectLora(path, format);
    detectFamily(src); // refuses with the reason (e.g. a VAE or LoRA file)
  }
  const kind = await torchKind(path);
  if (kind === 'checkpoint') return inspectCheckpoint(path, format);
  if (kind === 'hypernetwork') return inspectHypernetwork(path);
  if (kind === 'embedding') return inspectEmbedding(path, format);
  const o = await readOptim(path);
  return { file: path, format, kind: 'optimizer state', optimizer: o.optimizerName ?? 'AdamW', hash: o.hash, parameters: o.states.length, step: o.states[0]?.step, ...o.group };
}

function printText(r: Report): void {
  console.log(`${basename(String(r.file))}: ${r.kind} (${r.format})`);
  for (const [k, v] of Object.entries(r)) {
    if (k === 'file' || k === 'kind' || k === 'format' || v === undefined) continue;
    if (k === 'prediction' && v === null) {
      console.log('  prediction: undecided (SD2 without a .yaml beside it: the webui decides eps/v by a UNet test run)');
      continue;
    }
    console.log(`  ${k}: ${typeof v === 'object' && v !== null ? JSON.stringify(v) : String(v)}`);
  }
}

export function registerInspect(program: Command): void {
  program
    .command('inspect')
    .description('say what a checkpoint, embedding, hypernetwork or .optim file is, without executing it')
    .argument('<file>', '.safetensors, .ckpt, .pt, .bin or .optim file')
    .option('--json', 'print one JSON object')
    .action(async (file: string, opts: { json?: boolean }) => {
      try {
        const report = await inspectFile(file);
        if (opts.json) console.log(JSON.stringify(report));
        else printText(report);
      } catch (err) {
        const message = err instanceof Error ? err.message : String(err);
        if (opts.json) console.log(JSON.stringify({ file, error: message, ext: extname(file) }));
        else console.error(`sidetrain inspect: ${message}`);
        process.exitCode = 1;
      }
    });
}
