/**
 * bench/cpu_train: training tokens/s of the CPU backend (forward, backward, AdamW) for the demo model
 * (lib/demo.ts DEMO_CONFIG, batch 8x256) and a ~10M-parameter model, dense and its MoE upcycle
 * (8 experts, top-6, shared expert), on 1 and 2 threads (XFT_NUM_THREADS), and where a MoE step's
 * time goes (per op family, from a timed step). Each (addon, threads) pair runs in a child process,
 * because the thread count is read once when the addon loads; `--base <xft.node>` measures a second
 * addon (e.g. main's build) in the same run and prints the speed-up beside it.
 * Usage: see USAGE below (--help).
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { arg, printTable } from './table';

const USAGE = `Usage: node dist/bench/cpu_train.js [--threads 1,2] [--steps N] [--models demo,10m] [--kinds dense,moe] [--base addon.node] [--out file.json]
  --threads  thread counts, each in its own process (default 1,2)
  --steps    timed steps after one warm-up step (default 3); the median is reported
  --models   demo (d=128, L=4, batch 8x256) and/or 10m (d=320, L=4, V=8192, batch 4x128)
  --kinds    dense and/or moe (default both)
  --base     a second addon measured in the same run (e.g. /work/addon-base/xft.node); the table shows the speed-up
  --profile  also meter the CPU time of every native call of the timed steps (the share of each op family)
  --out      the JSON results (default bench/out/cpu_train.json)
The addon measured is XFT_ADDON_PATH (else the package's own build).`;

interface Measure {
  model: string; kind: string; params: number; tokens: number; ms: number; tokensPerSecond: number; loss: number;
  /** CPU time of the process per step (all threads; the steadier figure on a loaded machine) */
  cpuMs: number;
  /** with --profile: ms per step in each native function, largest first */
  profile?: [string, number][];
}

/** Wraps every function of the native addon with a CPU-time meter; returns the totals (ms) by name. */
function instrument(): Map<string, number> {
  const { native } = require('../lib/native') as typeof import('../lib/native');
  const totals = new Map<string, number>();
  const addon = native as unknown as Record<string, unknown>;
  for (const name of Object.keys(addon)) {
    const fn = addon[name];
    if (typeof fn !== 'function' || name === 'setErrorClass') continue;
    addon[name] = (...a: unknown[]) => {
      const c0 = process.cpuUsage();
      try {
        return (fn as (...x: unknown[]) => unknown)(...a);
      } finally {
        const c = process.cpuUsage(c0);
        totals.set(name, (totals.get(name) ?? 0) + (c.user + c.system) / 1e3);
      }
    };
  }
  return totals;
}


/** The child: measures the requested models on the addon and thread count it was started with. */
function child(models: string[], kinds: string[], steps: number, profile: boolean): void {
  const totals = profile ? instrument() : null;
  // imported here so that the parent never loads an addon
  /* eslint-disable @typescript-eslint/no-var-requires */
  const { llamaConfig } = require('../lib/config') as typeof import('../lib/config');
  const { createDense, upcycle, countParameters } = require('../lib/xft') as typeof import('../lib/xft');
  const { Trainer, disposeState } = require('../lib/train') as typeof import('../lib/train');
  const { seededRandom } = require('../lib/data') as typeof import('../lib/data');
  const { DEMO_CONFIG } = require('../lib/demo') as typeof import('../lib/demo');
  const sizes: Record<string, { config: import('../lib/config').LlamaConfig; batch: number; seqLen: number }> = {
    demo: { config: DEMO_CONFIG, batch: 8, seqLen: 256 },
    '10m': {
      config: llamaConfig({ hidden_size: 320, intermediate_size: 864, num_hidden_layers: 4, num_attention_heads: 5, num_key_value_heads: 5, vocab_size: 8192 }),
      batch: 4, seqLen: 128,
    },
  };
  const out: Measure[] = [];
  for (const name of models) {
    const s = sizes[name];
    if (!s) throw new Error(`unknown model ${name} (expected ${Object.keys(sizes).join(', ')})`);
    for (const kind of kinds) {
      const dense = createDense(s.config, { seed: 1, device: 'cpu', dtype: 'f32' });
      const model = kind === 'moe' ? upcycle(dense, { experts: 8, topK: 6, seed: 1 }) : dense;
      if (model !== dense) dense.dispose();
      const random = seededRandom(7), rand = () => Math.floor(random() * s.config.vocab_size);
      const rows = Array.from({ length: s.batch * (steps + 1) }, () => {
        const ids = Array.from({ length: s.seqLen + 1 }, rand);
        return { ids: ids.slice(0, -1), targets: ids.slice(1) };
      });
      const run = new Trainer(model, rows, { lr: 1e-4, batchSize: s.batch, steps: steps + 1, seed: 1 });
      const ms: number[] = [], cpu: number[] = [];
      let loss = 0;
      for (let i = 0; i < steps + 1; i++) {
        if (i === 1) totals?.clear();
        const t0 = process.hrtime.bigint(), c0 = process.cpuUsage();
        loss = run.step()!.loss; // logEvery 1: reads the step record
        const c = process.cpuUsage(c0);
        if (i >= 1) ms.push(Number(process.hrtime.bigint() - t0) / 1e6), cpu.push((c.user + c.system) / 1e3);
      }
      ms.sort((a, b) => a - b);
      cpu.sort((a, b) => a - b);
      const med = ms[Math.floor(ms.length / 2)], cpuMs = cpu[Math.floor(cpu.length / 2)], tokens = s.batch * s.seqLen;
      const prof = totals ? [...totals.entries()].map(([k, v]): [string, number] => [k, v / steps]).sort((a, b) => b[1] - a[1]) : undefined;
      out.push({ model: name, kind, params: countParameters(model), tokens, ms: med, tokensPerSecond: tokens / (med / 1e3), cpuMs, loss, profile: prof });
      run.dispose();
      disposeState(run.state);
      model.dispose();
    }
  }
  console.log(JSON.stringify(out));
}

