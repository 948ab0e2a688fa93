/**
 * Tensors: a shape, a dtype and a device over a block of native memory (host memory, or device
 * memory from the CUDA stream-ordered pool). Ops enqueue work and return at once; reading values
 * (`toArray`) waits for it. `dispose()` frees the memory and everything native at once (a tensor
 * holds only a number naming its block: no N-API reference or finalizer is left to wait for the event
 * loop); a FinalizationRegistry frees what was forgotten. Views made by `reshape` and `narrow` share
 * the memory: disposing any of them disposes all. Every entry point checks its arguments before it
 * allocates (lib/validate.ts).
 */
import * as os from 'node:os';
import { XftError, invalidArgument, describe } from './errors';
import { native, NativeStorage, NativeBackend } from './native';
import { cudaUnavailableReason } from './backend_reason';
import { expectArray, expectNumber, expectOptions, expectSeed } from './validate';

export type DType = 'f32' | 'bf16' | 'i32';
export type Device = 'cpu' | 'cuda';
export type Shape = readonly number[];

export const DTYPES: readonly DType[] = ['f32', 'bf16', 'i32'];
export const DEVICES: readonly Device[] = ['cpu', 'cuda'];
const DTYPE_CODE: Record<DType, number> = { f32: 0, bf16: 1, i32: 2 };
const DTYPE_BYTES: Record<DType, number> = { f32: 4, bf16: 2, i32: 4 };
const DEVICE_CODE: Record<Device, 0 | 1> = { cpu: 0, cuda: 1 };

export function dtypeCode(dtype: DType): number {
  return DTYPE_CODE[dtype];
}
export function dtypeBytes(dtype: DType): number {
  return DTYPE_BYTES[dtype];
}

export interface TensorOptions {
  dtype?: DType;
  device?: Device;
}

export interface RandomOptions extends TensorOptions {
  /** Seed of the counter-based generator; by default drawn from the global seed (see `manualSeed`). */
  seed?: number | bigint;
}

let defaultDeviceValue: Device = 'cpu';
/** The device tensors are created on when no device is given (initially 'cpu'). */
export function defaultDevice(): Device {
  return defaultDeviceValue;
}
export function setDefaultDevice(device: Device): void {
  checkDevice('setDefaultDevice', device);
  defaultDeviceValue = device;
}

