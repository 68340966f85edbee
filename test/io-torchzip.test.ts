import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import { openTorchZip, writeTorchZip } from '../trainers/io/torchzip.ts';
import { openTorchCheckpoint } from '../trainers/io/torch-source.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import { unpickle } from '../trainers/io/unpickle.ts';
import { SaveTensor } from '../trainers/io/pickle-write.ts';
import { PyFloat, PyOrderedDict, PyTuple, TensorRef } from '../trainers/io/pyobjects.ts';

const FIX = 'test/fixtures';
const tmp = () => mkdtemp(join(tmpdir(), 'sidetrain-tz-'));
/** webui v1.10 modules/safe.py */
const WEBUI_MEMBER = /^([^/]+)\/((data\/\d+)|version|(data\.pkl))$/;
const WEBUI_GLOBALS = new Set(['collections.OrderedDict', 'torch._utils._rebuild_tensor_v2', 'torch.FloatStorage', 'torch.HalfStorage', 'torch.LongStorage']);

for (const fixture of ['sd-tiny', 'sd2-tiny']) {
  test(`${fixture}: model.ckpt gives the same keys, shapes and values as model.safetensors`, async () => {
    const ckpt = await openTorchCheckpoint(`${FIX}/${fixture}/model.ckpt`);
    const st = await openSafetensors(`${FIX}/${fixture}/model.safetensors`);
    try {
      assert.deepEqual(ckpt.keys().sort(), st.keys().sort());
      assert.equal(ckpt.metadata().global_step, '0');
      for (const key of st.keys()) {
        assert.deepEqual(ckpt.info(key), st.info(key), key);
        assert.deepEqual(await ckpt.read(key), await st.read(key), key);
      }
    } finally {
      await ckpt.close();
      await st.close();
    }
  });
}

test('writer: round trip bit-exact, only webui-allowed members and globals', async () => {
  const dir = await tmp();
  const path = join(dir, 'out.pt');
  const w = Float32Array.from({ length: 12 }, (_, i) => Math.fround(Math.sin(i) * 1e-3));
  const sd = new PyOrderedDict([['a.weight', new SaveTensor('F32', [3, 4], w, true)], ['h', new SaveTensor('F16', [2], Float32Array.of(0.1, -2))]]);
  sd.attrs.set('_metadata', new PyOrderedDict([['', new Map([['version', 1]])]]));
  const value = new Map<unknown, unknown>([
    [32, new PyTuple([sd, sd])], ['ids', new SaveTensor('I64', [3], Float32Array.of(0, 5, 2 ** 40))],
    ['lr', new PyFloat(0)], ['x', 1e-8], ['big', 2n ** 70n], ['neg', -70000], ['list', [1, 'two', null, true]], ['s', 'é'],
  ]);
  await writeTorchZip(path, value);
  const zip = await openTorchZip(path);
  assert.equal(zip.dir, 'out');
  assert.deepEqual(zip.members, ['out/data.pkl', 'out/data/0', 'out/data/1', 'out/data/2', 'out/data/3', 'out/data/4', 'out/version']);
  for (const m of zip.members) assert.match(m, WEBUI_MEMBER);
  for (const g of zip.globals) assert.ok(WEBUI_GLOBALS.has(g), g);
  const top = zip.value as Map<unknown, unknown>;
  const [k] = (top.get(32) as PyTuple).items as PyOrderedDict[];
  const t = k!.get('a.weight') as TensorRef;
  assert.equal(t.requiresGrad, true);
  assert.deepEqual(await zip.readTensor(t), w);
  assert.deepEqual(Array.from(await zip.readTensor(k!.get('h') as TensorRef)), [0.0999755859375, -2]);
  assert.deepEqual(Array.from(await zip.readTensor(top.get('ids') as TensorRef)), [0, 5, 2 ** 40]);
  assert.deepEqual(k!.attrs.get('_metadata'), new PyOrderedDict([['', new Map([['version', 1]])]]));
  assert.equal(top.get('lr'), 0);
  assert.equal(top.get('x'), 1e-8);
  assert.equal(top.get('big'), 2n ** 70n);
  assert.equal(top.get('neg'), -70000);
  assert.deepEqual(top.get('list'), [1, 'two', null, true]);
  assert.equal(top.get('s'), 'é');
  await zip.close();
  await assert.rejects(() => writeTorchZip(path, value), /already exists/);
});

/** Protocol-2 pickle bytes: `GLOBAL module name`, `(` `'arg'` `t` `R` `.` */
function callPickle(module: string, name: string): Buffer {
  return Buffer.concat([Buffer.from([0x80, 2]), Buffer.from(`c${module}\n${name}\n(X`, 'latin1'), Buffer.from([2, 0, 0, 0]), Buffer.from('ls'), Buffer.from('tR.')]);
}

