/**
 * Instruction data for code SFT: JSONL records, the Magicoder prompt template, tokenizers
 * (lib/tokenizer.ts), loss on response tokens only, encoding a data file with a token cache next to it,
 * packing or padding to a sequence length, seeded shuffling, a held-out split.
 */
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Worker } from 'node:worker_threads';
import { XftError, type XftErrorCode, describe, invalidArgument } from './errors';
import { ByteTokenizer, HfTokenizer, type Tokenizer } from './tokenizer';
import { expectArray, expectFunction, expectInt, expectNumber, expectOneOf, expectString } from './validate';

/** The Magicoder instruction format used by XFT (XFT.md). */
export const MAGICODER_PROMPT =
  'You are an exceptionally intelligent coding assistant that consistently delivers accurate and reliable responses to user instructions.\n\n@@ Instruction\n{instruction}\n\n@@ Response\n';

export interface Example {
  instruction: string;
  response: string;
}

/** Field names accepted for (instruction, response): xft's own, evol-codealpaca's, Magicoder OSS-Instruct's. */
export const FIELD_PAIRS: readonly [string, string][] = [
  ['instruction', 'response'],
  ['instruction', 'output'],
  ['problem', 'solution'],
];

/** Parses JSONL text; a bad line is an XFT_FORMAT error naming `source:line`. Blank lines are skipped. */
export function parseJsonl(text: string, source = '<jsonl>'): Example[] {
  expectString('parseJsonl', 'text', text);
  expectString('parseJsonl', 'source', source);
  const out: Example[] = [];
  const lines = text.split('\n');
  lines.forEach((raw, i) => {
    const line = raw.trim();
    if (!line) return;
    let rec: unknown;
    try {
      rec = JSON.parse(line);
    } catch (err) {
      throw new XftError(`${source}:${i + 1}: not valid JSON (${(err as Error).message})`, 'XFT_FORMAT');
    }
    if (!rec || typeof rec !== 'object' || Array.isArray(rec)) throw new XftError(`${source}:${i + 1}: expected a JSON object`, 'XFT_FORMAT');
    const r = rec as Record<string, unknown>;
    const pair = FIELD_PAIRS.find(([a, b]) => typeof r[a] === 'string' && typeof r[b] === 'string');
    if (!pair)
      throw new XftError(`${source}:${i + 1}: expected string fields ${FIELD_PAIRS.map(([a, b]) => `${a}/${b}`).join(' or ')}, got keys ${Object.keys(r).join(', ') || '(none)'}`, 'XFT_FORMAT');
    out.push({ instruction: r[pair[0]] as string, response: r[pair[1]] as string });
  });
  return out;
}

export function readJsonl(file: string): Example[] {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new XftError(`cannot read ${file}: ${(err as Error).message}`, 'XFT_IO');
  }
  return parseJsonl(text, file);
}

export function formatPrompt(instruction: string, template = MAGICODER_PROMPT): string {
  expectString('formatPrompt', 'instruction', instruction);
  expectString('formatPrompt', 'template', template);
  return template.replace('{instruction}', instruction);
}

// ---- tokenizers (lib/tokenizer.ts) ----

export { type Tokenizer, ByteTokenizer, HfTokenizer, loadTokenizer, checkTokenizerFolder, tokenizerFile } from './tokenizer';

// ---- samples and batches ----

/** Token ids: a plain array (one example) or an Int32Array (the rows of toRows: 4 bytes a token). */
export type TokenArray = number[] | Int32Array;

/** One tokenized example: input ids and next-token targets, -1 where the loss is masked. */
export interface Sample {
  ids: TokenArray;
  targets: TokenArray;
}

/** The longest rows toRows makes (a sane limit: each row is allocated whole). */
export const MAX_SEQ_LEN = 2 ** 24;

/** `v` as token ids: an array or Int32Array of 32-bit integers, else XFT_TYPE / XFT_VALUE naming `name`. */
export function expectTokens(op: string, name: string, v: unknown): TokenArray {
  if (v instanceof Int32Array) return v;
  const a = expectArray<unknown>(op, name, v, 'an array or Int32Array of token ids');
  for (let i = 0; i < a.length; i++)
    if (typeof a[i] !== 'number' || !Number.isInteger(a[i]) || (a[i] as number) < -2147483648 || (a[i] as number) > 2147483647)
      throw invalidArgument(op, `${name}[${i}]`, 'a 32-bit integer token id', a[i], typeof a[i] === 'number' ? 'XFT_VALUE' : 'XFT_TYPE');
  return a as number[];
}

