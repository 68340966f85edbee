/**
 * @file The SD1/SD2 text encoders against the PyTorch goldens of every fixture: config from the
 * checkpoint, every `text.*` intermediate, Textual Inversion tokenization and splicing
 * (`ti.context`), gradients w.r.t. the vectors and the weights, and no tensor leaks. Also the
 * config of full-size SD1.5 / SD2.1 from their key lists, every key accounted for.
 */
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { initBackend, tf, type Tensor } from '../trainers/backend/index.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import type { TensorSource } from '../trainers/io/types.ts';
import { loadParams, type Params } from '../trainers/nets/params.ts';
import {
  encodeText, encodeTextHidden, namedTextOutputs, splicesFor, textConfigFromKeys, textKeys, type ClipTextConfig,
} from '../trainers/nets/clip.ts';
import { ClipTokenizer, tokenizeWithEmbeddings } from '../trainers/text/tokenizer.ts';

const FIXTURES = ['test/fixtures/sd-tiny', 'test/fixtures/sd2-tiny'];

interface Loaded {
  golden: any;
  config: any;
  goldens: TensorSource;
  cfg: ClipTextConfig;
  params: Params;
  tok: ClipTokenizer;
}

async function loadFixture(dir: string): Promise<Loaded> {
  const golden = JSON.parse(readFileSync(`${dir}/golden.json`, 'utf8'));
  const config = JSON.parse(readFileSync(`${dir}/config.json`, 'utf8'));
  const model = await openSafetensors(`${dir}/model.safetensors`);
  const shapes = new Map(model.keys().map((k) => [k, model.info(k).shape]));
  // heads are not in any shape (see ClipTextConfig.heads); the fixture's config.json says them
  const cfg = textConfigFromKeys(shapes, { heads: config.text_encoder.params.heads });
  const unused = new Set(textKeys(cfg).unused);
  const params = await loadParams(model, [cfg.prefix], (k) => unused.has(k));
  await model.close();
  const goldens = await openSafetensors(`${dir}/golden.safetensors`);
  const tok = await ClipTokenizer.load(`${dir}/${golden.tokenizer.vocab_file}`);
  return { golden, config, goldens, cfg, params, tok };
}

async function goldenTensor(f: Loaded, name: string): Promise<Tensor> {
  return tf.tensor(await f.goldens.read(name), f.goldens.info(name).shape);
}

/** max |ours − golden| ≤ golden.json atol, with the numbers in the message. */
async function expectClose(f: Loaded, name: string, ours: Tensor): Promise<void> {
  const { atol, shape } = f.golden.tensors[name];
  assert.deepEqual(ours.shape, shape, `${name}: shape`);
  const want = await goldenTensor(f, name);
  const diff = tf.tidy(() => tf.max(tf.abs(ours.sub(want))));
  const maxDiff = (await diff.data())[0]!;
  tf.dispose([want, diff]);
  assert.ok(maxDiff <= atol, `${name}: max |ours − golden| = ${maxDiff} > atol ${atol}`);
}

before(async () => {
  await initBackend();
});

