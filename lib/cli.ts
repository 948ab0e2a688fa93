#!/usr/bin/env node
/** The `xft` command line. */
import { Command } from 'commander';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { backend, memoryStats } from './index';
import { packageRoot } from './native';
import { MultiBar, Presets, type SingleBar } from 'cli-progress';
import { XftError } from './errors';
import { runDemo, markdownTable } from './demo';

const pkg = JSON.parse(fs.readFileSync(path.join(packageRoot(), 'package.json'), 'utf8')) as { version: string };

const program = new Command();
program.name('xft').description('XFT for code LLMs: upcycle a dense Llama to a shared-expert MoE, fine-tune, merge back to dense').version(pkg.version);

program
  .command('info')
  .description('show the compute backend (GPU name, compute capability, memory, or why the CPU is used) and the build')
  .option('--json', 'print JSON')
  .action((opts: { json?: boolean }) => {
    const b = backend();
    const info = { version: pkg.version, backend: b, memory: memoryStats(), node: process.version };
    if (opts.json) {
      console.log(JSON.stringify(info, null, 2));
      return;
    }
    console.log(`xft ${pkg.version} (node ${process.version})`);
    console.log(`build:   ${b.compiledWithCuda ? 'CUDA backend (sm_80, sm_90a, PTX compute_90) + CPU' : 'CPU only'}`);
    if (b.kind === 'cuda') {
      const gib = (v = 0) => (v / 2 ** 30).toFixed(1);
      console.log(`device:  ${b.name} (compute capability ${b.computeCapability!.join('.')}, ${b.multiprocessors} SMs)`);
      console.log(`memory:  ${gib(b.freeMemory)} GiB free of ${gib(b.totalMemory)} GiB`);
      console.log(`cuda:    driver ${b.driverVersion}, runtime ${b.runtimeVersion}`);
    } else {
      console.log(`device:  CPU (${b.reason})`);
    }
  });

program
  .command('demo')
  .description('the main job: pretrain a tiny Llama on code found on this machine, then SFT versus XFT (upcycle -> MoE -> learned merge) with equal budgets; writes a results table and loss curves')
  .option('-o, --out <dir>', 'output folder', 'xft-demo')
  .option('--device <device>', "'cuda' or 'cpu' (default: the GPU when there is one)")
  .option('--scale <x>', 'scale of the training budgets (1 = about 2 minutes on 2 CPU cores)', '1')
  .option('--seed <n>', 'seed', '0')
  .action((opts: { out: string; device?: string; scale: string; seed: string }) => {
    const scale = Number(opts.scale), seed = Number(opts.seed);
    if (!(scale > 0)) throw new XftError(`demo: expected a positive number for --scale but received ${opts.scale}`, 'XFT_VALUE');
    if (!Number.isSafeInteger(seed)) throw new XftError(`demo: expected an integer for --seed but received ${opts.seed}`, 'XFT_VALUE');
    if (opts.device !== undefined && opts.device !== 'cpu' && opts.device !== 'cuda')
      throw new XftError(`demo: expected 'cpu' or 'cuda' for --device but received ${opts.device}`, 'XFT_VALUE');
    const bars = new MultiBar({ format: ' {stage} |{bar}| {value}/{total} steps | loss {loss} | {tps} tok/s | ETA {eta_formatted}', hideCursor: true, clearOnComplete: false, noTTYOutput: true, notTTYSchedule: 10000 }, Presets.shades_classic);
    const open = new Map<string, SingleBar>();
    const r = runDemo({
      out: opts.out, scale, seed, device: opts.device as 'cpu' | 'cuda' | undefined,
      log: (line) => bars.log(line + '\n'),
      progress: (stage, s) => {
        let bar = open.get(stage);
        if (!bar) {
          bar = bars.create(s.steps, 0, { stage: stage.padEnd(8), loss: '-', tps: '-' });
          open.set(stage, bar);
        }
        bar.update(s.step, { loss: s.loss.toFixed(3), tps: Math.round(s.tokensPerSecond) });
      },
    });
    bars.stop();
    console.log('\n' + markdownTable(r));
    console.log(`wrote ${opts.out}/results.md, results.json, loss.svg, loss.png`);
  });

try {
  program.parse(process.argv);
} catch (err) {
  const e = err as Error & { code?: string };
  console.error(`xft: ${e.message}`);
  process.exit(e.code === 'XFT_VALUE' || e.code === 'XFT_TYPE' ? 2 : 1);
}
