// The CLI under faults: a diverging run stops with exit 1 writing nothing non-finite (the good output
// and last .resume kept), a collapsed one is warned about; unusable checkpoints exit 3 naming the file.
import t from 'tap';
import * as fs from 'node:fs';
import { SafetensorsReader } from '../lib/safetensors';
import { DATA, cliWorkspace } from './helpers/cli';

const { at, xft } = cliWorkspace('xft-cli-faults-', (fn) => t.teardown(fn));

t.test('a diverging run (--lr 1e20 --clip 0) stops with exit 1: nothing non-finite written, the good output and the last .resume kept', async (t) => {
  const base = ['train', 'dense', ...DATA, '--batch-size', '4', '--out', 'div'];
  // a run that collapses (finite, but stuck at the uniform prediction) writes the output folder
  let r = xft(...base, '--steps', '8', '--lr', '1e6');
  t.equal(r.code, 0, r.err);
  t.match(r.err, /xft: warning: the loss has been 5\.5568 = ln\(vocab_size 259\) for 5 steps/, 'a loss stuck at ln(V) is warned about');
  const good = fs.readFileSync(at('div/model.safetensors'));
  r = xft(...base, '--overwrite', '--steps', '6', '--lr', '1e20', '--clip', '0', '--save-every', '1');
  t.equal(r.code, 1, 'exit 1');
  t.match(r.err, /xft: train: the (loss|gradient norm) is not finite at step 2 .*training diverged/, 'says what diverged, and when');
  t.match(r.err, /the last good state \(step 1\) stays in .*div\.resume; div is unchanged/);
  t.same(fs.readFileSync(at('div/model.safetensors')), good, '--overwrite did not replace the good output');
  t.equal(JSON.parse(fs.readFileSync(at('div.resume/trainer_state.json'), 'utf8')).step, 1, '.resume holds the last good step');
  for (const f of ['params.safetensors', 'optimizer.safetensors']) {
    const rd = new SafetensorsReader(at(`div.resume/${f}`));
    for (const n of rd.names()) rd.read(n, { finite: true }).dispose();
  }
  t.pass('every tensor in .resume is finite');
  fs.rmSync(at('div.resume'), { recursive: true, force: true });
});

/** A copy of the dense checkpoint with one file replaced (or removed when content is null). */
function brokenCopy(name: string, file: string, content: string | Buffer | null, mkdir = false): string {
  fs.cpSync(at('dense'), at(name), { recursive: true });
  fs.rmSync(at(`${name}/${file}`), { recursive: true, force: true });
  if (mkdir) fs.mkdirSync(at(`${name}/${file}`));
  else if (content !== null) fs.writeFileSync(at(`${name}/${file}`), content);
  return name;
}

t.test('unusable checkpoints exit 3 with a message that names the file', async (t) => {
  const header = (json: string) => {
    const b = Buffer.from(json), len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(b.length));
    return Buffer.concat([len, b, Buffer.alloc(64)]);
  };
  const nan = fs.readFileSync(at('dense/model.safetensors'));
  const lm = new SafetensorsReader(at('dense')).info('lm_head.weight');
  nan.writeFloatLE(NaN, lm.offset);
  const cases: [string, RegExp][] = [
    [brokenCopy('st-null', 'model.safetensors', header('null')), /st-null\/model\.safetensors: the safetensors header is null/],
    [brokenCopy('st-dir', 'model.safetensors', null, true), /st-dir\/model\.safetensors: not a safetensors file \(a folder\)/],
    [brokenCopy('cfg-null', 'config.json', 'null'), /cfg-null\/config\.json: expected a JSON object/],
    [brokenCopy('idx-null', 'model.safetensors.index.json', '{"weight_map": {"lm_head.weight": null}}'), /idx-null\/model\.safetensors\.index\.json: weight_map maps lm_head\.weight to null/],
    [brokenCopy('nan-weights', 'model.safetensors', nan), /nan-weights\/model\.safetensors: lm_head\.weight holds a non-finite value/],
  ];
  for (const [dir, msg] of cases) {
    const r = xft('eval', dir, ...DATA);
    t.equal(r.code, 3, `eval ${dir} exits 3`);
    t.match(r.err, msg, `and names the file: ${r.err.trim().split('\n').at(-1)}`);
  }
  // upcycle streams the source through the writer: its non-finite guard is about the source (exit 3)
  const r = xft('upcycle', 'nan-weights', 'nan-moe', '--experts', '4', '--top-k', '2');
  t.equal(r.code, 3, 'upcycle of a checkpoint with NaN weights exits 3');
  t.match(r.err, /nan-weights: the checkpoint holds non-finite weights \(lm_head\.weight: NaN or ±Inf\); nothing was written to nan-moe/, `and names the source: ${r.err.trim().split('\n').at(-1)}`);
  t.notOk(fs.existsSync(at('nan-moe')), 'no output folder');
});
