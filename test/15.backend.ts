// Why the GPU is not used: the reasons worded from the native probe (lib/backend_reason.ts) for the
// hosts people have (a driver older than the CUDA runtime, no driver, no device, an sm_75 GPU), and,
// with the emulated CUDA backend (cuda/dev/emu/check.sh), the same hosts played through XFT_EMU_* end to
// end: backend(), the XftError of a CUDA tensor, `xft info`, and the opt-in shared memory reported.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { backend } from '../lib/index';
import { cudaUnavailableReason, cudaVersionString, DRIVER_FLOOR } from '../lib/backend_reason';
import type { NativeBackend } from '../lib/native';
import { cudaFlavourFor, readDriverRelease, type NativeCudaProbe } from '../lib/backend_reason';

const probe = (over: Partial<NativeCudaProbe>): NativeCudaProbe => ({
  error: 0, errorName: 'cudaSuccess', errorString: 'no error', deviceCount: 1, driverVersion: 13000, runtimeVersion: 13000,
  driverRelease: '580.65.06', ordinal: 0, name: 'NVIDIA H100', computeCapability: [9, 0], ...over,
});
const OLD_DRIVER = { error: 35, errorName: 'cudaErrorInsufficientDriver', errorString: 'CUDA driver version is insufficient for CUDA runtime version', deviceCount: 0 };

