/**
 * `xft demo`: the whole XFT story on a tiny model, from code found on this machine.
 *   1. a code instruction set: docstring -> function pairs from the Python standard library
 *      (or JSDoc -> function pairs from installed JavaScript when there is no Python)
 *   2. pretraining of a tiny dense Llama on that code
 *   3. with equal training budgets: SFT of the dense model (5 epochs) versus XFT: upcycle ->
 *      MoE fine-tune (4 epochs) -> learned merge (1 epoch) -> dense
 *   4. a table of held-out loss and token accuracy (SFT, MoE, XFT with the initial coefficients,
 *      XFT learned) as markdown and JSON, and the loss curves as SVG (and PNG when the optional
 *      renderer @resvg/resvg-js is installed)
 *   with method 'upit', UpIT as well (lib/upit/demo.ts): its rows in the table, its curve in the plot
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { XftError } from './errors';
import { backend, type Device } from './tensor';
import { llamaConfig, type LlamaConfig } from './config';
import { ByteTokenizer, type Example, type Sample, encodeExample, split, toRows, shuffle } from './data';
import { createDense, copyDense, mergeable, toDense, upcycle, countParameters } from './xft';
import { train, evaluate, disposeState, type StepInfo } from './train';
import type { Model } from './model';
import { writeFileAtomic } from './safetensors';
import { runUpitDemo, UPIT_DEMO } from './upit/demo';

export interface DemoOptions {
  out: string;
  device?: Device;
  /** scale of the step budgets (1 = default, about 4 minutes on 2 CPU cores) */
  scale?: number;
  seed?: number;
  /** progress reporting: one call per step of each stage */
  progress?: (stage: string, info: StepInfo) => void;
  log?: (line: string) => void;
  /** 'upit': UpIT too (lib/upit/demo.ts), its rows and curve beside SFT and XFT. Default 'xft'. */
  method?: 'xft' | 'upit';
}

// ---- the data ----

/** Python files of the standard library (or nothing). */
function pythonSources(): string[] {
  const r = spawnSync('python3', ['-c', "import sysconfig; print(sysconfig.get_paths()['stdlib'])"], { encoding: 'utf8' });
  const dirs = [r.status === 0 ? r.stdout.trim() : '', ...['/usr/lib/python3.12', '/usr/lib/python3.11', '/usr/lib/python3.10']].filter((d) => d && fs.existsSync(d));
  if (!dirs.length) return [];
  const dir = dirs[0];
  const files: string[] = [];
  const walk = (d: string, depth: number) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name))) {
      const p = path.join(d, e.name);
      if (e.isDirectory() && depth < 1 && !/test|idle|tkinter|site-packages|__pycache__|lib2to3|turtledemo|ensurepip/.test(e.name)) walk(p, depth + 1);
      else if (e.isFile() && e.name.endsWith('.py') && !e.name.startsWith('test')) files.push(p);
    }
  };
  walk(dir, 0);
  return files;
}

/** JavaScript files of installed packages (the fallback corpus). */
function javascriptSources(root: string): string[] {
  const files: string[] = [];
  const walk = (d: string, depth: number) => {
    if (depth > 4 || files.length > 400) return;
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory() && !e.name.startsWith('.')) walk(p, depth + 1);
      else if (e.isFile() && e.name.endsWith('.js') && !e.name.endsWith('.min.js')) files.push(p);
    }
  };
  if (fs.existsSync(root)) walk(root, 0);
  return files;
}

const MAX_RESPONSE = 360, MAX_INSTRUCTION = 200;