let seedState = 0x5eedn;
/** Sets the global seed from which `randn`/`uniform` without an explicit seed draw theirs. */
export function manualSeed(seed: number | bigint): void {
  seedState = expectSeed('manualSeed', seed);
}
function nextSeed(): bigint {
  // splitmix64 step
  seedState = BigInt.asUintN(64, seedState + 0x9e3779b97f4a7c15n);
  let z = seedState;
  z = BigInt.asUintN(64, (z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n);
  z = BigInt.asUintN(64, (z ^ (z >> 27n)) * 0x94d049bb133111ebn);
  return z ^ (z >> 31n);
}

let backendCache: NativeBackend | undefined;
/** The compute backend: the GPU in use (name, compute capability, memory) or the CPU, with the reason. */
export function backend(): NativeBackend {
  const b = native.backend();
  if (b.kind === 'cpu' && b.cuda) b.reason = cudaUnavailableReason(b.cuda, b.reason ?? '');
  backendCache = b;
  return b;
}
/** Is the CUDA backend usable here? */
export function cudaAvailable(): boolean {
  return (backendCache ?? backend()).kind === 'cuda';
}

/** Allocation counters of the native layer: live tensors and bytes per device, and the CUDA pool. */
export function memoryStats() {
  return native.memoryStats();
}

/** Restarts the high-water marks of memoryStats() (hostPeakBytes, cudaPeakBytes) from the bytes live now. */
export function resetPeakMemory(): void {
  native.resetPeakMemory();
}

/** Waits for all queued device work. */
export function synchronize(): void {
  native.synchronize();
}

/** A seed (safe integer or bigint) as an unsigned 64-bit bigint, else XFT_TYPE naming it. */
export function seedOf(op: string, seed: unknown): bigint {
  return expectSeed(op, seed);
}

function checkDtype(op: string, dtype: unknown): asserts dtype is DType {
  if (!DTYPES.includes(dtype as DType)) throw invalidArgument(op, 'dtype', "one of 'f32', 'bf16', 'i32'", dtype, 'XFT_DTYPE');
}

function checkDevice(op: string, device: unknown): asserts device is Device {
  if (!DEVICES.includes(device as Device)) throw invalidArgument(op, 'device', "'cpu' or 'cuda'", device, 'XFT_DEVICE');
  if (device === 'cuda' && !cudaAvailable())
    throw new XftError(`${op}: device 'cuda' is not available: ${(backendCache ?? backend()).reason}`, 'XFT_DEVICE');
}

/** Most dimensions a tensor may have. */
export const MAX_RANK = 64;

function checkShape(op: string, shape: unknown, name = 'shape'): number[] {
  const what = `an array of at most ${MAX_RANK} non-negative integers`;
  if (!Array.isArray(shape) || shape.length > MAX_RANK) throw invalidArgument(op, name, what, shape, 'XFT_SHAPE');
  const dims = expectArray<unknown>(op, name, shape, what);
  if (!dims.every((d) => typeof d === 'number' && Number.isSafeInteger(d) && d >= 0)) throw invalidArgument(op, name, what, shape, 'XFT_SHAPE');
  return [...(dims as number[])];
}

/** Options { dtype?, device? } checked, with the defaults filled in. */
function tensorOptions(op: string, options: unknown): { dtype: DType; device: Device } {
  const o = expectOptions<TensorOptions>(op, options, 'an options object { dtype?, device? }');
  const dtype = o.dtype ?? 'f32';
  const device = o.device ?? defaultDevice();
  checkDtype(op, dtype);
  checkDevice(op, device);
  return { dtype, device };
}

/** Most elements one tensor may have (the kernels index rows and columns with 32-bit integers). */
export const MAX_TENSOR_ELEMENTS = 2 ** 31 - 1;

/** The most bytes one tensor may take: the memory of its device (no larger tensor can exist there). */
export function maxTensorBytes(device: Device): number {
  return device === 'cuda' ? (backendCache ?? backend()).totalMemory ?? 0 : os.totalmem();
}

/** Throws XFT_SHAPE (before anything is allocated) when a tensor of this size cannot fit on its device. */
function checkSize(op: string, shape: Shape, dtype: DType, device: Device): number {
  const numel = numelOf(shape);
  if (!(numel <= MAX_TENSOR_ELEMENTS))
    throw new XftError(`${op}: a ${dtype}${formatShape(shape)} tensor would have ${numel} elements, more than the ${MAX_TENSOR_ELEMENTS} a tensor may have`, 'XFT_SHAPE');
  const bytes = numel * DTYPE_BYTES[dtype];
  const limit = maxTensorBytes(device);
  if (!(bytes <= limit))
    throw new XftError(`${op}: a ${dtype}${formatShape(shape)} tensor needs ${bytes} bytes, more than the ${limit} bytes of memory of the ${device}`, 'XFT_SHAPE');
  return bytes;
}

/** An i32 value: an integer in the 32-bit range, else XFT_VALUE. */
function checkI32Value(op: string, name: string, v: number): void {
  if (!Number.isInteger(v) || v < -2147483648 || v > 2147483647) throw invalidArgument(op, name, 'a 32-bit integer for an i32 tensor', v, 'XFT_VALUE');
}

/** The JS owner of one native block: frees it on dispose(); the native finalizer frees it when forgotten. */
class Block {
  readonly handle: NativeStorage;
  #disposed = false;
  constructor(device: Device, bytes: number) {
    this.handle = native.alloc(DEVICE_CODE[device], bytes, this);
  }
  get disposed(): boolean {
    return this.#disposed;
  }
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    native.free(this.handle);
  }
}

export function numelOf(shape: Shape): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

export function formatShape(shape: Shape): string {
  return `[${shape.join(', ')}]`;
}

export class Tensor {
  readonly shape: Shape;
  readonly dtype: DType;
  readonly device: Device;
  /** Element offset of this tensor in its storage (views made by `narrow` start later). */
  readonly offset: number;
  readonly #block: Block;

  private constructor(block: Block, shape: Shape, dtype: DType, device: Device, offset = 0) {
    this.#block = block;
    this.shape = Object.freeze([...shape]);
    this.dtype = dtype;
    this.device = device;
    this.offset = offset;
  }