function spawnChild(addon: string | undefined, threads: number, models: string[], kinds: string[], steps: number, profile: boolean): Measure[] {
  const env: NodeJS.ProcessEnv = { ...process.env, XFT_DEVICE: 'cpu', XFT_NUM_THREADS: String(threads), XFT_CPU_THREADS: String(threads) };
  if (addon) env.XFT_ADDON_PATH = addon;
  const args = [...process.execArgv, __filename, '--child', '--models', models.join(','), '--kinds', kinds.join(','), '--steps', String(steps), ...(profile ? ['--profile'] : [])];
  const r = spawnSync(process.execPath, args, { env, encoding: 'utf8', maxBuffer: 1 << 24 });
  const last = (r.stdout ?? '').trim().split('\n').pop() ?? '';
  if (r.status !== 0 || !last.startsWith('[')) throw new Error(`the measuring process (${addon ?? 'own addon'}, ${threads} threads) failed: ${r.error?.message ?? `exit status ${r.status}`}\n${(r.stderr ?? '').slice(-1500)}`);
  return JSON.parse(last) as Measure[];
}

function main(): void {
  if (process.argv.includes('--help') || process.argv.includes('-h')) {
    console.log(USAGE);
    return;
  }
  const models = (arg('--models') ?? 'demo,10m').split(',');
  const kinds = (arg('--kinds') ?? 'dense,moe').split(',');
  const steps = Number(arg('--steps') ?? 3);
  const profile = process.argv.includes('--profile');
  if (process.argv.includes('--child')) return child(models, kinds, steps, profile);
  const threads = (arg('--threads') ?? '1,2').split(',').map(Number);
  const base = arg('--base');
  const addon = process.env.XFT_ADDON_PATH;
  const results: { addon: string; threads: number; measures: Measure[] }[] = [];
  for (const t of threads) {
    results.push({ addon: addon ?? 'package', threads: t, measures: spawnChild(addon, t, models, kinds, steps, profile) });
    if (base) results.push({ addon: base, threads: t, measures: spawnChild(base, t, models, kinds, steps, profile) });
  }
  type Row = { model: string; kind: string; params: string; threads: number; ms: number; cpu_ms: number; tok_s: number; base_ms: number | null; base_cpu_ms: number | null; base_tok_s: number | null; speedup: string; cpu_speedup: string };
  const rows: Row[] = [];
  for (const r of results.filter((x) => x.addon === (addon ?? 'package'))) {
    const b = base ? results.find((x) => x.addon === base && x.threads === r.threads) : undefined;
    for (const m of r.measures) {
      const bm = b?.measures.find((x) => x.model === m.model && x.kind === m.kind);
      rows.push({
        model: m.model, kind: m.kind, params: `${(m.params / 1e6).toFixed(2)}M`, threads: r.threads, ms: m.ms, cpu_ms: m.cpuMs, tok_s: Math.round(m.tokensPerSecond),
        base_ms: bm?.ms ?? null, base_cpu_ms: bm?.cpuMs ?? null, base_tok_s: bm ? Math.round(bm.tokensPerSecond) : null,
        speedup: bm ? `${(bm.ms / m.ms).toFixed(2)}x` : '-', cpu_speedup: bm ? `${(bm.cpuMs / m.cpuMs).toFixed(2)}x` : '-',
      });
    }
  }
  printTable(`CPU training step (f32, AdamW; median of ${steps} steps after 1 warm-up; cpu_ms = process CPU time per step${base ? `; base = ${base}` : ''})`,
    ['model', 'kind', 'params', 'threads', 'ms', 'cpu_ms', 'tok_s', 'base_ms', 'base_cpu_ms', 'base_tok_s', 'speedup', 'cpu_speedup'], rows,
    (v, col) => (Number.isInteger(v) ? String(v) : v.toFixed(col.endsWith('ms') ? 1 : 0)));
  if (profile)
    for (const r of results)
      for (const m of r.measures) {
        const total = m.profile!.reduce((a, p) => a + p[1], 0);
        const prows = m.profile!.slice(0, 14).map(([fn, ms]) => ({ fn, ms, share: `${((100 * ms) / m.cpuMs).toFixed(1)}%` }));
        prows.push({ fn: '(outside native calls)', ms: m.cpuMs - total, share: `${((100 * (m.cpuMs - total)) / m.cpuMs).toFixed(1)}%` });
        printTable(`where a step goes: ${m.model} ${m.kind}, ${r.threads} thread(s), ${r.addon} (CPU ms per step, mean)`, ['fn', 'ms', 'share'], prows, (v) => v.toFixed(2));
      }
  const out = arg('--out') ?? path.resolve('bench', 'out', 'cpu_train.json');
  fs.mkdirSync(path.dirname(out), { recursive: true });
  fs.writeFileSync(out, JSON.stringify({ date: new Date().toISOString(), steps, results }, null, 2));
  console.log(`\nwrote ${out}`);
}

try {
  main();
} catch (err) {
  console.error(`bench/cpu_train: ${(err as Error).message}`);
  process.exitCode = 1;
}
