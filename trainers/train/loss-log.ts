/**
 * @file The job's one loss log: `<runDir>/loss.csv` with the webui's textual_inversion_loss.csv
 * columns (`step,epoch,epoch_step,loss,learn_rate`), one row per optimizer step, written by the
 * training loop (train/loop.ts) and nobody else. Its path goes out with a `lossLog` event, and the
 * server's GET /api/jobs/{id}/loss.csv serves that file as written — no second, throttled copy.
 *
 * Example:
 *   const log = await LossLog.start(join(runDir, 'loss.csv'), startStep, ctx);
 *   await log.append({ step, epoch, epochStep, loss, learnRate });
 */
import { existsSync } from 'node:fs';
import { appendFile, mkdir, readFile, writeFile } from 'node:fs/promises';
import { dirname } from 'node:path';
import type { JobContext } from '../job.ts';

export const LOSS_CSV_HEADER = 'step,epoch,epoch_step,loss,learn_rate\n';

export interface LossRow {
  step: number;
  epoch: number;
  /** 1-based step within the epoch. */
  epochStep: number;
  loss: number;
  learnRate: number;
}

export class LossLog {
  private constructor(readonly path: string) {}

  /**
   * Open the log at `startStep`: rows past it (written by a run killed after its last snapshot,
   * or by an earlier run an --overwrite replaces) are dropped so each step appears once.
   */
  static async start(path: string, startStep: number, ctx: Pick<JobContext, 'emit'>): Promise<LossLog> {
    if (!existsSync(path)) {
      await mkdir(dirname(path), { recursive: true });
      await writeFile(path, LOSS_CSV_HEADER);
    } else {
      const lines = (await readFile(path, 'utf8')).split('\n').slice(1).filter((l) => l.trim());
      const kept = lines.filter((l) => Number(l.split(',')[0]) <= startStep);
      if (kept.length !== lines.length) await writeFile(path, LOSS_CSV_HEADER + kept.map((l) => `${l}\n`).join(''));
    }
    ctx.emit({ type: 'lossLog', path });
    return new LossLog(path);
  }

  async append(r: LossRow): Promise<void> {
    await appendFile(this.path, `${r.step},${r.epoch},${r.epochStep},${r.loss},${r.learnRate}\n`);
  }
}
