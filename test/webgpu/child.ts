/**
 * @file Runs in a child process of test/webgpu.test.ts (Dawn reads VK_ICD_FILENAMES and the
 * loader path at process start): `probe` prints the backend choice and health's webgpu line;
 * `oversize` makes a tensor over the adapter's storage binding limit and prints the error.
 */
import { initBackend, tf } from '../../trainers/backend/index.ts';
import { webgpuStatus } from '../../trainers/backend/webgpu/adapter.ts';

const mode = process.argv[2];
if (mode === 'probe') {
  const choice = await initBackend();
  console.log(JSON.stringify({ ...choice, health: await webgpuStatus() }));
} else if (mode === 'oversize') {
  const choice = await initBackend('webgpu');
  const limit = Number(/binding ≤ (\d+) MiB/.exec(choice.adapter ?? '')?.[1]);
  const n = ((limit + 8) * 2 ** 20) / 4; // 8 MiB over the limit, float32
  let result: unknown;
  try {
    const big = tf.fill([n], 1.5);
    const values = await big.data();
    result = { error: null, first: values[0] };
  } catch (err) {
    result = { error: String(err instanceof Error ? err.message : err) };
  }
  // the backend keeps working after the refusal
  const small = Array.from(await tf.add(tf.tensor([1, 2]), 1).data());
  console.log(JSON.stringify({ ...(result as object), small }));
} else {
  throw new Error(`child.ts: unknown mode '${mode}'`);
}
