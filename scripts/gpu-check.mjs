#!/usr/bin/env node
// The GPU session's one prepared check (issue 13, item 7), run on an H100/H200 host from the project
// root after staging (../shared/gpu/README.md): bash .gpu/enter.sh "bash scripts/gpu-check.sh".
// It runs, in order, each step with its own time limit inside one overall budget (default 470 s, so
// the whole stays under 8 minutes even when a step hangs: a step past its limit is killed with its
// whole process group and reported as "timeout", and the next step runs):
//
//   step           limit  what
//   info             15 s  nvidia-smi, xft info (the backend must be CUDA)
//   gpu-tests       100 s  the GPU test files (test/3x, 13.index_safety) with XFT_SYNC=1
//   bench-kernels   100 s  bench/kernels at the 1.3B-layer shape (xft-1.3b) beside PyTorch
//   bench-train     105 s  bench/train at the ~100M model (dense, MoE 8x top-6, merge) beside PyTorch,
//                          with --profile (MFU and the per-kernel time breakdown, CUDA events)
//   bench-router     25 s  bench/router: the small-N router linears beside the grouped GEMM they replace
//   memcheck         60 s  compute-sanitizer memcheck over bench/kernel_families (every kernel family,
//                          small shapes, checked against the CPU)
//   racecheck        60 s  compute-sanitizer racecheck over the same
//
// Output in $OUT (or ./gpu-out): gpu-check.json (pass/fail, exit status and seconds per step, the
// benchmark JSONs), gpu-check.md (the same as tables, with each benchmark's printed tables), and
// gpu-check-logs.tar.gz (every step's full log): three files, within the device tool's limit of 8.
//
// XFT_GPU_CHECK_DRY=1: the same orchestration on a machine without a GPU (the emulated CUDA backend
// when XFT_ADDON_PATH names the XFT_EMU=ON build, else the CPU): small shapes, no PyTorch, the
// sanitizer steps run their driver without compute-sanitizer; used by test/81.gpu_check.ts and CI.
// Options (environment): XFT_GPU_CHECK_STEPS=a,b (a subset, in the order above), XFT_GPU_CHECK_BUDGET
// (overall seconds), XFT_GPU_CHECK_HANG=1 (adds a step that never ends: the timeout path, for tests).
// Usage: node scripts/gpu-check.mjs [--help]; exit status 0 when every step that ran passed, else 1.
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const HELP = fs.readFileSync(new URL(import.meta.url), 'utf8').split('\n').filter((l) => l.startsWith('//')).map((l) => l.slice(3)).join('\n');
if (process.argv.includes('--help') || process.argv.includes('-h')) {
  console.log(HELP);
  process.exit(0);
}

const DRY = process.env.XFT_GPU_CHECK_DRY === '1';
const BUDGET_S = Number(process.env.XFT_GPU_CHECK_BUDGET ?? 470);
const OUT = path.resolve(process.env.OUT || path.join(root, 'gpu-out'));
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-gpu-check-'));
const logs = path.join(work, 'logs');
fs.mkdirSync(logs, { recursive: true });
fs.mkdirSync(OUT, { recursive: true });

const GPU_TESTS = ['test/30.cuda.ts', 'test/31.cuda_layers.ts', 'test/32.cuda_train.ts', 'test/33.cuda_model.ts', 'test/34.cuda_vocab.ts',
  'test/35.cuda_attention.ts', 'test/36.cuda_router.ts', 'test/13.index_safety.ts'];
const NODE = process.execPath;
/** tap through its bin script in node_modules (the staged tree has no npx on the PATH guarantee) */
const tapCommand = (args) => [NODE, path.join(root, 'node_modules', 'tap', 'dist', 'esm', 'run.mjs'), ...args];
const sanitizer = (tool) => DRY
  ? [NODE, 'dist/bench/kernel_families.js', '--family', 'router-linear', '--family', 'gemm-odd']
  : ['compute-sanitizer', '--tool', tool, '--error-exitcode', '3', '--print-limit', '50', NODE, 'dist/bench/kernel_families.js'];