/** `v` as samples { ids, targets } with as many targets as ids (all of one length when `sameLength`). */
export function expectSamples(op: string, name: string, v: unknown, sameLength = false): Sample[] {
  const rows = expectArray<unknown>(op, name, v, 'an array of samples { ids, targets }');
  let length = -1;
  rows.forEach((r, i) => {
    if (r === null || typeof r !== 'object') throw invalidArgument(op, `${name}[${i}]`, 'a sample { ids, targets }', r, 'XFT_TYPE');
    const ids = expectTokens(op, `${name}[${i}].ids`, (r as Sample).ids), targets = expectTokens(op, `${name}[${i}].targets`, (r as Sample).targets);
    if (ids.length !== targets.length) throw new XftError(`${op}: ${name}[${i}] has ${ids.length} ids but ${targets.length} targets`, 'XFT_SHAPE');
    if (sameLength && length >= 0 && ids.length !== length)
      throw new XftError(`${op}: ${name} must be sequences of one length: ${name}[0] has ${length} tokens, ${name}[${i}] ${ids.length}`, 'XFT_SHAPE');
    length = ids.length;
  });
  return rows as Sample[];
}

/** Targets that count (>= 0): the response tokens of a sample. */
export function countTargets(targets: TokenArray): number {
  expectTokens('countTargets', 'targets', targets);
  let n = 0;
  for (let i = 0; i < targets.length; i++) if (targets[i] >= 0) n++;
  return n;
}

/** The rows' ids or targets one after another, as one Int32Array (a batch for Tensor.from). */
export function concatRows(rows: readonly Sample[], key: 'ids' | 'targets'): Int32Array {
  expectSamples('concatRows', 'rows', rows);
  expectOneOf('concatRows', 'key', key, ['ids', 'targets'] as const);
  const out = new Int32Array(rows.reduce((a, r) => a + r[key].length, 0));
  let at = 0;
  for (const r of rows) {
    out.set(r[key], at);
    at += r[key].length;
  }
  return out;
}

/**
 * [BOS] prompt response EOS; targets are the next tokens on the response (and EOS) positions and
 * -1 elsewhere: the loss is on the response tokens only. BOS is put first where the tokenizer's family
 * adds one, once: a template that starts with the BOS token itself gets no second one.
 */
export function encodeExample(tok: Tokenizer, ex: Example, template = MAGICODER_PROMPT): Sample {
  const op = 'encodeExample';
  expectTokenizer(op, tok);
  if (ex === null || typeof ex !== 'object') throw invalidArgument(op, 'ex', 'an example { instruction, response }', ex, 'XFT_TYPE');
  expectString(op, 'ex.response', ex.response);
  const promptIds = tok.encode(formatPrompt(ex.instruction, template));
  const prompt = tok.bos !== null && promptIds[0] !== tok.bos ? [tok.bos].concat(promptIds) : promptIds;
  const response = tok.encode(ex.response).concat([tok.eos]);
  const all = prompt.concat(response);
  const ids = all.slice(0, -1);
  const targets = all.slice(1).map((v, i) => (i + 1 >= prompt.length ? v : -1));
  return { ids, targets };
}

// ---- encoding a data set, with a cache next to the data file ----

/** Bumped when the cache layout or what is cached changes. */
const CACHE_VERSION = 1;
const CACHE_MAGIC = 'XFTTOKENS\n';

export interface EncodeDataOptions {
  template?: string;
  /** called every few hundred examples and at the end */
  onProgress?: (done: number, total: number) => void;
  /** read and write `<file>.xft-tokens` (default true); a cache that cannot be written is only a warning */
  cache?: boolean;
  /** where a warning goes (default: console.error) */
  warn?: (message: string) => void;
}

export interface EncodedData {
  samples: Sample[];
  /** whether the samples came from the cache file */
  cached: boolean;
  cacheFile: string;
  seconds: number;
}

