// The demo's pieces: instruction pairs mined from code, the results table and the loss chart; and the
// whole `xft demo --method upit` at a small --scale (every row of the table: SFT, XFT and UpIT).
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { pythonPairs, javascriptPairs, lossSvg, markdownTable, findDemoData } from '../lib/demo';

t.test('docstring -> function pairs from Python', async (t) => {
  const src = [
    'import os',
    '',
    'def add_numbers(a, b):',
    '    """Return the sum of a and b.',
    '',
    '    Longer description that is not used.',
    '    """',
    '    total = a + b',
    '    return total',
    '',
    'class K:',
    '    def scale(self, x) -> float:',
    "        '''Multiply x by the factor of this object.'''",
    '        return x * self.factor * 1.0 + 0.0',
    '',
    'def _private(x):',
    '    """Hidden helper function here."""',
    '    return x + 1 + 2 + 3 + 4 + 5 + 6 + 7',
    '',
    'def undocumented(x):',
    '    return x * 2 + 1 + 2 + 3 + 4 + 5 + 6 + 7 + 8',
  ].join('\n');
  const pairs = pythonPairs(src);
  t.equal(pairs.length, 2, 'documented public functions and methods only');
  t.same(pairs[0], { instruction: 'Write a Python function `add_numbers(a, b)`: Return the sum of a and b.', response: 'def add_numbers(a, b):\n    total = a + b\n    return total' });
  t.match(pairs[1].instruction, /`scale\(self, x\)`: Multiply x by the factor/);
  t.equal(pairs[1].response, 'def scale(self, x) -> float:\n    return x * self.factor * 1.0 + 0.0', 'dedented, docstring removed');
});

t.test('JSDoc -> function pairs from JavaScript', async (t) => {
  const src = '/**\n * Clamp a value into the given range.\n * @param {number} v\n */\nfunction clamp(v, lo, hi) {\n  return Math.min(hi, Math.max(lo, v));\n}\n';
  t.same(javascriptPairs(src), [{ instruction: 'Write a JavaScript function `clamp`: Clamp a value into the given range.', response: 'function clamp(v, lo, hi) {\n  return Math.min(hi, Math.max(lo, v));\n}' }]);
});

t.test('this machine has code to learn from', async (t) => {
  const d = findDemoData(20_000);
  t.ok(d.examples.length >= 100, `${d.examples.length} ${d.language} pairs from ${d.source}`);
  t.ok(d.pretrainText.length > 10_000, 'pretraining text');
});

t.test('table and chart', async (t) => {
  const r = { rows: [{ model: 'SFT', parameters: 1234, loss: 2.5, accuracy: 0.4 }], curves: { sft: [3, 2.5, 2], xft: [3, 2.4] },
    data: { language: 'Python', source: '/x', train: 10, heldOut: 5, pretrainTokens: 100 }, device: 'CPU', seconds: 1, files: [] };
  const md = markdownTable(r);
  t.match(md, /\| SFT \| 1,234 \| 2\.5000 \| 40\.00% \|/);
  const svg = lossSvg(r.curves);
  t.match(svg, /^<svg/);
  t.equal((svg.match(/<polyline/g) ?? []).length, 2, 'one line per curve');
});

t.test('xft demo --method upit --scale 0.05: the whole job, every row finite, its files, no work folder left', async (t) => {
  const out = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-demo-'));
  t.teardown(() => fs.rmSync(out, { recursive: true, force: true }));
  const cli = path.join(__dirname, '..', 'lib', 'cli.ts');
  const r = spawnSync(process.execPath, [...process.execArgv, cli, 'demo', '--method', 'upit', '--scale', '0.05', '--out', out],
    { encoding: 'utf8', env: { ...process.env, XFT_DEVICE: 'cpu' }, timeout: 240_000 });
  t.equal(r.status, 0, `exit 0 ${r.stderr.slice(-800)}`);
  const j = JSON.parse(fs.readFileSync(path.join(out, 'results.json'), 'utf8'));
  const names = j.rows.map((x: { model: string }) => x.model);
  for (const want of [/^pretrained/, /^SFT/, /^MoE \(8 experts/, /^XFT, initial/, /^XFT, learned/, /^UpIT, last SFT checkpoint/, /^UpIT MoE \(6 experts, top-2/])
    t.ok(names.some((n: string) => want.test(n)), `a row ${want}`);
  t.ok(j.rows.every((x: { loss: number; accuracy: number; parameters: number }) => Number.isFinite(x.loss) && x.loss > 0 && x.accuracy >= 0 && x.accuracy <= 1 && x.parameters > 0), 'every row finite');
  const dense = j.rows.find((x: { model: string }) => /^SFT/.test(x.model)).parameters;
  t.ok(j.rows.filter((x: { model: string }) => /^XFT/.test(x.model)).every((x: { parameters: number }) => x.parameters === dense), 'XFT merges back to the dense size');
  t.ok(Array.isArray(j.curves.upit) && j.curves.upit.length > 0 && j.curves.upit.every(Number.isFinite), "UpIT's loss curve");
  for (const f of ['results.md', 'results.json', 'loss.svg']) t.ok(fs.existsSync(path.join(out, f)), `wrote ${f}`);
  t.match(fs.readFileSync(path.join(out, 'results.md'), 'utf8'), /\| UpIT MoE .* \| \d+\.\d{4} \| \d+\.\d\d% \|/, 'the table has the UpIT rows');
  t.notOk(fs.existsSync(path.join(out, 'upit-work')), "UpIT's work folder removed");
});
