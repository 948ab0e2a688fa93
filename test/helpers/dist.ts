// Multi-process `xft train` runs for the data-parallel tests: a workspace with a tiny MoE checkpoint
// and data, and the CLI run from its TypeScript through a cached transpile hook (tap's loader would
// compile lib/ again in each of the N processes: several seconds each).
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { tinyConfig } from '../../lib/config';
import { createDense, upcycle } from '../../lib/xft';
import { saveModel } from '../../lib/checkpoint';
import { distNative } from '../../lib/dist/native';


/** The command that runs the CLI: [node, ...args] (test/helpers/cli_entry.js: lib/cli.ts through the cached transpile hook; the launched ranks run the same). */
export const CLI_COMMAND: string[] = [process.execPath, path.join(__dirname, 'cli_entry.js')];

export interface Run {
  code: number | null;
  out: string;
  err: string;
  seconds: number;
}

/** A temporary folder holding `moe/` (a tiny MoE: 4 experts, top-2, router noise, balance loss) and `data.jsonl`. */
export function distWorkspace(prefix: string, teardown: (fn: () => void) => void) {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
  const at = (name: string) => path.join(tmp, name);
  const config = tinyConfig({ hidden_size: 32, intermediate_size: 48, num_attention_heads: 4, num_key_value_heads: 2, num_hidden_layers: 2 });
  const dense = createDense(config, { seed: 1 });
  const moe = upcycle(dense, { experts: 4, topK: 2, seed: 3 });
  saveModel(moe, at('moe'));
  dense.dispose(), moe.dispose();
  fs.writeFileSync(at('data.jsonl'), Array.from({ length: 36 }, (_, i) => JSON.stringify({ instruction: `Add ${i} and ${2 * i}.`, response: `return ${3 * i};` })).join('\n') + '\n');
  /** `xft ...args` in the workspace, on the CPU, with `env` added. */
  const xft = (args: string[], env: Record<string, string> = {}): Promise<Run> =>
    new Promise((resolve) => {
      const t0 = Date.now();
      const child = spawn(CLI_COMMAND[0], [...CLI_COMMAND.slice(1), ...args], { cwd: tmp, env: { ...process.env, XFT_DEVICE: 'cpu', ...env } });
      let out = '', err = '';
      child.stdout.on('data', (d) => (out += d));
      child.stderr.on('data', (d) => (err += d));
      child.on('exit', (code) => resolve({ code, out, err, seconds: (Date.now() - t0) / 1000 }));
    });
  /** The per-step losses a run wrote (xft_train.json; a resumed run's include those before the resume). */
  const losses = (out: string): number[] => JSON.parse(fs.readFileSync(at(path.join(out, 'xft_train.json')), 'utf8')).losses;
  return { tmp, at, xft, losses };
}

/** Asserts exit 0; on failure, the run's last error lines as the message. */
export function ok(t: { equal: (a: unknown, b: unknown, m: string) => unknown }, r: Run): void {
  t.equal(r.code, 0, r.code === 0 ? `exit 0 in ${r.seconds.toFixed(1)} s` : `exit ${r.code}: ${r.err.trim().split('\n').slice(-5).join(' | ')}`);
}

/** The largest |a[i] - b[i]| (Infinity when the lengths differ). */
export function maxDiff(a: readonly number[], b: readonly number[]): number {
  if (a.length !== b.length) return Infinity;
  return a.reduce((m, x, i) => Math.max(m, Math.abs(x - b[i])), 0);
}

/**
 * Why the multi-process tests cannot run here (false: they can): the build has no Gloo. With
 * XFT_REQUIRE_GLOO set (CI) a missing Gloo is an error, not a skip.
 */
export const noGloo: string | false = distNative.distGloo
  ? false
  : process.env.XFT_REQUIRE_GLOO
    ? glooRequired()
    : 'this build has no Gloo (apt-get install libgloo-dev, then rebuild)';
function glooRequired(): never {
  throw new Error('XFT_REQUIRE_GLOO is set but this addon was built without Gloo (apt-get install libgloo-dev, then rebuild)');
}
