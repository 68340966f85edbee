import { test } from 'node:test';
import assert from 'node:assert/strict';
import { validate, getSchema } from '../schemas/index.ts';
import { parseLrSchedule, constantWithWarmup, cosineWithWarmup, lrScheduleError, LR_SYNTAX } from '../trainers/optim/lr.ts';

test('webui wiki example "0.005:100, 1e-3:1000, 1e-5": rate until step, last rate to the end', () => {
  const s = parseLrSchedule('0.005:100, 1e-3:1000, 1e-5', 3000);
  assert.deepEqual(s.segments, [
    { rate: 0.005, until: 100 },
    { rate: 1e-3, until: 1000 },
    { rate: 1e-5, until: 3000 },
  ]);
  assert.equal(s.getLr(0), 0.005);
  assert.equal(s.getLr(99), 0.005);
  assert.equal(s.getLr(100), 1e-3);
  assert.equal(s.getLr(999), 1e-3);
  assert.equal(s.getLr(1000), 1e-5);
  assert.equal(s.getLr(2999), 1e-5);
  assert.equal(s.endStep, 3000);
  assert.deepEqual(s.warnings, []);
  assert.equal(s.describe(), '0.005 until step 100, 0.001 until step 1000, 0.00001 until step 3000');
});

test('learn_schedule.py docstring example "0.001:100, 0.00001:1000, 1e-5:10000" ends the run at 10000', () => {
  const s = parseLrSchedule('0.001:100, 0.00001:1000, 1e-5:10000', 100000);
  assert.deepEqual(s.segments.map((x) => x.until), [100, 1000, 10000]);
  assert.equal(s.endStep, 10000); // the webui's scheduler finishes after the last pair
  assert.equal(s.getLr(5000), 1e-5);
});

test('a single number is used to the end; whitespace is ignored like Python float()/int()', () => {
  const s = parseLrSchedule(' 0.005 ', 500);
  assert.deepEqual(s.segments, [{ rate: 0.005, until: 500 }]);
  assert.equal(parseLrSchedule('1e-3 :  200 ,5e-4', 500).getLr(200), 5e-4);
});

test('-1 means to the end and ends the list; later entries are reported as unused', () => {
  const s = parseLrSchedule('0.01:50, 0.001:-1, 0.0001', 400);
  assert.deepEqual(s.segments, [
    { rate: 0.01, until: 50 },
    { rate: 0.001, until: 400 },
  ]);
  assert.equal(s.endStep, 400);
  assert.equal(s.warnings.length, 1);
  assert.match(s.warnings[0]!, /'0\.0001' never used/);
});

test('steps beyond max steps are clamped and end the list', () => {
  const s = parseLrSchedule('0.005:100, 1e-3:1000, 1e-5', 500);
  assert.deepEqual(s.segments, [
    { rate: 0.005, until: 100 },
    { rate: 1e-3, until: 500 },
  ]);
  assert.equal(s.endStep, 500);
  assert.deepEqual(s.warnings, []);
});

test('resume drops the pairs already passed (LearnScheduleIterator cur_step)', () => {
  const s = parseLrSchedule('0.005:100, 1e-3:1000, 1e-5', 3000, 100);
  assert.deepEqual(s.segments, [
    { rate: 1e-3, until: 1000 },
    { rate: 1e-5, until: 3000 },
  ]);
  assert.equal(s.getLr(100), 1e-3);
  const later = parseLrSchedule('0.005:100, 1e-3:1000, 1e-5', 3000, 1500);
  assert.deepEqual(later.segments, [{ rate: 1e-5, until: 3000 }]);
  // same rate for the same step, resumed or not
  const fresh = parseLrSchedule('0.005:100, 1e-3:1000, 1e-5', 3000);
  for (const step of [100, 500, 999, 1000, 2999]) assert.equal(s.getLr(step), fresh.getLr(step));
});

test('a schedule that ends with a pair stops the run there; resuming past it is an error', () => {
  const s = parseLrSchedule('0.01:100, 0.001:200', 1000);
  assert.equal(s.endStep, 200);
  assert.throws(() => parseLrSchedule('0.01:100, 0.001:200', 1000, 250), /ends at step 200.*already at step 250/);
  assert.throws(() => parseLrSchedule('0.01', 100, 100), /already trained to step 100/);
});

test('bad strings are errors that show the syntax', () => {
  const bad = ['', 'abc', '0.005:', '0.005:abc', '0.005:100:200', '0.005:100,', ',0.005', '0.005:0', '0.005:-5', '-0.005', '0.005:1.5', 'nan', 'inf', '0.01:200, 0.001:100', '1e-3:100 200'];
  for (const text of bad) {
    assert.throws(() => parseLrSchedule(text, 1000), (err: Error) => {
      assert.ok(err.message.includes(LR_SYNTAX), `message for "${text}" shows the syntax: ${err.message}`);
      assert.match(err.message, /^bad learn rate schedule/);
      return true;
    });
    assert.ok(lrScheduleError(text));
  }
  assert.match(lrScheduleError('0.005:abc') ?? '', /'abc' is not a step/);
  assert.match(lrScheduleError('0.01:200, 0.001:100') ?? '', /steps must increase/);
  assert.equal(lrScheduleError('0.005:100, 1e-3:1000, 1e-5'), undefined);
  assert.throws(() => parseLrSchedule('0.1:x', 10, 0, 'gradient clip value'), /^Error: bad gradient clip value schedule/);
});

