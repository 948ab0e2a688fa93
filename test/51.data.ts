// Instruction data: JSONL field variants, errors with line numbers, the Magicoder template,
// response-only loss, packing and padding, seeded shuffles and splits, tokenizers.
import t, { type Test } from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { XftError } from '../lib/index';
import { ByteTokenizer, HfTokenizer, MAGICODER_PROMPT, batches, cacheFileOf, checkTokenizerFolder, encodeDataFile, encodeDataFileAsync, encodeExample, parseJsonl, readJsonl, shuffle, split, toRows } from '../lib/data';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-data-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));

t.test('JSONL with the three field conventions', async (t) => {
  const text = [
    JSON.stringify({ instruction: 'a', response: 'b' }),
    '',
    JSON.stringify({ instruction: 'c', output: 'd', extra: 1 }),
    JSON.stringify({ problem: 'e', solution: 'f' }),
  ].join('\n');
  t.same(parseJsonl(text), [{ instruction: 'a', response: 'b' }, { instruction: 'c', response: 'd' }, { instruction: 'e', response: 'f' }]);
  const file = path.join(tmp, 'd.jsonl');
  fs.writeFileSync(file, text);
  t.equal(readJsonl(file).length, 3);
});

t.test('bad lines name the line number', async (t) => {
  const check = (text: string, re: RegExp) => {
    try {
      parseJsonl(text, 'data.jsonl');
      t.fail('should throw');
    } catch (err) {
      t.equal((err as XftError).code, 'XFT_FORMAT');
      t.match((err as Error).message, re);
    }
  };
  check('{"instruction":"a","response":"b"}\n{oops', /data\.jsonl:2: not valid JSON/);
  check('\n\n[1,2]', /data\.jsonl:3: expected a JSON object/);
  check('{"instruction":"a"}', /data\.jsonl:1: expected string fields instruction\/response or instruction\/output or problem\/solution, got keys instruction/);
  try {
    readJsonl(path.join(tmp, 'missing.jsonl'));
    t.fail('a missing file should throw');
  } catch (err) {
    t.equal((err as XftError).code, 'XFT_IO');
  }
});

t.test('the Magicoder template and response-only targets', async (t) => {
  const tok = new ByteTokenizer();
  const s = encodeExample(tok, { instruction: 'Add.', response: 'x+y' });
  const prompt = MAGICODER_PROMPT.replace('{instruction}', 'Add.');
  t.ok(prompt.startsWith('You are an exceptionally intelligent coding assistant'));
  t.ok(prompt.endsWith('@@ Instruction\nAdd.\n\n@@ Response\n'));
  const full = [tok.bos!, ...tok.encode(prompt), ...tok.encode('x+y'), tok.eos];
  t.same(s.ids, full.slice(0, -1), 'inputs: BOS, prompt, response');
  const counted = s.targets.filter((v) => v >= 0);
  t.same(counted, [...tok.encode('x+y'), tok.eos], 'the loss counts exactly the response and EOS');
  t.equal(s.targets.length, s.ids.length);
  t.equal(s.targets.findIndex((v) => v >= 0), full.length - 5, 'the first counted target is the first response token');
  t.equal(tok.decode(tok.encode('héllo ✓')), 'héllo ✓', 'byte tokenizer round trips UTF-8');
});

