import { test } from 'node:test';
import assert from 'node:assert/strict';
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
