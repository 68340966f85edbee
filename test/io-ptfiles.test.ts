import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openTorchZip } from '../trainers/io/torchzip.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import { PyFloat, PyOrderedDict, PyTuple, TensorRef } from '../trainers/io/pyobjects.ts';
import { embeddingChecksum, readEmbedding, writeEmbedding, writeEmbeddingOptim } from '../trainers/io/pt-embedding.ts';
import { readOptim } from '../trainers/io/optim-file.ts';
import { readHypernetwork, writeHypernetwork, writeHypernetworkOptim } from '../trainers/io/pt-hypernet.ts';
import { modelHash } from '../trainers/io/checkpoint.ts';

const FIX = 'test/fixtures';
const WEBUI_MEMBER = /^([^/]+)\/((data\/\d+)|version|(data\.pkl))$/;
const WEBUI_GLOBALS = ['collections.OrderedDict', 'torch._utils._rebuild_tensor_v2', 'torch.FloatStorage'];
const tmp = () => mkdtemp(join(tmpdir(), 'sidetrain-pt-'));

/** Our Python value in golden.json's `pt_files` notation. */
function describe(x: unknown): unknown {
  const simple = (v: unknown) => v === null || ['string', 'number', 'boolean'].includes(typeof v) || v instanceof PyFloat;
  const plain = (v: unknown) => (v instanceof PyFloat ? v.value : v);
  const key = (k: unknown) => (typeof k === 'number' ? `(int) ${k}` : k);
  if (x instanceof TensorRef) return { type: 'Tensor', dtype: { F32: 'float32', F16: 'float16' }[x.storage.dtype as string], shape: x.shape, requires_grad: x.requiresGrad };
  if (x instanceof Map) return { type: x instanceof PyOrderedDict ? 'OrderedDict' : 'dict', items: [...x].map(([k, v]) => [key(k), describe(v)]) };
  if (x instanceof PyTuple || Array.isArray(x)) {
    const items = x instanceof PyTuple ? x.items : x;
    const type = x instanceof PyTuple ? 'tuple' : 'list';
    return items.every(simple) ? { type, value: items.map(plain) } : { type, items: items.map(describe) };
  }
  if (x === null) return { type: 'NoneType', value: null };
  if (x instanceof PyFloat) return { type: 'float', value: x.value };
  return { type: typeof x === 'boolean' ? 'bool' : typeof x === 'number' ? 'int' : 'str', value: x };
}

async function goldenTensors(fixture: string): Promise<Map<string, Float32Array>> {
  const g = await openSafetensors(`${FIX}/${fixture}/golden.safetensors`);
  const out = new Map<string, Float32Array>();
  for (const k of g.keys()) if (k === 'ti.vectors' || /^hn\.\d+\.[kv]\.linear/.test(k)) out.set(k, await g.read(k));
  await g.close();
  return out;
}

