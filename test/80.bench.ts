// The benchmarks run end to end on the CPU (their tiny shapes) and write their JSON: they do not rot
// between GPU sessions. Speed is not checked here (bench/ prints the figures).
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
