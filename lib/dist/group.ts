/**
 * ProcessGroup: the collectives of a data-parallel run, as PyTorch's ProcessGroup: one interface,
 * Gloo behind it for CPU tensors and NCCL for CUDA tensors (binding/dist.cc). Collectives run in the
 * order they are called, on one communication thread (Gloo) or stream (NCCL), so every rank must
 * call the same collectives in the same order with the same sizes. Results are deterministic: the
 * ring algorithms sum in an order fixed by the world size, and every element is reduced on one rank
 * and copied to the others, so all ranks hold identical bits. bf16 is reduced in f32 and rounded
 * once (Gloo) or by NCCL's bf16 reduction.
 *
 * Failures: a peer that exits, is killed, or does not arrive within `timeoutMs` makes the collective
 * throw an XftError (code XFT_DIST) that names the rank and the cause (from rank 0's rendezvous
 * store, which watches every rank's connection and the last collective each entered); the group is
 * unusable afterwards.
 */
import { spawnSync } from 'node:child_process';
import * as dgram from 'node:dgram';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { XftError, invalidArgument } from '../errors';
import type { NativeStorage } from '../native';
import { Tensor, backend, dtypeCode } from '../tensor';
import { expectArray, expectInt, expectOneOf, expectOptions } from '../validate';
import { distEnv, type DistEnv } from './env';
import { DistKind, distNative, type NativeDistGroup } from './native';
import { acquireStore, releaseStore, type StoreStatus } from './store';

/** How values from the ranks combine: the sum, or the mean (the sum divided by the world size). */
export type ReduceOp = 'sum' | 'avg';
export type DistBackend = 'gloo' | 'nccl';

/** The default `timeoutMs` of a process group: how long a collective waits for its peers. */
export const DEFAULT_DIST_TIMEOUT_MS = 300_000;

export interface ProcessGroupOptions {
  /** The environment to read (`distEnv`), or the place already read; default `process.env`. */
  env?: DistEnv | Record<string, string | undefined>;
  /** 'cpu' (Gloo) or 'cuda' (NCCL); default 'cpu'. */
  device?: 'cpu' | 'cuda';
  /** How long each collective waits for the other ranks (ms); default 300000. */
  timeoutMs?: number;
  /** How long `init` waits for every rank to start and connect (ms); default `timeoutMs`. */
  initTimeoutMs?: number;
}

/** An asynchronous collective: `wait()` returns when it is done (on NCCL: when later work on the
 * current stream is ordered after it) and throws its error. Its tensors must stay alive until then. */
export interface Work {
  wait(): void;
  /** Has it finished (successfully or not)? Never blocks. */
  readonly done: boolean;
}

const KIND_NAMES = ['allReduce', 'reduceScatter', 'allGather', 'broadcast', 'barrier', 'allReduceNumbers', 'broadcastJson'];
const OPS: readonly ReduceOp[] = ['sum', 'avg'];
const OP_CODE: Record<ReduceOp, number> = { sum: 0, avg: 1 };

let groupsMade = 0;

function isLoopback(host: string): boolean {
  return host === 'localhost' || host.startsWith('127.') || host === '::1';
}

/** The local address on the route to `host` (what the other ranks can reach this one at). */
async function localAddressToward(host: string, port: number): Promise<string> {
  if (isLoopback(host)) return '127.0.0.1';
  const socket = dgram.createSocket(host.includes(':') ? 'udp6' : 'udp4');
  try {
    return await new Promise<string>((resolve) => {
      socket.once('error', () => resolve(os.hostname()));
      socket.connect(port, host, () => resolve(socket.address().address));
    });
  } finally {
    socket.close();
  }
}

/**
 * Where NCCL may be, in the order tried: XFT_NCCL_LIBRARY; libnccl.so.2 from the loader's search path
 * (the system's libnccl2, LD_LIBRARY_PATH); the nvidia-nccl-cu12/-cu13 wheels (nvidia/nccl/lib) in
 * python3's site-packages (the active virtual environment or conda first).
 */
