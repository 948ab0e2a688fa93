/**
 * bench/tokenize: time to encode an instruction data set of evol-codealpaca's size (110K examples,
 * instructions of 100-500 words, code responses of 10-80 lines) with a tokenizer, cold and from
 * the token cache next to the data file.
 *
 * Usage: node dist/bench/tokenize.js --tokenizer <folder|tokenizer.json|byte> [--examples N] [--workers W] [--dir D] [--seed S]
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { encodeDataFile, encodeDataFileAsync, seededRandom } from '../lib/data';
import { loadTokenizer } from '../lib/tokenizer';

const PROSE = ('the a an of to in for with that this which function should return given list array string integer value values input output ' +
  'implement write create design optimize handle edge cases empty negative large efficient memory time complexity algorithm class method ' +
  'data structure sort search tree graph node key map set error exception test example explain why how each every user file database query').split(' ');
const NAMES = ['count', 'total', 'items', 'result', 'index', 'node', 'left', 'right', 'value', 'key', 'buffer', 'size', 'data', 'user', 'name', 'path', 'cache', 'queue'];

/** One example of evol-codealpaca's shape: a prose instruction and a code response in Python, JavaScript or C. */
export function syntheticExample(rand: () => number): { instruction: string; output: string } {
  const pick = <T>(a: readonly T[]) => a[Math.floor(rand() * a.length)];
  const ident = () => `${pick(NAMES)}${rand() < 0.5 ? '_' + pick(NAMES) : ''}${rand() < 0.3 ? Math.floor(rand() * 100) : ''}`;
  const words = 100 + Math.floor(rand() * 401);
  const instr: string[] = [];
  for (let i = 0; i < words; i++) instr.push(rand() < 0.05 ? `\`${ident()}\`` : pick(PROSE) + (rand() < 0.08 ? '.' : rand() < 0.05 ? ',' : ''));
  const lines = 10 + Math.floor(rand() * 71), lang = Math.floor(rand() * 3);
  const code: string[] = [];
  for (let i = 0; i < lines; i++) {
    const indent = ' '.repeat(4 * Math.floor(rand() * 3));
    const a = ident(), b = ident(), n = Math.floor(rand() * 1000);
    if (lang === 0) code.push(`${indent}${rand() < 0.2 ? `def ${a}(${b}, n=${n}):` : rand() < 0.5 ? `${a} = ${b}[${n}] + len(${b})  # ${pick(PROSE)} ${pick(PROSE)}` : `return ${a}.get("${b}", ${n})`}`);
    else if (lang === 1) code.push(`${indent}${rand() < 0.2 ? `function ${a}(${b}) {` : rand() < 0.5 ? `const ${a} = ${b}.map((x) => x * ${n});` : `return ${a}?.${b} ?? ${n};`}`);
    else code.push(`${indent}${rand() < 0.2 ? `static int ${a}(const int *${b}, size_t n) {` : rand() < 0.5 ? `${a}[i] = ${b}[i] * ${n}; /* ${pick(PROSE)} */` : `printf("%d\\n", ${a});`}`);
  }
  const fence = ['python', 'javascript', 'c'][lang];
  return { instruction: instr.join(' '), output: `Here is the implementation:\n\n\`\`\`${fence}\n${code.join('\n')}\n\`\`\`\n\nThis runs in O(n) time.` };
}

export function writeSyntheticData(file: string, examples: number, seed = 0): void {
  const rand = seededRandom(seed);
  const fd = fs.openSync(file, 'w');
  try {
    for (let i = 0; i < examples; i++) fs.writeSync(fd, JSON.stringify(syntheticExample(rand)) + '\n');
  } finally {
    fs.closeSync(fd);
  }
}

async function main(): Promise<void> {
  const arg = (name: string, dflt: string) => {
    const i = process.argv.indexOf(name);
    return i >= 0 ? process.argv[i + 1] : dflt;
  };
  const n = Number(arg('--examples', '110000'));
  const dir = arg('--dir', fs.mkdtempSync(path.join(os.tmpdir(), 'xft-tok-')));
  const file = path.join(dir, `synthetic-${n}.jsonl`);
  if (!fs.existsSync(file)) writeSyntheticData(file, n, Number(arg('--seed', '0')));
  fs.rmSync(`${file}.xft-tokens`, { force: true });
  const t = performance.now();
  const tok = loadTokenizer(arg('--tokenizer', 'byte'));
  const load = (performance.now() - t) / 1000;
  const cpu0 = process.cpuUsage();
  const workers = Number(arg('--workers', '0')) || undefined;
  const cold = await encodeDataFileAsync(file, tok, { workers });
  const cpu = process.cpuUsage(cpu0);
  const tokens = cold.samples.reduce((a, s) => a + s.ids.length + 1, 0);
  const warm = encodeDataFile(file, tok);
  const mb = fs.statSync(file).size / 1e6;
  console.log(JSON.stringify({ tokenizer: tok.name, examples: n, dataMB: +mb.toFixed(1), tokens, loadSeconds: +load.toFixed(2), coldSeconds: +cold.seconds.toFixed(2), mainThreadCpuSeconds: +((cpu.user + cpu.system) / 1e6).toFixed(2), workers: workers ?? 'default',
    cachedSeconds: +warm.seconds.toFixed(2), cached: warm.cached, examplesPerSecond: Math.round(n / cold.seconds) }));
}

if (require.main === module) void main();
