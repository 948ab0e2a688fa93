/**
 * The typed native surface of the communicator (binding/dist.cc): one `DistGroup` class per
 * process group, over Gloo (binding/gloo.cc, when the build found libgloo) or NCCL (cuda/nccl.cu,
 * loaded at run time, CUDA builds only). lib/dist/group.ts is the only caller and checks every
 * argument first. dtype codes as lib/native.ts (0 f32, 1 bf16); op codes 0 sum, 1 avg.
 */
import { native, type NativeStorage } from '../native';

/** What a collective does (binding/dist.cc DistKind). */
export const DistKind = { AllReduce: 0, ReduceScatter: 1, AllGather: 2, Broadcast: 3, Barrier: 4 } as const;
export type DistKind = (typeof DistKind)[keyof typeof DistKind];

export interface NativeDistGroupOptions {
  /** 0 gloo, 1 nccl */
  backend: number;
  rank: number;
  size: number;
  /** the rendezvous store (rank 0's lib/dist/store.ts server) */
  storeHost: string;
  storePort: number;
  /** key prefix of this group in the store (groups made one after another do not mix) */
  prefix: string;
  /** each collective */
  timeoutMs: number;
  /** rendezvous: every rank started and connected */
  initTimeoutMs: number;
  /** gloo: the address this rank's pairs listen on (reachable by the others) */
  bindHost: string;
  /** nccl: the CUDA device ordinal this rank uses */
  device: number;
  /** nccl: the files to try to dlopen, one per line (ncclCandidates in lib/dist/group.ts) */
  ncclPaths?: string;
}

/** A native process group. Collectives run in submission order on one communication thread (gloo)
 * or stream (nccl); `submit` returns a work id, `wait` blocks until it is done and throws its error. */
export interface NativeDistGroup {
  readonly rank: number;
  readonly size: number;
  /** Enqueues a collective over the given (storage, element offset, element count) buffers; `out*` is
   * the output of reduce-scatter and all-gather (null otherwise). Returns the work id. */
  submit(kind: DistKind, dtype: number, op: number, root: number, storages: NativeStorage[], offsets: number[], numels: number[],
    outStorage: NativeStorage | null, outOffset: number, outNumel: number): number;
  /** Blocks until the work is done; throws its error (XFT_DIST) once. */
  wait(work: number): void;
  /** Is the work done (successfully or not)? */
  done(work: number): boolean;
  /** In place over host memory, synchronous: all-reduce of f64 values (op 0 sum, 1 avg). */
  allReduceHost(values: Float64Array, op: number): void;
  /** In place over host memory, synchronous: broadcast of bytes from `root`. */
  broadcastHost(bytes: Uint8Array, root: number): void;
  /** The rendezvous store's view of the ranks (JSON; see lib/dist/store.ts), or throws when it is unreachable. */
  storeStatus(): string;
  /** Tells the store this rank leaves cleanly, stops the communication thread, frees the communicator. */
  dispose(): void;
}

export interface DistNative {
  /** Was Gloo found at build time? */
  distGloo: boolean;
  /** Was the NCCL loader compiled in (CUDA builds)? */
  distNccl: boolean;
  DistGroup?: new (options: NativeDistGroupOptions) => NativeDistGroup;
}

/** The communicator part of the loaded addon. */
export const distNative = native as unknown as DistNative;