export function ncclCandidates(env: Record<string, string | undefined> = process.env): string[] {
  const out: string[] = [];
  if (env.XFT_NCCL_LIBRARY) out.push(env.XFT_NCCL_LIBRARY);
  out.push('libnccl.so.2');
  const sites: string[] = [];
  for (const prefix of [env.VIRTUAL_ENV, env.CONDA_PREFIX]) {
    if (!prefix) continue;
    try {
      for (const d of fs.readdirSync(path.join(prefix, 'lib'))) if (/^python3/.test(d)) sites.push(path.join(prefix, 'lib', d, 'site-packages'));
    } catch {
      /* not a virtual environment */
    }
  }
  const py = spawnSync('python3', ['-c', 'import site, sys; print(chr(10).join(site.getsitepackages() + [site.getusersitepackages()]))'], { encoding: 'utf8', timeout: 10_000 });
  if (py.status === 0) for (const s of py.stdout.split('\n')) if (s.trim()) sites.push(s.trim());
  for (const site of sites) {
    const file = path.join(site, 'nvidia', 'nccl', 'lib', 'libnccl.so.2');
    if (!out.includes(file) && fs.existsSync(file)) out.push(file);
  }
  return out;
}

/** A tensor as the native side takes it: its storage, its element offset there (views), its element count. */
type Entry = { storage: NativeStorage; offset: number; numel: number };

/**
 * A group of `worldSize` processes that run collectives together. Make one with `ProcessGroup.init`
 * (every rank at once), call the same collectives in the same order on every rank, `dispose()` at
 * the end. With a world size of 1 every collective is a local no-op (avg divides by 1), so a
 * single-process run takes the same code path without Gloo or NCCL.
 */
export class ProcessGroup {
  readonly rank: number;
  readonly worldSize: number;
  readonly backend: DistBackend;
  readonly device: 'cpu' | 'cuda';
  readonly timeoutMs: number;
  readonly env: DistEnv;
  #native: NativeDistGroup | undefined;
  /** rank 0: the port of the store it serves */
  #storePort: number | undefined;
  #seq = 0;
  #failure: XftError | undefined;
  #disposed = false;
  /** work in flight and the tensors it uses (kept referenced so that they are not collected) */
  #pending = new Map<number, Tensor[]>();

  private constructor(env: DistEnv, device: 'cpu' | 'cuda', timeoutMs: number, native: NativeDistGroup | undefined, storePort: number | undefined) {
    this.env = env;
    this.rank = env.rank;
    this.worldSize = env.worldSize;
    this.device = device;
    this.backend = device === 'cuda' ? 'nccl' : 'gloo';
    this.timeoutMs = timeoutMs;
    this.#native = native;
    this.#storePort = storePort;
  }