test('constant with warm-up (transformers semantics: first update at lr 0)', () => {
  const s = constantWithWarmup({ lr: 1e-4, warmupSteps: 10, maxSteps: 100 });
  assert.equal(s.getLr(0), 0);
  assert.equal(s.getLr(5), 5e-5);
  assert.equal(s.getLr(10), 1e-4);
  assert.equal(s.getLr(99), 1e-4);
  assert.equal(s.endStep, 100);
  assert.equal(constantWithWarmup({ lr: 1e-4, warmupSteps: 0, maxSteps: 100 }).getLr(0), 1e-4);
});

test('cosine with warm-up (transformers semantics)', () => {
  const s = cosineWithWarmup({ lr: 1e-4, warmupSteps: 10, maxSteps: 110 });
  assert.equal(s.getLr(0), 0);
  assert.equal(s.getLr(10), 1e-4);
  assert.ok(Math.abs(s.getLr(60) - 5e-5) < 1e-12); // half-way down
  assert.ok(Math.abs(s.getLr(110)) < 1e-12);
  const two = cosineWithWarmup({ lr: 1, warmupSteps: 0, maxSteps: 100, cycles: 1 });
  assert.ok(Math.abs(two.getLr(100) - 1) < 1e-12); // a full cosine comes back up
  assert.throws(() => cosineWithWarmup({ lr: 0, warmupSteps: 0, maxSteps: 10 }), /positive/);
});

// The job schemas carry the schedule's syntax as a pattern; the parser adds the semantic checks.

test('schemas: TI and hypernetwork jobs get the webui defaults; the lr pattern agrees with the parser on syntax', () => {
  const ti: Record<string, unknown> = { model: 'm.safetensors', images: 'imgs', name: 'pallas_cat' };
  assert.deepEqual(validate('textual-inversion', ti), []);
  assert.deepEqual(
    [ti.lr, ti.steps, ti.vectors, ti.initText, ti.template, ti.batchSize, ti.gradAccum, ti.width, ti.clipGrad, ti.clipGradValue, ti.latentSampling],
    // width/height: none in the schema, the run fills in the model family's native side (train/run.ts withNativeSize; 512 for SD1/SD2 as the webui)
    ['0.005', 3000, 1, '*', 'style_filewords', 1, 1, undefined, 'disabled', '0.1', 'once'],
  );
  const hn: Record<string, unknown> = { model: 'm.safetensors', images: 'imgs', name: 'hn' };
  assert.deepEqual(validate('hypernetwork', hn), []);
  assert.deepEqual([hn.lr, hn.sizes, hn.layerStructure, hn.activation, hn.weightInit, hn.template, hn.activateOutput], ['0.00001', [768, 320, 640, 1280], [1, 2, 1], 'linear', 'Normal', 'hypernetwork', false]);
  for (const good of ['0.005', '0.005:100, 1e-3:1000, 1e-5', ' 1e-3 : 200 ,5e-4', '0.01:500, 0.001:-1', '.5']) {
    assert.deepEqual(validate('textual-inversion', { ...ti, lr: good }), [], good);
    assert.equal(lrScheduleError(good), undefined, good);
  }
  for (const bad of ['', 'abc', '0.005:', '0.005:abc', '0.005:100:200', '0.005:100,', '-0.005', '0.005:1.5', 'nan', '1e-3:100 200']) {
    const errors = validate('textual-inversion', { ...ti, lr: bad });
    assert.ok(errors.length >= 1 && errors.every((e) => e.field === '/lr'), bad);
    assert.ok(lrScheduleError(bad), bad);
  }
});

test('schemas: bad inputs are field errors (vectors 0/76, name with "/", unknown field, dropout ≥ 1, unknown activation)', () => {
  const base = { model: 'm', images: 'i', name: 'n' };
  const fields = (schema: string, spec: object) => validate(schema, { ...base, ...spec }).map((e) => e.field);
  assert.deepEqual(fields('textual-inversion', { vectors: 0 }), ['/vectors']);
  assert.deepEqual(fields('textual-inversion', { vectors: 76 }), ['/vectors']);
  assert.deepEqual(fields('textual-inversion', { name: 'a/b' }), ['/name']);
  assert.deepEqual(fields('textual-inversion', { name: '..\\x' }), ['/name']);
  assert.deepEqual(fields('textual-inversion', { width: 500 }), ['/width']);
  assert.deepEqual(fields('textual-inversion', { tagDropOut: 1.5 }), ['/tagDropOut']);
  assert.deepEqual(fields('textual-inversion', { stepz: 5 }), ['/stepz']);
  assert.deepEqual(fields('textual-inversion', {}).length, 0);
  assert.deepEqual(validate('textual-inversion', {}).map((e) => e.text), ['/model is required', '/images is required', '/name is required']);
  assert.deepEqual(fields('hypernetwork', { dropoutStructure: [0, 1, 0] }), ['/dropoutStructure/1']);
  assert.deepEqual(fields('hypernetwork', { activation: 'softmax' }), ['/activation']);
  assert.deepEqual(fields('hypernetwork', { sizes: [] }), ['/sizes']);
  assert.deepEqual(fields('hypernetwork', { weightInit: 'Zeros' }), ['/weightInit']);
});

test('schemas: every option has a description (CLI help, OpenAPI, UI forms)', () => {
  for (const name of ['textual-inversion', 'hypernetwork']) {
    const props = getSchema(name)!.properties as Record<string, { description?: string; type?: string }>;
    for (const [key, p] of Object.entries(props)) {
      assert.ok(p.description && p.description.length > 10, `${name}.${key} has a description`);
      assert.ok(p.type, `${name}.${key} has a type beside its $ref`);
    }
  }
});
