/**
 * Tensors: a shape, a dtype and a device over a block of native memory (host memory, or device
 * memory from the CUDA stream-ordered pool). Ops enqueue work and return at once; reading values
 * (`toArray`) waits for it. `dispose()` frees the memory at once; a finalizer frees what was
 * forgotten. Views made by `reshape` share the memory: disposing any of them disposes all.
 */
import { XftError, invalidArgument, describe } from './errors';
import { native, NativeStorage, NativeBackend } from './native';

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
  seedState = BigInt.asUintN(64, BigInt(seed));
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
  if (typeof seed === 'bigint') return BigInt.asUintN(64, seed);
  if (typeof seed === 'number' && Number.isSafeInteger(seed)) return BigInt.asUintN(64, BigInt(seed));
  throw invalidArgument(op, 'seed', 'an integer or bigint', seed, 'XFT_TYPE');
}

function checkDtype(op: string, dtype: unknown): asserts dtype is DType {
  if (!DTYPES.includes(dtype as DType)) throw invalidArgument(op, 'dtype', "one of 'f32', 'bf16', 'i32'", dtype, 'XFT_DTYPE');
}

function checkDevice(op: string, device: unknown): asserts device is Device {
  if (!DEVICES.includes(device as Device)) throw invalidArgument(op, 'device', "'cpu' or 'cuda'", device, 'XFT_DEVICE');
  if (device === 'cuda' && !cudaAvailable())
    throw new XftError(`${op}: device 'cuda' is not available: ${(backendCache ?? backend()).reason}`, 'XFT_DEVICE');
}

