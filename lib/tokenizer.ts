/**
 * Tokenizers: bytes (the default, no files) and Hugging Face tokenizer.json files through
 * @huggingface/tokenizers, with the special tokens of tokenizer_config.json and a cached fast path
 * for BPE (Llama 2 and 3, Qwen, DeepSeek): the library's own normalizer, pre-tokenizer patterns and
 * BPE, each distinct pre-token encoded once.
 */
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { XftError, invalidArgument } from './errors';
import { expectArray, expectString } from './validate';

export interface Tokenizer {
  readonly name: string;
  readonly vocabSize: number;
  /** the id each sequence starts with, or null where the model family adds none (Qwen) */
  readonly bos: number | null;
  readonly eos: number;
  readonly pad: number;
  /** what identifies the encoding (a hash of the tokenizer's files), for caches; defaults to the name */
  readonly fingerprint?: string;
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
  readonly fingerprint = 'byte';
  encode(text: string): number[] {
    return Array.from(Buffer.from(expectString('ByteTokenizer.encode', 'text', text), 'utf8'));
  }
  decode(ids: ArrayLike<number>): string {
    return Buffer.from(Array.from(expectIds('ByteTokenizer.decode', ids)).filter((i) => i >= 0 && i < 256)).toString('utf8');
  }
}

/** Token ids to decode: an integer typed array or an array of integers, else XFT_TYPE / XFT_VALUE. */
function expectIds(op: string, ids: unknown): ArrayLike<number> {
  if (ids instanceof Int32Array || ids instanceof Uint32Array || ids instanceof Uint16Array || ids instanceof Uint8Array) return ids;
  const a = expectArray<unknown>(op, 'ids', ids, 'an array or Int32Array of token ids');
  for (let i = 0; i < a.length; i++)
    if (typeof a[i] !== 'number' || !Number.isInteger(a[i]))
      throw invalidArgument(op, `ids[${i}]`, 'an integer token id', a[i], typeof a[i] === 'number' ? 'XFT_VALUE' : 'XFT_TYPE');
  return a as number[];
}

/** The parts of @huggingface/tokenizers' Tokenizer that xft uses (its fields are read for the fast path). */
interface HfImpl {
  encode(t: string, o?: { add_special_tokens?: boolean }): { ids: number[] };
  decode(ids: number[], o?: object): string;
  token_to_id(t: string): number | undefined;
  normalizer: ((t: string) => string) | null;
  pre_tokenizer: { tokenizers?: { pattern?: unknown; pre_tokenize_text(t: string): string[] }[] } | null;
  model: ((words: string[]) => string[]) & { tokens_to_ids: Map<string, number>; unk_token_id?: number };
  added_tokens: { content: string; id: number; normalized: boolean }[];
  added_tokens_map: Map<string, { id: number }>;
  remove_space?: boolean;
  do_lowercase_and_remove_accent?: boolean;
}

type Json = Record<string, unknown>;

const isObject = (v: unknown): v is Json => typeof v === 'object' && v !== null && !Array.isArray(v);

function readJsonFile(file: string, what: string, hash?: crypto.Hash): unknown {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
    hash?.update(text).update('\0');
  } catch (err) {
    throw new XftError(`cannot read the ${what} ${file}: ${(err as Error).message}`, 'XFT_IO');
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new XftError(`${file}: the ${what} is not valid JSON (${(err as Error).message})`, 'XFT_FORMAT');
  }
}

