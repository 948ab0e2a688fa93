#!/usr/bin/env node
// Mutation check: plants each bug of the table below in a temporary copy of the project, runs only the
// test files that should catch it, and fails if any mutant survives (every test passes) or no longer
// applies (the code it mutates changed: update the table). The working tree is never touched.
//
//   node scripts/mutation-check.mjs [name ...]        (default: every mutant)
//
// Mutants run on XFT_MUTANT_JOBS workers at once (default: 2, or 1 on a single core), each in its own
// copy; a mutant's test files run one at a time, so two workers keep two cores busy.
//
// TypeScript mutants run against XFT_ADDON_PATH when it is set, else against a CPU-only addon built in
// the copy (~11 s); native mutants (binding/cpu) rebuild a CPU-only addon in the copy each (~11 s).
// test/54 needs python3 with numpy (XFT_PYTHON picks the interpreter); XFT_REQUIRE_REFERENCES=1 is set
// so that a missing reference fails instead of letting its mutant survive.
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');

/**
 * name, why, file, edits [from, to, count = 1] (literal text; each must occur exactly `count` times),
 * and the test files expected to kill it.
 */
const MUTANTS = [
  // the review's six (issue 19): three survived the suite before it
  { name: 'router-frozen', why: 'router parameters created with trainable = false', file: 'lib/xft.ts',
    edits: [['new Param(name, init.next(shape, dtype)())', 'new Param(name, init.next(shape, dtype)(), false)']], tests: ['test/60.model.ts'] },
  { name: 'microbatch-own-tokens', why: "each micro-batch normalised by its own token count, not the step's", file: 'lib/train.ts',
    edits: [['model.backward({ tokens: stepTokens, ', 'model.backward({ tokens: f.tokens, ']], tests: ['test/64.train_loop.ts'] },
  { name: 'gemm-chunk-row', why: "the CPU grouped GEMM reference path's second thread chunk computes one row fewer", file: 'binding/cpu/grouped_gemm.cc', native: true,
    edits: [['ye.data() + ra * n, (int)(rb - ra), n, k);', 'ye.data() + ra * n, (int)(rb - ra) - (ra > 0 ? 1 : 0), n, k);']], tests: ['test/21.gemm_fast.ts'] },
  { name: 'gemm-block-row', why: "the fast CPU GEMM's output blocks after the first compute one row fewer", file: 'binding/cpu/grouped_gemm.cc', native: true,
    edits: [['x.m0 = m0, x.mb = std::min(mc, g[q].M - m0),', 'x.m0 = m0, x.mb = std::min(mc, g[q].M - m0) - (m0 > 0 ? 1 : 0),']],
    tests: ['test/65.references.ts', 'test/21.gemm_fast.ts'] },
  { name: 'dare-no-rescale', why: "UpIT's DARE child keeps parent j's entries without the 1 / (1 - p) rescale (CPU twin)", file: 'binding/cpu/expand.cc', native: true,
    edits: [['const double ta = expand_keep(stream_a, i, drop_rate) ? (value(a, i) - b0) / keep : 0.0;', 'const double ta = expand_keep(stream_a, i, drop_rate) ? (value(a, i) - b0) : 0.0;']],
    tests: ['test/90.upit_expand.ts'] },
  { name: 'joint-router-label-shift', why: "UpIT's joint router trains each row toward the next expert's bucket", file: 'lib/upit/joint_router.ts',
    edits: [['labelValues[b * T + t] = targets[b * T + t] >= 0 ? part[b].label : -1;', 'labelValues[b * T + t] = targets[b * T + t] >= 0 ? (part[b].label + 1) % routers[0].value.shape[0] : -1;']],
    tests: ['test/94.upit_joint_router.ts'] },
  { name: 'trunk-expert-own-trunk', why: "UpIT's sharedTrunk keeps the expert's own trunk instead of the MoE's", file: 'lib/upit/assemble.ts',
    edits: [['const meanEntry = trunkMean(tr, to, chunk);\n  const entries: WriteEntry[] = [meanEntry(\'model.embed_tokens.weight\')];\n  for (let l = 0; l < c.num_hidden_layers; l++) {',
      'const meanEntry = trunkMean([ex], to, chunk);\n  const entries: WriteEntry[] = [meanEntry(\'model.embed_tokens.weight\')];\n  for (let l = 0; l < c.num_hidden_layers; l++) {']],
    tests: ['test/92.upit_assemble.ts'] },
  { name: 'bucket-ties-upward', why: "UpIT's seed buckets break loss ties toward the higher expert index", file: 'lib/upit/seed.ts',
    edits: [['if (!Number.isNaN(v) && (Number.isNaN(b) || v < b)) best = e;', 'if (!Number.isNaN(v) && (Number.isNaN(b) || v <= b)) best = e;']],
    tests: ['test/91.upit_route.ts'] },
  { name: 'router-backward-removed', why: 'no gradient through the routing weights to the router', file: 'lib/model.ts',
    edits: [['const dLogits = xops.routeSharedBackward(s.logits, s.routing, dWeights, { ...(dImportance ? { dImportance } : {}), ...(dProbs ? { dProbs } : {}) });',
      'const dLogits = Tensor.zeros(s.logits.shape, { dtype: s.logits.dtype, device: s.logits.device });']], tests: ['test/60.model.ts'] },
  { name: 'balance-backward-skipped', why: "the balance loss's backward skipped", file: 'lib/model.ts',
    edits: [['if (this.moe.balance_loss_weight > 0) {\n      const b = tops.balanceLossBackward', 'if (false) {\n      const b = tops.balanceLossBackward']], tests: ['test/60.model.ts'] },
  { name: 'causal-mask-off-by-one', why: 'the CPU attention sees one future token', file: 'binding/cpu/attention.cc', native: true,
    edits: [
      ['const int i = i0 + x, n = i + 1;', 'const int i = i0 + x, n = i + 2 < T ? i + 2 : T;'],
      ['      const int n = i + 1;\n      scores(q, Kt', '      const int n = i + 2 < T ? i + 2 : T;\n      scores(q, Kt'],
    ], tests: ['test/45.attention.ts', 'test/65.references.ts'] },
  // five more
  { name: 'balance-load-counts', why: 'the balance loss uses the hard counts under noise instead of the noisy top-k estimate', file: 'lib/model.ts',
    edits: [['tops.balanceLoss(routing.importance, estimate ?? routing.load,', 'tops.balanceLoss(routing.importance, routing.load,']], tests: ['test/65.references.ts'] },
  { name: 'noise-in-eval', why: 'router noise added outside training', file: 'lib/model.ts',
    edits: [['const noisy = ctx.training && this.noise !== null && this.moe.gate_noise;', 'const noisy = this.noise !== null && this.moe.gate_noise;']], tests: ['test/65.references.ts'] },
  { name: 'grad-norm-squared', why: "the gradient norm reported and clipped as its square (the step ledger's step end, CPU twin and kernel share it)", file: 'cuda/step.h', native: true,
    edits: [['const double norm = sqrt((double)sumsq);', 'const double norm = (double)sumsq;']], tests: ['test/64.train_loop.ts'] },
  { name: 'rope-scaling-ignored', why: 'linear rope_scaling dropped from the model', file: 'lib/model.ts',
    edits: [['theta: c.rope_theta, scalingFactor: ropeScaling(c) };', 'theta: c.rope_theta, scalingFactor: ropeScaling(c) * 0 + 1 };']], tests: ['test/54.hf_reference.ts'] },
  { name: 'gqa-heads-interleaved', why: 'query head h reads kv head h % Hkv instead of h / (H / Hkv) (forward and backward alike)', file: 'binding/cpu/attention.cc', native: true,
    edits: [['kv = b * Hkv + h / G;', 'kv = b * Hkv + h % Hkv;'], ['load_kv(S, k, v, b, h / G, ', 'load_kv(S, k, v, b, h % Hkv, '], ['for (int h = kvh * G; h < (kvh + 1) * G; h++)', 'for (int h = kvh; h < H; h += Hkv)']], tests: ['test/45.attention.ts', 'test/65.references.ts'] },
  { name: 'merge-rate-swapped', why: 'mixing coefficients with λ and 1 − λ swapped (on-disk merge)', file: 'lib/checkpoint.ts',
    edits: [['[sharedRate, ...s.map((v) => (1 - sharedRate) * v)]', '[1 - sharedRate, ...s.map((v) => sharedRate * v)]']], tests: ['test/52.checkpoint.ts'] },
  // recomputation and the memory plan (issue 11)
  { name: 'recompute-noise-reseeded', why: "the recomputed forward draws router noise from the backward's seed, not the forward's", file: 'lib/model.ts',
    edits: [['this.forward({ ...ctx, training: true, recompute: false, seed }, x)', 'this.forward({ ...ctx, training: true, recompute: false }, x)']], tests: ['test/66.recompute.ts'] },
  { name: 'plan-forgets-expert-outputs', why: "the plan does not count the MoE's kept expert outputs ye", file: 'lib/plan.ts',
    edits: [['saved.push(gu, ye);', 'saved.push(gu);\n    pool.free(ye);']], tests: ['test/67.plan.ts'] },
  // issue 14: checkpoints as the reference reads them
  { name: 'importance-full-softmax', why: 'without a shared expert, importance sums p instead of the top-K renormalized weights', file: 'binding/cpu/routing.cc', native: true,
    edits: [['importance[sel[j]] += shared ? p[sel[j]] : g[j];', 'importance[sel[j]] += p[sel[j]];']], tests: ['test/20.routing.ts'] },
  { name: 'config-json-lossy', why: 'config.json written with JSON.stringify (4.0 becomes 4, the source key order lost)', file: 'lib/checkpoint.ts',
    edits: [["configJsonText(config));", "JSON.stringify(config, null, 2) + '\\n');"]], tests: ['test/52.config_json.ts'] },
  // the optimizers (issue 11)
  { name: 'adafactor-rms-whole-stack', why: "Adafactor clips an expert stack's update by the RMS of the whole stack, not per expert", file: 'binding/cpu/adafactor.cc', native: true,
    edits: [['const size_t groups = t.clip_per_slice ? S : 1,', 'const size_t groups = 1,']], tests: ['test/47.adafactor.ts'] },
  { name: 'stochastic-rounding-truncates', why: 'stochastic rounding without the random bits (always toward zero)', file: 'cuda/optim.h', native: true,
    edits: [['u += r & 0xffffu;', 'u += 0;']], tests: ['test/47.adafactor.ts'] },
  // the small-N router linears (issue 13)
  { name: 'router-linear-dw-last-token', why: "the CPU router linear's dW leaves out the last token", file: 'binding/cpu/router_linear.cc', native: true,
    edits: [['for (int t = 0; t < T; t++) {', 'for (int t = 0; t < T - 1; t++) {']], tests: ['test/23.router_linear.ts'] },
];

