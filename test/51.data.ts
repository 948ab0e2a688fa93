// Instruction data: JSONL field variants, errors with line numbers, the Magicoder template,
// response-only loss, packing and padding, seeded shuffles and splits, tokenizers.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { XftError } from '../lib/index';
import { ByteTokenizer, HfTokenizer, MAGICODER_PROMPT, batches, encodeExample, parseJsonl, readJsonl, shuffle, split, toRows } from '../lib/data';

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
  const dir = path.join(tmp, 'hf');
  fs.mkdirSync(dir);
  fs.writeFileSync(path.join(dir, 'tokenizer.json'), JSON.stringify({
    version: '1.0', truncation: null, padding: null,
    added_tokens: [
      { id: 0, content: '<s>', single_word: false, lstrip: false, rstrip: false, normalized: false, special: true },
      { id: 1, content: '</s>', single_word: false, lstrip: false, rstrip: false, normalized: false, special: true },
    ],
    normalizer: null, pre_tokenizer: { type: 'Whitespace' }, post_processor: null, decoder: null,
    model: { type: 'WordLevel', vocab: { '<s>': 0, '</s>': 1, '<unk>': 2, def: 3, f: 4, '(': 5, '):': 6, return: 7 }, unk_token: '<unk>' },
  }));
  fs.writeFileSync(path.join(dir, 'tokenizer_config.json'), JSON.stringify({ bos_token: '<s>', eos_token: { content: '</s>' } }));
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