  /**
   * Joins the group: every rank calls it; rank 0 serves the rendezvous store at
   * MASTER_ADDR:MASTER_PORT, the others connect to it (retrying until `timeoutMs`), and the Gloo
   * pairs or the NCCL communicator are set up. Throws XFT_DIST when the peers do not all arrive in
   * time, XFT_NATIVE when this build has no Gloo (install libgloo-dev and rebuild) or NCCL cannot
   * be loaded.
   */
  static async init(options: ProcessGroupOptions = {}): Promise<ProcessGroup> {
    const op = 'ProcessGroup.init';
    const o = expectOptions<ProcessGroupOptions>(op, options, 'an options object { env?, device?, timeoutMs?, initTimeoutMs? }');
    const env = o.env !== undefined && typeof o.env === 'object' && typeof (o.env as DistEnv).source === 'string' && typeof (o.env as DistEnv).rank === 'number'
      ? checkDistEnv(op, o.env as DistEnv)
      : distEnv((o.env ?? process.env) as Record<string, string | undefined>);
    const device = expectOneOf(op, 'device', o.device ?? 'cpu', ['cpu', 'cuda'] as const, 'XFT_DEVICE');
    const timeoutMs = expectInt(op, 'timeoutMs', o.timeoutMs ?? DEFAULT_DIST_TIMEOUT_MS, 1, 2 ** 31 - 1);
    const initTimeoutMs = expectInt(op, 'initTimeoutMs', o.initTimeoutMs ?? timeoutMs, 1, 2 ** 31 - 1);
    const prefix = `g${groupsMade++}/`;
    if (env.worldSize === 1) return new ProcessGroup(env, device, timeoutMs, undefined, undefined);
    const Group = distNative.DistGroup;
    if (device === 'cpu' && (!distNative.distGloo || !Group))
      throw new XftError(
        `${op}: this build of xft has no Gloo, which CPU process groups (world size ${env.worldSize}) need: ` +
          'install it (Debian/Ubuntu: apt-get install libgloo-dev) and rebuild the addon (npm run build)',
        'XFT_NATIVE',
      );
    if (device === 'cuda' && (!distNative.distNccl || !Group))
      throw new XftError(`${op}: this build of xft has no CUDA backend, so no NCCL process groups (device 'cuda'); use device 'cpu'`, 'XFT_NATIVE');
    let ncclPaths: string | undefined;
    if (device === 'cuda') {
      // one GPU per local rank: XFT_CUDA_DEVICE picks it when the CUDA backend starts (it has not, if this runs first);
      // with CUDA_VISIBLE_DEVICES naming fewer GPUs (e.g. one per Slurm task) the local rank wraps around them
      const visible = (process.env.CUDA_VISIBLE_DEVICES ?? '').split(',').filter((d) => d.trim() !== '').length;
      if (process.env.XFT_CUDA_DEVICE === undefined) process.env.XFT_CUDA_DEVICE = String(visible > 0 ? env.localRank % visible : env.localRank);
      const b = backend();
      if (b.kind !== 'cuda') throw new XftError(`${op}: device 'cuda' is not available: ${b.reason}`, 'XFT_DEVICE');
      if (b.ordinal !== Number(process.env.XFT_CUDA_DEVICE))
        throw new XftError(
          `${op}: the CUDA backend already runs on device ${b.ordinal}, not XFT_CUDA_DEVICE=${process.env.XFT_CUDA_DEVICE}: ` +
            'create the process group before the first CUDA tensor, or set XFT_CUDA_DEVICE to the local rank',
          'XFT_DEVICE',
        );
      ncclPaths = ncclCandidates().join('\n');
    }
    const store = env.rank === 0 ? await acquireStore(env.masterPort, env.worldSize) : undefined;
    try {
      const bindHost = process.env.XFT_GLOO_HOST || (await localAddressToward(env.masterAddr, env.masterPort));
      const native = new Group!({
        backend: device === 'cuda' ? 1 : 0, rank: env.rank, size: env.worldSize, storeHost: env.masterAddr, storePort: env.masterPort,
        prefix, timeoutMs, initTimeoutMs, bindHost, device: env.localRank, ncclPaths,
      });
      return new ProcessGroup(env, device, timeoutMs, native, store?.port);
    } catch (err) {
      if (store) releaseStore(store.port, 0);
      throw err;
    }
  }

  /** Sums (or averages) each tensor over the ranks, in place. All tensors: one dtype (f32 or bf16), on the group's device. */
  allReduce(tensors: Tensor | Tensor[], op: ReduceOp = 'sum'): void {
    this.allReduceAsync(tensors, op).wait();
  }

