/**
 * The typed surface of the native addon (binding/*.cc): everything JavaScript can call, in one
 * place. lib/ops.ts and lib/tensor.ts are the only callers; they validate arguments first.
 * dtype codes: 0 f32, 1 bf16, 2 i32. device codes: 0 cpu, 1 cuda.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { XftError } from './errors';
import { cudaFlavourFor, readDriverRelease, type NativeCudaProbe } from './backend_reason';

/** A storage handle (binding/addon.cc alloc/free): a number naming a block of native memory.
 * lib/tensor.ts owns each one; ops pass them to the native functions, which look them up. */
export type NativeStorage = number & { readonly __nativeStorage: never };

export interface NativeBackend {
  compiledWithCuda: boolean;
  kind: 'cpu' | 'cuda';
  /** kind 'cpu': why the GPU is not used. */
  reason?: string;
  /** kind 'cpu' in a CUDA build: what the host offered (lib/backend_reason.ts words `reason` from it). */
  cuda?: NativeCudaProbe;
  name?: string;
  ordinal?: number;
  computeCapability?: [number, number];
  multiprocessors?: number;
  totalMemory?: number;
  freeMemory?: number;
  driverVersion?: number;
  runtimeVersion?: number;
  /** kind 'cuda': the NVIDIA kernel module's version ('' when unknown). */
  driverRelease?: string;
  /** kind 'cuda': cudaDevAttrMaxSharedMemoryPerBlockOptin in bytes (the bf16 GEMMs pick their pipeline from it). */
  maxSharedMemoryPerBlock?: number;
}

export interface NativeMemoryStats {
  hostBytes: number;
  hostTensors: number;
  cudaBytes: number;
  cudaTensors: number;
  /** the most bytes live at once since the start or the last resetPeakMemory() */
  hostPeakBytes: number;
  cudaPeakBytes: number;
  poolUsedBytes?: number;
  poolReservedBytes?: number;
  /** freed host blocks (>= 64 KiB) kept for reuse by later allocations of their size class */
  hostCachedBytes: number;
  /** host blocks (>= 64 KiB) mapped from the system: live ones plus the cached */
  hostReservedBytes: number;
  /** the most bytes the host cache keeps (XFT_HOST_CACHE_BYTES, setHostCacheLimit) */
  hostCacheLimitBytes: number;
  /** large host allocations served from the cache / that had to map new memory */
  hostCacheHits: number;
  hostCacheMisses: number;
  /** mmap and munmap calls of the host cache since the start (a warm training step adds none) */
  hostMaps: number;
  hostUnmaps: number;
  /** CUDA: host waits on the stream since the start (each d2h copy, synchronize, trimPool); a training step between log points makes none */
  hostSyncs?: number;
  /** CUDA: device -> host copies since the start (each also counts in hostSyncs) */
  d2hCopies?: number;
  /** CUDA: uploads that waited for their pinned staging buffer (the GPU was behind the host) */
  stagingWaits?: number;
  /** CUDA: kernel launches since the start (counted by the emulated backend; -1 on a GPU) */
  kernelLaunches?: number;
}

type S = NativeStorage;
type Seed = number | bigint;

export interface NativeAddon {
  /** A new block of `bytes` bytes on device 0 (cpu) or 1 (cuda), uninitialised; freed when `owner` is collected unless freed first. */
  alloc(device: number, bytes: number, owner: object): NativeStorage;
  /** Releases it now; false when it was already released. */
  free(storage: NativeStorage): boolean;
  compiledWithCuda: boolean;
  setErrorClass(cls: typeof XftError): void;
  backend(): NativeBackend;
  memoryStats(): NativeMemoryStats;
  resetPeakMemory(): void;
  synchronize(): void;
  trimPool(): void;
  /** Unmaps every cached (freed) host block. */
  emptyHostCache(): void;
  /** The most bytes of freed host blocks kept for reuse (0 disables the cache); trims at once. */
  setHostCacheLimit(bytes: number): void;
  /** Testing aid: fill every new storage with 0xFF bytes (NaN floats, -1 ints) to expose unwritten outputs. */
  setPoison(on: boolean): void;
  upload(s: S, dtype: number, data: Float32Array | Int32Array, offset: number): void;
  download(s: S, dtype: number, n: number, offset: number): Float32Array | Int32Array;
  uploadBytes(s: S, data: Uint8Array, offsetBytes: number): void;
  downloadBytes(s: S, bytes: number, offsetBytes: number): Uint8Array;
  copy(dst: S, src: S, bytes: number, dstOffset: number, srcOffset: number): void;
  fillRandom(s: S, dtype: number, n: number, kind: 0 | 1, seed: Seed, a: number, b: number): void;
  fillValue(s: S, dtype: number, n: number, value: number): void;
  cast(dst: S, dstDtype: number, src: S, srcDtype: number, n: number): void;
  routeForward(logits: S, dtype: number, T: number, N: number, K: number, normalize: boolean, shared: boolean,
    experts: S, weights: S, counts: S, offsets: S, order: S, importance: S, load: S, probs?: S | null): void;
  routeBackward(logits: S, dtype: number, T: number, N: number, K: number, normalize: boolean, shared: boolean,
    experts: S, dWeights: S, dImportance: S | null, dLogits: S, dProbs?: S | null): void;
  groupedGemmForward(x: S, w: S, offsets: S, y: S, dtype: number, M: number, n: number, k: number, E: number): void;
  groupedGemmBackward(x: S, w: S, offsets: S, dy: S, dx: S | null, dw: S | null, dtype: number,
    M: number, n: number, k: number, E: number, accumulate: boolean, dwDtype: number, dxAccumulate?: boolean): void;
  gateupForward(x: S, gather: S | null, gatherDiv: number, S: number, wGate: S, wUp: S, offsets: S, gu: S, h: S, dtype: number,
    M: number, f: number, d: number, E: number): void;
  qkvForward(x: S, wq: S, wk: S, wv: S, offsets: S, q: S, k: S, v: S, dtype: number, M: number, nq: number, nk: number, d: number): void;
  swigluDownBackward(dy: S, wDown: S, offsets: S, gu: S, dgu: S, h: S, dtype: number, M: number, f: number, d: number, E: number): void;
  gateupBackward(x: S, gather: S | null, gatherDiv: number, S: number, wGate: S, wUp: S, offsets: S, dgu: S, dx: S | null,
    dwGate: S | null, dwUp: S | null, dtype: number, dwDtype: number, M: number, f: number, d: number, E: number,
    accumulate: boolean, dxAccumulate: boolean): void;
  mergeForward(stacks: S[], merged: S[], numel: number[], dtype: number, E: number, alpha: S, sharedRate: number): void;
  mergeBackward(stacks: S[], dMerged: S[], numel: number[], dtype: number, E: number, alpha: S, sharedRate: number,
    dAlpha: S, accumulate: boolean): void;
  /** UpIT expansion (binding/expand_ops.cc): out (i32 [2·count]) receives count fp64 Σ(a − base)(others[q] − base). */
  expandDeltaDots(base: S, a: S, others: S[], dtype: number, numel: number, out: S): void;
  /** UpIT expansion: out = base + α·DARE_p(a − base) + β·DARE_p(b − base), masks from (seed, tensorId). */
  expandChild(base: S, a: S, b: S, dtype: number, numel: number, out: S, outDtype: number, alpha: number, beta: number,
    dropRate: number, seed: Seed, tensorId: number): void;
  /** the CPU GEMM's kernel ('avx512' | 'avx2' | 'portable' | 'reference') and thread count, as they stand now */
  cpuGemm(): { kernel: string; threads: number };
  /** the machine's FMA ceiling in GFLOP/s on `threads` threads at once, measured for about `ms` */
  cpuPeak(threads: number, ms: number): number;
}

