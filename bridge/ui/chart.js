/**
 * @file The loss chart: uPlot (vendored from npm, served at vendor/uplot/) with the raw loss per
 * step and a smoothed line (exponential moving average, like TensorBoard's smoothing), so a
 * noisy diffusion loss still shows its trend. Points are kept by step, so the CSV history and
 * live step events can arrive in any order without duplicates.
 */
import uPlot from './vendor/uplot/uPlot.esm.js';

const SMOOTHING = 0.9;
/** Whole steps only on the x axis. */
const STEP_INCRS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000, 1e6, 1e7];

function ema(values) {
  const out = [];
  let acc;
  for (const v of values) {
    acc = acc === undefined ? v : SMOOTHING * acc + (1 - SMOOTHING) * v;
    out.push(acc);
  }
  return out;
}

export function createLossChart(root) {
  const losses = new Map();
  let plot;
  let pending = false;

  const size = () => ({ width: Math.max(root.clientWidth, 240), height: 220 });
  const data = () => {
    const steps = [...losses.keys()].sort((a, b) => a - b);
    const ys = steps.map((s) => losses.get(s));
    return [steps, ys, ema(ys)];
  };
  const draw = () => {
    pending = false;
    root.dataset.points = String(losses.size);
    if (!losses.size) return;
    if (plot) return plot.setData(data());
    plot = new uPlot({
      ...size(),
      class: 'loss-plot',
      scales: { x: { time: false } },
      axes: [{ label: 'step', incrs: STEP_INCRS }, { label: 'loss', size: 60 }],
      legend: { live: true },
      series: [
        { label: 'step' },
        { label: 'loss', stroke: 'rgba(99, 132, 255, 0.45)', width: 1, points: { show: false } },
        { label: 'smoothed', stroke: '#e8590c', width: 2, points: { show: false } },
      ],
    }, data(), root);
  };
  const schedule = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(draw);
  };
  new ResizeObserver(() => plot?.setSize(size())).observe(root);

  return {
    /** Add points [{step, loss}] (duplicates by step replace). */
    add(points) {
      for (const p of points) if (Number.isFinite(p.loss)) losses.set(p.step, p.loss);
      schedule();
    },
    /** Forget everything (another job is shown). */
    reset() {
      losses.clear();
      plot?.destroy();
      plot = undefined;
      root.dataset.points = '0';
    },
  };
}

/** loss.csv (`step,epoch,epoch_step,loss,learn_rate`; columns found by the header) → [{step, loss}]. */
export function parseLossCsv(text) {
  const [header = '', ...rows] = text.split('\n');
  const names = header.split(',');
  const stepAt = names.indexOf('step');
  const lossAt = names.indexOf('loss');
  if (stepAt < 0 || lossAt < 0) return [];
  return rows
    .filter(Boolean)
    .map((line) => {
      const cells = line.split(',');
      return { step: Number(cells[stepAt]), loss: Number(cells[lossAt]) };
    })
    .filter((p) => Number.isFinite(p.step));
}
