/**
 * Why the GPU is not used, in words a user can act on, from what the native probe found (binding/addon.cc,
 * cuda/runtime.cu xft_cuda_probe): a driver older than the CUDA runtime this build links, no driver, no
 * device, a device xft's kernels were not built for (sm_80+). lib/tensor.ts's backend() puts it in
 * `reason`; `xft info` and the "device 'cuda' is not available" errors show it. Also which CUDA flavour of
 * the addon a driver can run, where more than one is installed (lib/native.ts).
 */
import * as fs from 'node:fs';

/** What a CUDA build found on the host when it did not use the GPU (cuda/xft_cuda.h xft_cuda_probe_result). */
export interface NativeCudaProbe {
  /** cudaGetDeviceCount's error (0 none; 35 cudaErrorInsufficientDriver, 100 cudaErrorNoDevice). */
  error: number;
  errorName: string;
  errorString: string;
  deviceCount: number;
  /** The newest CUDA the driver supports, e.g. 12040 (0: no driver could be loaded). */
  driverVersion: number;
  /** The CUDA runtime this build links, e.g. 13000. */
  runtimeVersion: number;
  /** The NVIDIA kernel module's version, e.g. '550.54.15' ('' when unknown). */
  driverRelease: string;
  ordinal: number;
  name?: string;
  computeCapability?: [number, number];
}

/** The oldest Linux driver each CUDA runtime major version runs on (CUDA minor version compatibility). */
export const DRIVER_FLOOR: Readonly<Record<number, string>> = { 11: '450.80.02', 12: '525.60.13', 13: '580.65.06' };
/** The oldest GPU architecture the kernels are built for (compute capability major). */
export const MIN_COMPUTE_MAJOR = 8;
const CUDA_ERROR_INSUFFICIENT_DRIVER = 35;
const CUDA_ERROR_NO_DEVICE = 100;

/** 12040 -> '12.4' (cudaDriverGetVersion / cudaRuntimeGetVersion encoding). */
export function cudaVersionString(v: number): string {
  return `${Math.floor(v / 1000)}.${Math.floor((v % 1000) / 10)}`;
}

/** The driver branch a runtime needs, as '580' (undefined for a runtime this table does not know). */
function driverFloor(runtimeVersion: number): string | undefined {
  return DRIVER_FLOOR[Math.floor(runtimeVersion / 1000)]?.split('.')[0];
}

/**
 * The reason the CUDA backend is not used, worded from the probe; `fallback` (the native layer's own short
 * reason) when the probe shows nothing wrong (e.g. initialisation failed after a good probe).
 */
export function cudaUnavailableReason(p: NativeCudaProbe, fallback: string, env: NodeJS.ProcessEnv = process.env): string {
  const runtime = cudaVersionString(p.runtimeVersion);
  const floor = driverFloor(p.runtimeVersion);
  const needs = floor ? `${floor}+` : `CUDA ${runtime}+`;
  const cpu = 'xft runs on the CPU';
  const driver = p.driverRelease ? `CUDA driver ${p.driverRelease}` : 'the CUDA driver';
  if (p.driverVersion === 0 && p.error !== 0)
    return `no NVIDIA driver was found (libcuda could not be loaded; ${p.errorName}): install the NVIDIA driver (${needs} for this build's CUDA ${runtime} runtime) to use a GPU; ${cpu}`;
  if (p.error === CUDA_ERROR_INSUFFICIENT_DRIVER || (p.error !== 0 && p.driverVersion < p.runtimeVersion))
    return (
      `${driver} is older than this build needs (${needs}): the driver supports CUDA ${cudaVersionString(p.driverVersion)}, ` +
      `this build of xft links the CUDA ${runtime} runtime (${p.errorName}). Update the NVIDIA driver to ${needs} to use the GPU; ${cpu}`
    );
  if (p.error === CUDA_ERROR_NO_DEVICE || (p.error === 0 && p.deviceCount === 0)) {
    const visible = env.CUDA_VISIBLE_DEVICES !== undefined ? ` (CUDA_VISIBLE_DEVICES=${JSON.stringify(env.CUDA_VISIBLE_DEVICES)})` : '';
    return `no CUDA device was found: ${driver}${p.driverRelease ? '' : ` (CUDA ${cudaVersionString(p.driverVersion)})`} is loaded but reports no GPU${visible}; ${cpu}`;
  }
  if (p.error !== 0)
    return `CUDA could not be initialised: ${p.errorString} (${p.errorName}; ${driver}, CUDA ${cudaVersionString(p.driverVersion)}; runtime ${runtime}); ${cpu}`;
  if (p.ordinal < 0 || p.ordinal >= p.deviceCount)
    return `XFT_CUDA_DEVICE=${p.ordinal} names no device: ${p.deviceCount} found (0..${p.deviceCount - 1}); ${cpu}`;
  if (p.computeCapability && p.computeCapability[0] < MIN_COMPUTE_MAJOR)
    return (
      `GPU ${p.ordinal} (${p.name}) has compute capability ${p.computeCapability.join('.')}; xft's CUDA kernels need ` +
      `${MIN_COMPUTE_MAJOR}.0 or newer (sm_80: A100, A10, L4, RTX 30 series and later); ${cpu}`
    );
  return fallback;
}

/** The NVIDIA kernel module's version from /proc/driver/nvidia/version ('' when there is none), as the native probe reads it. */
export function readDriverRelease(file = '/proc/driver/nvidia/version'): string {
  let text = '';
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return '';
  }
  const line = text.split('\n').find((l) => l.includes('Kernel Module')) ?? '';
  return line.slice(line.indexOf('Kernel Module') + 13).split(/\s+/).find((w) => /^\d+(\.\d+)+$/.test(w)) ?? '';
}

/**
 * Of the CUDA major versions of the addon builds at hand (e.g. [13, 12]), the newest this driver runs
 * (DRIVER_FLOOR); undefined when the driver is unknown or too old for all of them (the default build
 * then loads and says why).
 */
export function cudaFlavourFor(driverRelease: string, flavours: readonly number[]): number | undefined {
  const branch = Number(driverRelease.split('.')[0]);
  if (!driverRelease || !Number.isFinite(branch)) return undefined;
  const runs = flavours.filter((v) => DRIVER_FLOOR[v] !== undefined && branch >= Number(DRIVER_FLOOR[v].split('.')[0]));
  return runs.length ? runs.reduce((a, b) => Math.max(a, b)) : undefined;
}