/** docstring -> function pairs from Python source: instruction from the docstring's first paragraph. */
export function pythonPairs(source: string): Example[] {
  const lines = source.split('\n'), out: Example[] = [];
  for (let i = 0; i < lines.length; i++) {
    const m = /^(\s*)def (\w+)\((.*)\)(\s*->\s*[^:]+)?:\s*$/.exec(lines[i]);
    if (!m || m[2].startsWith('_')) continue;
    const indent = m[1].length;
    let j = i + 1;
    const body: string[] = [];
    while (j < lines.length && (lines[j].trim() === '' || lines[j].search(/\S/) > indent)) body.push(lines[j++]);
    while (body.length && body[body.length - 1].trim() === '') body.pop();
    const first = body.findIndex((l) => l.trim() !== '');
    if (first < 0) continue;
    const q = /^\s*[rub]?("""|''')/.exec(body[first]);
    if (!q) continue;
    let end = first;
    const afterOpen = body[first].slice(body[first].indexOf(q[1]) + 3);
    if (!afterOpen.includes(q[1])) {
      end = first + 1;
      while (end < body.length && !body[end].includes(q[1])) end++;
    }
    const doc = body.slice(first, end + 1).join('\n').replace(/^\s*[rub]?("""|''')/, '').replace(/("""|''')\s*$/, '');
    const para = doc.split(/\n\s*\n/)[0].replace(/\s+/g, ' ').trim();
    const code = [lines[i], ...body.slice(end + 1)].map((l) => l.slice(indent)).join('\n').trim();
    if (para.length < 12 || para.length > MAX_INSTRUCTION || code.length < 40 || code.length > MAX_RESPONSE) continue;
    out.push({ instruction: `Write a Python function \`${m[2]}(${m[3]})\`: ${para}`, response: code });
    i = j - 1;
  }
  return out;
}

/** JSDoc -> function pairs from JavaScript source. */
export function javascriptPairs(source: string): Example[] {
  const out: Example[] = [];
  const re = /\/\*\*([\s\S]*?)\*\/\s*\n(\s*)((?:async\s+)?function\s+(\w+)\s*\([^)]*\)\s*\{[\s\S]*?\n\2\})/g;
  for (let m = re.exec(source); m; m = re.exec(source)) {
    const doc = m[1].split('\n').map((l) => l.replace(/^\s*\*\s?/, '')).filter((l) => !l.startsWith('@')).join(' ').replace(/\s+/g, ' ').trim();
    const code = m[3].split('\n').map((l) => l.slice(m![2].length)).join('\n');
    if (doc.length < 12 || doc.length > MAX_INSTRUCTION || code.length < 40 || code.length > MAX_RESPONSE) continue;
    out.push({ instruction: `Write a JavaScript function \`${m[4]}\`: ${doc}`, response: code });
  }
  return out;
}

export interface DemoData {
  language: string;
  source: string;
  pretrainText: string;
  examples: Example[];
}

/** The demo's corpus: code and instruction pairs found on this machine. */
export function findDemoData(maxPretrainBytes = 400_000): DemoData {
  const py = pythonSources();
  if (py.length) {
    const examples: Example[] = [];
    let text = '';
    for (const f of py) {
      const src = fs.readFileSync(f, 'utf8');
      for (const e of pythonPairs(src)) examples.push(e);
      if (text.length < maxPretrainBytes) text += src.slice(0, 20_000) + '\n';
    }
    if (examples.length >= 100) return { language: 'Python', source: path.dirname(py[0]), pretrainText: text.slice(0, maxPretrainBytes), examples };
  }
  const root = path.join(__dirname, '..', '..', 'node_modules');
  const js = javascriptSources(fs.existsSync(root) ? root : path.join(__dirname, '..', 'node_modules'));
  const examples: Example[] = [];
  let text = '';
  for (const f of js) {
    const src = fs.readFileSync(f, 'utf8');
    for (const e of javascriptPairs(src)) examples.push(e);
    if (text.length < maxPretrainBytes) text += src.slice(0, 20_000) + '\n';
  }
  return { language: 'JavaScript', source: root, pretrainText: text.slice(0, maxPretrainBytes), examples };
}

// ---- the run ----

/** the demo's dense model: 0.8M parameters (a MoE of 4.6M after upcycling), sized with DEMO_SIZES so that the
 * whole run takes 3-4 minutes on 2 CPU cores (the fast CPU backend) */