  /** Is `v` a tensor made by this library (not merely an object with Tensor.prototype)? */
  static isTensor(v: unknown): v is Tensor {
    return typeof v === 'object' && v !== null && #block in v;
  }

  /** A new tensor over a new block; the size was checked by the caller. */
  static #alloc(shape: number[], dtype: DType, device: Device): Tensor {
    return new Tensor(new Block(device, numelOf(shape) * DTYPE_BYTES[dtype]), shape, dtype, device);
  }

  // ---- creation ----

  /** An uninitialised tensor. */
  static empty(shape: Shape, options: TensorOptions = {}): Tensor {
    const op = 'Tensor.empty';
    const { dtype, device } = tensorOptions(op, options);
    const s = checkShape(op, shape);
    checkSize(op, s, dtype, device);
    return Tensor.#alloc(s, dtype, device);
  }

  /** A tensor holding `data` (flat, row-major): an array or typed array of numbers. bf16 values are rounded to nearest even. */
  static from(data: ArrayLike<number>, shape?: Shape, options: TensorOptions = {}): Tensor {
    const op = 'Tensor.from';
    const what = 'an array or typed array of numbers';
    if (data === null || typeof data !== 'object' || data instanceof DataView || data instanceof BigInt64Array || data instanceof BigUint64Array)
      throw invalidArgument(op, 'data', what, data, 'XFT_TYPE');
    const length = (data as ArrayLike<number>).length;
    if (typeof length !== 'number' || !Number.isSafeInteger(length) || length < 0)
      throw invalidArgument(op, 'data.length', `a non-negative integer (data must be ${what})`, length, 'XFT_TYPE');
    const { dtype, device } = tensorOptions(op, options);
    const s = shape === undefined ? [length] : checkShape(op, shape);
    if (numelOf(s) !== length)
      throw new XftError(`${op}: data has ${length} elements but shape ${formatShape(s)} needs ${numelOf(s)}`, 'XFT_SHAPE');
    checkSize(op, s, dtype, device);
    const typed = ArrayBuffer.isView(data);
    let host: Float32Array | Int32Array;
    if (dtype === 'i32') {
      if (data instanceof Int32Array) host = data;
      else {
        host = new Int32Array(length);
        for (let i = 0; i < length; i++) {
          const v = data[i];
          if (typeof v !== 'number') throw invalidArgument(op, `data[${i}]`, 'a number', v, 'XFT_TYPE');
          if (!Number.isInteger(v) || v < -2147483648 || v > 2147483647)
            throw invalidArgument(op, `data[${i}]`, 'a 32-bit integer for an i32 tensor', v, 'XFT_DTYPE');
          host[i] = v;
        }
      }
    } else if (data instanceof Float32Array) host = data;
    else {
      host = new Float32Array(length);
      for (let i = 0; i < length; i++) {
        const v = data[i];
        if (!typed && typeof v !== 'number') throw invalidArgument(op, `data[${i}]`, 'a number', v, 'XFT_TYPE');
        host[i] = v;
      }
    }
    const t = Tensor.#alloc(s, dtype, device);
    native.upload(t.#block.handle, DTYPE_CODE[dtype], host, 0);
    return t;
  }

  /** A tensor from its raw little-endian bytes (f32, bf16 bits, or i32), e.g. read from a checkpoint. */
  static fromBytes(bytes: Uint8Array, shape: Shape, options: TensorOptions = {}): Tensor {
    const op = 'Tensor.fromBytes';
    if (!(bytes instanceof Uint8Array)) throw invalidArgument(op, 'bytes', 'a Uint8Array', bytes, 'XFT_TYPE');
    const { dtype, device } = tensorOptions(op, options);
    const s = checkShape(op, shape);
    const need = numelOf(s) * DTYPE_BYTES[dtype];
    if (bytes.byteLength !== need)
      throw new XftError(`${op}: ${bytes.byteLength} bytes do not hold a ${dtype}${formatShape(s)} tensor (${need} bytes)`, 'XFT_SHAPE');
    checkSize(op, s, dtype, device);
    const t = Tensor.#alloc(s, dtype, device);
    native.uploadBytes(t.#block.handle, bytes, 0);
    return t;
  }

  /** Every element `value` (for i32: an integer in the 32-bit range). */
  static full(shape: Shape, value: number, options: TensorOptions = {}): Tensor {
    const op = 'Tensor.full';
    if (typeof value !== 'number') throw invalidArgument(op, 'value', 'a number', value, 'XFT_TYPE');
    const { dtype, device } = tensorOptions(op, options);
    if (dtype === 'i32') checkI32Value(op, 'value', value);
    const s = checkShape(op, shape);
    checkSize(op, s, dtype, device);
    const t = Tensor.#alloc(s, dtype, device);
    native.fillValue(t.#block.handle, DTYPE_CODE[dtype], t.numel, value);
    return t;
  }

  static zeros(shape: Shape, options: TensorOptions = {}): Tensor {
    return Tensor.full(shape, 0, options);
  }

  static ones(shape: Shape, options: TensorOptions = {}): Tensor {
    return Tensor.full(shape, 1, options);
  }

  /** Normal values, mean 0 and std 1 unless given; reproducible for a given seed on any device. f32 or bf16. */
  static randn(shape: Shape, options: RandomOptions & { mean?: number; std?: number } = {}): Tensor {
    const op = 'Tensor.randn';
    const o = expectOptions<RandomOptions & { mean?: number; std?: number }>(op, options, 'an options object { dtype?, device?, seed?, mean?, std? }');
    const { dtype, device } = tensorOptions(op, o);
    if (dtype === 'i32') throw invalidArgument(op, 'dtype', "'f32' or 'bf16' (normal values are not integers)", dtype, 'XFT_DTYPE');
    const mean = o.mean === undefined ? 0 : expectNumber(op, 'mean', o.mean);
    const std = o.std === undefined ? 1 : expectNumber(op, 'std', o.std, 'a finite number >= 0', (x) => x >= 0);
    const seed = o.seed === undefined ? undefined : seedOf(op, o.seed);
    const s = checkShape(op, shape);
    checkSize(op, s, dtype, device);
    const t = Tensor.#alloc(s, dtype, device);
    native.fillRandom(t.#block.handle, DTYPE_CODE[dtype], t.numel, 1, seed ?? nextSeed(), mean, std);
    return t;
  }

  /** Uniform values in [low, high), default [0, 1); for i32, integers in [low, high). */
  static uniform(shape: Shape, options: RandomOptions & { low?: number; high?: number } = {}): Tensor {
    const op = 'Tensor.uniform';
    const o = expectOptions<RandomOptions & { low?: number; high?: number }>(op, options, 'an options object { dtype?, device?, seed?, low?, high? }');
    const { dtype, device } = tensorOptions(op, o);
    const low = o.low === undefined ? 0 : expectNumber(op, 'low', o.low);
    const high = o.high === undefined ? 1 : expectNumber(op, 'high', o.high);
    if (!(high >= low)) throw invalidArgument(op, 'high', `a number >= low (${low})`, high);
    if (dtype === 'i32') {
      checkI32Value(op, 'low', low);
      checkI32Value(op, 'high', high);
      if (!(high > low)) throw invalidArgument(op, 'high', `an integer > low (${low}) for i32 values in [low, high)`, high);
    }
    const seed = o.seed === undefined ? undefined : seedOf(op, o.seed);
    const s = checkShape(op, shape);
    checkSize(op, s, dtype, device);
    const t = Tensor.#alloc(s, dtype, device);
    native.fillRandom(t.#block.handle, DTYPE_CODE[dtype], t.numel, 0, seed ?? nextSeed(), low, high);
    return t;
  }

  // ---- properties ----

  get numel(): number {
    Tensor.#self(this, 'numel');
    return numelOf(this.shape);
  }
  get rank(): number {
    Tensor.#self(this, 'rank');
    return this.shape.length;
  }
  get bytes(): number {
    Tensor.#self(this, 'bytes');
    return this.numel * DTYPE_BYTES[this.dtype];
  }
  get disposed(): boolean {
    return Tensor.#self(this, 'disposed').#block.disposed;
  }
  /** The native storage handle, for lib/ops*.ts; throws XFT_DISPOSED after dispose(). */
  get storage(): NativeStorage {
    const block = Tensor.#self(this, 'storage').#block;
    if (block.disposed) throw new XftError(`a ${this.describe()} tensor was used after dispose()`, 'XFT_DISPOSED');
    if (this.offset !== 0) throw new XftError('ops take whole tensors; this view starts inside its storage: clone() it', 'XFT_SHAPE');
    return block.handle;
  }

  /** The native storage handle and this tensor's element offset in it (views included), for lib/dist. */
  get storageView(): { storage: NativeStorage; offset: number } {
    const block = Tensor.#self(this, 'storageView').#block;
    if (block.disposed) throw new XftError(`a ${this.describe()} tensor was used after dispose()`, 'XFT_DISPOSED');
    return { storage: block.handle, offset: this.offset };
  }

  /** e.g. "f32[2, 3]@cpu". Never throws (error messages use it). */
  describe(): string {
    if (!Tensor.isTensor(this)) return 'an object that is not a Tensor made by xft';
    return `${this.dtype}${formatShape(this.shape)}@${this.device}`;
  }
  toString(): string {
    if (!Tensor.isTensor(this)) return 'Tensor(not a tensor made by xft)';
    return `Tensor(${this.describe()}${this.disposed ? ', disposed' : ''})`;
  }

  // ---- reading ----

  /** A host copy of the values: Float32Array for f32 and bf16, Int32Array for i32. Waits for queued work. */
  toArray(): Float32Array | Int32Array {
    Tensor.#live(this, 'toArray');
    return native.download(this.#block.handle, DTYPE_CODE[this.dtype], this.numel, this.offset);
  }

  /** The raw little-endian bytes of the values (bf16 as its 16-bit patterns). Waits for queued work. */
  toBytes(): Uint8Array {
    Tensor.#live(this, 'toBytes');
    return native.downloadBytes(this.#block.handle, this.bytes, this.offset * DTYPE_BYTES[this.dtype]);
  }

  /** The single value of a one-element tensor. */
  item(): number {
    Tensor.#live(this, 'item');
    if (this.numel !== 1) throw new XftError(`item: expected a tensor with one element, got ${this.describe()}`, 'XFT_SHAPE');
    return this.toArray()[0];
  }

  // ---- conversion and views ----

  /** A copy on `device` (always a new tensor, also when already there). */
  to(device: Device): Tensor {
    Tensor.#live(this, 'to');
    checkDevice('Tensor.to', device);
    const t = Tensor.empty(this.shape, { dtype: this.dtype, device });
    native.copy(t.#block.handle, this.#block.handle, this.bytes, 0, this.offset * DTYPE_BYTES[this.dtype]);
    return t;
  }

  clone(): Tensor {
    Tensor.#live(this, 'clone');
    return this.to(this.device);
  }

  /** A copy converted to `dtype` (bf16 rounds to nearest even, i32 truncates toward zero). */
  cast(dtype: DType): Tensor {
    Tensor.#live(this, 'cast');
    checkDtype('Tensor.cast', dtype);
    const t = Tensor.empty(this.shape, { dtype, device: this.device });
    const src = this.offset ? this.clone() : this;
    native.cast(t.#block.handle, DTYPE_CODE[dtype], src.#block.handle, DTYPE_CODE[this.dtype], this.numel);
    if (src !== this) src.dispose();
    return t;
  }

  /** A view with another shape over the same memory (one dimension may be -1). */
  reshape(shape: Shape): Tensor {
    const op = 'Tensor.reshape';
    Tensor.#live(this, 'reshape');
    const what = 'an array of integers >= 0 (one of them may be -1)';
    if (!Array.isArray(shape) || shape.length > MAX_RANK) throw invalidArgument(op, 'shape', what, shape, 'XFT_SHAPE');
    const dims = [...expectArray<number>(op, 'shape', shape, what)];
    if (!dims.every((d) => typeof d === 'number' && Number.isSafeInteger(d) && d >= -1) || dims.filter((d) => d === -1).length > 1)
      throw invalidArgument(op, 'shape', what, shape, 'XFT_SHAPE');
    const unknown = dims.indexOf(-1);
    if (unknown >= 0) {
      const rest = numelOf(dims.filter((_, i) => i !== unknown));
      dims[unknown] = rest === 0 ? 0 : this.numel / rest;
    }
    if (!dims.every((d) => Number.isSafeInteger(d)) || numelOf(dims) !== this.numel)
      throw new XftError(`reshape: cannot view ${this.describe()} as ${formatShape(shape)}`, 'XFT_SHAPE');
    return new Tensor(this.#block, dims, this.dtype, this.device, this.offset);
  }

  /** A view of rows [start, start + length) along the first dimension, over the same memory. */
  narrow(start: number, length: number): Tensor {
    Tensor.#live(this, 'narrow');
    if (this.rank < 1) throw new XftError(`narrow: a ${this.describe()} tensor has no rows`, 'XFT_SHAPE');
    const rows = this.shape[0];
    if (typeof start !== 'number' || typeof length !== 'number')
      throw invalidArgument('narrow', typeof start !== 'number' ? 'start' : 'length', 'an integer', typeof start !== 'number' ? start : length, 'XFT_TYPE');
    if (!Number.isSafeInteger(start) || !Number.isSafeInteger(length) || start < 0 || length < 0 || start + length > rows)
      throw new XftError(`narrow: rows [${start}, ${start}+${length}) out of range for ${this.describe()}`, 'XFT_SHAPE');
    const rowElems = numelOf(this.shape.slice(1));
    return new Tensor(this.#block, [length, ...this.shape.slice(1)], this.dtype, this.device, this.offset + start * rowElems);
  }

  /** Copies `src` (same dtype and element count, any device) into this tensor. */
  copy_(src: Tensor): this {
    Tensor.#live(this, 'copy_');
    if (!Tensor.isTensor(src)) throw invalidArgument('copy_', 'src', 'a Tensor', src, 'XFT_TYPE');
    Tensor.#live(src, 'copy_');
    if (src.dtype !== this.dtype || src.numel !== this.numel)
      throw new XftError(`copy_: cannot copy ${src.describe()} into ${this.describe()}`, 'XFT_SHAPE');
    native.copy(this.#block.handle, src.#block.handle, this.bytes, this.offset * DTYPE_BYTES[this.dtype], src.offset * DTYPE_BYTES[src.dtype]);
    return this;
  }

  /** Sets every element to `value` (for i32: an integer in the 32-bit range). */
  fill_(value: number): this {
    Tensor.#live(this, 'fill_');
    if (typeof value !== 'number') throw invalidArgument('fill_', 'value', 'a number', value, 'XFT_TYPE');
    if (this.dtype === 'i32') checkI32Value('fill_', 'value', value);
    if (this.offset !== 0) {
      const tmp = Tensor.full(this.shape, value, { dtype: this.dtype, device: this.device });
      this.copy_(tmp);
      tmp.dispose();
    } else native.fillValue(this.#block.handle, DTYPE_CODE[this.dtype], this.numel, value);
    return this;
  }

  /** Frees the memory now (all views of it too), with everything native that belongs to it. Idempotent. */
  dispose(): void {
    Tensor.#self(this, 'dispose').#block.dispose();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  /** `t` itself when it is a tensor made by this library (a method called on anything else: XFT_TYPE). */
  static #self(t: unknown, op: string): Tensor {
    if (!Tensor.isTensor(t)) throw invalidArgument(`Tensor.${op}`, 'this', 'a Tensor made by xft (Tensor.from, Tensor.zeros, an op, ...)', t, 'XFT_TYPE');
    return t;
  }

  static #live(t: unknown, op: string): void {
    const self = Tensor.#self(t, op);
    if (self.#block.disposed) throw new XftError(`${op}: a ${self.describe()} tensor was used after dispose()`, 'XFT_DISPOSED');
  }
}

/** Disposes every tensor found in the arguments (tensors, and arrays, Maps, Sets and plain objects of them, cycles allowed). */
export function disposeAll(...items: unknown[]): void {
  const seen = new Set<object>();
  const stack: unknown[] = [...items];
  while (stack.length) {
    const v = stack.pop();
    if (v === null || typeof v !== 'object' || seen.has(v)) continue;
    seen.add(v);
    if (Tensor.isTensor(v)) v.dispose();
    else if (Array.isArray(v)) {
      for (let i = 0; i < v.length; i++) stack.push(v[i]);
    } else if (v instanceof Map || v instanceof Set) for (const x of v.values()) stack.push(x);
    else if (Object.getPrototypeOf(v) === Object.prototype || Object.getPrototypeOf(v) === null) for (const x of Object.values(v)) stack.push(x);
  }
}

export { describe };