t.test('packing, padding, shuffles and splits', async (t) => {
  const samples = [{ ids: [1, 2, 3], targets: [-1, 3, 4] }, { ids: [5, 6], targets: [6, 7] }, { ids: [8, 9, 10, 11, 12], targets: [-1, -1, 11, 12, 13] }];
  const padded = toRows(samples, 4, 'pad', 0);
  const plain = (r: { ids: ArrayLike<number>; targets: ArrayLike<number> }) => ({ ids: Array.from(r.ids), targets: Array.from(r.targets) });
  t.same(plain(padded[0]), { ids: [1, 2, 3, 0], targets: [-1, 3, 4, -1] });
  t.same(plain(padded[2]), { ids: [8, 9, 10, 11], targets: [-1, -1, 11, 12] }, 'truncated');
  const packed = toRows(samples, 4, 'pack', 0);
  t.same(packed.map((r) => Array.from(r.ids)), [[1, 2, 3, 5], [6, 8, 9, 10], [11, 12, 0, 0]], 'the stream cut into rows, the tail padded');
  t.ok(packed.every((r) => r.ids instanceof Int32Array && r.targets instanceof Int32Array), 'rows are Int32Arrays (4 bytes a token)');
  t.same(Array.from(packed[2].targets), [12, 13, -1, -1]);
  const bs = [...batches(packed, 2, 1)];
  t.equal(bs.length, 2);
  t.equal(bs[0].ids.length, 8);
  t.equal(bs.reduce((a, b) => a + b.tokens, 0), packed.reduce((a, r) => a + Array.from(r.targets).filter((v) => v >= 0).length, 0), 'token counts');
  const items = Array.from({ length: 100 }, (_, i) => i);
  t.same(shuffle(items, 7), shuffle(items, 7), 'same seed, same order');
  t.notSame(shuffle(items, 7), shuffle(items, 8), 'other seed, other order');
  const sp = split(items, 0.1, 3);
  t.equal(sp.eval.length, 10);
  t.same([...sp.eval, ...sp.train].sort((a, b) => a - b), items, 'a partition');
  t.throws(() => toRows(samples, 0, 'pack', 0), /seqLen/);
});

t.test('a Hugging Face tokenizer.json', async (t) => {
  const dir = wordLevel(path.join(tmp, 'hf'), { bos_token: '<s>', eos_token: { content: '</s>' }, add_bos_token: true });
  const tok = new HfTokenizer(dir);
  t.equal(tok.vocabSize, 8);
  t.equal(tok.bos, 0);
  t.equal(tok.eos, 1);
  t.equal(tok.pad, 1, 'pad falls back to eos');
  t.same(tok.encode('def f ( ): return'), [3, 4, 5, 6, 7]);
  const s = encodeExample(tok, { instruction: 'f', response: 'return' });
  t.equal(s.ids[0], 0, 'BOS first');
  t.same(s.targets.filter((v) => v >= 0), [7, 1], 'response then EOS');
});

/** A WordLevel tokenizer.json over `vocab` with <s> and </s> as added special tokens. */
function wordLevel(dir: string, config: object | string) {
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'tokenizer.json'), JSON.stringify({
    version: '1.0', truncation: null, padding: null,
    added_tokens: [
      { id: 0, content: '<s>', single_word: false, lstrip: false, rstrip: false, normalized: false, special: true },
      { id: 1, content: '</s>', single_word: false, lstrip: false, rstrip: false, normalized: false, special: true },
    ],
    normalizer: null, pre_tokenizer: { type: 'Whitespace' }, post_processor: null, decoder: null,
    model: { type: 'WordLevel', vocab: { '<s>': 0, '</s>': 1, '<unk>': 2, def: 3, f: 4, '(': 5, '):': 6, return: 7 }, unk_token: '<unk>' },
  }));
  fs.writeFileSync(path.join(dir, 'tokenizer_config.json'), typeof config === 'string' ? config : JSON.stringify(config));
  return dir;
}

t.test('BOS only where the family adds it, once', async (t) => {
  const none = new HfTokenizer(wordLevel(path.join(tmp, 'nobos'), { bos_token: '<s>', eos_token: '</s>' }));
  t.equal(none.bos, null, 'a bos_token without add_bos_token and without a post-processor that adds it: no BOS');
  t.equal(encodeExample(none, { instruction: 'f', response: 'return' }).ids[0], none.encode(MAGICODER_PROMPT.replace('{instruction}', 'f'))[0]);
  const tok = new HfTokenizer(wordLevel(path.join(tmp, 'bos'), { bos_token: '<s>', eos_token: '</s>', add_bos_token: true }));
  const s = encodeExample(tok, { instruction: 'f', response: 'return' }, '<s> def {instruction}');
  t.same(Array.from(s.ids), [0, 3, 4, 7], 'a template that starts with BOS gets no second one');
  t.same(s.targets.filter((v) => v >= 0), [7, 1]);
  t.equal(tok.decode([]), '', 'decoding nothing is the empty string');
});