/** tokenizer.json: an object with a model that has a type and a vocabulary; returns its largest id + 1. */
function checkTokenizerJson(json: unknown, file: string): number {
  const bad = (what: string) => new XftError(`${file}: not a Hugging Face tokenizer.json (${what})`, 'XFT_FORMAT');
  if (!isObject(json)) throw bad(`expected a JSON object, got ${json === null ? 'null' : Array.isArray(json) ? 'an array' : typeof json}`);
  const model = json.model;
  if (!isObject(model) || typeof model.type !== 'string') throw bad('no "model" object with a "type"');
  const vocab = model.vocab;
  if (!isObject(vocab) && !Array.isArray(vocab)) throw bad('no "model.vocab"');
  let size = 0;
  if (Array.isArray(vocab)) size = vocab.length; // Unigram: [piece, score] pairs, ids are positions
  else
    for (const key in vocab) {
      const id = vocab[key];
      if (!Number.isSafeInteger(id) || (id as number) < 0) throw bad(`the id of ${JSON.stringify(key)} in model.vocab is ${JSON.stringify(id)}`);
      if ((id as number) >= size) size = (id as number) + 1;
    }
  const added = json.added_tokens ?? [];
  if (!Array.isArray(added)) throw bad('"added_tokens" is not an array');
  for (const t of added) {
    if (!isObject(t) || typeof t.content !== 'string' || !Number.isSafeInteger(t.id) || (t.id as number) < 0) throw bad(`an added token is ${JSON.stringify(t)}`);
    if ((t.id as number) >= size) size = (t.id as number) + 1;
  }
  if (size === 0) throw bad('an empty vocabulary');
  return size;
}

/** The tokenizer.json path for a folder or file spec (the folder must hold one). */
export function tokenizerFile(spec: string): string {
  let isDir = false;
  try {
    isDir = fs.statSync(spec).isDirectory();
  } catch (err) {
    throw new XftError(`cannot read the tokenizer ${spec}: ${(err as Error).message}`, 'XFT_IO');
  }
  return isDir ? path.join(spec, 'tokenizer.json') : spec;
}

/**
 * Checks the tokenizer files of a checkpoint folder (tokenizer.json and tokenizer_config.json, where
 * present) by loading them: an XftError naming the bad file, before anything copies them.
 */
export function checkTokenizerFolder(dir: string): void {
  if (fs.existsSync(path.join(dir, 'tokenizer.json'))) new HfTokenizer(dir);
  else if (fs.existsSync(path.join(dir, 'tokenizer_config.json'))) readConfig(path.join(dir, 'tokenizer_config.json'));
}

function readConfig(file: string, hash?: crypto.Hash): Json {
  const c = readJsonFile(file, 'tokenizer config', hash);
  if (!isObject(c)) throw new XftError(`${file}: the tokenizer config is not a JSON object`, 'XFT_FORMAT');
  return c;
}

/**
 * Leftmost-longest matches of the literal strings (as the library's DictionarySplitter finds them):
 * an alternation sorted longest first, null when there are none.
 */
function literalsPattern(words: readonly string[]): RegExp | null {
  const sorted = words.filter((w) => w.length > 0).sort((a, b) => b.length - a.length);
  return sorted.length ? new RegExp(sorted.map((w) => w.replace(/[.*+?^${}()|[\]\\/-]/g, '\\$&')).join('|'), 'g') : null;
}

const METASPACE = '\u2581';

/**
 * BPE over one pre-token, the library's semantics (@huggingface/tokenizers `BPE.bpe` + `encode`)
 * without its per-lookup JSON keys: the word split into code points, then repeatedly the adjacent
 * pair of lowest merge rank merged (the leftmost on ties; a later duplicate merge line wins, as the
 * library's Map does); each resulting token is its id, else its UTF-8 bytes as `<0xXX>` tokens when
 * the model falls back to bytes. Pairs are looked up by vocabulary ids (a · V + b), which is exact
 * because every merge's parts and result are checked to be in the vocabulary (else no fast BPE); a
 * code point outside the vocabulary takes part in no merge. A word the library would map to unk
 * (where `fuse_unk` would join pieces) returns null and the caller asks the library, as for words
 * over MAX_WORD code points (the scan is O(n²) in the word's length; the library's heap is not).
 */