export const DEMO_CONFIG: LlamaConfig = llamaConfig({
  hidden_size: 128, intermediate_size: 352, num_hidden_layers: 4, num_attention_heads: 4, num_key_value_heads: 2,
  vocab_size: 259, rms_norm_eps: 1e-6, rope_theta: 10000, max_position_embeddings: 512,
});

/** the demo's data and pretraining budget at --scale 1 (training examples and pretraining steps scale with it) */
export const DEMO_SIZES = { trainExamples: 320, heldOutExamples: 100, pretrainSteps: 200 };

export interface DemoResult {
  rows: { model: string; parameters: number; loss: number; accuracy: number }[];
  curves: Record<string, number[]>;
  data: { language: string; source: string; train: number; heldOut: number; pretrainTokens: number };
  device: string;
  seconds: number;
  /** the files written to `out` (loss.png only when @resvg/resvg-js is installed) */
  files: string[];
}

export function runDemo(options: DemoOptions): DemoResult {
  const t0 = Date.now();
  const log = options.log ?? (() => undefined);
  const device = options.device ?? backend().kind;
  const scale = options.scale ?? 1, seed = options.seed ?? 0;
  const tok = new ByteTokenizer();
  const data = findDemoData();
  log(`data: ${data.examples.length} ${data.language} instruction pairs from ${data.source}`);
  const examples = shuffle(data.examples, seed).slice(0, Math.round(DEMO_SIZES.trainExamples * scale) + DEMO_SIZES.heldOutExamples);
  const { train: trainEx, eval: evalEx } = split(examples, DEMO_SIZES.heldOutExamples, seed);
  const seqLen = 256;
  const encode = (ex: Example[]) => toRows(ex.map((e) => encodeExample(tok, e)), seqLen, 'pack', tok.pad);
  const trainRows = encode(trainEx), evalRows = encode(evalEx);
  const ids = tok.encode(data.pretrainText);
  const pretrainRows: Sample[] = toRows([{ ids: ids.slice(0, -1), targets: ids.slice(1) }], 128, 'pack', tok.pad);
  if (trainRows.length === 0) throw new XftError(`--scale ${scale} leaves no training sequences: expected a larger scale`, 'XFT_VALUE');
  const progress = (stage: string) => (info: StepInfo) => options.progress?.(stage, info);
  const curves: Record<string, number[]> = {};

  // 1. pretraining
  const base = createDense(DEMO_CONFIG, { seed, device });
  const pre = train(base, pretrainRows, { lr: 3e-3, batchSize: Math.min(16, pretrainRows.length), steps: Math.max(1, Math.round(DEMO_SIZES.pretrainSteps * scale)), warmupSteps: 10, seed, onStep: progress('pretrain') });
  disposeState(pre.state);
  curves.pretrain = pre.losses;
  log(`pretrained: loss ${pre.losses[0].toFixed(3)} -> ${pre.losses[pre.losses.length - 1].toFixed(3)}`);

  // a small --scale leaves fewer sequences than the batch: the batch is then all of them
  const batchSize = Math.min(8, trainRows.length), lr = 1e-3;
  const stepsPerEpoch = Math.floor(trainRows.length / batchSize);
  // 2. SFT baseline: 5 epochs (the paper's equal budget)
  const sft = copyDense(base);
  const sftRun = train(sft, trainRows, { lr, batchSize, epochs: 5, warmupSteps: Math.round(stepsPerEpoch * 0.5), seed: seed + 1, onStep: progress('sft') });
  disposeState(sftRun.state);
  curves.sft = sftRun.losses;
  // 3. XFT: upcycle -> MoE fine-tune 4 epochs -> merge 1 epoch
  const moe = upcycle(base, { experts: 8, topK: 6, seed });
  const moeRun = train(moe, trainRows, { lr, batchSize, epochs: 4, warmupSteps: Math.round(stepsPerEpoch * 0.4), seed: seed + 1, onStep: progress('moe') });
  disposeState(moeRun.state);
  const initialMerge = mergeable(moe, { sharedRate: 0.75 });
  const initial = toDense(initialMerge);
  initialMerge.dispose();
  const merge = mergeable(moe, { sharedRate: 0.75 });
  const mergeRun = train(merge, trainRows, { lr: 2e-2, batchSize, epochs: 1, warmupSteps: Math.round(stepsPerEpoch * 0.1), seed: seed + 2, onStep: progress('merge') });
  disposeState(mergeRun.state);
  curves.xft = [...moeRun.losses, ...mergeRun.losses];
  const learned = toDense(merge);
  // 4. UpIT (--method upit): SFT checkpoints -> experts -> MoE, post-trained
  const upitRun = options.method === 'upit'
    ? runUpitDemo(base, trainRows, { work: path.join(options.out, 'upit-work'), device, lr, batchSize, seed, progress, log })
    : null;
  if (upitRun) curves.upit = [...upitRun.curves.sft, ...upitRun.curves.post];

  const evalOf = (name: string, m: Model) => {
    const e = evaluate(m, evalRows);
    return { model: name, parameters: countParameters(m), loss: e.loss, accuracy: e.accuracy };
  };
  const rows = [
    evalOf('pretrained (no SFT)', base),
    evalOf('SFT (dense, 5 epochs)', sft),
    evalOf('MoE (8 experts, top-6, 4 epochs)', moe),
    evalOf('XFT, initial coefficients (dense)', initial),
    evalOf('XFT, learned coefficients (dense)', learned),
    ...(upitRun ? [evalOf(`UpIT, last SFT checkpoint (dense, ${UPIT_DEMO.prepareEpochs} epochs)`, upitRun.sft),
      evalOf(`UpIT MoE (${UPIT_DEMO.experts} experts, top-${UPIT_DEMO.topK}, ${UPIT_DEMO.postEpochs} epochs post-training)`, upitRun.moe)] : []),
  ];
  [base, sft, moe, initial, merge, learned, upitRun?.sft, upitRun?.moe].forEach((m) => m?.dispose());
  const result: DemoResult = {
    rows, curves, device: device === 'cuda' ? `${backend().name}` : 'CPU',
    data: { language: data.language, source: data.source, train: trainRows.length, heldOut: evalRows.length, pretrainTokens: ids.length },
    seconds: (Date.now() - t0) / 1000,
    files: ['results.md', 'results.json', 'loss.svg', ...(pngRenderer() ? ['loss.png'] : [])],
  };
  writeOutputs(options.out, result);
  if (!result.files.includes('loss.png'))
    log(`loss.png not written: the PNG renderer is an optional dependency (npm install @resvg/resvg-js); loss.svg holds the same curves`);
  return result;
}