function checkShape(op: string, shape: unknown): number[] {
  if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0))
    throw invalidArgument(op, 'shape', 'an array of non-negative integers', shape, 'XFT_SHAPE');
  return [...shape];
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
  readonly #storage: NativeStorage;

  private constructor(storage: NativeStorage, shape: Shape, dtype: DType, device: Device, offset = 0) {
    this.#storage = storage;
    this.shape = Object.freeze([...shape]);
    this.dtype = dtype;
    this.device = device;
    this.offset = offset;
  }

  // ---- creation ----

  /** An uninitialised tensor. */
  static empty(shape: Shape, options: TensorOptions = {}): Tensor {
    const s = checkShape('Tensor.empty', shape);
    const dtype = options.dtype ?? 'f32';
    const device = options.device ?? defaultDevice();
    checkDtype('Tensor.empty', dtype);
    checkDevice('Tensor.empty', device);
    const storage = new native.Storage(DEVICE_CODE[device], numelOf(s) * DTYPE_BYTES[dtype]);
    return new Tensor(storage, s, dtype, device);
  }

  /** A tensor holding `data` (flat, row-major). bf16 values are rounded to nearest even. */
  static from(data: ArrayLike<number>, shape?: Shape, options: TensorOptions = {}): Tensor {
    const op = 'Tensor.from';
    if (data === null || typeof data !== 'object' || typeof (data as ArrayLike<number>).length !== 'number')
      throw invalidArgument(op, 'data', 'an array or typed array of numbers', data, 'XFT_TYPE');
    const dtype = options.dtype ?? 'f32';
    checkDtype(op, dtype);
    const s = shape === undefined ? [data.length] : checkShape(op, shape);
    if (numelOf(s) !== data.length)
      throw new XftError(`${op}: data has ${data.length} elements but shape ${formatShape(s)} needs ${numelOf(s)}`, 'XFT_SHAPE');
    let host: Float32Array | Int32Array;
    if (dtype === 'i32') {
      if (data instanceof Int32Array) host = data;
      else {
        host = new Int32Array(data.length);
        for (let i = 0; i < data.length; i++) {
          const v = data[i];
          if (!Number.isInteger(v) || v < -2147483648 || v > 2147483647)
            throw invalidArgument(op, `data[${i}]`, 'a 32-bit integer for an i32 tensor', v, 'XFT_DTYPE');
          host[i] = v;
        }
      }
    } else {
      host = data instanceof Float32Array ? data : Float32Array.from(data);
    }
    const t = Tensor.empty(s, options);
    native.upload(t.#storage, DTYPE_CODE[dtype], host, 0);
    return t;
  }

  /** A tensor from its raw little-endian bytes (f32, bf16 bits, or i32), e.g. read from a checkpoint. */
  static fromBytes(bytes: Uint8Array, shape: Shape, options: TensorOptions = {}): Tensor {
    const op = 'Tensor.fromBytes';
    if (!(bytes instanceof Uint8Array)) throw invalidArgument(op, 'bytes', 'a Uint8Array', bytes, 'XFT_TYPE');
    const t = Tensor.empty(shape, options);
    if (bytes.byteLength !== t.bytes) {
      t.dispose();
      throw new XftError(`${op}: ${bytes.byteLength} bytes do not hold a ${t.dtype}${formatShape(shape)} tensor (${t.bytes} bytes)`, 'XFT_SHAPE');
    }
    native.uploadBytes(t.#storage, bytes, 0);
    return t;
  }

  static full(shape: Shape, value: number, options: TensorOptions = {}): Tensor {
    if (typeof value !== 'number') throw invalidArgument('Tensor.full', 'value', 'a number', value, 'XFT_TYPE');
    const t = Tensor.empty(shape, options);
    native.fillValue(t.#storage, DTYPE_CODE[t.dtype], t.numel, value);
    return t;
  }

  static zeros(shape: Shape, options: TensorOptions = {}): Tensor {
    return Tensor.full(shape, 0, options);
  }

  static ones(shape: Shape, options: TensorOptions = {}): Tensor {
    return Tensor.full(shape, 1, options);
  }

  /** Normal values, mean 0 and std 1 unless given; reproducible for a given seed on any device. */
  static randn(shape: Shape, options: RandomOptions & { mean?: number; std?: number } = {}): Tensor {
    const t = Tensor.empty(shape, options);
    native.fillRandom(t.#storage, DTYPE_CODE[t.dtype], t.numel, 1, Tensor.#seed('Tensor.randn', options.seed),
      options.mean ?? 0, options.std ?? 1);
    return t;
  }

  /** Uniform values in [low, high), default [0, 1); for i32, integers in [low, high). */
  static uniform(shape: Shape, options: RandomOptions & { low?: number; high?: number } = {}): Tensor {
    const low = options.low ?? 0, high = options.high ?? 1;
    if (!(high >= low)) throw invalidArgument('Tensor.uniform', 'high', `a number >= low (${low})`, high);
    const t = Tensor.empty(shape, options);
    native.fillRandom(t.#storage, DTYPE_CODE[t.dtype], t.numel, 0, Tensor.#seed('Tensor.uniform', options.seed), low, high);
    return t;
  }

  static #seed(op: string, seed: number | bigint | undefined): bigint {
    return seed === undefined ? nextSeed() : seedOf(op, seed);
  }

  // ---- properties ----

  get numel(): number {
    return numelOf(this.shape);
  }
  get rank(): number {
    return this.shape.length;
  }
  get bytes(): number {
    return this.numel * DTYPE_BYTES[this.dtype];
  }
  get disposed(): boolean {
    return this.#storage.disposed;
  }
  /** The native storage, for lib/ops.ts; throws XFT_DISPOSED after dispose(). */
  get storage(): NativeStorage {
    if (this.#storage.disposed) throw new XftError(`a ${this.describe()} tensor was used after dispose()`, 'XFT_DISPOSED');
    if (this.offset !== 0) throw new XftError('ops take whole tensors; this view starts inside its storage: clone() it', 'XFT_SHAPE');
    return this.#storage;
  }

  /** e.g. "f32[2, 3]@cpu" */
  describe(): string {
    return `${this.dtype}${formatShape(this.shape)}@${this.device}`;
  }
  toString(): string {
    return `Tensor(${this.describe()}${this.disposed ? ', disposed' : ''})`;
  }

  // ---- reading ----

  /** A host copy of the values: Float32Array for f32 and bf16, Int32Array for i32. Waits for queued work. */
  toArray(): Float32Array | Int32Array {
    this.#live('toArray');
    return native.download(this.#storage, DTYPE_CODE[this.dtype], this.numel, this.offset);
  }

  /** The raw little-endian bytes of the values (bf16 as its 16-bit patterns). Waits for queued work. */
  toBytes(): Uint8Array {
    this.#live('toBytes');
    return native.downloadBytes(this.#storage, this.bytes, this.offset * DTYPE_BYTES[this.dtype]);
  }

  /** The single value of a one-element tensor. */
  item(): number {
    if (this.numel !== 1) throw new XftError(`item: expected a tensor with one element, got ${this.describe()}`, 'XFT_SHAPE');
    return this.toArray()[0];
  }

  // ---- conversion and views ----

  /** A copy on `device` (always a new tensor, also when already there). */
  to(device: Device): Tensor {
    this.#live('to');
    checkDevice('Tensor.to', device);
    const t = Tensor.empty(this.shape, { dtype: this.dtype, device });
    native.copy(t.#storage, this.#storage, this.bytes, 0, this.offset * DTYPE_BYTES[this.dtype]);
    return t;
  }

  clone(): Tensor {
    return this.to(this.device);
  }

  /** A copy converted to `dtype` (bf16 rounds to nearest even, i32 truncates toward zero). */
  cast(dtype: DType): Tensor {
    this.#live('cast');
    checkDtype('Tensor.cast', dtype);
    const src = this.offset ? this.clone() : this;
    const t = Tensor.empty(this.shape, { dtype, device: this.device });
    native.cast(t.#storage, DTYPE_CODE[dtype], src.#storage, DTYPE_CODE[this.dtype], this.numel);
    if (src !== this) src.dispose();
    return t;
  }

  /** A view with another shape over the same memory (one dimension may be -1). */
  reshape(shape: Shape): Tensor {
    this.#live('reshape');
    const dims = [...shape];
    const unknown = dims.indexOf(-1);
    if (unknown >= 0) {
      const rest = numelOf(dims.filter((_, i) => i !== unknown));
      dims[unknown] = rest === 0 ? 0 : this.numel / rest;
    }
    const s = checkShape('Tensor.reshape', dims);
    if (numelOf(s) !== this.numel)
      throw new XftError(`reshape: cannot view ${this.describe()} as ${formatShape(shape)}`, 'XFT_SHAPE');
    return new Tensor(this.#storage, s, this.dtype, this.device, this.offset);
  }

  /** A view of rows [start, start + length) along the first dimension, over the same memory. */
  narrow(start: number, length: number): Tensor {
    this.#live('narrow');
    const rows = this.shape[0] ?? 0;
    if (!Number.isSafeInteger(start) || !Number.isSafeInteger(length) || start < 0 || length < 0 || start + length > rows)
      throw new XftError(`narrow: rows [${start}, ${start}+${length}) out of range for ${this.describe()}`, 'XFT_SHAPE');
    const rowElems = numelOf(this.shape.slice(1));
    return new Tensor(this.#storage, [length, ...this.shape.slice(1)], this.dtype, this.device, this.offset + start * rowElems);
  }

  /** Copies `src` (same dtype and element count, any device) into this tensor. */
  copy_(src: Tensor): this {
    this.#live('copy_');
    if (!(src instanceof Tensor)) throw invalidArgument('copy_', 'src', 'a Tensor', src, 'XFT_TYPE');
    src.#live('copy_');
    if (src.dtype !== this.dtype || src.numel !== this.numel)
      throw new XftError(`copy_: cannot copy ${src.describe()} into ${this.describe()}`, 'XFT_SHAPE');
    native.copy(this.#storage, src.#storage, this.bytes, this.offset * DTYPE_BYTES[this.dtype], src.offset * DTYPE_BYTES[src.dtype]);
    return this;
  }

  /** Sets every element to `value`. */
  fill_(value: number): this {
    this.#live('fill_');
    if (this.offset !== 0) {
      const tmp = Tensor.full(this.shape, value, { dtype: this.dtype, device: this.device });
      this.copy_(tmp);
      tmp.dispose();
    } else native.fillValue(this.#storage, DTYPE_CODE[this.dtype], this.numel, value);
    return this;
  }

  /** Frees the memory now (all views of it too). Idempotent. */
  dispose(): void {
    this.#storage.dispose();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  #live(op: string): void {
    if (this.#storage.disposed) throw new XftError(`${op}: a ${this.describe()} tensor was used after dispose()`, 'XFT_DISPOSED');
  }
}

/** Disposes every tensor found in the arguments (tensors, arrays and plain objects of them). */
export function disposeAll(...items: unknown[]): void {
  const visit = (v: unknown): void => {
    if (v instanceof Tensor) v.dispose();
    else if (Array.isArray(v)) v.forEach(visit);
    else if (v && typeof v === 'object' && Object.getPrototypeOf(v) === Object.prototype) Object.values(v).forEach(visit);
  };
  items.forEach(visit);
}

export { describe };