class MergeRanks {
  static readonly MAX_WORD = 128;
  /** a · V + b -> the merge's rank */
  readonly #rank = new Map<number, number>();
  /** rank -> the merged token's vocabulary id */
  readonly #merged: Int32Array;
  readonly #vocab: Map<string, number>;
  readonly #v: number;
  /** vocabulary ids that the library reports as an added token's other id */
  readonly #renamed = new Map<number, number>();
  readonly #byteFallback: boolean;
  readonly #ignoreMerges: boolean;
  readonly #utf8 = new TextEncoder();

  private constructor(model: Json, vocab: Map<string, number>, merges: number) {
    this.#vocab = vocab;
    let v = 0;
    for (const id of vocab.values()) if (id >= v) v = id + 1;
    this.#v = v;
    this.#merged = new Int32Array(merges);
    this.#byteFallback = model.byte_fallback === true;
    this.#ignoreMerges = model.ignore_merges === true;
  }

  /** The ranks of model.merges ("a b" strings or [a, b] pairs), or null when a merge cannot be looked up by ids. */
  static from(model: Json, vocab: Map<string, number>, added: Map<string, { id: number }>): MergeRanks | null {
    const merges = model.merges;
    if (!Array.isArray(merges)) return null;
    const m = new MergeRanks(model, vocab, merges.length);
    if (m.#v * m.#v > Number.MAX_SAFE_INTEGER) return null;
    for (let i = 0; i < merges.length; i++) {
      const e = merges[i] as unknown;
      let a: unknown, b: unknown;
      if (typeof e === 'string') {
        const parts = e.split(' ', 2); // the library's split: what follows a second space is dropped
        if (parts.length !== 2) return null;
        [a, b] = parts;
      } else if (Array.isArray(e) && e.length === 2) [a, b] = e as unknown[];
      if (typeof a !== 'string' || typeof b !== 'string') return null;
      const ia = vocab.get(a), ib = vocab.get(b), ic = vocab.get(a + b);
      if (ia === undefined || ib === undefined || ic === undefined) return null;
      m.#rank.set(ia * m.#v + ib, i);
      m.#merged[i] = ic;
    }
    for (const [content, { id }] of added) {
      const own = vocab.get(content);
      if (own !== undefined && own !== id) m.#renamed.set(own, id);
    }
    return m;
  }

  /** The ids of one pre-token, or null where the library must decide (unknown pieces, long words). */
  ids(word: string): number[] | null {
    if (word.length === 0) return [];
    if (this.#ignoreMerges) {
      const whole = this.#vocab.get(word);
      if (whole !== undefined) return [this.#renamed.get(whole) ?? whole];
    }
    if (word.length > MergeRanks.MAX_WORD) return null;
    const chars = Array.from(word);
    const sym: number[] = new Array(chars.length);
    for (let i = 0; i < chars.length; i++) sym[i] = this.#vocab.get(chars[i]) ?? -1 - i; // -1 - i: chars[i], in no merge
    const rankOf = (i: number): number => (sym[i] < 0 || sym[i + 1] < 0 ? Infinity : this.#rank.get(sym[i] * this.#v + sym[i + 1]) ?? Infinity);
    const pair: number[] = new Array(sym.length - 1);
    for (let i = 0; i + 1 < sym.length; i++) pair[i] = rankOf(i);
    while (pair.length > 0) {
      let best = Infinity, at = -1;
      for (let i = 0; i < pair.length; i++)
        if (pair[i] < best) {
          best = pair[i];
          at = i;
        }
      if (at < 0) break;
      sym[at] = this.#merged[best];
      sym.splice(at + 1, 1);
      pair.splice(at, 1);
      if (at > 0) pair[at - 1] = rankOf(at - 1);
      if (at < pair.length) pair[at] = rankOf(at);
    }
    const out: number[] = [];
    for (const id of sym) {
      if (id >= 0) {
        out.push(this.#renamed.get(id) ?? id);
        continue;
      }
      if (!this.#byteFallback) return null;
      for (const byte of this.#utf8.encode(chars[-1 - id])) {
        const b = this.#vocab.get(`<0x${byte.toString(16).toUpperCase().padStart(2, '0')}>`);
        if (b === undefined) return null;
        out.push(this.#renamed.get(b) ?? b);
      }
    }
    return out;
  }
}

/**
 * The BPE fast path: added tokens, the normalizer and the pre-tokenizers applied as the library
 * applies them, then BPE once per distinct pre-token. Two shapes: byte-level BPE behind Split
 * pre-tokenizers (the library's own compiled patterns: Llama 3, Qwen, DeepSeek), and SentencePiece
 * BPE (Llama 2, CodeLlama: ' ' -> '▁', no pre-tokenizer) split before each '▁' that starts a word,
 * which BPE gives the same tokens only because no token of the vocabulary has a '▁' after another
 * character (checked on load).
 */
class CachedBpe {
  readonly #hf: HfImpl;
  readonly #patterns: RegExp[];
  readonly #byteLevel: { pre_tokenize_text(t: string): string[] } | null;
  readonly #unnormalized: RegExp | null;
  readonly #normalized: RegExp | null;
  readonly #cache = new Map<string, number[]>();
  readonly #merges: MergeRanks | null;

  private constructor(hf: HfImpl, patterns: RegExp[], byteLevel: { pre_tokenize_text(t: string): string[] } | null, model: Json) {
    this.#hf = hf;
    this.#merges = MergeRanks.from(model, hf.model.tokens_to_ids, hf.added_tokens_map);
    this.#patterns = patterns;
    this.#byteLevel = byteLevel;
    const normalizer = hf.normalizer;
    this.#unnormalized = literalsPattern(hf.added_tokens.filter((t) => !(t.normalized && normalizer)).map((t) => t.content));
    this.#normalized = normalizer ? literalsPattern(hf.added_tokens.filter((t) => t.normalized).map((t) => normalizer(t.content))) : null;
  }

  /** The fast path where the tokenizer has one of the two shapes, else null. */
  static from(hf: HfImpl, json: Json): CachedBpe | null {
    const model = json.model as Json, pre = json.pre_tokenizer as Json | null, norm = json.normalizer as Json | null;
    if (model.type !== 'BPE' || model.dropout || model.continuing_subword_prefix || model.end_of_word_suffix) return null;
    if (hf.remove_space || hf.do_lowercase_and_remove_accent || !Array.isArray(hf.added_tokens) || !(hf.added_tokens_map instanceof Map)) return null;
    const added = (json.added_tokens ?? []) as Json[];
    if (added.some((t) => t.lstrip || t.rstrip || t.single_word)) return null;
    if (!pre) return CachedBpe.#sentencePiece(hf, model, norm);
    if (model.byte_fallback) return null;
    if (norm && !(norm.type === 'NFC' || (norm.type === 'Sequence' && Array.isArray(norm.normalizers) && norm.normalizers.length === 0))) return null;
    if (pre.type !== 'Sequence' || !Array.isArray(pre.pretokenizers) || !hf.pre_tokenizer?.tokenizers) return null;
    const cfgs = pre.pretokenizers as Json[], impls = hf.pre_tokenizer.tokenizers;
    if (cfgs.length < 2 || impls.length !== cfgs.length) return null;
    const last = cfgs[cfgs.length - 1];
    if (last.type !== 'ByteLevel' || last.use_regex !== false || last.add_prefix_space) return null;
    const patterns: RegExp[] = [];
    for (let i = 0; i < cfgs.length - 1; i++) {
      const c = cfgs[i], p = impls[i].pattern;
      if (c.type !== 'Split' || c.invert || String(c.behavior).toLowerCase() !== 'isolated' || !(p instanceof RegExp) || !p.global) return null;
      patterns.push(new RegExp(p.source, p.flags)); // our own lastIndex
    }
    return new CachedBpe(hf, patterns, impls[impls.length - 1], model);
  }

  static #sentencePiece(hf: HfImpl, model: Json, norm: Json | null): CachedBpe | null {
    const steps = norm?.type === 'Sequence' && Array.isArray(norm.normalizers) ? (norm.normalizers as Json[]) : [];
    const prepend = steps.length === 2 && steps[0].type === 'Prepend' && steps[0].prepend === METASPACE;
    const replace = steps.length === 2 && steps[1].type === 'Replace' && isObject(steps[1].pattern) && steps[1].pattern.String === ' ' && steps[1].content === METASPACE;
    if (!prepend || !replace || (model.fuse_unk && !model.byte_fallback) || !isObject(model.vocab)) return null;
    for (const token in model.vocab) if (/[^\u2581]\u2581/.test(token)) return null; // a merge across a word start
    return new CachedBpe(hf, [], null, model);
  }

  encode(text: string, out: number[]): void {
    this.#split(this.#unnormalized, text, out, (section) => {
      const normalized = this.#hf.normalizer ? this.#hf.normalizer(section) : section;
      this.#split(this.#normalized, normalized, out, (sub) => this.#pieces(sub, 0, out));
    });
  }

  /** The added tokens found by `re` become their ids; the text between them goes to `rest`. */
  #split(re: RegExp | null, text: string, out: number[], rest: (t: string) => void): void {
    if (re === null) {
      if (text.length) rest(text);
      return;
    }
    re.lastIndex = 0;
    let prev = 0;
    for (let m = re.exec(text); m !== null; m = re.exec(text)) {
      if (prev < m.index) rest(text.slice(prev, m.index));
      out.push(this.#hf.added_tokens_map.get(m[0])!.id);
      prev = m.index + m[0].length;
    }
    if (prev < text.length) rest(prev === 0 ? text : text.slice(prev));
  }

  /**
   * Isolated splits by each pattern in turn (matches and the text between them), then the cached BPE.
   * Recursion depth: the number of Split pre-tokenizers (1 to 3), not the text.
   */
  #pieces(text: string, level: number, out: number[]): void {
    if (level === this.#patterns.length) {
      if (this.#byteLevel) this.#word(text, out);
      else this.#words(text, out);
      return;
    }
    const re = this.#patterns[level];
    re.lastIndex = 0;
    let prev = 0;
    for (let m = re.exec(text); m !== null; m = re.exec(text)) {
      const s = m[0];
      if (s.length === 0) {
        re.lastIndex = m.index + ((text.codePointAt(m.index) ?? 0) > 0xffff ? 2 : 1);
        continue;
      }
      const end = m.index + s.length;
      if (prev < m.index) this.#pieces(text.slice(prev, m.index), level + 1, out);
      this.#pieces(s, level + 1, out);
      prev = end;
      re.lastIndex = end; // the inner levels use other patterns, but keep ours exact
    }
    if (prev < text.length) this.#pieces(prev === 0 ? text : text.slice(prev), level + 1, out);
  }

  /** SentencePiece text cut before each '▁' that follows another character (a word start). */
  #words(text: string, out: number[]): void {
    let start = 0;
    for (let i = 1; i < text.length; i++)
      if (text.charCodeAt(i) === 0x2581 && text.charCodeAt(i - 1) !== 0x2581) {
        this.#word(text.slice(start, i), out);
        start = i;
      }
    this.#word(start === 0 ? text : text.slice(start), out);
  }

  #word(piece: string, out: number[]): void {
    let ids = this.#cache.get(piece);
    if (ids === undefined) {
      const hf = this.#hf;
      const words = this.#byteLevel ? this.#byteLevel.pre_tokenize_text(piece) : [piece];
      const ours = words.length === 1 && this.#merges ? this.#merges.ids(words[0]) : null;
      if (ours !== null) ids = ours;
      else {
        const tokens = hf.model(words);
        ids = tokens.map((t) => hf.added_tokens_map.get(t)?.id ?? hf.model.tokens_to_ids.get(t) ?? (hf.model.unk_token_id as number));
      }
      this.#cache.set(piece, ids);
    }
    for (let i = 0; i < ids.length; i++) out.push(ids[i]);
  }
}

/**
 * A Hugging Face tokenizer (tokenizer.json, with tokenizer_config.json when present). The special
 * tokens come from tokenizer_config.json as the family defines them: eos_token, pad_token (else
 * eos), and bos_token, which starts each sequence where the family adds it: `add_bos_token` where the
 * config says (Llama 2, DeepSeek), else where tokenizer.json's post-processor prepends it.
 */
export class HfTokenizer implements Tokenizer {
  readonly name: string;
  readonly vocabSize: number;
  readonly bos: number | null;
  readonly eos: number;
  readonly pad: number;
  readonly fingerprint: string;
  readonly #tok: HfImpl;
  readonly #fast: CachedBpe | null;