for (const dir of FIXTURES) {
  let f: Loaded;
  const padding = () => (f.golden.family === 'sd1' ? 'eos' : 'zero') as 'eos' | 'zero';

  test(`${dir}: config from the checkpoint's keys and shapes`, async () => {
    f = await loadFixture(dir);
    const want = f.config.text_encoder.params;
    assert.equal(f.cfg.family, f.golden.family);
    assert.equal(f.cfg.width, want.width);
    assert.equal(f.cfg.layers, want.layers);
    assert.equal(f.cfg.vocabSize, want.vocab_size);
    assert.equal(f.cfg.contextLength, want.context_length);
    assert.equal(f.cfg.activation, want.act);
    assert.equal(f.cfg.contextLayer, want.context_layer);
    assert.equal(f.cfg.mlpWidth, 4 * want.width);
  });

  test(`${dir}: every text.* golden from text.ids`, async () => {
    const ids = f.golden.text.ids as number[][];
    const outs = encodeTextHidden(f.params, f.cfg, ids);
    const named = namedTextOutputs(outs);
    for (const name of f.golden.text.outputs as string[]) {
      const ours = named.get(name);
      assert.ok(ours, `${name} not computed`);
      await expectClose(f, name, ours);
    }
    const context = encodeText(f.params, f.cfg, ids);
    await expectClose(f, f.golden.text.context_tensor, context);
    await expectClose(f, f.golden.text.context_tensor, outs.context);
    // webui CLIP skip 2 on SD1 = final LN of the second-to-last block; SD2 ignores CLIP skip
    const skip2 = encodeText(f.params, f.cfg, ids, { clipSkip: 2 });
    await expectClose(f, f.cfg.family === 'sd1' ? 'text.penultimate_ln' : f.golden.text.context_tensor, skip2);
    tf.dispose([context, skip2, outs as unknown as tf.TensorContainer]);
  });

  test(`${dir}: Textual Inversion ids, positions and ti.context`, async () => {
    const ti = f.golden.textual_inversion;
    const embeddings = new Map([[ti.name as string, ti.num_vectors as number]]);
    const prompts = (ti.prompts as string[]).map((p) => tokenizeWithEmbeddings(f.tok, p, embeddings, padding()));
    prompts.forEach((p, i) => {
      assert.deepEqual(p.ids, ti.ids[i], `ids of ${ti.prompts[i]}`);
      assert.deepEqual(p.embeddings, [{ name: ti.name, positions: ti.vector_positions[i] }]);
      assert.equal(p.truncated, false);
    });
    assert.deepEqual(f.tok.bpe(ti.name), ti.name_bpe);
    const vectors = await goldenTensor(f, 'ti.vectors');
    const context = encodeText(f.params, f.cfg, ti.ids, { splices: splicesFor(prompts, new Map([[ti.name, vectors]])) });
    await expectClose(f, 'ti.context', context);
    tf.dispose([vectors, context]);
  });

  test(`${dir}: gradients w.r.t. the TI vectors and every weight are finite; no leaks`, async () => {
    const ti = f.golden.textual_inversion;
    const vectors = await goldenTensor(f, 'ti.vectors');
    const splicesOf = (v: Tensor) => ti.vector_positions.map((positions: number[], batch: number) => ({ batch, positions, vectors: v }));
    const weights = tf.tidy(() => tf.randomNormal([ti.ids.length, 77, f.cfg.width], 0, 1, 'float32', 7));
    const loss = (ctx: Tensor) => ctx.mul(weights).mean();
    const run = () =>
      tf.tidy(() => {
        const g = tf.grad((v: Tensor) => loss(encodeText(f.params, f.cfg, ti.ids, { splices: splicesOf(v) })))(vectors);
        return tf.stack([g.abs().max(), tf.logicalNot(tf.isFinite(g)).cast('float32').sum()]);
      });
    tf.dispose(run()); // warm-up (kernels may cache)
    const before = tf.memory().numTensors;
    const stats = run();
    const [gMax, nonFinite] = await stats.data();
    stats.dispose();
    assert.equal(tf.memory().numTensors, before, 'tensor count after forward + grad');
    assert.ok(Number.isFinite(gMax!) && gMax! > 0, `grad max ${gMax}`);
    assert.equal(nonFinite, 0);
    tf.dispose([vectors, weights]);
  });

  test(`${dir}: directional derivative w.r.t. the vectors matches a finite difference`, async () => {
    const ti = f.golden.textual_inversion;
    const vectors = await goldenTensor(f, 'ti.vectors');
    const splicesOf = (v: Tensor) => [{ batch: 0, positions: ti.vector_positions[0], vectors: v }];
    const ids = [ti.ids[0]];
    const [analytic, numeric] = tf.tidy(() => {
      const weights = tf.randomNormal([1, 77, f.cfg.width], 0, 1, 'float32', 3);
      const dir = tf.randomNormal(vectors.shape, 0, 1, 'float32', 5);
      const loss = (v: Tensor) => encodeText(f.params, f.cfg, ids, { splices: splicesOf(v) }).mul(weights).sum();
      const g = tf.grad(loss)(vectors);
      // central difference; eps well below |vectors| (~0.05: the final LayerNorm makes the loss
      // curve fast), well above float32 noise (~1e-5 on a loss of ~100)
      const eps = 2e-4;
      const fd = loss(vectors.add(dir.mul(eps))).sub(loss(vectors.sub(dir.mul(eps)))).div(2 * eps);
      return [g.mul(dir).sum().dataSync()[0]!, fd.dataSync()[0]!];
    });
    assert.ok(Math.abs(analytic - numeric) <= 1e-2 * Math.abs(analytic) + 1e-2, `analytic ${analytic} vs numeric ${numeric}`);
    vectors.dispose();
  });

  test(`${dir}: full fine-tune gradients reach every used weight`, async () => {
    // SD2's context skips the last block: its weights are not on the path (their gradient is 0)
    const skipped = f.cfg.contextLayer === 'penultimate' ? `resblocks.${f.cfg.layers - 1}.` : '\0';
    const keys = textKeys(f.cfg).used.filter((k) => !k.includes(skipped));
    assert.ok(keys.length > 0);
    const ids = f.golden.text.ids as number[][];
    const before = tf.memory().numTensors;
    const grads = tf.tidy(() => {
      const xs = keys.map((k) => f.params.get(k)!);
      const fn = (...ws: Tensor[]) => {
        const p: Params = new Map(keys.map((k, i) => [k, ws[i]!]));
        return encodeText(p, f.cfg, ids).square().mean();
      };
      const gs = tf.grads(fn)(xs);
      return tf.stack(gs.map((g) => g.abs().sum()));
    });
    const sums = await grads.data();
    grads.dispose();
    assert.equal(tf.memory().numTensors, before);
    keys.forEach((k, i) => assert.ok(Number.isFinite(sums[i]!) && sums[i]! > 0, `${k}: grad ${sums[i]}`));
  });
}