  /**
   * `allReduce`, started now and finished by `wait()`: Gloo runs it on the communication thread
   * while this thread goes on; NCCL runs it on a second stream after the work already queued on
   * the current one, and `wait()` orders later work after it. The tensors must not be read,
   * written or disposed before `wait()`.
   */
  allReduceAsync(tensors: Tensor | Tensor[], op: ReduceOp = 'sum'): Work {
    const name = 'allReduce';
    const list = this.#tensors(name, 'tensors', tensors);
    const code = OP_CODE[expectOneOf(`ProcessGroup.${name}`, 'op', op, OPS)];
    if (!this.#native) return { wait: () => undefined, done: true }; // a world of one: the sum is the tensor
    const dtype = list[0]?.dtype ?? 'f32';
    const e = list.map((t) => this.#entry(t));
    return this.#submit(name, list, () =>
      this.#native!.submit(DistKind.AllReduce, dtypeCode(dtype), code, 0, e.map((x) => x.storage), e.map((x) => x.offset), e.map((x) => x.numel), null, 0, 0),
    );
  }

  /**
   * Reduces `input` (worldSize × n elements) over the ranks and writes chunk `rank` of the result
   * (elements [rank·n, (rank+1)·n)) to `output` (n elements). Same dtype, the group's device.
   */
  reduceScatter(input: Tensor, output: Tensor, op: ReduceOp = 'sum'): void {
    const name = 'reduceScatter';
    const [inp, out] = this.#tensors(name, 'input, output', [input, output], ['input', 'output']);
    const code = OP_CODE[expectOneOf(`ProcessGroup.${name}`, 'op', op, OPS)];
    if (inp.numel !== out.numel * this.worldSize)
      throw new XftError(`ProcessGroup.${name}: input has ${inp.numel} elements, expected worldSize ${this.worldSize} × output's ${out.numel}`, 'XFT_SHAPE');
    if (!this.#native) {
      out.copy_(inp.reshape(out.shape)); // a world of one: its own chunk is the whole input
      return;
    }
    const a = this.#entry(inp);
    const b = this.#entry(out);
    this.#submit(name, [inp, out], () =>
      this.#native!.submit(DistKind.ReduceScatter, dtypeCode(inp.dtype), code, 0, [a.storage], [a.offset], [a.numel], b.storage, b.offset, b.numel),
    ).wait();
  }