  constructor(spec: string) {
    const file = tokenizerFile(spec);
    const configFile = path.join(path.dirname(file), 'tokenizer_config.json');
    const hash = crypto.createHash('sha256');
    const json = readJsonFile(file, 'tokenizer', hash);
    this.vocabSize = checkTokenizerJson(json, file);
    const config = fs.existsSync(configFile) ? readConfig(configFile, hash) : {};
    this.fingerprint = hash.digest('hex');
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const { Tokenizer: HfTok } = require('@huggingface/tokenizers') as { Tokenizer: new (t: object, c: object) => HfImpl };
    try {
      this.#tok = new HfTok(json as Json, config);
    } catch (err) {
      throw new XftError(`${file}: the tokenizer cannot be built from it (${(err as Error).message})`, 'XFT_FORMAT');
    }
    this.#fast = CachedBpe.from(this.#tok, json as Json);
    this.name = file;
    const special = (key: string): number | null => {
      const v = config[key];
      const content = typeof v === 'string' ? v : isObject(v) && typeof v.content === 'string' ? v.content : undefined;
      if (content === undefined) return null;
      const id = this.#tok.token_to_id(content);
      if (id === undefined) throw new XftError(`${configFile}: ${key} ${JSON.stringify(content)} is not a token of ${file}`, 'XFT_FORMAT');
      return id;
    };
    const bos = special('bos_token');
    const eos = special('eos_token');
    if (eos === null) throw new XftError(`${file}: the tokenizer has no eos_token (tokenizer_config.json)`, 'XFT_FORMAT');
    this.eos = eos;
    this.pad = special('pad_token') ?? eos;
    const addBos = typeof config.add_bos_token === 'boolean' ? config.add_bos_token : bos !== null && this.#tok.encode('a', { add_special_tokens: true }).ids[0] === bos;
    this.bos = addBos ? bos : null;
  }

  /** Whether encode takes the cached fast path (else the library encodes each text whole). */
  get fastPath(): boolean {
    return this.#fast !== null;
  }

  encode(text: string): number[] {
    expectString('HfTokenizer.encode', 'text', text);
    if (!this.#fast) return this.#tok.encode(text, { add_special_tokens: false }).ids;
    const out: number[] = [];
    this.#fast.encode(text, out);
    return out;
  }

  /** The text of the ids, special tokens left out, exactly as encoded (no clean-up of spaces: code keeps ` ?` and ` .`). */
  decode(ids: ArrayLike<number>): string {
    expectIds('HfTokenizer.decode', ids);
    if (ids.length === 0) return '';
    return this.#tok.decode(Array.from(ids), { skip_special_tokens: true, clean_up_tokenization_spaces: false });
  }
}

/** 'byte' (default) or a path to a Hugging Face tokenizer (folder or tokenizer.json). */
export function loadTokenizer(spec = 'byte'): Tokenizer {
  return spec === 'byte' ? new ByteTokenizer() : new HfTokenizer(spec);
}