const only = process.argv.slice(2);
const mutants = only.length ? MUTANTS.filter((m) => only.includes(m.name)) : MUTANTS;
if (only.length && mutants.length !== only.length) {
  console.error(`unknown mutant(s): ${only.filter((n) => !MUTANTS.some((m) => m.name === n)).join(', ')}; known: ${MUTANTS.map((m) => m.name).join(', ')}`);
  process.exit(2);
}

// the copies: the project's files as they are in the working tree (tracked and untracked, not ignored),
// one per worker
const files = spawnSync('git', ['ls-files', '-z', '--cached', '--others', '--exclude-standard'], { cwd: root, encoding: 'utf8' }).stdout.split('\0').filter(Boolean);
const cores = os.availableParallelism?.() ?? os.cpus().length;
const jobs = Math.max(1, Math.min(mutants.length, Number(process.env.XFT_MUTANT_JOBS) || Math.min(2, cores)));
const works = [];
process.on('exit', () => {
  for (const w of works) fs.rmSync(w, { recursive: true, force: true });
});
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => process.exit(130));
for (let j = 0; j < jobs; j++) {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-mutants-'));
  works.push(work);
  for (const f of files) {
    if (f === 'node_modules' || f.startsWith('build') || !fs.existsSync(path.join(root, f))) continue;
    fs.mkdirSync(path.dirname(path.join(work, f)), { recursive: true });
    fs.copyFileSync(path.join(root, f), path.join(work, f));
  }
  fs.symlinkSync(fs.realpathSync(path.join(root, 'node_modules')), path.join(work, 'node_modules'));
}

