// Generation for spot checks: greedy decoding equals the argmax of the model's logits step by step;
// EOS and the length limit stop it; sampling follows softmax(logits / T) with nucleus filtering,
// reproducibly for a seed.
import t from 'tap';
import { Tensor } from '../lib/index';
import { tinyConfig } from '../lib/config';
import { createDense, upcycle } from '../lib/xft';
import { ByteTokenizer, MAGICODER_PROMPT, formatPrompt, seededRandom, type Tokenizer } from '../lib/data';
import { generate, pickToken } from '../lib/generate';
import { throwsCode } from './helpers/check';

const config = tinyConfig({ hidden_size: 32, intermediate_size: 48, num_attention_heads: 4, num_key_value_heads: 2 });
const tok = new ByteTokenizer();

t.test('greedy generation is the argmax of the logits, token by token (dense and MoE)', async (t) => {
  const dense = createDense(config, { seed: 3, std: 0.3 });
  const moe = upcycle(dense, { experts: 4, topK: 3, seed: 2 });
  for (const [what, m] of [['dense', dense], ['moe', moe]] as const) {
    const r = generate(m, tok, 'Add two numbers.', { maxNewTokens: 6 });
    const ids = [tok.bos, ...tok.encode(formatPrompt('Add two numbers.', MAGICODER_PROMPT))];
    const want: number[] = [];
    for (let n = 0; n < 6; n++) {
      const input = Tensor.from(ids, [ids.length], { dtype: 'i32' });
      const l = m.logits(input, 1, ids.length).toArray();
      const row = Array.from(l.slice((ids.length - 1) * config.vocab_size, ids.length * config.vocab_size));
      const next = row.indexOf(Math.max(...row));
      if (next === tok.eos) break;
      want.push(next);
      ids.push(next);
    }
    t.same(r.ids, want, `${what}: ${want.length} greedy tokens`);
    t.equal(r.stop, want.length === 6 ? 'length' : 'eos');
  }
  t.same(generate(dense, tok, 'x', { maxNewTokens: 0 }).ids, [], 'maxNewTokens 0');
  [dense, moe].forEach((m) => m.dispose());
});

t.test('EOS stops generation', async (t) => {
  const m = createDense(config, { seed: 4 });
  m.lmHead.value.fill_(0); // every logit 0: the argmax is token 0, which this tokenizer calls EOS
  const eos0: Tokenizer = { name: 'eos0', vocabSize: 259, bos: null, eos: 0, pad: 0, encode: (s) => tok.encode(s), decode: (ids) => tok.decode(ids) };
  const r = generate(m, eos0, 'hello', { maxNewTokens: 10, raw: true });
  t.same(r, { text: '', ids: [], stop: 'eos' });
  m.dispose();
});

t.test('sampling: softmax(logits / T) frequencies, nucleus filtering, seeded', async (t) => {
  const logits = [Math.log(0.5), Math.log(0.3), Math.log(0.15), Math.log(0.05)];
  const draw = (T: number, p: number, n: number, seed: number) => {
    const rand = seededRandom(seed), counts = [0, 0, 0, 0];
    for (let i = 0; i < n; i++) counts[pickToken(logits, T, p, rand)]++;
    return counts.map((c) => c / n);
  };
  const f = draw(1, 1, 20000, 1);
  t.ok([0.5, 0.3, 0.15, 0.05].every((p, i) => Math.abs(f[i] - p) < 0.015), `T = 1: frequencies ${f.map((v) => v.toFixed(3))}`);
  const nucleus = draw(1, 0.75, 20000, 2);
  t.equal(nucleus[2] + nucleus[3], 0, 'top-p 0.75 keeps only the two most likely tokens (0.5 + 0.3 reach it)');
  t.ok(Math.abs(nucleus[0] - 0.625) < 0.015, `renormalised: ${nucleus[0].toFixed(3)} ~ 0.5 / 0.8`);
  const cold = draw(0.25, 1, 5000, 3);
  t.ok(cold[0] > 0.85, `low temperature sharpens (${cold[0].toFixed(3)})`);
  t.equal(pickToken(logits, 0, 1, seededRandom(0)), 0, 'temperature 0 is the argmax');
  const m = createDense(config, { seed: 5, std: 0.3 });
  const a = generate(m, tok, 'y', { maxNewTokens: 8, temperature: 1, seed: 9 }), b = generate(m, tok, 'y', { maxNewTokens: 8, temperature: 1, seed: 9 });
  t.same(a.ids, b.ids, 'the same seed gives the same sample');
  throwsCode(t, () => generate(m, tok, 'y', { temperature: -1 }), 'XFT_VALUE', /temperature/, 'negative temperature');
  throwsCode(t, () => generate(m, tok, 'y', { topP: 0 }), 'XFT_VALUE', /topP/, 'topP 0');
  throwsCode(t, () => generate(m, tok, 'y', { maxNewTokens: 1.5 }), 'XFT_VALUE', /maxNewTokens/, 'fractional maxNewTokens');
  m.dispose();
});