// ---- outputs ----

export function markdownTable(r: DemoResult): string {
  const lines = [
    `| model | parameters | held-out loss | token accuracy |`,
    `| --- | ---: | ---: | ---: |`,
    ...r.rows.map((x) => `| ${x.model} | ${x.parameters.toLocaleString('en-US')} | ${x.loss.toFixed(4)} | ${(100 * x.accuracy).toFixed(2)}% |`),
  ];
  return [
    `# xft demo`,
    '',
    `${r.data.language} instruction pairs (docstring → function) from \`${r.data.source}\`: ${r.data.train} training and ${r.data.heldOut} held-out sequences; ` +
      `pretraining on ${r.data.pretrainTokens.toLocaleString('en-US')} bytes of the same code. Device: ${r.device}. ${r.seconds.toFixed(0)} s.`,
    '',
    ...lines,
    '',
    'Loss on the response tokens only (Magicoder template). SFT and XFT have equal budgets: 5 epochs of SFT versus 4 of MoE fine-tuning and 1 of merge learning.',
    ...(r.curves.upit ? ['', `UpIT (Hui et al. 2024): ${UPIT_DEMO.prepareEpochs} epochs of SFT with a checkpoint every ${UPIT_DEMO.checkpointEvery} epoch, genetic expansion to ` +
      `${UPIT_DEMO.experts} experts, routing vectors pre-optimized on lowest-loss seed buckets, then ${UPIT_DEMO.postEpochs} epochs of the MoE (4 epochs in all, the paper's budget); its output stays an MoE.`] : []),
    '',
  ].join('\n');
}

