// The benchmarks (kernels, train, cpu) run end to end on the CPU (their tiny shapes) and write their JSON: they do not rot
// between GPU sessions. Speed is not checked here (bench/ prints the figures). A failing PyTorch
// reference stops a benchmark with exit status 1 (here: a python3 that fails), and --help answers.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-bench-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));

for (const [name, table] of [['kernels', /groupedGemm/], ['train', /dense .*\n.*moe .*\n.*merge /]] as const)
  t.test(`bench/${name} on the CPU`, async (t) => {
    const out = path.join(tmp, `${name}.json`);
    const r = spawnSync(process.execPath, [...process.execArgv, path.join(__dirname, '..', 'bench', `${name}.ts`), '--out', out, '--no-torch'],
      { encoding: 'utf8', env: { ...process.env, XFT_DEVICE: 'cpu' } });
    t.equal(r.status, 0, r.stderr);
    t.match(r.stdout, table, 'prints its table');
    const j = JSON.parse(fs.readFileSync(out, 'utf8'));
    t.ok(Array.isArray(j.results) && j.results.length > 0, `writes ${j.results.length} results`);
    if (name === 'train') t.ok(j.results.every((x: { xft: { ms: number; loss: number } }) => x.xft.ms > 0 && Number.isFinite(x.xft.loss)), 'timings and finite losses');
  });

const bench = (name: string, args: string[], env: NodeJS.ProcessEnv = {}) =>
  spawnSync(process.execPath, [...process.execArgv, path.join(__dirname, '..', 'bench', `${name}.ts`), ...args],
    { encoding: 'utf8', env: { ...process.env, XFT_DEVICE: 'cpu', ...env } });

t.test('bench/cpu_train: tokens/s per thread count, in child processes', async (t) => {
  const out = path.join(tmp, 'cpu_train.json');
  const r = bench('cpu_train', ['--models', 'demo', '--kinds', 'dense', '--threads', '1', '--steps', '1', '--profile', '--out', out]);
  t.equal(r.status, 0, r.stderr);
  t.match(r.stdout, /demo +\| dense +\| [\d.]+M +\| 1 /, 'prints its table');
  t.match(r.stdout, /where a step goes: demo dense[\s\S]*groupedGemm/, 'and where the time goes');
  const j = JSON.parse(fs.readFileSync(out, 'utf8'));
  t.ok(j.results.length === 1 && j.results[0].measures[0].tokensPerSecond > 0, 'writes its results');
});

t.test('--help prints the usage (bench/kernels; bench/train shares the code)', async (t) => {
  const r = bench('kernels', ['--help']);
  t.equal(r.status, 0, 'exit status 0');
  t.match(r.stdout, /^Usage: .*--no-torch.*\n[\s\S]*--out/, 'usage');
});

t.test('bench/kernels fails loudly when the PyTorch reference fails', async (t) => {
  const bin = fs.mkdtempSync(path.join(tmp, 'bin-'));
  fs.writeFileSync(path.join(bin, 'python3'), '#!/bin/sh\necho "no torch here" >&2\nexit 3\n', { mode: 0o755 });
  const r = bench('kernels', ['--out', path.join(tmp, 'failed.json')], { XFT_PYTHON: path.join(bin, 'python3') });
  t.equal(r.status, 1, 'exit status 1');
  t.match(r.stderr, /PyTorch reference .*torch_kernels\.py.* failed with exit status 3:\s+no torch here[\s\S]*--no-torch/, 'says which reference failed, its error and the way out');
  t.notOk(fs.existsSync(path.join(tmp, 'failed.json')), 'writes no results');
});

t.test('bench/cpu --quick: xft GEMMs at 1 and 2 threads beside its reference kernel', async (t) => {
  const out = path.join(tmp, 'cpu.json');
  const r = bench('cpu', ['--quick', '--no-numpy', '--threads', '1,2', '--out', out]);
  t.equal(r.status, 0, r.stderr);
  t.match(r.stdout, /CPU GEMM f32, GFLOP\/s: xft \((avx512|avx2|portable) kernel\)/, 'prints its table with the kernel');
  const j = JSON.parse(fs.readFileSync(out, 'utf8'));
  t.equal(j.results.length, 2 * 2 * 3, 'two shapes, two thread counts, three products');
  t.ok(j.results.every((x: { xft: number }) => x.xft > 0), 'GFLOP/s for each');
  t.ok(j.results.some((x: { reference: number | null }) => x.reference! > 0), 'and the reference kernel beside them');
  t.ok(j.results.every((x: { peak: number; peak1: number }) => x.peak > 0 && x.peak1 > 0), "the machine's FMA ceiling beside each figure");
  t.equal(j.scaling.length, 2 * 3, 'thread scaling for the 2-thread rows');
  t.ok(j.scaling.every((x: { machine: string; xft: string }) => /^\d+\.\d\dx$/.test(x.machine) && /^\d+\.\d\dx$/.test(x.xft)), 'with the machine\'s own scaling beside xft\'s');
  t.match(r.stdout, /thread scaling[\s\S]*\| machine \| of machine \|/, 'printed in the scaling table');
  t.same(j.targets, { singleThreadVsNumpy: null, twoThreads: null }, 'the targets: none among the quick shapes without numpy');
  t.match(bench('cpu', ['--help']).stdout, /^Usage: .*--no-numpy/, '--help prints the usage');
});

t.test('bench/cpu fails loudly when numpy fails', async (t) => {
  const bin = fs.mkdtempSync(path.join(tmp, 'bin-'));
  fs.writeFileSync(path.join(bin, 'python3'), '#!/bin/sh\necho "no numpy here" >&2\nexit 3\n', { mode: 0o755 });
  const r = bench('cpu', ['--quick', '--no-reference', '--out', path.join(tmp, 'cpu-failed.json')], { XFT_PYTHON: path.join(bin, 'python3') });
  t.equal(r.status, 1, 'exit status 1');
  t.match(r.stderr, /numpy reference .*numpy_gemm\.py.* failed with exit status 3:\s+no numpy here[\s\S]*--no-numpy/, 'says which reference failed, its error and the way out');
  t.notOk(fs.existsSync(path.join(tmp, 'cpu-failed.json')), 'writes no results');
});