  /** Gathers every rank's `input` (n elements) into `output` (worldSize × n elements, rank r's at [r·n, (r+1)·n)). */
  allGather(input: Tensor, output: Tensor): void {
    const name = 'allGather';
    const [inp, out] = this.#tensors(name, 'input, output', [input, output], ['input', 'output']);
    if (out.numel !== inp.numel * this.worldSize)
      throw new XftError(`ProcessGroup.${name}: output has ${out.numel} elements, expected worldSize ${this.worldSize} × input's ${inp.numel}`, 'XFT_SHAPE');
    if (!this.#native) {
      out.copy_(inp.reshape(out.shape));
      return;
    }
    const a = this.#entry(inp);
    const b = this.#entry(out);
    this.#submit(name, [inp, out], () =>
      this.#native!.submit(DistKind.AllGather, dtypeCode(inp.dtype), 0, 0, [a.storage], [a.offset], [a.numel], b.storage, b.offset, b.numel),
    ).wait();
  }

  /** Copies `root`'s tensors to every rank, in place (the same shapes on every rank). */
  broadcast(tensors: Tensor | Tensor[], root = 0): void {
    const name = 'broadcast';
    const list = this.#tensors(name, 'tensors', tensors);
    expectInt(`ProcessGroup.${name}`, 'root', root, 0, this.worldSize - 1);
    if (!this.#native) return;
    const dtype = list[0]?.dtype ?? 'f32';
    const e = list.map((t) => this.#entry(t));
    this.#submit(name, list, () =>
      this.#native!.submit(DistKind.Broadcast, dtypeCode(dtype), 0, root, e.map((x) => x.storage), e.map((x) => x.offset), e.map((x) => x.numel), null, 0, 0),
    ).wait();
  }

  /** Returns when every rank has called it. */
  barrier(): void {
    this.#live('barrier');
    if (!this.#native) return;
    this.#submit('barrier', [], () => this.#native!.submit(DistKind.Barrier, 0, 0, 0, [], [], [], null, 0, 0)).wait();
  }

  /** The sum (or mean) over the ranks of a few numbers (f64, host memory: losses, token counts), the same on every rank. */
  allReduceNumbers(values: readonly number[], op: ReduceOp = 'sum'): number[] {
    const name = 'allReduceNumbers';
    this.#live(name);
    const v = expectArray<number>(`ProcessGroup.${name}`, 'values', values, 'an array of finite numbers');
    v.forEach((x, i) => {
      if (typeof x !== 'number' || !Number.isFinite(x)) throw invalidArgument(`ProcessGroup.${name}`, `values[${i}]`, 'a finite number', x);
    });
    const code = OP_CODE[expectOneOf(`ProcessGroup.${name}`, 'op', op, OPS)];
    const buf = Float64Array.from(v);
    if (this.#native && buf.length > 0) this.#run(name, () => this.#native!.allReduceHost(buf, code));
    return Array.from(buf);
  }

  /** `root`'s value (anything JSON can hold), on every rank; the others' `value` is ignored. */
  broadcastJson<T>(value: T, root = 0): T {
    const name = 'broadcastJson';
    this.#live(name);
    expectInt(`ProcessGroup.${name}`, 'root', root, 0, this.worldSize - 1);
    let text = '';
    if (this.rank === root) {
      const json = JSON.stringify(value);
      if (json === undefined) throw invalidArgument(`ProcessGroup.${name}`, 'value', 'a value JSON can hold', value, 'XFT_TYPE');
      text = json;
    }
    if (!this.#native) return JSON.parse(text) as T;
    const bytes = Buffer.from(text, 'utf8');
    const size = new Uint8Array(new Float64Array([bytes.length]).buffer);
    this.#run(name, () => this.#native!.broadcastHost(size, root));
    const n = new Float64Array(size.buffer)[0];
    const data = this.rank === root ? new Uint8Array(bytes) : new Uint8Array(n);
    this.#run(name, () => this.#native!.broadcastHost(data, root));
    return JSON.parse(Buffer.from(data).toString('utf8')) as T;
  }

  /** Waits for the work still in flight, leaves the group (rank 0 stops its store) and frees the communicator. Idempotent. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    const native = this.#native;
    this.#native = undefined;
    if (native) {
      for (const id of this.#pending.keys())
        try {
          native.wait(id);
        } catch {
          /* the failure was or will be reported by the Work's wait() */
        }
      this.#pending.clear();
      native.dispose();
    }
    // rank 0's store: stopped a moment later, once the others said BYE (a group made meanwhile takes it over)
    if (this.#storePort !== undefined) releaseStore(this.#storePort);
    this.#storePort = undefined;
  }

  get disposed(): boolean {
    return this.#disposed;
  }

  // ---- internals ----

  #live(name: string): void {
    if (this.#disposed) throw new XftError(`ProcessGroup.${name}: the process group was used after dispose()`, 'XFT_DISPOSED');
    if (this.#failure) throw new XftError(`ProcessGroup.${name}: the process group failed earlier and cannot be used: ${this.#failure.message}`, 'XFT_DIST');
  }

  /** The tensors checked: live, one dtype (f32 or bf16), on the group's device. */
  #tensors(name: string, what: string, tensors: Tensor | Tensor[], names?: string[]): Tensor[] {
    this.#live(name);
    const op = `ProcessGroup.${name}`;
    const list = Tensor.isTensor(tensors) ? [tensors] : expectArray<Tensor>(op, what, tensors, 'a Tensor or an array of Tensors');
    list.forEach((t, i) => {
      const label = names ? names[i] : Array.isArray(tensors) ? `${what}[${i}]` : what;
      if (!Tensor.isTensor(t)) throw invalidArgument(op, label, 'a Tensor', t, 'XFT_TYPE');
      if (t.disposed) throw new XftError(`${op}: ${label} (${t.describe()}) was used after dispose()`, 'XFT_DISPOSED');
      if (t.dtype !== 'f32' && t.dtype !== 'bf16') throw new XftError(`${op}: expected ${label} to be an f32 or bf16 tensor, got ${t.describe()}`, 'XFT_DTYPE');
      if (t.dtype !== list[0].dtype)
        throw new XftError(`${op}: all tensors must have one dtype, got ${list[0].describe()} and ${t.describe()}`, 'XFT_DTYPE');
      if (t.device !== this.device)
        throw new XftError(`${op}: expected ${label} on the group's device '${this.device}' (${this.backend}), got ${t.describe()}`, 'XFT_DEVICE');
    });
    return list;
  }

  #entry(t: Tensor): Entry {
    const { storage, offset } = t.storageView;
    return { storage, offset, numel: t.numel };
  }

  /** Submits native work and returns its Work; errors come back with the cause named. */
  #submit(name: string, tensors: Tensor[], submit: () => number): Work {
    const seq = ++this.#seq;
    const id = this.#call(name, seq, submit);
    this.#pending.set(id, tensors);
    let finished = false;
    const group = this;
    return {
      wait: () => {
        if (finished) return;
        finished = true;
        const native = group.#native;
        if (!native) {
          if (group.#disposed) return; // dispose() waited for it
          throw new XftError(`ProcessGroup.${name}: the process group failed earlier`, 'XFT_DIST');
        }
        try {
          group.#call(name, seq, () => native.wait(id));
        } finally {
          group.#pending.delete(id);
        }
      },
      get done() {
        return finished || !group.#native || group.#native.done(id);
      },
    };
  }

  /** A synchronous native call (host helpers), counted as one collective. */
  #run(name: string, fn: () => void): void {
    this.#call(name, ++this.#seq, fn);
  }

  #call<T>(name: string, seq: number, fn: () => T): T {
    try {
      return fn();
    } catch (err) {
      if (!(err instanceof XftError) || err.code !== 'XFT_DIST') throw err;
      this.#failure = new XftError(`ProcessGroup.${name} (collective #${seq} of rank ${this.rank}/${this.worldSize}): ${this.#diagnose(seq, err.message)}`, 'XFT_DIST');
      throw this.#failure;
    }
  }

  /**
   * Names the rank that failed and why, from the store's view of the ranks; `raw` is the backend's
   * message. A rank whose connection to the store closed without BYE died; else, after a timeout, the
   * ranks that never entered this collective hang (or left the group early). A connection error may
   * reach this rank before the store saw the peer's socket close, so the store is asked again for up
   * to 1.5 s.
   */
  #diagnose(seq: number, raw: string): string {
    const native = this.#native!;
    const timedOut = /timed out|timeout/i.test(raw);
    const deadline = Date.now() + (timedOut ? 0 : 1500);
    let status: StoreStatus | undefined;
    for (;;) {
      try {
        status = JSON.parse(native.storeStatus()) as StoreStatus;
      } catch {
        if (this.rank !== 0)
          return `rank 0 is gone: its rendezvous store at ${this.env.masterAddr}:${this.env.masterPort} cannot be reached (rank 0 exited, crashed or was killed); ${raw}`;
        return raw;
      }
      const lost = status.ranks.filter((r) => r.state === 'lost');
      if (lost.length > 0)
        return `${lost.map((r) => `rank ${r.rank} is gone (its connection to the rendezvous store closed: the process exited, crashed or was killed)`).join('; ')}; ${raw}`;
      if (Date.now() >= deadline) break;
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 100);
    }
    const behind = status.ranks.filter((r) => r.rank !== this.rank && r.seq < seq);
    if (behind.length > 0) {
      const words = behind.map((r) => {
        const last = r.seq > 0 ? `its last was #${r.seq} (${KIND_NAMES[r.kind] ?? 'collective'}) ${((status!.now - r.since) / 1000).toFixed(1)} s ago` : 'it entered none';
        if (r.state === 'left') return `rank ${r.rank} left the group (dispose()) before collective #${seq} (${last}): the ranks ran different collectives`;
        return timedOut
          ? `rank ${r.rank} did not arrive within ${this.timeoutMs} ms (${last}): it hangs, is too slow, or runs different collectives`
          : `rank ${r.rank} had not arrived (${last})`;
      });
      return `${words.join('; ')}; ${raw}`;
    }
    return raw;
  }
}

/** A DistEnv given directly, checked. */
function checkDistEnv(op: string, env: DistEnv): DistEnv {
  const worldSize = expectInt(op, 'env.worldSize', env.worldSize, 1);
  expectInt(op, 'env.rank', env.rank, 0, worldSize - 1);
  const lws = expectInt(op, 'env.localWorldSize', env.localWorldSize, 1);
  expectInt(op, 'env.localRank', env.localRank, 0, lws - 1);
  expectInt(op, 'env.masterPort', env.masterPort, 1, 65535);
  if (typeof env.masterAddr !== 'string' || !env.masterAddr) throw invalidArgument(op, 'env.masterAddr', 'a host name or address', env.masterAddr, 'XFT_TYPE');
  if (!['torchrun', 'slurm', 'xft', 'single'].includes(env.source)) throw invalidArgument(op, 'env.source', 'a DistSource', env.source);
  return { ...env };
}

