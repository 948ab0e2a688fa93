/**
 * The local launcher (`xft train --nproc N`): starts N processes of one command with torchrun's
 * variables set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free
 * MASTER_PORT, and XFT_DIST_LAUNCHER=1), forwards their output line by line with a `[rank r]`
 * prefix, and supervises them: when one exits non-zero or is killed, the others get SIGTERM, then
 * SIGKILL after `timeoutMs`, and the result names the rank and the cause. SIGINT/SIGTERM of this
 * process stop the children the same way, and none outlives it.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as net from 'node:net';
import * as readline from 'node:readline';
import type { Writable } from 'node:stream';
import { invalidArgument } from '../errors';
import { expectArray, expectBool, expectInt, expectOptions } from '../validate';

export interface LaunchOptions {
  /** How many processes (ranks) to start. */
  nproc: number;
  /** The command: argv[0] the executable (e.g. process.execPath), then its arguments. */
  argv: readonly string[];
  /** The environment of the children, to which the rank variables are added; default process.env. */
  env?: Record<string, string | undefined>;
  /** After the first failure, how long the other ranks get to exit after SIGTERM before SIGKILL (ms); default 10000. */
  timeoutMs?: number;
  /** The rendezvous port; default a free one. */
  port?: number;
  /** Prefix every output line with `[rank r] ` (default true; false passes the bytes through unchanged). */
  prefix?: boolean;
  /** Where the children's output goes; default process.stdout / process.stderr. */
  stdout?: Writable;
  stderr?: Writable;
}

export interface LaunchResult {
  /** 0 when every rank exited 0; else the failed rank's exit code (1 when it was killed), 130/143 when this process was interrupted. */
  exitCode: number;
  /** The first rank that failed, and how ("exited with code 3", "was killed by SIGKILL"). */
  failedRank?: number;
  cause?: string;
  /** A sentence for the user, e.g. "rank 1 of 3 exited with code 1 (last error line: …); the other ranks were stopped". */
  message?: string;
}

/** A port no one listens on now (the OS picks it; it is free again when this returns). */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const port = (server.address() as net.AddressInfo).port;
      server.close(() => resolve(port));
    });
  });
}

/** Starts `nproc` ranks of `argv` and waits for all of them; see the file comment. Never rejects once the children started. */
export async function launch(options: LaunchOptions): Promise<LaunchResult> {
  const op = 'launch';
  const o = expectOptions<LaunchOptions>(op, options, 'an options object { nproc, argv, env?, timeoutMs?, port?, prefix? }');
  const nproc = expectInt(op, 'nproc', o.nproc, 1, 4096);
  const argv = expectArray<string>(op, 'argv', o.argv, 'a non-empty array of strings (the command)', 1);
  argv.forEach((a, i) => {
    if (typeof a !== 'string') throw invalidArgument(op, `argv[${i}]`, 'a string', a, 'XFT_TYPE');
  });
  const graceMs = expectInt(op, 'timeoutMs', o.timeoutMs ?? 10_000, 0, 2 ** 31 - 1);
  const prefix = expectBool(op, 'prefix', o.prefix, true);
  const port = o.port === undefined ? await freePort() : expectInt(op, 'port', o.port, 1, 65535);
  const stdout = o.stdout ?? process.stdout;
  const stderr = o.stderr ?? process.stderr;
  const baseEnv = o.env ?? process.env;

  const children: (ChildProcess | undefined)[] = [];
  const running = new Set<number>();
  const lastErrorLine: string[] = new Array(nproc).fill('');
  let failure: { rank: number; cause: string; exitCode: number } | undefined;
  let killTimer: NodeJS.Timeout | undefined;

  const stopAll = (signal: NodeJS.Signals) => {
    for (const r of running) children[r]?.kill(signal);
    if (!killTimer && signal !== 'SIGKILL') {
      killTimer = setTimeout(() => stopAll('SIGKILL'), graceMs);
      killTimer.unref();
    }
  };
  const fail = (rank: number, cause: string, exitCode: number) => {
    if (failure) return;
    failure = { rank, cause, exitCode };
    stopAll('SIGTERM');
  };
  const onSignal = (signal: NodeJS.Signals) => {
    if (!failure) failure = { rank: -1, cause: `interrupted by ${signal}`, exitCode: signal === 'SIGINT' ? 130 : 143 };
    stopAll('SIGTERM');
  };
  const onExit = () => {
    for (const r of running) children[r]?.kill('SIGKILL');
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('exit', onExit);

  const forward = (rank: number, from: NodeJS.ReadableStream, to: Writable, isErr: boolean): Promise<void> =>
    new Promise((resolve) => {
      if (!prefix) {
        from.on('data', (chunk: Buffer) => {
          to.write(chunk);
          if (isErr) {
            const lines = chunk.toString('utf8').split('\n').filter((l) => l.trim());
            if (lines.length) lastErrorLine[rank] = lines[lines.length - 1];
          }
        });
        from.on('end', resolve);
        return;
      }
      const rl = readline.createInterface({ input: from, crlfDelay: Infinity });
      rl.on('line', (line) => {
        to.write(`[rank ${rank}] ${line}\n`);
        if (isErr && line.trim()) lastErrorLine[rank] = line;
      });
      rl.on('close', resolve);
    });

  const exits: Promise<void>[] = [];
  for (let rank = 0; rank < nproc; rank++) {
    const env: Record<string, string | undefined> = {
      ...baseEnv,
      RANK: String(rank), WORLD_SIZE: String(nproc), LOCAL_RANK: String(rank), LOCAL_WORLD_SIZE: String(nproc),
      MASTER_ADDR: '127.0.0.1', MASTER_PORT: String(port), XFT_DIST_LAUNCHER: '1',
    };
    const child = spawn(argv[0], argv.slice(1), { env, stdio: ['ignore', 'pipe', 'pipe'] });
    children.push(child);
    running.add(rank);
    const outputs = Promise.all([forward(rank, child.stdout!, stdout, false), forward(rank, child.stderr!, stderr, true)]);
    exits.push(
      new Promise<void>((resolve) => {
        child.once('error', (err) => {
          running.delete(rank);
          fail(rank, `could not be started: ${err.message}`, 1);
          resolve();
        });
        child.once('exit', (code, signal) => {
          running.delete(rank);
          if (signal) fail(rank, `was killed by ${signal}`, 1);
          else if (code !== 0) fail(rank, `exited with code ${code}`, code ?? 1);
          void outputs.then(() => resolve());
        });
      }),
    );
    if (failure) break;
  }
  await Promise.all(exits);
  if (killTimer) clearTimeout(killTimer);
  process.off('SIGINT', onSignal);
  process.off('SIGTERM', onSignal);
  process.off('exit', onExit);
  if (!failure) return { exitCode: 0 };
  const f = failure as { rank: number; cause: string; exitCode: number };
  if (f.rank < 0) return { exitCode: f.exitCode, cause: f.cause, message: `launch: ${f.cause}; the ${nproc} ranks were stopped` };
  const last = lastErrorLine[f.rank] ? ` (its last error line: ${lastErrorLine[f.rank].trim().slice(0, 500)})` : '';
  return {
    exitCode: f.exitCode,
    failedRank: f.rank,
    cause: f.cause,
    message: `rank ${f.rank} of ${nproc} ${f.cause}${last}${nproc > 1 ? '; the other ranks were stopped' : ''}`,
  };
}
