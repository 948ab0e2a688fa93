// Real vocabularies end to end (Qwen 3 / Qwen 2.5 Coder: 151,936; DeepSeek V3: 129,280): see test/helpers/vocab.ts.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { FIXTURES } from './helpers/tokenizers';
import { vocabPipeline } from './helpers/vocab';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-vocab-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
for (const f of FIXTURES.filter((x) => x.name === 'qwen3' || x.name === 'deepseek_v3')) t.test(`${f.name}: V = ${f.vocabSize}`, async (t) => vocabPipeline(t, f, tmp));
