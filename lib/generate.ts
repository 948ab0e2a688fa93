/**
 * Text generation for spot checks of a trained model: the prompt (in the Magicoder template unless
 * raw) is extended one token at a time, greedily (temperature 0) or by sampling with temperature and
 * nucleus (top-p) filtering from a seeded generator, until EOS or maxNewTokens.
 * There is no KV cache: each new token runs the model over the whole sequence (cost O(T²)); it is
 * meant for looking at a few answers, not for serving.
 */
import { XftError } from './errors';
import { Tensor } from './tensor';
import { type Model, expectModel } from './model';
import { type Tokenizer, MAGICODER_PROMPT, expectTokenizer, formatPrompt, seededRandom } from './data';
import { expectBool, expectFunction, expectInt, expectNumber, expectOptions, expectString } from './validate';

export interface GenerateOptions {
  /** most tokens to add (default 256) */
  maxNewTokens?: number;
  /** 0 (default): greedy; > 0: sample from softmax(logits / temperature) */
  temperature?: number;
  /** nucleus sampling: keep the smallest set of tokens whose probability reaches topP (default 1) */
  topP?: number;
  /** seed of the sampling (default 0) */
  seed?: number;
  /** use the prompt as it is, not in the Magicoder template */
  raw?: boolean;
  /** called with each new token's text */
  onToken?: (text: string) => void;
}

export interface GenerateResult {
  /** the generated text (without the prompt) */
  text: string;
  /** the generated token ids */
  ids: number[];
  /** why it stopped */
  stop: 'eos' | 'length';
}

/** The next token from one row of logits. */
export function pickToken(logits: ArrayLike<number>, temperature: number, topP: number, rand: () => number): number {
  const op = 'pickToken';
  const ok = logits !== null && typeof logits === 'object' && Number.isSafeInteger(logits.length) && logits.length >= 1 &&
    !(logits instanceof BigInt64Array || logits instanceof BigUint64Array);
  if (!ok) throw new XftError(`${op}: expected a non-empty array or typed array of numbers for logits`, 'XFT_TYPE');
  for (let i = 0; i < logits.length; i++) if (typeof logits[i] !== 'number') throw new XftError(`${op}: logits[${i}] is not a number`, 'XFT_TYPE');
  expectNumber(op, 'temperature', temperature, 'a finite number >= 0', (x) => x >= 0);
  expectNumber(op, 'topP', topP, 'a number in (0, 1]', (x) => x > 0 && x <= 1);
  expectFunction(op, 'rand', rand, false);
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  if (temperature === 0) return best;
  const p = Array.from(logits, (v) => Math.exp((v - logits[best]) / temperature));
  const z = p.reduce((a, v) => a + v, 0);
  const order = [...p.keys()].sort((a, b) => p[b] - p[a] || a - b);
  let kept = 0, mass = 0;
  while (kept < order.length && mass < topP * z * (1 - 1e-12)) mass += p[order[kept++]]; // the smallest set reaching topP
  let u = rand() * mass;
  for (let i = 0; i < kept; i++) {
    u -= p[order[i]];
    if (u < 0) return order[i];
  }
  return order[kept - 1];
}

/** Generates a continuation of `prompt` with `model` (any kind: dense, MoE or merge). */
export function generate(model: Model, tok: Tokenizer, prompt: string, options: GenerateOptions = {}): GenerateResult {
  const op = 'generate';
  expectModel(op, 'model', model);
  expectTokenizer(op, tok);
  expectString(op, 'prompt', prompt);
  options = expectOptions<GenerateOptions>(op, options, 'an options object { maxNewTokens?, temperature?, topP?, seed?, raw?, onToken? }');
  if (options.seed !== undefined) expectInt(op, 'options.seed', options.seed, -(2 ** 53) + 1);
  if (options.raw !== undefined) expectBool(op, 'options.raw', options.raw);
  expectFunction(op, 'options.onToken', options.onToken);
  const max = options.maxNewTokens === undefined ? 256 : expectInt(op, 'options.maxNewTokens', options.maxNewTokens, 0);
  const temperature = options.temperature === undefined ? 0 : expectNumber(op, 'options.temperature', options.temperature, 'a finite number >= 0', (x) => x >= 0);
  const topP = options.topP === undefined ? 1 : expectNumber(op, 'options.topP', options.topP, 'a number in (0, 1]', (x) => x > 0 && x <= 1);
  if (tok.vocabSize > model.config.vocab_size)
    throw new XftError(`generate: the tokenizer has ${tok.vocabSize} tokens but the model's vocab_size is ${model.config.vocab_size}`, 'XFT_VALUE');
  const text = options.raw ? prompt : formatPrompt(prompt, MAGICODER_PROMPT);
  const ids = (tok.bos !== null ? [tok.bos] : []).concat(tok.encode(text));
  if (ids.length === 0) throw new XftError('generate: the prompt is empty', 'XFT_VALUE');
  const rand = seededRandom(options.seed ?? 0), out: number[] = [];
  const V = model.config.vocab_size;
  let shown = '';
  for (let n = 0; n < max; n++) {
    const input = Tensor.from(ids, [ids.length], { dtype: 'i32', device: model.device });
    const logits = model.logits(input, 1, ids.length);
    const last = logits.narrow(ids.length - 1, 1);
    const row = last.toArray();
    [input, logits].forEach((t) => t.dispose());
    const next = pickToken(row.length === V ? row : row.slice(0, V), temperature, topP, rand);
    if (next === tok.eos) return { text: tok.decode(out), ids: out, stop: 'eos' };
    ids.push(next);
    out.push(next);
    if (options.onToken) {
      // the text so far, decoded whole (a character may span tokens): emit what it adds
      const now = tok.decode(out);
      if (now.startsWith(shown) && !now.endsWith('\ufffd')) {
        options.onToken(now.slice(shown.length));
        shown = now;
      }
    }
  }
  return { text: tok.decode(out), ids: out, stop: 'length' };
}