/** The cache file of a data file: `<file>.xft-tokens`, reused while its key matches. */
export function cacheFileOf(file: string): string {
  return `${file}.xft-tokens`;
}

/**
 * The key of an encoding: a SHA-256 of the data file's bytes, the tokenizer's fingerprint (the bytes of
 * its files), the template and CACHE_VERSION.
 */
function cacheKey(data: Buffer, tok: Tokenizer, template: string): string {
  const h = crypto.createHash('sha256');
  h.update(`xft-tokens ${CACHE_VERSION}\0`).update(tokenizerFingerprint(tok)).update('\0').update(template).update('\0').update(data);
  return h.digest('hex');
}

/** One sample from the full token sequence (prompt, response, EOS) and its prompt length. */
function sampleOf(all: Int32Array, promptLength: number): Sample {
  const n = all.length - 1;
  const targets = new Int32Array(n);
  for (let i = 0; i < n; i++) targets[i] = i + 1 >= promptLength ? all[i + 1] : -1;
  return { ids: all.subarray(0, n), targets };
}

function readCache(cacheFile: string, key: string): Sample[] | null {
  let buf: Buffer;
  try {
    buf = fs.readFileSync(cacheFile);
  } catch {
    return null;
  }
  const magic = Buffer.from(CACHE_MAGIC);
  if (buf.length < magic.length + 4 || !buf.subarray(0, magic.length).equals(magic)) return null;
  const headerLength = buf.readUInt32LE(magic.length);
  const start = magic.length + 4;
  let header: { key?: string; examples?: number; tokens?: number };
  try {
    header = JSON.parse(buf.subarray(start, start + headerLength).toString('utf8'));
  } catch {
    return null;
  }
  const n = header.examples ?? -1, total = header.tokens ?? -1;
  const body = start + headerLength;
  if (header.key !== key || !Number.isSafeInteger(n) || !Number.isSafeInteger(total) || n < 0 || total < 0 || body % 4 !== 0 || buf.length !== body + 4 * (2 * n + total)) return null;
  // a private copy, aligned: the samples are views into it
  const ints = new Int32Array(2 * n + total);
  Buffer.from(ints.buffer).set(buf.subarray(body));
  const lengths = ints.subarray(0, n), prompts = ints.subarray(n, 2 * n), tokens = ints.subarray(2 * n);
  const samples: Sample[] = new Array(n);
  let at = 0;
  for (let i = 0; i < n; i++) {
    if (lengths[i] < 2 || prompts[i] < 0 || prompts[i] > lengths[i] || at + lengths[i] > total) return null;
    samples[i] = sampleOf(tokens.subarray(at, at + lengths[i]), prompts[i]);
    at += lengths[i];
  }
  return at === total ? samples : null;
}

function writeCache(cacheFile: string, key: string, lengths: Int32Array, prompts: Int32Array, tokens: Int32Array): void {
  const magic = Buffer.from(CACHE_MAGIC);
  let header = JSON.stringify({ key, examples: lengths.length, tokens: tokens.length, version: CACHE_VERSION });
  while ((magic.length + 4 + Buffer.byteLength(header)) % 4 !== 0) header += ' ';
  const head = Buffer.alloc(magic.length + 4 + Buffer.byteLength(header));
  magic.copy(head);
  head.writeUInt32LE(Buffer.byteLength(header), magic.length);
  head.write(header, magic.length + 4, 'utf8');
  const tmp = `${cacheFile}.tmp-${process.pid}`;
  try {
    const fd = fs.openSync(tmp, 'w');
    try {
      for (const part of [head, lengths, prompts, tokens]) {
        const b = Buffer.from(part.buffer, part.byteOffset, part.byteLength);
        for (let off = 0; off < b.length; ) off += fs.writeSync(fd, b, off, b.length - off);
      }
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, cacheFile);
  } catch (err) {
    fs.rmSync(tmp, { force: true });
    throw err;
  }
}

/** What identifies a tokenizer's encoding: the bytes of its files (HfTokenizer), else its name. */
function tokenizerFingerprint(tok: Tokenizer): string {
  const f = (tok as { fingerprint?: string }).fingerprint;
  return typeof f === 'string' ? f : tok.name;
}