t.test('reason wording from a probe', async (t) => {
  t.equal(cudaVersionString(12040), '12.4');
  t.equal(cudaVersionString(13000), '13.0');
  t.equal(DRIVER_FLOOR[13], '580.65.06');
  const old = cudaUnavailableReason(probe({ ...OLD_DRIVER, driverVersion: 12040, driverRelease: '550.54.15' }), 'short');
  t.match(old, /^CUDA driver 550\.54\.15 is older than this build needs \(580\+\)/, 'R550 with a CUDA 13 build: names the driver and the floor');
  t.match(old, /supports CUDA 12\.4/);
  t.match(old, /CUDA 13\.0 runtime \(cudaErrorInsufficientDriver\)/);
  t.match(old, /xft runs on the CPU$/);
  const unknown = cudaUnavailableReason(probe({ ...OLD_DRIVER, driverVersion: 12020, driverRelease: '' }), 'short');
  t.match(unknown, /^the CUDA driver is older than this build needs \(580\+\): the driver supports CUDA 12\.2/, 'no /proc file: the CUDA version it supports');
  t.match(cudaUnavailableReason(probe({ ...OLD_DRIVER, driverVersion: 12040, runtimeVersion: 12080 }), 's'), /needs \(525\+\)/, 'a CUDA 12 build: floor 525');
  t.match(cudaUnavailableReason(probe({ ...OLD_DRIVER, driverVersion: 0, driverRelease: '' }), 's'), /^no NVIDIA driver was found .*580\+ for this build's CUDA 13\.0 runtime/);
  t.match(cudaUnavailableReason(probe({ error: 100, errorName: 'cudaErrorNoDevice', deviceCount: 0 }), 's', {}),
    /^no CUDA device was found: CUDA driver 580\.65\.06 is loaded but reports no GPU; xft runs on the CPU$/);
  t.match(cudaUnavailableReason(probe({ error: 100, errorName: 'cudaErrorNoDevice', deviceCount: 0 }), 's', { CUDA_VISIBLE_DEVICES: '' }),
    /reports no GPU \(CUDA_VISIBLE_DEVICES=""\)/, 'an empty CUDA_VISIBLE_DEVICES is named');
  t.match(cudaUnavailableReason(probe({ error: 999, errorName: 'cudaErrorUnknown', errorString: 'unknown error' }), 's'),
    /^CUDA could not be initialised: unknown error \(cudaErrorUnknown; CUDA driver 580\.65\.06, CUDA 13\.0; runtime 13\.0\)/);
  t.match(cudaUnavailableReason(probe({ ordinal: 2, deviceCount: 2 }), 's'), /^XFT_CUDA_DEVICE=2 names no device: 2 found \(0\.\.1\)/);
  const turing = cudaUnavailableReason(probe({ name: 'Tesla T4', computeCapability: [7, 5] }), 's');
  t.match(turing, /^GPU 0 \(Tesla T4\) has compute capability 7\.5; xft's CUDA kernels need 8\.0 or newer/, 'sm_75: says so');
  t.equal(cudaUnavailableReason(probe({}), 'CUDA initialisation failed: out of memory'), 'CUDA initialisation failed: out of memory',
    'a good probe: the native reason stands');
});

t.test('the CUDA flavour a driver runs', async (t) => {
  t.equal(cudaFlavourFor('550.54.15', [13, 12]), 12, 'R550: the CUDA 12 build');
  t.equal(cudaFlavourFor('580.65.06', [13, 12]), 13, 'R580: the CUDA 13 build');
  t.equal(cudaFlavourFor('525.60.13', [13, 12]), 12);
  t.equal(cudaFlavourFor('470.256.02', [13, 12]), undefined, 'R470: none (the default build loads and says why)');
  t.equal(cudaFlavourFor('', [13, 12]), undefined, 'no driver: the default');
  t.equal(cudaFlavourFor('550.54.15', [13]), undefined, 'no CUDA 12 build at hand');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-proc-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'version');
  fs.writeFileSync(file, 'NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (dvs-builder@U16)\nGCC version: gcc 12\n');
  t.equal(readDriverRelease(file), '570.86.15', 'the open kernel module line');
  fs.writeFileSync(file, 'NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 19:39:15 UTC 2024\n');
  t.equal(readDriverRelease(file), '535.183.01', 'the proprietary module line');
  t.equal(readDriverRelease(path.join(dir, 'none')), '', 'no file: unknown');
});

// The emulated CUDA backend plays the host; other builds cannot, and say so
const b = backend();
const EMULATED = b.kind === 'cuda' && /host emulation/.test(b.name ?? '');
const skipEmu = EMULATED ? false : 'needs the emulated CUDA backend (bash cuda/dev/emu/check.sh quick test/15.backend.ts)';
const CHILD = path.join(__dirname, 'helpers', 'backend_child.ts');
const CLI = path.join(__dirname, '..', 'lib', 'cli.ts');

function child(env: Record<string, string>, script = CHILD, args: string[] = []) {
  const r = spawnSync(process.execPath, [...process.execArgv, script, ...args], { env: { ...process.env, ...env }, encoding: 'utf8', timeout: 60_000 });
  if (r.status !== 0) throw new Error(`child exit ${r.status}: ${r.stderr}`);
  return r.stdout;
}
const run = (env: Record<string, string>) => JSON.parse(child(env).trim().split('\n').pop()!) as { backend: NativeBackend; error: { name: string; code?: string; message: string } | null };

t.test('emulated hosts: the reason in backend(), the XftError for a CUDA tensor, xft info', { skip: skipEmu }, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-backend-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const proc = path.join(dir, 'version');
  fs.writeFileSync(proc, 'NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\nGCC version:  gcc version 12.3.0\n');
  const r550 = { XFT_EMU_DRIVER_VERSION: '12040', XFT_EMU_NVIDIA_VERSION_FILE: proc };

  const old = run(r550);
  t.equal(old.backend.kind, 'cpu', 'R550: the CPU backend');
  t.match(old.backend.reason, /^CUDA driver 550\.54\.15 is older than this build needs \(580\+\)/);
  t.match(old.backend.cuda, { error: 35, errorName: 'cudaErrorInsufficientDriver', driverVersion: 12040, runtimeVersion: 13000, driverRelease: '550.54.15' });
  t.match(old.error, { name: 'XftError', code: 'XFT_DEVICE' }, "device 'cuda' asked for: an XftError");
  t.match(old.error?.message, /device 'cuda' is not available: CUDA driver 550\.54\.15 is older than this build needs \(580\+\)/);
  const info = child(r550, CLI, ['info']);
  t.match(info, /device: {2}CPU \(CUDA driver 550\.54\.15 is older than this build needs \(580\+\)/, 'xft info says why');
  t.match(info, /cuda: {4}driver 550\.54\.15 \(supports CUDA 12\.4\), runtime 13\.0, 0 device\(s\)/);

  const openModule = path.join(dir, 'open');
  fs.writeFileSync(openModule, 'NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (dvs-builder@U16-I3-B03-4-3)\n');
  t.match(run({ XFT_EMU_DRIVER_VERSION: '12080', XFT_EMU_NVIDIA_VERSION_FILE: openModule }).backend.reason, /^CUDA driver 570\.86\.15 is older/, 'the open kernel module line');

  const none = run({ XFT_EMU_DRIVER_VERSION: '0' });
  t.match(none.backend.reason, /^no NVIDIA driver was found/, 'no driver');
  const noGpu = run({ XFT_EMU_DEVICES: '0', XFT_EMU_NVIDIA_VERSION_FILE: proc });
  t.match(noGpu.backend.reason, /^no CUDA device was found: CUDA driver 550\.54\.15 is loaded but reports no GPU/, 'a driver without a GPU');

  const turing = run({ XFT_EMU_SM: '75' });
  t.equal(turing.backend.kind, 'cpu', 'sm_75: the CPU backend');
  t.match(turing.backend.reason, /^GPU 0 \(xft host emulation \(sm_75\)\) has compute capability 7\.5; xft's CUDA kernels need 8\.0 or newer/);
  t.match(turing.error, { code: 'XFT_DEVICE', message: /compute capability 7\.5/ });

  const ada = run({ XFT_EMU_SM: '89', XFT_EMU_SMEM_OPTIN: '101376' });
  t.equal(ada.backend.kind, 'cuda', 'sm_89: the CUDA backend');
  t.equal(ada.backend.maxSharedMemoryPerBlock, 101376, 'its opt-in shared memory per block reported');
  t.equal(ada.error, null, 'a CUDA tensor is made');
  t.equal(b.maxSharedMemoryPerBlock, Number(process.env.XFT_EMU_SMEM_OPTIN ?? 232448), 'this process: the emulated sm_90 (227 KiB) or XFT_EMU_SMEM_OPTIN');
});