/** npx in a copy, without blocking the other workers: { status, stdout, stderr } */
function npx(work, args, env = {}) {
  return new Promise((resolve) => {
    const child = spawn('npx', args, { cwd: work, env: { ...process.env, ...env } });
    let stdout = '', stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', (err) => resolve({ status: -1, stdout, stderr: stderr + err.message }));
    child.on('close', (status) => resolve({ status, stdout, stderr }));
  });
}

async function buildCpu(work, out) {
  const t0 = Date.now();
  const r = await npx(work, ['cmake-js', 'compile', '--out', out, '--CDXFT_CUDA=OFF']);
  if (r.status !== 0) throw new Error(`CPU build in ${work}/${out} failed:\n${(r.stdout + r.stderr).slice(-3000)}`);
  return { addon: path.join(work, out, 'Release', 'xft.node'), seconds: (Date.now() - t0) / 1000 };
}

let baseAddon = process.env.XFT_ADDON_PATH;
if (!baseAddon) {
  const b = await buildCpu(works[0], 'build-base');
  baseAddon = b.addon;
  console.log(`== CPU-only addon for the TypeScript mutants built in ${b.seconds.toFixed(0)} s`);
}

async function runTests(work, tests, addon) {
  // one test file at a time (--jobs 1): the workers share the cores
  const r = await npx(work, ['tap', '--disable-coverage', '--jobs', '1', '-R', 'tap', ...tests], {
    XFT_ADDON_PATH: addon, XFT_REQUIRE_REFERENCES: '1', XFT_DEVICE: 'cpu', XFT_TEST_EXPECT_BACKEND: 'cpu',
  });
  const out = r.stdout + r.stderr;
  const failed = tests.filter((f) => new RegExp(`^not ok \\d+ - ${f.replace(/[.]/g, '\\.')}`, 'm').test(out));
  const first = (out.match(/^\s+not ok \d+ - .*$/m) ?? [''])[0].trim();
  return { status: r.status, failed, first, out };
}