test(`token-embedding table gradient: each row sums dy over the positions holding its id`, async () => {
  const f = await loadFixture(FIXTURES[0]!);
  const ids = f.golden.text.ids as number[][];
  const [b, t, w] = [ids.length, ids[0]!.length, f.cfg.width];
  const tableKey = textKeys(f.cfg).used[0]!; // token embedding
  const table = f.params.get(tableKey)!;
  const dy = tf.randomNormal([b, t, w], 0, 1, 'float32', 11);
  const grad = tf.tidy(() =>
    tf.grad((tbl: Tensor) => {
      const p: Params = new Map(f.params);
      p.set(tableKey, tbl);
      return encodeTextHidden(p, f.cfg, ids).embeddings.mul(dy).sum();
    })(table),
  );
  const want = new Float32Array(table.size);
  const dyData = await dy.data();
  ids.flat().forEach((id, n) => {
    for (let c = 0; c < w; c++) want[id * w + c]! += dyData[n * w + c]!;
  });
  const got = await grad.data();
  let maxDiff = 0;
  for (let i = 0; i < want.length; i++) maxDiff = Math.max(maxDiff, Math.abs(got[i]! - want[i]!));
  assert.ok(maxDiff <= 1e-5, `max diff ${maxDiff}`);
  tf.dispose([dy, grad]);
});

test('full-size SD1.5 and SD2.1 text configs from key lists alone; every key accounted for', () => {
  const cases = [
    { file: 'keys-sd15.json', family: 'sd1', width: 768, layers: 12, heads: 12 },
    { file: 'keys-sd21.json', family: 'sd2', width: 1024, layers: 24, heads: 16 },
  ];
  for (const c of cases) {
    const all = JSON.parse(readFileSync(`test/fixtures/sd-tiny/${c.file}`, 'utf8')) as Record<string, number[]>;
    const cfg = textConfigFromKeys(new Map(Object.entries(all)));
    assert.deepEqual([cfg.family, cfg.width, cfg.layers, cfg.heads, cfg.mlpWidth], [c.family, c.width, c.layers, c.heads, 4 * c.width]);
    const { used, unused } = textKeys(cfg);
    const expected = new Set([...used, ...unused]);
    const inFile = Object.keys(all).filter((k) => k.startsWith(cfg.prefix));
    assert.deepEqual(inFile.filter((k) => !expected.has(k)), [], `${c.file}: keys left over`);
    assert.deepEqual([...expected].filter((k) => !(k in all)), [], `${c.file}: keys missing`);
    // function lookup works too
    assert.deepEqual(textConfigFromKeys((k) => all[k]), cfg);
  }
});

test('heads: width/64 by default, an explicit value otherwise, an error when it cannot split', () => {
  const shapes = (w: number) =>
    new Map<string, number[]>([
      ['cond_stage_model.model.token_embedding.weight', [49408, w]],
      ['cond_stage_model.model.positional_embedding', [77, w]],
      ['cond_stage_model.model.transformer.resblocks.0.ln_1.weight', [w]],
      ['cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight', [4 * w, w]],
    ]);
  assert.equal(textConfigFromKeys(shapes(1280)).heads, 20);
  assert.equal(textConfigFromKeys(shapes(48), { heads: 3 }).heads, 3);
  assert.throws(() => textConfigFromKeys(shapes(48)), /width 48 is not a known SD1\/SD2 text encoder .*put the config it came with \(<name>\.yaml, or config\.json\) beside the checkpoint/);
  assert.throws(() => textConfigFromKeys(new Map()), /found neither/);
});