/** Encoded examples packed: the full token sequence of each (prompt, response, EOS), one after another. */
export interface PackedExamples {
  lengths: Int32Array;
  /** prompt tokens (BOS included) at the start of each sequence */
  prompts: Int32Array;
  tokens: Int32Array;
}

/** encodeExample over `examples`, packed; `onProgress(done)` every 256 examples and at the end. */
export function encodePacked(tok: Tokenizer, examples: readonly Example[], template = MAGICODER_PROMPT, onProgress?: (done: number) => void): PackedExamples {
  const n = examples.length;
  const lengths = new Int32Array(n), prompts = new Int32Array(n);
  const pieces: Int32Array[] = new Array(n);
  let total = 0;
  for (let i = 0; i < n; i++) {
    const s = encodeExample(tok, examples[i], template);
    const all = new Int32Array(s.ids.length + 1);
    all.set(s.ids);
    all[s.ids.length] = s.targets[s.targets.length - 1];
    let p = 0;
    while (p < s.targets.length && s.targets[p] < 0) p++;
    pieces[i] = all;
    lengths[i] = all.length;
    prompts[i] = p + 1;
    total += all.length;
    if (onProgress && (i % 256 === 255 || i === n - 1)) onProgress(i + 1);
  }
  const tokens = new Int32Array(total);
  for (let i = 0, at = 0; i < n; at += lengths[i], i++) tokens.set(pieces[i], at);
  return { lengths, prompts, tokens };
}

/** Packed parts (of consecutive example ranges) as one. */
function concatPacked(parts: readonly PackedExamples[]): PackedExamples {
  const cat = (key: keyof PackedExamples) => {
    const out = new Int32Array(parts.reduce((a, p) => a + p[key].length, 0));
    let at = 0;
    for (const p of parts) {
      out.set(p[key], at);
      at += p[key].length;
    }
    return out;
  };
  return { lengths: cat('lengths'), prompts: cat('prompts'), tokens: cat('tokens') };
}

function samplesOf(p: PackedExamples): Sample[] {
  const samples: Sample[] = new Array(p.lengths.length);
  for (let i = 0, at = 0; i < samples.length; at += p.lengths[i], i++) samples[i] = sampleOf(p.tokens.subarray(at, at + p.lengths[i]), p.prompts[i]);
  return samples;
}

interface CacheLookup {
  data: Buffer;
  key: string;
  cacheFile: string;
  hit: Sample[] | null;
}

function lookUp(file: string, tok: Tokenizer, template: string, useCache: boolean): CacheLookup {
  let data: Buffer;
  try {
    data = fs.readFileSync(file);
  } catch (err) {
    throw new XftError(`cannot read ${file}: ${(err as Error).message}`, 'XFT_IO');
  }
  const cacheFile = cacheFileOf(file);
  const key = useCache ? cacheKey(data, tok, template) : '';
  return { data, key, cacheFile, hit: useCache ? readCache(cacheFile, key) : null };
}

function store(c: CacheLookup, packed: PackedExamples, options: EncodeDataOptions): void {
  if (!(options.cache ?? true) || packed.lengths.length === 0) return;
  try {
    writeCache(c.cacheFile, c.key, packed.lengths, packed.prompts, packed.tokens);
  } catch (err) {
    (options.warn ?? ((m: string) => console.error(m)))(`xft: could not write the token cache ${c.cacheFile} (${(err as Error).message}); continuing without it`);
  }
}

/**
 * Reads and encodes a JSONL data file (encodeExample per example), or reads the encoding back from
 * `<file>.xft-tokens` when the data, the tokenizer and the template are unchanged. The cache is
 * written atomically (a temporary file renamed into place).
 */
export function encodeDataFile(file: string, tok: Tokenizer, options: EncodeDataOptions = {}): EncodedData {
  const e = openEncoding(file, tok, options);
  if ('samples' in e) return e;
  return finishEncoding(e, encodePacked(tok, e.examples, e.template, e.onProgress), options);
}

/** Where an encoding starts: the cached result, or the parsed examples to encode. */
interface Encoding {
  t0: number;
  c: CacheLookup;
  template: string;
  examples: Example[];
  onProgress?: (done: number) => void;
}