/** name, limit (s), command (argv), extra environment, the files it writes for the summary */
const STEPS = [
  { name: 'info', limit: 15, cmd: DRY ? [NODE, 'dist/lib/cli.js', 'info']
    : ['bash', '-c', 'nvidia-smi; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv; "$0" dist/lib/cli.js info && "$0" -e "$1"', NODE,
      "const b = require('./dist/lib/index.js').backend(); if (b.kind !== 'cuda') { console.error('the backend is not CUDA: ' + b.reason); process.exit(1); }"] },
  { name: 'gpu-tests', limit: 100, cmd: tapCommand(['--disable-coverage', '--timeout', '100', ...(DRY ? ['test/36.cuda_router.ts'] : GPU_TESTS)]),
    env: DRY ? { XFT_TEST_FAST: '1' } : { XFT_SYNC: '1' } },
  { name: 'bench-kernels', limit: 100, json: 'kernels.json',
    cmd: [NODE, 'dist/bench/kernels.js', '--shape', DRY ? 'tiny' : 'xft-1.3b', ...(DRY ? ['--no-torch'] : []), '--out', path.join(work, 'kernels.json')] },
  { name: 'bench-train', limit: 105, json: 'train.json',
    cmd: [NODE, 'dist/bench/train.js', '--size', DRY ? 'tiny' : '100m', '--steps', DRY ? '1' : '5', '--profile', ...(DRY ? ['--no-torch'] : []), '--out', path.join(work, 'train.json')] },
  { name: 'bench-router', limit: 25, json: 'router.json',
    cmd: [NODE, 'dist/bench/router.js', ...(DRY ? ['--tokens', '64', '--hidden', '32'] : []), '--out', path.join(work, 'router.json')] },
  { name: 'memcheck', limit: 60, cmd: sanitizer('memcheck') },
  { name: 'racecheck', limit: 60, cmd: sanitizer('racecheck') },
];
if (process.env.XFT_GPU_CHECK_HANG === '1') STEPS.splice(1, 0, { name: 'hang', limit: 2, cmd: [NODE, '-e', 'setInterval(() => {}, 1000)'] });
const only = process.env.XFT_GPU_CHECK_STEPS ? process.env.XFT_GPU_CHECK_STEPS.split(',').map((s) => s.trim()) : null;
if (only) {
  const unknown = only.filter((s) => !STEPS.some((st) => st.name === s));
  if (unknown.length) {
    console.error(`gpu-check: unknown step ${unknown.join(', ')} (expected ${STEPS.map((s) => s.name).join(', ')})`);
    process.exit(2);
  }
}

/** runs argv with a time limit; the child leads its own process group, all of which a timeout kills */
function runStep(step, limitS) {
  return new Promise((resolve) => {
    const log = path.join(logs, `${step.name}.log`);
    const fd = fs.openSync(log, 'w');
    fs.writeSync(fd, `$ ${step.cmd.join(' ')}\n`);
    const t0 = Date.now();
    let timedOut = false;
    const child = spawn(step.cmd[0], step.cmd.slice(1), {
      cwd: root, stdio: ['ignore', fd, fd], detached: true,
      env: { ...process.env, PYTHONUNBUFFERED: '1', FORCE_COLOR: '0', ...(step.env ?? {}) },
    });
    const kill = (sig) => { try { process.kill(-child.pid, sig); } catch { /* gone */ } };
    const timer = setTimeout(() => {
      timedOut = true;
      kill('SIGTERM');
      setTimeout(() => kill('SIGKILL'), 5000).unref();
    }, limitS * 1000);
    const done = (code, error) => {
      clearTimeout(timer);
      kill('SIGKILL');  // whatever the step left behind in its group
      fs.closeSync(fd);
      resolve({ code, error, timedOut, seconds: (Date.now() - t0) / 1000, log });
    };
    child.on('error', (e) => done(null, e.message));
    child.on('exit', (code, signal) => done(code ?? (signal ? `signal ${signal}` : null)));
  });
}