/** one mutant in `work`: plant, build (native), run its tests, restore */
async function runMutant(work, m) {
  const t0 = Date.now();
  const file = path.join(work, m.file), original = fs.readFileSync(file, 'utf8');
  let text = original, stale = null;
  for (const [from, to, count = 1] of m.edits) {
    const n = text.split(from).length - 1;
    if (n !== count) stale = `expected ${count} occurrence(s) of ${JSON.stringify(from.slice(0, 60))} in ${m.file}, found ${n}`;
    text = text.split(from).join(to);
  }
  let row;
  if (stale) row = { name: m.name, verdict: 'STALE', detail: stale };
  else {
    fs.writeFileSync(file, text);
    try {
      const addon = m.native ? (await buildCpu(work, `build-mutant-${m.name}`)).addon : baseAddon;
      const r = await runTests(work, m.tests, addon);
      row = r.failed.length
        ? { name: m.name, verdict: 'killed', detail: `${r.failed.join(', ')}: ${r.first}` }
        : r.status !== 0
          ? { name: m.name, verdict: 'ERROR', detail: `tap exited ${r.status} without a failing file:\n${r.out.slice(-2000)}` }
          : { name: m.name, verdict: 'SURVIVED', detail: `${m.tests.join(', ')} all pass` };
    } catch (err) {
      row = { name: m.name, verdict: 'ERROR', detail: err.message };
    } finally {
      fs.writeFileSync(file, original);
      if (m.native) fs.rmSync(path.join(work, `build-mutant-${m.name}`), { recursive: true, force: true });
    }
  }
  row.seconds = (Date.now() - t0) / 1000;
  console.log(`${row.verdict.padEnd(8)} ${m.name.padEnd(26)} ${row.seconds.toFixed(0).padStart(4)} s  ${m.why}\n         ${row.detail}`);
  return row;
}

const results = [];
const total0 = Date.now();
let next = 0;
await Promise.all(works.map(async (work) => {
  while (next < mutants.length) results.push(await runMutant(work, mutants[next++]));
}));
const bad = results.filter((r) => r.verdict !== 'killed');
console.log(`== ${results.length - bad.length} of ${results.length} mutants killed in ${((Date.now() - total0) / 1000).toFixed(0)} s (${jobs} at a time)`);
process.exit(bad.length ? 1 : 0);