function openEncoding(file: string, tok: Tokenizer, options: EncodeDataOptions): Encoding | EncodedData {
  const t0 = performance.now();
  const template = options.template ?? MAGICODER_PROMPT;
  const c = lookUp(file, tok, template, options.cache ?? true);
  if (c.hit) {
    options.onProgress?.(c.hit.length, c.hit.length);
    return { samples: c.hit, cached: true, cacheFile: c.cacheFile, seconds: (performance.now() - t0) / 1000 };
  }
  const examples = parseJsonl(c.data.toString('utf8'), file);
  const onProgress = options.onProgress && ((done: number) => options.onProgress!(done, examples.length));
  return { t0, c, template, examples, onProgress };
}

function finishEncoding(e: Encoding, packed: PackedExamples, options: EncodeDataOptions): EncodedData {
  store(e.c, packed, options);
  return { samples: samplesOf(packed), cached: false, cacheFile: e.c.cacheFile, seconds: (performance.now() - e.t0) / 1000 };
}

/** Below this many examples a data file is encoded on the calling thread. */
const MIN_EXAMPLES_PER_WORKER = 2000;

/**
 * encodeDataFile with the examples split over `workers` threads (default: the available cores, at
 * most 8), each loading the tokenizer from its files. Tokenizers that cannot be reloaded by name
 * (not 'byte' or an HfTokenizer) and small files are encoded on the calling thread.
 */
export async function encodeDataFileAsync(file: string, tok: Tokenizer, options: EncodeDataOptions & { workers?: number } = {}): Promise<EncodedData> {
  const e = openEncoding(file, tok, options);
  if ('samples' in e) return e;
  const { examples, template } = e;
  const spec = tok instanceof ByteTokenizer ? 'byte' : tok instanceof HfTokenizer ? tok.name : null;
  const workers = Math.min(options.workers ?? Math.min(8, os.availableParallelism()), Math.floor(examples.length / MIN_EXAMPLES_PER_WORKER));
  let packed: PackedExamples;
  if (spec === null || workers < 2) {
    packed = encodePacked(tok, examples, template, e.onProgress);
  } else {
    const done = new Array<number>(workers).fill(0);
    const chunk = Math.ceil(examples.length / workers);
    const script = path.join(__dirname, `tokenize_worker${path.extname(__filename)}`);
    const run = (w: number) => new Promise<PackedExamples>((resolve, reject) => {
      const worker = new Worker(script, { workerData: { spec, template, examples: examples.slice(w * chunk, (w + 1) * chunk) } });
      worker.on('message', (m: { done?: number; result?: PackedExamples }) => {
        if (m.result) resolve(m.result);
        else if (m.done !== undefined) {
          done[w] = m.done;
          options.onProgress?.(done.reduce((a, b) => a + b, 0), examples.length);
        }
      });
      worker.on('error', (err) => {
        const code = (err as { code?: unknown }).code; // an XftError thrown in the worker arrives as a plain Error with its code
        reject(new XftError((err as Error).message, typeof code === 'string' && code.startsWith('XFT_') ? (code as XftErrorCode) : 'XFT_IO'));
      });
      worker.on('exit', (code) => reject(new XftError(`tokenizing ${file}: a worker thread exited with code ${code}`, 'XFT_IO')));
    });
    packed = concatPacked(await Promise.all(Array.from({ length: workers }, (_, w) => run(w))));
  }
  return finishEncoding(e, packed, options);
}

/** `tok` as a tokenizer (encode, decode, eos, bos), else XFT_TYPE. */
export function expectTokenizer(op: string, tok: unknown): Tokenizer {
  const t = tok as Tokenizer;
  if (tok === null || typeof tok !== 'object' || typeof t.encode !== 'function' || typeof t.decode !== 'function' ||
    !Number.isInteger(t.eos) || !(t.bos === null || Number.isInteger(t.bos)) || !Number.isInteger(t.vocabSize))
    throw invalidArgument(op, 'tokenizer', 'a Tokenizer (ByteTokenizer, HfTokenizer)', tok, 'XFT_TYPE');
  return t;
}

/** A seeded generator (mulberry32) for shuffling. */
export function seededRandom(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let z = s;
    z = Math.imul(z ^ (z >>> 15), z | 1);
    z ^= z + Math.imul(z ^ (z >>> 7), z | 61);
    return ((z ^ (z >>> 14)) >>> 0) / 4294967296;
  };
}