export function lossSvg(curves: Record<string, number[]>): string {
  const W = 720, H = 420, L = 60, R = 20, T = 30, B = 50;
  const series = Object.entries(curves).filter(([, v]) => v.length);
  // loops, not Math.max(...curve): a curve grows with the run, past the engine's argument limit
  let maxX = 0, min = Infinity, max = -Infinity;
  for (const [, v] of series) {
    maxX = Math.max(maxX, v.length);
    for (const val of v) {
      if (val < min) min = val;
      if (val > max) max = val;
    }
  }
  const lo = Math.floor(min * 2) / 2, hi = Math.ceil(max * 2) / 2;
  const x = (i: number) => L + ((W - L - R) * i) / Math.max(1, maxX - 1);
  const y = (v: number) => T + ((H - T - B) * (hi - v)) / Math.max(1e-9, hi - lo);
  const colors = ['#888888', '#d62728', '#1f77b4', '#2ca02c'];
  const parts = [`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="DejaVu Sans, Arial, sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="white"/>`, `<text x="${W / 2}" y="18" text-anchor="middle" font-size="14">training loss per step (response tokens)</text>`];
  for (let v = lo; v <= hi + 1e-9; v += 0.5) parts.push(`<line x1="${L}" x2="${W - R}" y1="${y(v)}" y2="${y(v)}" stroke="#eee"/><text x="${L - 6}" y="${y(v) + 4}" text-anchor="end">${v.toFixed(1)}</text>`);
  parts.push(`<line x1="${L}" x2="${L}" y1="${T}" y2="${H - B}" stroke="black"/><line x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}" stroke="black"/>`);
  parts.push(`<text x="${(L + W - R) / 2}" y="${H - 12}" text-anchor="middle">step</text><text x="${L}" y="${H - B + 16}" text-anchor="middle">0</text><text x="${W - R}" y="${H - B + 16}" text-anchor="middle">${maxX}</text>`);
  series.forEach(([name, v], k) => {
    const pts = v.map((val, i) => `${x(i).toFixed(1)},${y(val).toFixed(1)}`).join(' ');
    parts.push(`<polyline fill="none" stroke="${colors[k % colors.length]}" stroke-width="1.5" points="${pts}"/>`);
    parts.push(`<rect x="${W - R - 190}" y="${T + 8 + 18 * k}" width="12" height="3" fill="${colors[k % colors.length]}"/><text x="${W - R - 172}" y="${T + 13 + 18 * k}">${name}</text>`);
  });
  parts.push('</svg>');
  return parts.join('\n');
}

function writeOutputs(out: string, r: DemoResult): void {
  fs.mkdirSync(out, { recursive: true });
  writeFileAtomic(path.join(out, 'results.md'), markdownTable(r));
  writeFileAtomic(path.join(out, 'results.json'), JSON.stringify(r, null, 2));
  const svg = lossSvg({ 'SFT (dense)': r.curves.sft, 'XFT (MoE, then merge)': r.curves.xft, ...(r.curves.upit ? { 'UpIT (SFT, then MoE)': r.curves.upit } : {}) });
  writeFileAtomic(path.join(out, 'loss.svg'), svg);
  const png = pngRenderer();
  if (png) writeFileAtomic(path.join(out, 'loss.png'), new png.Resvg(svg, { background: 'white', font: { loadSystemFonts: true } }).render().asPng());
}

/** The PNG renderer, an optional peer dependency (4 MB of native code): null when it is not installed. */
function pngRenderer(): typeof import('@resvg/resvg-js') | null {
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    return require('@resvg/resvg-js') as typeof import('@resvg/resvg-js');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'MODULE_NOT_FOUND') return null;
    throw err;
  }
}