test('unpickler refuses os.system, builtins.eval, posix.system, and executes nothing', () => {
  for (const [m, n] of [['os', 'system'], ['builtins', 'eval'], ['posix', 'system'], ['torch', 'load'], ['__builtin__', 'getattr']]) {
    assert.throws(() => unpickle(callPickle(m!, n!), 'evil.pt'), new RegExp(`^Error: evil\\.pt: pickle refers to global '${m}\\.${n}', which is not allowed`));
  }
  // STACK_GLOBAL route (protocol 4)
  const sg = Buffer.concat([Buffer.from([0x80, 4, 0x8c, 2]), Buffer.from('os'), Buffer.from([0x8c, 6]), Buffer.from('system'), Buffer.from([0x93, 0x2e])]);
  assert.throws(() => unpickle(sg, 'sg.pt'), /sg\.pt: pickle refers to global 'os\.system'/);
  assert.throws(() => unpickle(Buffer.from([0x80, 2, 0x7d]), 't.pkl'), /t\.pkl: pickle ends without STOP/);
  assert.throws(() => unpickle(Buffer.from('i__main__\nX\n.'), 'i.pkl'), /i\.pkl: unsupported pickle opcode 0x69/);
});

/** A stored zip with the given members; `declare` overrides a member's declared size/method. */
function makeZip(members: { name: string; data: Buffer; size?: number; method?: number }[]): Buffer {
  const locals: Buffer[] = [];
  const centrals: Buffer[] = [];
  let offset = 0;
  for (const m of members) {
    const name = Buffer.from(m.name);
    const h = Buffer.alloc(30);
    h.writeUInt32LE(0x04034b50, 0); h.writeUInt16LE(20, 4); h.writeUInt16LE(m.method ?? 0, 8);
    h.writeUInt32LE(crc32(m.data), 14); h.writeUInt32LE(m.data.length, 18); h.writeUInt32LE(m.size ?? m.data.length, 22); h.writeUInt16LE(name.length, 26);
    const c = Buffer.alloc(46);
    c.writeUInt32LE(0x02014b50, 0); c.writeUInt16LE(20, 4); c.writeUInt16LE(20, 6); c.writeUInt16LE(m.method ?? 0, 10);
    c.writeUInt32LE(crc32(m.data), 16); c.writeUInt32LE(m.data.length, 20); c.writeUInt32LE(m.size ?? m.data.length, 24); c.writeUInt16LE(name.length, 28); c.writeUInt32LE(offset, 42);
    locals.push(h, name, m.data);
    centrals.push(c, name);
    offset += 30 + name.length + m.data.length;
  }
  const cd = Buffer.concat(centrals);
  const end = Buffer.alloc(22);
  end.writeUInt32LE(0x06054b50, 0); end.writeUInt16LE(members.length, 8); end.writeUInt16LE(members.length, 10); end.writeUInt32LE(cd.length, 12); end.writeUInt32LE(offset, 16);
  return Buffer.concat([...locals, cd, end]);
}

test('bad torch files fail with an error naming the file and the problem', async () => {
  const dir = await tmp();
  const pkl = Buffer.from([0x80, 2, 0x7d, 0x2e]); // {}
  const cases: [string, Buffer, RegExp][] = [
    ['evil.pt', makeZip([{ name: 'a/data.pkl', data: callPickle('os', 'system') }]), /evil\.pt \(a\/data\.pkl\): pickle refers to global 'os\.system'/],
    ['dotdot.pt', makeZip([{ name: 'a/data.pkl', data: pkl }, { name: '../x', data: Buffer.from('x') }]), /dotdot\.pt: zip member '\.\.\/x' escapes its folder/],
    ['abs.pt', makeZip([{ name: '/etc/x', data: pkl }]), /abs\.pt: zip member '\/etc\/x' has an absolute path/],
    ['bomb.pt', makeZip([{ name: 'a/data.pkl', data: Buffer.from([3, 0]), size: 2 ** 31, method: 8 }]), /bomb\.pt: members declare 2147483648 bytes uncompressed in a \d+-byte file \(zip bomb\?\)/],
    ['extra.pt', makeZip([{ name: 'a/data.pkl', data: pkl }, { name: 'a/code/x.py', data: pkl }]), /extra\.pt: unexpected zip member 'a\/code\/x\.py'/],
    ['nopkl.pt', makeZip([{ name: 'a/version', data: Buffer.from('3\n') }]), /nopkl\.pt: no <dir>\/data\.pkl/],
    ['two.pt', makeZip([{ name: 'a/data.pkl', data: pkl }, { name: 'b/data.pkl', data: pkl }]), /two\.pt: several <dir>\/data\.pkl/],
    ['legacy.pt', Buffer.from([0x80, 2, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e]), /legacy\.pt: legacy \(pre-1\.6, non-zip\) torch file/],
    ['empty.pt', Buffer.alloc(0), /empty\.pt: empty file/],
    ['junk.ckpt', Buffer.from('hello world'), /junk\.ckpt: not a torch zip file/],
  ];
  for (const [name, bytes, re] of cases) {
    const path = join(dir, name);
    await writeFile(path, bytes);
    await assert.rejects(() => openTorchZip(path), (err: Error) => {
      assert.match(err.message, re, name);
      assert.ok(err.message.startsWith(path), `${name}: ${err.message}`);
      return true;
    });
  }
  await assert.rejects(() => openTorchZip(dir), /is a directory/);
  const whole = await (await import('node:fs/promises')).readFile(`${FIX}/sd-tiny/real-hypernetwork.pt`);
  await writeFile(join(dir, 'cut.pt'), whole.subarray(0, 20000));
  await assert.rejects(() => openTorchZip(join(dir, 'cut.pt')), /cut\.pt: not a readable zip/);
});
