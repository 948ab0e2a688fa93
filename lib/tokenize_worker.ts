/**
 * The worker thread of encodeDataFileAsync (lib/data.ts): loads the tokenizer from its files,
 * encodes its share of the examples and sends them back packed (the buffers transferred).
 */
import { parentPort, workerData } from 'node:worker_threads';
import { encodePacked, type Example } from './data';
import { loadTokenizer } from './tokenizer';

const { spec, template, examples } = workerData as { spec: string; template: string; examples: Example[] };
const port = parentPort!;
const packed = encodePacked(loadTokenizer(spec), examples, template, (done) => port.postMessage({ done }));
port.postMessage({ result: packed }, [packed.lengths.buffer as ArrayBuffer, packed.prompts.buffer as ArrayBuffer, packed.tokens.buffer as ArrayBuffer]);