for (const fixture of ['sd-tiny', 'sd2-tiny']) {
  const dir = `${FIX}/${fixture}`;

  test(`${fixture}: real .pt / .optim files read to golden.json → pt_files`, async () => {
    const golden = JSON.parse(await readFile(`${dir}/golden.json`, 'utf8')).pt_files;
    for (const file of ['real-embedding.pt', 'real-embedding.pt.optim', 'real-hypernetwork.pt', 'real-hypernetwork.pt.optim']) {
      const zip = await openTorchZip(`${dir}/${file}`, { tagFloats: true });
      assert.deepEqual(describe(zip.value), golden[file], file);
      for (const m of zip.members) assert.match(m, WEBUI_MEMBER);
      await zip.close();
    }
    assert.equal(golden.sd_checkpoint.slice(-10), await modelHash(`${dir}/model.safetensors`));
  });

  test(`${fixture}: embedding reads to ti.vectors, checksum matches .optim, writes back bit-exact`, async () => {
    const g = await goldenTensors(fixture);
    const e = await readEmbedding(`${dir}/real-embedding.pt`);
    assert.equal(e.layout, 'string_to_param');
    assert.deepEqual(e.vectors['*']!.values, g.get('ti.vectors'));
    const optim = await readOptim(`${dir}/real-embedding.pt.optim`);
    assert.equal(embeddingChecksum(e.vectors['*']!.values), optim.hash);
    const out = join(await tmp(), 'pallas.pt');
    const v = e.vectors['*']!;
    await writeEmbedding(out, { name: e.name, values: v.values, shape: v.shape, step: e.step!, sdCheckpoint: e.sdCheckpoint!, sdCheckpointName: e.sdCheckpointName! });
    const zipA = await openTorchZip(`${dir}/real-embedding.pt`);
    const zipB = await openTorchZip(out);
    assert.deepEqual(describe(zipB.value), describe(zipA.value));
    assert.deepEqual(zipB.members, ['pallas/data.pkl', 'pallas/data/0', 'pallas/version']);
    assert.deepEqual([...zipB.globals].sort(), [...WEBUI_GLOBALS].sort());
    await zipA.close();
    await zipB.close();
    const back = await readEmbedding(out);
    assert.deepEqual(back.vectors['*']!.values, v.values);
    await writeEmbeddingOptim(out + '.optim', v.values, optim.states[0]!, optim.group);
    const optimZip = await openTorchZip(out + '.optim', { tagFloats: true });
    const realOptim = await openTorchZip(`${dir}/real-embedding.pt.optim`, { tagFloats: true });
    assert.deepEqual(describe(optimZip.value), describe(realOptim.value));
    await optimZip.close();
    await realOptim.close();
    assert.deepEqual(await readOptim(out + '.optim'), optim);
  });

  test(`${fixture}: hypernetwork reads to hn.* goldens, writes back bit-exact with every key`, async () => {
    const g = await goldenTensors(fixture);
    const hn = await readHypernetwork(`${dir}/real-hypernetwork.pt`);
    assert.deepEqual(hn.missing, []);
    for (const [size, [k, v]] of hn.modules) {
      for (const [name, t] of k) assert.deepEqual(t.values, g.get(`hn.${size}.k.${name}`), name);
      for (const [name, t] of v) assert.deepEqual(t.values, g.get(`hn.${size}.v.${name}`), name);
    }
    const out = join(await tmp(), 'hn.pt');
    await writeHypernetwork(out, hn);
    const a = await openTorchZip(`${dir}/real-hypernetwork.pt`, { tagFloats: true });
    const b = await openTorchZip(out, { tagFloats: true });
    assert.deepEqual(describe(b.value), describe(a.value));
    // the state dicts' _metadata equals the webui's (module names of the Sequential)
    const sdA = ((a.value as Map<unknown, unknown>).values().next().value as PyTuple).items[0] as PyOrderedDict;
    const sdB = ((b.value as Map<unknown, unknown>).values().next().value as PyTuple).items[0] as PyOrderedDict;
    assert.deepEqual(sdB.attrs, sdA.attrs);
    assert.deepEqual([...b.globals].sort(), [...WEBUI_GLOBALS].sort());
    for (const m of b.members) assert.match(m, WEBUI_MEMBER);
    await a.close();
    await b.close();
    const back = await readHypernetwork(out);
    assert.deepEqual(back.modules, hn.modules);
    const optim = await readOptim(`${dir}/real-hypernetwork.pt.optim`);
    assert.equal(optim.hash, await modelHash(`${dir}/real-hypernetwork.pt`));
    await writeHypernetworkOptim(out + '.optim', out, optim.states, optim.group);
    const written = await readOptim(out + '.optim');
    assert.equal(written.hash, await modelHash(out));
    assert.deepEqual(written.states, optim.states);
    assert.equal(written.optimizerName, 'AdamW');
  });
}

test('sdxl-tiny: {clip_l, clip_g} safetensors embedding', async () => {
  const e = await readEmbedding(`${FIX}/sdxl-tiny/real-embedding.safetensors`);
  assert.equal(e.layout, 'sdxl');
  assert.deepEqual(e.vectors.clip_l!.shape, [2, 32]);
  assert.deepEqual(e.vectors.clip_g!.shape, [2, 48]);
  assert.equal(e.name, 'real-embedding');
});

test('diffusers {token: tensor} and kohya {emb_params} layouts; checksum semantics', async () => {
  const { writeTorchZip } = await import('../trainers/io/torchzip.ts');
  const { SaveTensor } = await import('../trainers/io/pickle-write.ts');
  const dir = await tmp();
  const vec = Float32Array.from({ length: 8 }, (_, i) => i / 10 - 0.3);
  await writeTorchZip(join(dir, 'learned_embeds.bin'), new Map([['<cat>', new SaveTensor('F32', [8], vec)]]));
  const d = await readEmbedding(join(dir, 'learned_embeds.bin'));
  assert.equal(d.layout, 'diffusers');
  assert.deepEqual(d.vectors['*']!.shape, [1, 8]);
  await writeTorchZip(join(dir, 'k.pt'), new Map<unknown, unknown>([['emb_params', new SaveTensor('F32', [2, 4], vec)], ['step', 3]]));
  const k = await readEmbedding(join(dir, 'k.pt'));
  assert.equal(k.layout, 'kohya');
  assert.equal(k.step, 3);
  // python: r = (r*281 ^ int(v*100)*997) & 0xFFFFFFFF, int() truncating toward zero, negatives two's complement
  assert.equal(embeddingChecksum(Float32Array.of(-0.015, 0.5)), '7b19'); // computed with the Python expression on float32 values
});
