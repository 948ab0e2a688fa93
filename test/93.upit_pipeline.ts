// `xft upit` end to end on a tiny model (../shared/UPIT.md): prepare (SFT with epoch checkpoints) ->
// expand -> seed -> route -> assemble -> post-train, each stage's folder, the MoE it ends with (no shared
// expert, linear router from the routing vectors, the Switch loss), a rerun that skips every complete
// stage and leaves the folders as they were, one stage rerun alone (--stage) giving the same bits, a stage
// whose inputs are missing (exit 3), a rerun asking for other settings over complete stages (exit 3, the
// setting named), --help, and the ablations --no-expand --no-router-init.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { tinyConfig } from '../lib/config';
import { createDense } from '../lib/xft';
import { saveModel, readCheckpointInfo } from '../lib/checkpoint';
import { SafetensorsReader } from '../lib/safetensors';
import { readRoutingVectors, listEpochCheckpoints } from '../lib/upit/index';
import { exact } from './helpers/check';

// many CLI child processes (each loads the TypeScript sources: seconds apiece): about 4 min on 2 busy
// cores, near the runner's 5-minute default; the whole file gets 10 (tap's root setTimeout tells the runner)
t.setTimeout(600_000);

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-upit-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
const at = (...p: string[]) => path.join(tmp, ...p);
const CLI = path.join(__dirname, '..', 'lib', 'cli.ts');
const env = { ...process.env, XFT_DEVICE: 'cpu' };