/** The error `f` throws (a test failure when it does not throw). */
function thrown(t: Test, f: () => unknown): XftError | undefined {
  try {
    f();
  } catch (err) {
    return err as XftError;
  }
  t.fail('should throw');
  return undefined;
}

t.test('bad tokenizer files: XFT_FORMAT naming the file', async (t) => {
  const cases: [string, string, RegExp][] = [
    ['empty-object', '{}', /tokenizer\.json: not a Hugging Face tokenizer\.json \(no "model" object/],
    ['null', 'null', /tokenizer\.json: not a Hugging Face tokenizer\.json \(expected a JSON object, got null\)/],
    ['garbage', 'GARBAGE \u0000\u0001', /tokenizer\.json: the tokenizer is not valid JSON/],
    ['truncated', '', /tokenizer\.json: the tokenizer is not valid JSON/],
    ['bad-id', JSON.stringify({ model: { type: 'BPE', vocab: { a: -1 }, merges: [] } }), /the id of "a" in model\.vocab is -1/],
    ['bad-model', JSON.stringify({ model: { type: 'NoSuchModel', vocab: { a: 0 } } }), /tokenizer\.json: the tokenizer cannot be built from it/],
  ];
  const good = fs.readFileSync(path.join(wordLevel(path.join(tmp, 'good'), { eos_token: '</s>' }), 'tokenizer.json'), 'utf8');
  cases[3][1] = good.slice(0, Math.floor(good.length / 2));
  for (const [name, text, re] of cases) {
    const dir = wordLevel(path.join(tmp, `bad-${name}`), { eos_token: '</s>' });
    fs.writeFileSync(path.join(dir, 'tokenizer.json'), text);
    for (const load of [() => new HfTokenizer(dir), () => checkTokenizerFolder(dir)]) {
      const err = thrown(t, load);
      t.ok(err instanceof XftError && err.code === 'XFT_FORMAT', `${name}: XFT_FORMAT`);
      t.ok(err?.message.includes(path.join(dir, 'tokenizer.json')), `${name}: names the file`);
      t.match(err?.message, re, name);
    }
  }
  const cfg = wordLevel(path.join(tmp, 'bad-config'), '{"eos_token": "</s>", oops');
  const e = thrown(t, () => new HfTokenizer(cfg));
  t.equal(e?.code, 'XFT_FORMAT');
  t.match(e?.message, `${path.join(cfg, 'tokenizer_config.json')}: the tokenizer config is not valid JSON`, 'a garbage config names tokenizer_config.json');
  const nullCfg = wordLevel(path.join(tmp, 'null-config'), 'null');
  t.throws(() => checkTokenizerFolder(nullCfg), /tokenizer_config\.json: the tokenizer config is not a JSON object/);
  const unknownEos = wordLevel(path.join(tmp, 'unknown-eos'), { eos_token: '<|eot|>' });
  t.throws(() => new HfTokenizer(unknownEos), /tokenizer_config\.json: eos_token "<\|eot\|>" is not a token of/);
  t.equal(thrown(t, () => new HfTokenizer(path.join(tmp, 'no-such')))?.code, 'XFT_IO');
  t.doesNotThrow(() => checkTokenizerFolder(tmp), 'a folder without tokenizer files is fine');
});

t.test('encodeDataFile: the token cache next to the data file', async (t) => {
  const file = path.join(tmp, 'cache.jsonl');
  const rows = Array.from({ length: 50 }, (_, i) => ({ instruction: `Add ${i}.`, response: `x + ${i}` }));
  fs.writeFileSync(file, rows.map((r) => JSON.stringify(r)).join('\n'));
  const tok = new ByteTokenizer();
  const progress: number[] = [];
  const a = encodeDataFile(file, tok, { onProgress: (done, total) => progress.push(done / total) });
  t.notOk(a.cached);
  t.equal(progress.at(-1), 1, 'progress reaches the end');
  t.ok(fs.existsSync(cacheFileOf(file)), 'the cache is written next to the data');
  t.same(fs.readdirSync(tmp).filter((f) => f.includes('.tmp-')), [], 'no temporary file left');
  const plain = (s: { ids: ArrayLike<number>; targets: ArrayLike<number> }) => ({ ids: Array.from(s.ids), targets: Array.from(s.targets) });
  t.same(a.samples.map(plain), rows.map((r) => plain(encodeExample(tok, r))), 'the samples of encodeExample');
  const b = encodeDataFile(file, tok);
  t.ok(b.cached, 'unchanged data and tokenizer: read back');
  t.same(b.samples.map(plain), a.samples.map(plain));
  t.notOk(encodeDataFile(file, tok, { template: 'Q: {instruction}\nA: ' }).cached, 'another template: encoded again');
  t.ok(encodeDataFile(file, tok, { template: 'Q: {instruction}\nA: ' }).cached, 'and cached under its own key');
  const hf = new HfTokenizer(wordLevel(path.join(tmp, 'cachetok'), { eos_token: '</s>' }));
  t.notOk(encodeDataFile(file, hf).cached, 'another tokenizer: encoded again');
  fs.appendFileSync(file, '\n' + JSON.stringify({ instruction: 'new', response: 'one' }));
  const c = encodeDataFile(file, tok);
  t.notOk(c.cached, 'changed data: encoded again');
  t.equal(c.samples.length, 51);
  const bytes = fs.readFileSync(cacheFileOf(file));
  fs.writeFileSync(cacheFileOf(file), bytes.subarray(0, bytes.length - 7));
  const d = encodeDataFile(file, tok);
  t.notOk(d.cached, 'a truncated cache is ignored and rewritten');
  t.same(d.samples.map(plain), c.samples.map(plain));
  t.ok(encodeDataFile(file, tok).cached);
  const warnings: string[] = [];
  fs.rmSync(cacheFileOf(file));
  fs.mkdirSync(cacheFileOf(file)); // the cache path is taken: the encoding still works, with a warning
  t.equal(encodeDataFile(file, tok, { warn: (m) => warnings.push(m) }).samples.length, 51);
  t.match(warnings.join('\n'), /could not write the token cache/);
  t.equal(encodeDataFile(file, tok, { cache: false }).cached, false);
});

t.test('encodeDataFileAsync: worker threads give the samples of encodeDataFile', async (t) => {
  const file = path.join(tmp, 'many.jsonl');
  fs.writeFileSync(file, Array.from({ length: 4100 }, (_, i) => JSON.stringify({ instruction: `Task ${i}: sort ${i % 7} items.`, output: `def f${i}(x):\n\treturn sorted(x)[:${i % 13}]` })).join('\n'));
  const tok = new HfTokenizer(wordLevel(path.join(tmp, 'workertok'), { eos_token: '</s>', add_bos_token: true }));
  const progress: number[] = [];
  const a = await encodeDataFileAsync(file, tok, { workers: 2, onProgress: (done) => progress.push(done) });
  const b = encodeDataFile(file, tok, { cache: false });
  t.notOk(a.cached);
  t.equal(a.samples.length, 4100);
  let differ = 0;
  for (let i = 0; i < b.samples.length; i++)
    if (Array.from(a.samples[i].ids).join() !== Array.from(b.samples[i].ids).join() || Array.from(a.samples[i].targets).join() !== Array.from(b.samples[i].targets).join()) differ++;
  t.equal(differ, 0, 'the same samples from 2 threads');
  t.equal(progress.at(-1), 4100, 'progress adds up over the threads');
  t.ok((await encodeDataFileAsync(file, tok, { workers: 2 })).cached, 'the async path writes and reads the same cache');
  fs.writeFileSync(path.join(tmp, 'workertok', 'tokenizer.json'), '{"model": null}'); // the files change under a worker's feet
  await t.rejects(encodeDataFileAsync(file, tok, { workers: 2, cache: false }), { code: 'XFT_FORMAT' }, 'an error in a worker is an XftError with its code');
});
