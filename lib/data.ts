/**
 * Instruction data for code SFT: JSONL records, the Magicoder prompt template, tokenizers
 * (byte level by default; a Hugging Face tokenizer.json through @huggingface/tokenizers), loss
 * on response tokens only, packing or padding to a sequence length, seeded shuffling, a held-out split.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { XftError, describe, invalidArgument } from './errors';
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

// ---- tokenizers ----

export interface Tokenizer {
  readonly name: string;
  readonly vocabSize: number;
  readonly bos: number | null;
  readonly eos: number;
  readonly pad: number;
  encode(text: string): number[];
  decode(ids: ArrayLike<number>): string;
}

/** UTF-8 bytes as tokens 0..255, then BOS 256, EOS 257, PAD 258. Needs no files. */
export class ByteTokenizer implements Tokenizer {
  readonly name = 'byte';
  readonly vocabSize = 259;
  readonly bos = 256;
  readonly eos = 257;
  readonly pad = 258;
  encode(text: string): number[] {
    return Array.from(Buffer.from(expectString('ByteTokenizer.encode', 'text', text), 'utf8'));
  }
  decode(ids: ArrayLike<number>): string {
    return Buffer.from(Array.from(expectTokens('ByteTokenizer.decode', 'ids', ids)).filter((i) => i >= 0 && i < 256)).toString('utf8');
  }
}

interface HfTokenizerImpl {
  encode(t: string, o?: { add_special_tokens?: boolean }): { ids: number[] };
  decode(ids: number[], o?: object): string;
  token_to_id(t: string): number | undefined;
}

/** A Hugging Face tokenizer (tokenizer.json, with tokenizer_config.json when present). */
export class HfTokenizer implements Tokenizer {
  readonly name: string;
  readonly vocabSize: number;
  readonly bos: number | null;
  readonly eos: number;
  readonly pad: number;
  readonly #tok: HfTokenizerImpl;

  constructor(dir: string) {
    const file = fs.existsSync(dir) && fs.statSync(dir).isDirectory() ? path.join(dir, 'tokenizer.json') : dir;
    const configFile = path.join(path.dirname(file), 'tokenizer_config.json');
    let json: { model?: { vocab?: Record<string, number> | unknown[] }; added_tokens?: { id: number; content: string }[] };
    let config: Record<string, unknown> = {};
    try {
      json = JSON.parse(fs.readFileSync(file, 'utf8'));
      if (fs.existsSync(configFile)) config = JSON.parse(fs.readFileSync(configFile, 'utf8'));
    } catch (err) {
      throw new XftError(`cannot read the tokenizer ${file}: ${(err as Error).message}`, 'XFT_IO');
    }
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const { Tokenizer: HfTok } = require('@huggingface/tokenizers') as { Tokenizer: new (t: object, c: object) => HfTokenizerImpl };
    this.#tok = new HfTok(json, config);
    this.name = file;
    const vocab = json.model?.vocab;
    const base = Array.isArray(vocab) ? vocab.length : vocab ? Math.max(...Object.values(vocab)) + 1 : 0;
    const added = Math.max(-1, ...(json.added_tokens ?? []).map((t) => t.id)) + 1;
    this.vocabSize = Math.max(base, added);
    const special = (key: string): number | null => {
      const v = config[key];
      const content = typeof v === 'string' ? v : v && typeof v === 'object' ? (v as { content?: string }).content : undefined;
      return content === undefined ? null : this.#tok.token_to_id(content) ?? null;
    };
    this.bos = special('bos_token');
    const eos = special('eos_token');
    if (eos === null) throw new XftError(`${file}: the tokenizer has no eos_token (tokenizer_config.json)`, 'XFT_FORMAT');
    this.eos = eos;
    this.pad = special('pad_token') ?? eos;
  }
  encode(text: string): number[] {
    return this.#tok.encode(text, { add_special_tokens: false }).ids;
  }
  decode(ids: ArrayLike<number>): string {
    return this.#tok.decode(Array.from(ids), { skip_special_tokens: true });
  }
}

/** 'byte' (default) or a path to a Hugging Face tokenizer (folder or tokenizer.json). */
export function loadTokenizer(spec = 'byte'): Tokenizer {
  return spec === 'byte' ? new ByteTokenizer() : new HfTokenizer(spec);
}

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
 * -1 elsewhere: the loss is on the response tokens only.
 */
export function encodeExample(tok: Tokenizer, ex: Example, template = MAGICODER_PROMPT): Sample {
  const op = 'encodeExample';
  expectTokenizer(op, tok);
  if (ex === null || typeof ex !== 'object') throw invalidArgument(op, 'ex', 'an example { instruction, response }', ex, 'XFT_TYPE');
  expectString(op, 'ex.response', ex.response);
  const prompt = (tok.bos !== null ? [tok.bos] : []).concat(tok.encode(formatPrompt(ex.instruction, template)));
  const response = tok.encode(ex.response).concat([tok.eos]);
  const all = prompt.concat(response);
  const ids = all.slice(0, -1);
  const targets = all.slice(1).map((v, i) => (i + 1 >= prompt.length ? v : -1));
  return { ids, targets };
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
