// Real vocabularies end to end (Llama 2: 32,000; Llama 3: 128,256): see test/helpers/vocab.ts.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { FIXTURES } from './helpers/tokenizers';
import { vocabPipeline } from './helpers/vocab';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-vocab-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
for (const f of FIXTURES.filter((x) => x.name === 'llama2' || x.name === 'llama3')) t.test(`${f.name}: V = ${f.vocabSize}`, async (t) => vocabPipeline(t, f, tmp));