/** The package root: the nearest folder above this file with xft's package.json. */
export function packageRoot(): string {
  let dir = __dirname;
  for (;;) {
    const pkg = path.join(dir, 'package.json');
    if (fs.existsSync(pkg)) {
      try {
        if (JSON.parse(fs.readFileSync(pkg, 'utf8')).name === 'xft') return dir;
      } catch {
        /* keep looking */
      }
    }
    const up = path.dirname(dir);
    if (up === dir) throw new XftError(`cannot find the xft package root above ${__dirname}`, 'XFT_NATIVE');
    dir = up;
  }
}

/** The CUDA major version of the default build (CMakeLists.txt with the toolkit CI and the prebuild use). */
const DEFAULT_CUDA_MAJOR = 13;

/**
 * A second CUDA flavour for drivers older than the default build needs: prebuilds/<platform>-<arch>/cuda<N>/xft.node
 * (e.g. cuda12, built by scripts/build-cuda12.sh, for R525-R570 drivers), taken when the driver's version
 * (/proc/driver/nvidia/version) runs it and not the default; undefined: the default build.
 */
function cudaFlavourAddon(root: string): string | undefined {
  const dir = path.join(root, 'prebuilds', `${process.platform}-${process.arch}`);
  let flavours: number[];
  try {
    flavours = fs.readdirSync(dir).flatMap((n) => {
      const m = /^cuda(\d+)$/.exec(n);
      return m && fs.existsSync(path.join(dir, n, 'xft.node')) ? [Number(m[1])] : [];
    });
  } catch {
    return undefined;
  }
  if (flavours.length === 0) return undefined;
  const pick = cudaFlavourFor(readDriverRelease(), [DEFAULT_CUDA_MAJOR, ...flavours]);
  return pick !== undefined && pick !== DEFAULT_CUDA_MAJOR ? path.join(dir, `cuda${pick}`, 'xft.node') : undefined;
}

function load(): NativeAddon {
  const root = packageRoot();
  // XFT_ADDON_PATH loads a specific build (e.g. a second build folder while developing)
  const explicit = process.env.XFT_ADDON_PATH;
  // otherwise an older driver's CUDA flavour where one is installed, else node-gyp-build's choice
  const flavour = explicit ? undefined : cudaFlavourAddon(root);
  let addon: NativeAddon;
  try {
    const file = explicit ?? flavour;
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    addon = (file ? require(path.resolve(file)) : require('node-gyp-build')(root)) as NativeAddon;
  } catch (err) {
    const reason = String((err as Error).message ?? err).split('\n')[0].trim();
    if (explicit) throw new XftError(`the xft native addon XFT_ADDON_PATH=${explicit} could not be loaded: ${reason}`, 'XFT_NATIVE');
    if (flavour)
      throw new XftError(`the xft native addon ${flavour} (the CUDA build chosen for this NVIDIA driver) could not be loaded: ${reason}; XFT_ADDON_PATH=<file> loads another build`, 'XFT_NATIVE');
    throw new XftError(
      `the xft native addon could not be loaded from ${root}: ${reason}. ` +
        `Reinstall it with \`npm rebuild xft\`: it uses the prebuilt binary for this machine (linux-x64, linux-arm64) ` +
        `or compiles one (cmake and a C++17 compiler; nvcc only for the CUDA backend), and its output says what failed; ` +
        `\`npm rebuild xft --build-from-source\` always compiles (in a checkout of xft itself: \`npm run build\`).`,
      'XFT_NATIVE',
    );
  }
  addon.setErrorClass(XftError);
  return addon;
}

/** The loaded addon (loaded on first import). */
export const native: NativeAddon = load();