/** what the summary shows of a log: tap's totals and failures, sanitizer summaries, family lines, tables */
function highlights(name, text) {
  const lines = text.split('\n');
  const pick = (re, max = 20) => lines.filter((l) => re.test(l)).slice(0, max);
  if (name === 'gpu-tests') return pick(/^# \{ total|^\s*not ok|^# (fail|skip)/);
  if (name === 'memcheck' || name === 'racecheck') return pick(/ERROR SUMMARY|RACECHECK SUMMARY|^family |========= (Invalid|Error|Race|.*hazard)/, 30);
  if (name === 'info') return pick(/NVIDIA|backend|cuda|device|Driver/i, 12);
  return [];
}

const started = Date.now();
const deadline = started + BUDGET_S * 1000;
const results = [];
for (const step of STEPS) {
  if (only && !only.includes(step.name)) continue;
  const left = (deadline - Date.now()) / 1000 - 5;  // 5 s kept for the summary
  const limit = Math.min(step.limit, Math.floor(left));
  if (left < 3) {
    results.push({ name: step.name, status: 'skipped', reason: 'the overall budget is spent', limit_s: step.limit, seconds: 0 });
    console.log(`== ${step.name}: skipped (budget spent)`);
    continue;
  }
  console.log(`== ${step.name} (limit ${limit} s): ${step.cmd.join(' ')}`);
  const r = await runStep(step, limit);
  const text = fs.readFileSync(r.log, 'utf8');
  const status = r.timedOut ? 'timeout' : r.code === 0 ? 'pass' : 'fail';
  const entry = {
    name: step.name, status, exit: r.code, seconds: Math.round(r.seconds * 10) / 10, limit_s: limit, command: step.cmd.join(' '),
    log: `logs/${step.name}.log`, highlights: highlights(step.name, text), tail: text.trimEnd().split('\n').slice(-(step.json ? 80 : 25)),
  };
  if (r.error) entry.error = r.error;
  if (step.json && fs.existsSync(path.join(work, step.json))) {
    try { entry.result = JSON.parse(fs.readFileSync(path.join(work, step.json), 'utf8')); } catch (e) { entry.result_error = e.message; }
  }
  results.push(entry);
  console.log(`   ${status}${r.timedOut ? ` after ${limit} s` : ` (exit ${r.code})`} in ${entry.seconds} s`);
  for (const h of entry.highlights.slice(0, 8)) console.log(`   ${h}`);
}

const total = (Date.now() - started) / 1000;
const failed = results.filter((r) => r.status === 'fail' || r.status === 'timeout');
const summary = {
  date: new Date().toISOString(), dry: DRY, host: os.hostname(), budget_s: BUDGET_S, total_s: Math.round(total * 10) / 10,
  ok: failed.length === 0, steps: results,
};
fs.writeFileSync(path.join(OUT, 'gpu-check.json'), JSON.stringify(summary, null, 2));

const md = [
  `# xft gpu-check ${DRY ? '(dry run: no GPU, small shapes, no PyTorch, no compute-sanitizer)' : ''}`.trim(),
  '',
  `${summary.date}, ${summary.host}: ${summary.ok ? 'every step passed' : `${failed.length} step(s) failed: ${failed.map((f) => f.name).join(', ')}`} in ${summary.total_s} s (budget ${BUDGET_S} s).`,
  '',
  '| step | status | exit | seconds | limit |',
  '| --- | --- | ---: | ---: | ---: |',
  ...results.map((r) => `| ${r.name} | ${r.status === 'pass' ? 'pass' : `**${r.status}**`} | ${r.exit ?? '-'} | ${r.seconds} | ${r.limit_s} |`),
  '',
];
for (const r of results) {
  if (r.status === 'skipped') continue;
  const body = r.name.startsWith('bench-') ? r.tail : r.highlights.length ? r.highlights : r.tail.slice(-12);
  md.push(`## ${r.name}: ${r.status}`, '', `\`${r.command}\``, '', '```', ...body, '```', '');
}
fs.writeFileSync(path.join(OUT, 'gpu-check.md'), md.join('\n'));
const tar = spawnSync('tar', ['-czf', path.join(OUT, 'gpu-check-logs.tar.gz'), '-C', work, '.'], { encoding: 'utf8' });
if (tar.status !== 0) console.error(`gpu-check: could not pack the logs: ${tar.stderr}`);
fs.rmSync(work, { recursive: true, force: true });
console.log(`\n${summary.ok ? 'gpu-check: every step passed' : `gpu-check: FAILED ${failed.map((f) => `${f.name} (${f.status})`).join(', ')}`} in ${summary.total_s} s; wrote ${OUT}/gpu-check.{json,md} and gpu-check-logs.tar.gz`);
process.exitCode = summary.ok ? 0 : 1;