export function shuffle<T>(items: readonly T[], seed: number): T[] {
  expectArray('shuffle', 'items', items, 'an array');
  expectInt('shuffle', 'seed', seed, -(2 ** 53) + 1);
  const a = [...items], rand = seededRandom(seed);
  for (let i = a.length - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [a[i], a[j]] = [a[j], a[i]];
  }
  return a;
}

/** A seeded held-out split: `fraction` (0..1) or a count of examples goes to eval. */
export function split<T>(items: readonly T[], heldOut: number, seed: number): { train: T[]; eval: T[] } {
  expectArray('split', 'items', items, 'an array');
  expectNumber('split', 'heldOut', heldOut, 'a fraction in [0, 1) or a count of examples >= 1', (x) => x >= 0);
  expectInt('split', 'seed', seed, -(2 ** 53) + 1);
  const s = shuffle(items, seed);
  const n = heldOut < 1 ? Math.round(items.length * heldOut) : Math.min(items.length, Math.floor(heldOut));
  return { eval: s.slice(0, n), train: s.slice(n) };
}

/** A batch of sequences, row-major [batch, seqLen]. */
export interface Batch {
  ids: Int32Array;
  targets: Int32Array;
  batch: number;
  seqLen: number;
  /** targets that count (>= 0) */
  tokens: number;
}

/**
 * Rows of exactly seqLen tokens. 'pack' concatenates samples and cuts the stream into rows (no
 * padding, attention may cross sample boundaries); 'pad' puts one sample per row, truncated or
 * padded with `pad` (masked targets).
 */
export function toRows(samples: readonly Sample[], seqLen: number, mode: 'pack' | 'pad', pad: number): Sample[] {
  expectSamples('toRows', 'samples', samples);
  expectOneOf('toRows', 'mode', mode, ['pack', 'pad'] as const);
  expectInt('toRows', 'pad', pad, -2147483648, 2147483647);
  expectInt('toRows', 'seqLen', seqLen, 1, MAX_SEQ_LEN);
  const padded = (ids: TokenArray, targets: TokenArray, from: number, to: number): Sample => {
    const row = { ids: new Int32Array(seqLen).fill(pad), targets: new Int32Array(seqLen).fill(-1) };
    const n = Math.min(seqLen, to - from);
    for (let i = 0; i < n; i++) {
      row.ids[i] = ids[from + i];
      row.targets[i] = targets[from + i];
    }
    return row;
  };
  if (mode === 'pad') return samples.map((s) => padded(s.ids, s.targets, 0, s.ids.length));
  const ids = concatRows(samples, 'ids'), targets = concatRows(samples, 'targets');
  const rows: Sample[] = [];
  for (let i = 0; i + seqLen <= ids.length; i += seqLen) rows.push({ ids: ids.slice(i, i + seqLen), targets: targets.slice(i, i + seqLen) });
  const rest = ids.length % seqLen;
  if (rest > 0 && countTargets(targets.subarray(ids.length - rest)) > 0) rows.push(padded(ids, targets, ids.length - rest, ids.length));
  return rows;
}

/** Batches of `batchSize` rows (the last may be smaller), in a seeded order when `seed` is given. */
export function* batches(rows: readonly Sample[], batchSize: number, seed?: number): Generator<Batch> {
  expectSamples('batches', 'rows', rows, true);
  expectInt('batches', 'batchSize', batchSize, 1);
  if (seed !== undefined) expectInt('batches', 'seed', seed, -(2 ** 53) + 1);
  const order = seed === undefined ? [...rows] : shuffle(rows, seed);
  for (let i = 0; i < order.length; i += batchSize) {
    const chunk = order.slice(i, i + batchSize);
    const seqLen = chunk[0].ids.length;
    const ids = new Int32Array(chunk.length * seqLen), targets = new Int32Array(chunk.length * seqLen);
    let tokens = 0;
    chunk.forEach((r, b) => {
      ids.set(r.ids, b * seqLen);
      targets.set(r.targets, b * seqLen);
      tokens += countTargets(r.targets);
    });
    yield { ids, targets, batch: chunk.length, seqLen, tokens };
  }
}
