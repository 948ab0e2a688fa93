// Driving the `xft` CLI from tests: a temporary folder with a tiny dense checkpoint and data, and
// the CLI run through the same TypeScript loader as the test (on the CPU unless XFT_TEST_CLI_DEVICE=auto).
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { tinyConfig } from '../../lib/config';
import { createDense } from '../../lib/xft';
import { saveModel } from '../../lib/checkpoint';

export const CLI = path.join(__dirname, '..', '..', 'lib', 'cli.ts');
export const env = process.env.XFT_TEST_CLI_DEVICE === 'auto' ? { ...process.env } : { ...process.env, XFT_DEVICE: 'cpu' };
export const DATA = ['--data', 'data.jsonl', '--seq-len', '200'];

export interface CliResult {
  code: number | null;
  out: string;
  err: string;
}

/** A temporary folder (removed by teardown) holding `dense/` (a tiny Llama) and `data.jsonl`; xft runs there. */
export function cliWorkspace(prefix: string, teardown: (fn: () => void) => void) {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
  const at = (name: string) => path.join(tmp, name);
  const config = tinyConfig({ hidden_size: 32, intermediate_size: 48, num_attention_heads: 4, num_key_value_heads: 2, num_hidden_layers: 2 });
  const dense = createDense(config, { seed: 1 });
  saveModel(dense, at('dense'));
  dense.dispose();
  fs.writeFileSync(at('data.jsonl'), Array.from({ length: 40 }, (_, i) => JSON.stringify({ instruction: `Add ${i} and ${2 * i}.`, response: `return ${3 * i};` })).join('\n') + '\n');
  const xft = (...args: string[]): CliResult => {
    const r = spawnSync(process.execPath, [...process.execArgv, CLI, ...args], { cwd: tmp, env, encoding: 'utf8' });
    return { code: r.status, out: r.stdout, err: r.stderr };
  };
  /** Runs the CLI without waiting. */
  const start = (...args: string[]) => {
    const child = spawn(process.execPath, [...process.execArgv, CLI, ...args], { cwd: tmp, env });
    let out = '', err = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (err += d));
    const done = new Promise<CliResult>((resolve) => child.on('exit', (code) => resolve({ code, out, err })));
    return { child, done, err: () => err };
  };
  return { tmp, at, xft, start };
}