function xft(...args: string[]) {
  const r = spawnSync(process.execPath, [...process.execArgv, CLI, ...args], { cwd: tmp, env, encoding: 'utf8' });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

const config = tinyConfig({ hidden_size: 32, intermediate_size: 48, num_attention_heads: 4, num_key_value_heads: 2, num_hidden_layers: 2 });
const dense = createDense(config, { seed: 1 });
saveModel(dense, at('dense'));
dense.dispose();
fs.writeFileSync(at('data.jsonl'), Array.from({ length: 32 }, (_, i) => JSON.stringify({ instruction: `Add ${i} and ${i % 5}.`, response: `${i + (i % 5)}` })).join('\n') + '\n');
// 1 epoch of 4 steps, a checkpoint every 0.5 epoch: 2 checkpoints, expanded to 3 experts; 25% seed rows
const RUN = ['upit', 'dense', '--data', 'data.jsonl', '--experts', '3', '--top-k', '2', '--prepare-epochs', '1', '--checkpoint-every', '0.5',
  '--post-epochs', '1', '--route-epochs', '1', '--seed-fraction', '0.25', '--batch-size', '8', '--seq-len', '200', '--lr', '1e-3'];
const STAGES = ['prepare', 'expand', 'seed', 'route', 'assemble', 'post-train'];

const files = (dir: string) => fs.readdirSync(dir, { recursive: true }).map(String).sort();
const stamp = (dir: string) => files(dir).map((f) => `${f}:${fs.statSync(path.join(dir, f)).mtimeMs}`);

t.test('--help says which defaults are the paper\'s and which are choices', async (t) => {
  const r = xft('upit', '--help');
  t.equal(r.code, 0);
  for (const flag of ['--experts', '--top-k', '--stage', '--no-expand', '--random-parents', '--no-router-init', '--random-buckets', '--first-half', '--drop-rate', '--trunk', '--gamma'])
    t.match(r.out, flag, `lists ${flag}`);
  t.match(r.out, /\[paper: 0\.25\]/, 'the checkpoint interval is the paper\'s');
  t.match(r.out, /\[choice: 0\.5\]/, 'the DARE drop rate is a choice');
  t.match(xft('--help').out, /\n  upit\b/, 'xft --help lists upit');
});

t.test('the whole pipeline, then a rerun that skips every stage', async (t) => {
  const r = xft(...RUN, '--out', 'up');
  t.equal(r.code, 0, `xft upit: ${r.err}`);
  for (const s of STAGES) t.ok(fs.existsSync(at('up', s)), `${s}/ written`);
  const saved = listEpochCheckpoints(at('up', 'prepare'));
  t.same(saved.map((c) => c.epoch), [0.5, 1], 'stage 1: a checkpoint every 0.5 epoch');
  const info = readCheckpointInfo(at('up', 'post-train'));
  t.equal(info.kind, 'moe');
  t.match(info.moe, { num_experts: 3, num_selects: 2, shared_expert: false, gate_type: 'linear', gate_noise: false, balance_loss: 'switch' }, 'the UpIT MoE');
  // the assembled router: row e of layer l is expert e's routing vector
  const r0 = new SafetensorsReader(at('up', 'assemble'));
  for (let e = 0; e < 3; e++) {
    const v = readRoutingVectors(at('up', 'route', `expert-${e}`));
    for (let l = 0; l < 2; l++) exact(t, r0.readF32(`model.layers.${l}.mlp.gate.gate_network.weight`).subarray(e * 32, (e + 1) * 32), v[l], `router row ${e}, layer ${l}`);
  }
  const before = stamp(at('up'));
  const again = xft(...RUN, '--out', 'up');
  t.equal(again.code, 0, `rerun: ${again.err}`);
  t.match(again.out, /skipped: prepare, expand, seed, route, assemble, post-train/, 'every stage complete: skipped');
  t.match(again.out, /ran nothing/);
  t.same(stamp(at('up')), before, 'nothing rewritten');
});

t.test('one stage rerun alone gives the same bits; a stage without its inputs is exit 3', async (t) => {
  const first = new SafetensorsReader(at('up', 'assemble'));
  const keep = Object.fromEntries(first.names().map((n) => [n, Array.from(first.readF32(n))]));
  fs.renameSync(at('up', 'assemble'), at('assemble-before'));
  let r = xft(...RUN, '--out', 'up', '--stage', 'assemble');
  t.equal(r.code, 0, `--stage assemble: ${r.err}`);
  t.match(r.out, /ran assemble in/, 'only assemble ran');
  const second = new SafetensorsReader(at('up', 'assemble'));
  t.same(second.names().sort(), Object.keys(keep).sort());
  for (const n of Object.keys(keep)) exact(t, second.readF32(n), keep[n], `${n} as before`);
  // the marks record their folders relative to --out: a rerun from another working directory finds them
  fs.rmSync(at('up', 'assemble'), { recursive: true });
  const abs = RUN.map((a) => (a === 'dense' || a === 'data.jsonl' ? at(a) : a));
  const elsewhere = spawnSync(process.execPath, [...process.execArgv, CLI, ...abs, '--out', at('up'), '--stage', 'assemble'], { cwd: os.homedir(), env, encoding: 'utf8' });
  t.equal(elsewhere.status, 0, `--stage assemble from another working directory, --out absolute: ${elsewhere.stderr}`);
  const third = new SafetensorsReader(at('up', 'assemble'));
  for (const n of Object.keys(keep)) exact(t, third.readF32(n), keep[n], `${n} as before (from elsewhere)`);
  r = xft(...RUN, '--out', 'fresh', '--stage', 'assemble');
  t.equal(r.code, 3, 'assemble before the earlier stages: exit 3');
  t.match(r.err, /run (it|the prepare stage) first/, `names what to run first: ${r.err.trim()}`);
  t.notOk(fs.existsSync(at('fresh', 'assemble')), 'nothing assembled');
});

t.test('a rerun asking for other settings over complete stages is exit 3, naming the setting; nothing rewritten', async (t) => {
  const before = stamp(at('up'));
  let r = xft(...RUN, '--out', 'up', '--drop-rate', '0.3');
  t.equal(r.code, 3, 'a changed DARE drop rate over a complete expand stage: exit 3');
  t.match(r.err, /up[/\\]expand was made with dropRate 0\.5 \(--drop-rate\), and this run asks for 0\.3/, `names the setting, both values and the stage: ${r.err.trim()}`);
  r = xft(...RUN, '--out', 'up', '--post-epochs', '2');
  t.equal(r.code, 3, 'a changed post-training length over a complete post-train stage: exit 3');
  t.match(r.err, /post-train was made with postEpochs 1 \(--post-epochs\)/);
  r = xft(...RUN, '--out', 'up', '--lr', '2e-3');
  t.equal(r.code, 3, 'a changed SFT lr: exit 3 at the first stage it made');
  t.match(r.err, /up[/\\]prepare was made with lr 0\.001 \(--lr\)/);
  t.same(stamp(at('up')), before, 'nothing rewritten');
  // a stage not started yet takes new settings: delete post-train, rerun with 2 post-training epochs
  fs.rmSync(at('up', 'post-train'), { recursive: true });
  r = xft(...RUN, '--out', 'up', '--post-epochs', '2', '--stage', 'post-train');
  t.equal(r.code, 0, `post-train redone with a new length: ${r.err}`);
  t.match(JSON.parse(fs.readFileSync(at('up', 'upit_settings.json'), 'utf8'))['post-train'], { postEpochs: 2, dropRate: 0.5 }, 'its settings recorded, with those of the stages before it');
});

t.test("a stage's damaged completion mark is exit 3 naming the file and the way out; nothing rewritten", async (t) => {
  const mark = at('up', 'expand', 'upit_stage.json'), good = fs.readFileSync(mark);
  try {
    for (const [text, what] of [['{"E": 3', 'not JSON'], ['[1, 2]', 'not an object'], ['null', 'null']]) {
      fs.writeFileSync(mark, text);
      const before = stamp(at('up'));
      const r = xft(...RUN, '--out', 'up', '--post-epochs', '2');  // as the test before left it
      t.equal(r.code, 3, `a mark that is ${what}: exit 3`);
      t.match(r.err, /expand[/\\]upit_stage\.json (is not valid JSON|holds .*not a JSON object)/, `names the file: ${r.err.trim()}`);
      t.match(r.err, /delete/, 'and the way out');
      t.notMatch(r.err, /SyntaxError|at .*\.ts:\d+/, 'no stack trace');
      t.same(stamp(at('up')), before, 'nothing rewritten');
    }
  } finally {
    fs.writeFileSync(mark, good);
  }
});

t.test('--joint-router: the assembled routers trained on the seed buckets; recorded as an assemble setting', async (t) => {
  // the stages before assemble from the main run, copied
  fs.mkdirSync(at('jr'));
  for (const f of fs.readdirSync(at('up'))) if (!/^(assemble|post-train)/.test(f)) fs.cpSync(at('up', f), at('jr', f), { recursive: true });
  let r = xft(...RUN, '--out', 'jr', '--joint-router', '--stage', 'assemble');
  t.equal(r.code, 0, `--joint-router --stage assemble: ${r.err}`);
  t.match(r.err, /joint router: \d+ rows, 2 layers, 3 experts; before: top-1 [\d.]+%[\s\S]*after: top-1 [\d.]+%/, 'logs the fit before and after');
  const report = JSON.parse(fs.readFileSync(at('jr', 'assemble', 'joint_router.json'), 'utf8'));
  t.ok(report.steps >= 1 && report.after.loss < report.before.loss, `the seed-label loss went down: ${report.before.loss} -> ${report.after.loss}`);
  t.notOk(fs.existsSync(at('jr', 'assemble.raw')), 'the raw assembly removed');
  const a = new SafetensorsReader(at('up', 'assemble')), b = new SafetensorsReader(at('jr', 'assemble'));
  for (const name of a.names())
    if (/gate_network/.test(name)) t.notSame(Array.from(b.readF32(name)), Array.from(a.readF32(name)), `${name}: trained`);
    else exact(t, b.readF32(name), a.readF32(name), `${name}: as assembled`);
  t.match(JSON.parse(fs.readFileSync(at('jr', 'upit_settings.json'), 'utf8')).assemble, { jointRouter: true }, 'recorded');
  r = xft(...RUN, '--out', 'jr', '--stage', 'assemble');
  t.equal(r.code, 3, 'a rerun without --joint-router over it: exit 3');
  t.match(r.err, /assemble was made with jointRouter true \(--\[no-\]joint-router\)/, r.err.trim());
  r = xft(...RUN, '--out', 'jr2', '--joint-router', '--no-router-init');
  t.equal(r.code, 3, '--joint-router without router init: exit 3');
  t.match(r.err, /jointRouter .*routerInit: false/, r.err.trim());
});

t.test('--shared-trunk: seed and route see each expert on the MoE\'s trunk (trunked/expert-e); recorded as a seed setting', async (t) => {
  fs.mkdirSync(at('st'));
  for (const f of fs.readdirSync(at('up'))) if (/^(prepare|expand|upit_settings)/.test(f)) fs.cpSync(at('up', f), at('st', f), { recursive: true });
  let r = xft(...RUN, '--out', 'st', '--shared-trunk', '--post-epochs', '2');
  t.equal(r.code, 0, `--shared-trunk: ${r.err}`);
  t.match(r.out, /ran seed, route, assemble, post-train/, 'the stages after expand ran');
  const pool: string[] = JSON.parse(fs.readFileSync(at('st', 'expand', 'upit_stage.json'), 'utf8')).pool;
  const moe = new SafetensorsReader(at('st', 'assemble'));
  for (let e = 0; e < 3; e++) {
    const tr = new SafetensorsReader(at('st', 'trunked', `expert-${e}`)), src = new SafetensorsReader(path.resolve(at('st'), pool[e]));
    const routed = new SafetensorsReader(at('st', 'route', `expert-${e}`));
    for (const name of ['model.layers.1.mlp.up_proj.weight', 'model.layers.0.self_attn.q_proj.weight', 'model.embed_tokens.weight']) {
      const ffn = name.includes('.mlp.');
      exact(t, tr.readF32(name), ffn ? src.readF32(name) : moe.readF32(name), `trunked expert ${e}: ${name} ${ffn ? "the expert's" : "the MoE's trunk"}`);
      if (!ffn) exact(t, routed.readF32(name), moe.readF32(name), `route/expert-${e} trained on that trunk: ${name}`);
    }
  }
  t.match(JSON.parse(fs.readFileSync(at('st', 'upit_settings.json'), 'utf8')).seed, { sharedTrunk: true, trunk: 'average' }, 'recorded with its trunk');
  r = xft(...RUN, '--out', 'st', '--post-epochs', '2');
  t.equal(r.code, 3, 'a rerun without --shared-trunk: exit 3');
  t.match(r.err, /seed was made with sharedTrunk true \(--\[no-\]shared-trunk\)/, r.err.trim());
  r = xft(...RUN, '--out', 'st2', '--shared-trunk', '--no-router-init');
  t.equal(r.code, 3, '--shared-trunk without router init: exit 3');
});

t.test('ablations: --no-expand saves E checkpoints, --no-router-init draws the router', async (t) => {
  const r = xft(...RUN, '--out', 'abl', '--no-expand', '--no-router-init');
  t.equal(r.code, 0, `xft upit with the ablations: ${r.err}`);
  t.ok(listEpochCheckpoints(at('abl', 'prepare')).length >= 3, 'without expansion stage 1 saves at least E checkpoints');
  t.notOk(fs.existsSync(at('abl', 'route', 'expert-0')), 'no routing vectors');
  t.equal(readCheckpointInfo(at('abl', 'post-train')).moe!.num_experts, 3);
});
