// scripts/gpu-check.mjs, the GPU session's prepared check, in its dry-run mode (no GPU): the same
// orchestration writes its JSON, markdown and log tarball; a step that hangs is killed at its limit and
// reported as a timeout while the next steps still run; a spent overall budget skips the rest.
// Needs the compiled dist/ (npm install's prepare, or npx tsc -p tsconfig.json).
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';

const root = path.join(__dirname, '..');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-gpu-check-test-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));

interface Step { name: string; status: string; seconds: number; limit_s: number; highlights: string[]; tail: string[]; result?: { results: unknown[] } }

function dryRun(out: string, env: NodeJS.ProcessEnv) {
  const r = spawnSync(process.execPath, [path.join(root, 'scripts', 'gpu-check.mjs')], {
    encoding: 'utf8', env: { ...process.env, XFT_GPU_CHECK_DRY: '1', XFT_DEVICE: 'cpu', OUT: out, ...env }, timeout: 120_000,
  });
  const json = JSON.parse(fs.readFileSync(path.join(out, 'gpu-check.json'), 'utf8')) as { ok: boolean; dry: boolean; total_s: number; steps: Step[] };
  return { r, json, md: fs.readFileSync(path.join(out, 'gpu-check.md'), 'utf8') };
}

t.test('dist/ is built (the check runs the compiled benchmarks)', async (t) => {
  t.ok(fs.existsSync(path.join(root, 'dist', 'bench', 'kernel_families.js')), 'dist/bench/kernel_families.js exists (run npx tsc -p tsconfig.json)');
});

t.test('dry run: a hanging step times out, the others run and are summarised', async (t) => {
  const out = path.join(tmp, 'a');
  const { r, json, md } = dryRun(out, { XFT_GPU_CHECK_HANG: '1', XFT_GPU_CHECK_STEPS: 'info,hang,bench-train,memcheck' });
  t.equal(r.status, 1, 'exit status 1: a step timed out');
  t.match(r.stdout, /FAILED hang \(timeout\)/, 'says which step failed');
  t.equal(json.dry, true);
  t.same(json.steps.map((s) => [s.name, s.status]), [['info', 'pass'], ['hang', 'timeout'], ['bench-train', 'pass'], ['memcheck', 'pass']]);
  const hang = json.steps[1];
  t.ok(hang.seconds >= 2 && hang.seconds < 10, `the hanging step was stopped at its ${hang.limit_s} s limit (${hang.seconds} s)`);
  t.match(json.steps[3].highlights.join('\n'), /family router-linear ok[\s\S]*family gemm-odd ok/, 'the sanitizer driver reports each family');
  const train = json.steps[2];
  t.ok(Array.isArray(train.result?.results) && train.result!.results.length === 3, 'bench/train JSON embedded (dense, moe, merge)');
  t.match(train.tail.join('\n'), /MFU/, 'bench/train prints MFU');
  t.match(train.tail.join('\n'), /wall clock/, 'its per-kernel breakdown is labelled as wall clock without a GPU');
  t.match(md, /\| hang \| \*\*timeout\*\* \|/, 'the markdown table marks the timeout');
  t.match(md, /## bench-train: pass[\s\S]*```/, 'the markdown carries the benchmark tables');
  t.ok(fs.statSync(path.join(out, 'gpu-check-logs.tar.gz')).size > 100, 'the logs tarball is written');
  t.same(fs.readdirSync(out).sort(), ['gpu-check-logs.tar.gz', 'gpu-check.json', 'gpu-check.md'], 'three files in $OUT (the device tool returns 8 at most)');
});

t.test('dry run: a spent overall budget skips the remaining steps', async (t) => {
  const out = path.join(tmp, 'b');
  const { r, json } = dryRun(out, { XFT_GPU_CHECK_HANG: '1', XFT_GPU_CHECK_STEPS: 'hang,racecheck', XFT_GPU_CHECK_BUDGET: '9' });
  t.equal(r.status, 1);
  t.same(json.steps.map((s) => [s.name, s.status]), [['hang', 'timeout'], ['racecheck', 'skipped']]);
  t.ok(json.total_s < 9, `the whole stays within the budget (${json.total_s} s)`);
});

t.test('an unknown step name is refused', async (t) => {
  const r = spawnSync(process.execPath, [path.join(root, 'scripts', 'gpu-check.mjs')], { encoding: 'utf8', env: { ...process.env, XFT_GPU_CHECK_STEPS: 'nope', OUT: path.join(tmp, 'c') } });
  t.equal(r.status, 2);
  t.match(r.stderr, /unknown step nope/);
});
