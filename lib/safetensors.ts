/**
 * safetensors, read and written tensor by tensor (peak memory: one tensor), single files and
 * Hugging Face shards (`model.safetensors.index.json`). Writes are atomic: a file (or a whole
 * checkpoint folder, lib/folder.ts) is written under a temporary name and renamed into place when
 * complete; a float tensor holding NaN or ±Inf is never written. Headers are checked as the format
 * requires (known dtypes, offsets that hold their shape, inside the file, no overlaps).
 * Format: u64 little-endian header length N, N bytes of JSON
 * `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then the data.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { XftError, describe } from './errors';
import { Tensor, type DType, type Device, formatShape, numelOf } from './tensor';
import { recoverFolder, temporaryName as tempName, writeFileAtomic } from './folder';

export { writeFileAtomic, writeFolderAtomic } from './folder';

export type FileDType = 'F32' | 'BF16' | 'F16' | 'I32' | 'I64' | 'F64' | 'U8' | 'I8' | 'BOOL' | 'I16' | 'U16';
const FILE_DTYPE_BYTES: Record<FileDType, number> = { F64: 8, I64: 8, F32: 4, I32: 4, BF16: 2, F16: 2, I16: 2, U16: 2, U8: 1, I8: 1, BOOL: 1 };
/** The file dtypes xft reads into tensors. */
export const READABLE: readonly FileDType[] = ['F32', 'BF16', 'F16', 'I32'];
const TENSOR_TO_FILE: Record<DType, FileDType> = { f32: 'F32', bf16: 'BF16', i32: 'I32' };

export interface TensorInfo {
  name: string;
  dtype: FileDType;
  shape: number[];
  /** absolute byte offset of the data in its file */
  offset: number;
  bytes: number;
  file: string;
}

const MAX_HEADER = 100 * 2 ** 20;

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
const isCount = (v: unknown): v is number => Number.isSafeInteger(v) && (v as number) >= 0;

/**
 * Reads the header of one safetensors file and checks what the format requires: a JSON object of
 * entries with a known dtype, a shape of non-negative integers and data offsets [begin, end] that
 * hold exactly the shape's bytes, inside the file, with no two tensors overlapping.
 */
export function readHeader(file: string): { tensors: TensorInfo[]; metadata: Record<string, string> } {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new XftError(`cannot open ${file}: ${(err as Error).message}`, code === 'EISDIR' ? 'XFT_FORMAT' : 'XFT_IO');
  }
  try {
    const stat = fs.fstatSync(fd);
    if (!stat.isFile()) throw new XftError(`${file}: not a safetensors file (${stat.isDirectory() ? 'a folder' : 'not a regular file'})`, 'XFT_FORMAT');
    const size = stat.size;
    const lenBuf = Buffer.alloc(8);
    if (size < 8 || fs.readSync(fd, lenBuf, 0, 8, 0) !== 8) throw new XftError(`${file}: not a safetensors file (shorter than 8 bytes)`, 'XFT_FORMAT');
    const n = Number(lenBuf.readBigUInt64LE(0));
    if (n > MAX_HEADER || 8 + n > size) throw new XftError(`${file}: not a safetensors file (header length ${n} does not fit in ${size} bytes)`, 'XFT_FORMAT');
    const hb = Buffer.alloc(n);
    if (fs.readSync(fd, hb, 0, n, 8) !== n) throw new XftError(`${file}: the safetensors header is truncated`, 'XFT_FORMAT');
    let header: unknown;
    try {
      header = JSON.parse(hb.toString('utf8'));
    } catch (err) {
      throw new XftError(`${file}: the safetensors header is not valid JSON (${(err as Error).message})`, 'XFT_FORMAT');
    }
    if (!isObject(header)) throw new XftError(`${file}: the safetensors header is ${describe(header)}, expected a JSON object of tensors`, 'XFT_FORMAT');
    const base = 8 + n;
    const tensors: TensorInfo[] = [];
    let metadata: Record<string, string> = {};
    const bad = (name: string, v: unknown, why: string) =>
      new XftError(`${file}: tensor ${JSON.stringify(name)} has a malformed header entry ${JSON.stringify(v)?.slice(0, 200)} (${why})`, 'XFT_FORMAT');
    for (const [name, v] of Object.entries(header)) {
      if (name === '__metadata__') {
        if (v !== null && !isObject(v)) throw new XftError(`${file}: __metadata__ is ${describe(v)}, expected an object of strings`, 'XFT_FORMAT');
        metadata = (v ?? {}) as Record<string, string>;
        continue;
      }
      if (!isObject(v)) throw bad(name, v, 'not an object');
      const { dtype, shape, data_offsets: offsets } = v;
      if (typeof dtype !== 'string' || !(dtype in FILE_DTYPE_BYTES)) throw bad(name, v, `unknown dtype; expected one of ${Object.keys(FILE_DTYPE_BYTES).join(', ')}`);
      if (!Array.isArray(shape) || !shape.every(isCount)) throw bad(name, v, 'shape is not a list of non-negative integers');
      if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isCount) || offsets[0] > offsets[1])
        throw bad(name, v, 'data_offsets is not [begin, end] with 0 <= begin <= end');
      const [b, end] = offsets as [number, number];
      const bytes = numelOf(shape) * FILE_DTYPE_BYTES[dtype as FileDType];
      if (end - b !== bytes)
        throw new XftError(`${file}: tensor ${name} (${dtype}${formatShape(shape)}, ${bytes} bytes) has data offsets [${b}, ${end}] of ${end - b} bytes`, 'XFT_FORMAT');
      if (base + end > size)
        throw new XftError(`${file}: tensor ${name} has data offsets [${b}, ${end}] past the end of the file (${size - base} bytes of data)`, 'XFT_FORMAT');
      tensors.push({ name, dtype: dtype as FileDType, shape: shape as number[], offset: base + b, bytes, file });
    }
    const sorted = [...tensors].sort((x, y) => x.offset - y.offset || x.bytes - y.bytes);
    for (let i = 1; i < sorted.length; i++) {
      const prev = sorted[i - 1], cur = sorted[i];
      if (cur.bytes > 0 && prev.bytes > 0 && cur.offset < prev.offset + prev.bytes)
        throw new XftError(`${file}: tensors ${prev.name} and ${cur.name} overlap in data_offsets (the format forbids it)`, 'XFT_FORMAT');
    }
    return { tensors, metadata };
  } catch (err) {
    if (err instanceof XftError) throw err;
    throw new XftError(`cannot read ${file}: ${(err as Error).message}`, 'XFT_IO');
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Index of the first NaN or ±Inf element in `raw`, bytes of file dtype `dtype` (-1: none; always
 * -1 for integer dtypes). Reads the exponent bits only, so it costs about one pass over the bytes.
 */
export function firstNonFinite(raw: Uint8Array, dtype: FileDType): number {
  const dv = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
  if (dtype === 'F32') {
    const n = raw.byteLength >> 2;
    if (raw.byteOffset % 4 === 0) {
      const u = new Uint32Array(raw.buffer, raw.byteOffset, n);
      for (let i = 0; i < n; i++) if ((u[i] & 0x7f800000) === 0x7f800000) return i;
      return -1;
    }
    for (let i = 0; i < n; i++) if ((dv.getUint32(i * 4, true) & 0x7f800000) === 0x7f800000) return i;
    return -1;
  }
  if (dtype === 'BF16' || dtype === 'F16') {
    const mask = dtype === 'BF16' ? 0x7f80 : 0x7c00, n = raw.byteLength >> 1;
    if (raw.byteOffset % 2 === 0) {
      const u = new Uint16Array(raw.buffer, raw.byteOffset, n);
      for (let i = 0; i < n; i++) if ((u[i] & mask) === mask) return i;
      return -1;
    }
    for (let i = 0; i < n; i++) if ((dv.getUint16(i * 2, true) & mask) === mask) return i;
    return -1;
  }
  if (dtype === 'F64') {
    for (let i = 0; i < raw.byteLength >> 3; i++) if (!Number.isFinite(dv.getFloat64(i * 8, true))) return i;
  }
  return -1;
}

// ---- host dtype conversion ----

function f16ToF32(h: number): number {
  const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

const f32Scratch = new Float32Array(1), u32Scratch = new Uint32Array(f32Scratch.buffer);
/** f32 -> f16 bits, round to nearest even. */
function f32ToF16(v: number): number {
  f32Scratch[0] = v;
  const x = u32Scratch[0];
  const sign = (x >>> 16) & 0x8000, exp = (x >>> 23) & 0xff, mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  const e = exp - 127 + 15;
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    const m = mant | 0x800000, shift = 14 - e;
    let r = m >>> shift;
    const rem = m & ((1 << shift) - 1), half = 1 << (shift - 1);
    if (rem > half || (rem === half && r & 1)) r++;
    return sign | r;
  }
  let r = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && r & 1)) r++;
  return sign | r;
}

/** Raw file bytes of a float dtype to f32 values (into `out` when given: its first values). */
export function bytesToF32(raw: Uint8Array, from: FileDType, name = 'tensor', out?: Float32Array): Float32Array {
  const dv = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
  const size = from === 'F32' ? 4 : 2, n = raw.byteLength / size;
  if (out && out.length < n) throw new XftError(`bytesToF32: ${n} values do not fit an output of ${out.length}`, 'XFT_SHAPE');
  if (from === 'F32') {
    if (!out && raw.byteOffset % 4 === 0) return new Float32Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength));
    const f = out ? out.subarray(0, n) : new Float32Array(n);
    for (let i = 0; i < n; i++) f[i] = dv.getFloat32(i * 4, true);
    return f;
  }
  const f = out ? out.subarray(0, n) : new Float32Array(n);
  if (from === 'BF16') {
    const u = new Uint32Array(f.buffer, f.byteOffset, f.length);
    for (let i = 0; i < f.length; i++) u[i] = dv.getUint16(i * 2, true) << 16;
  } else if (from === 'F16') for (let i = 0; i < f.length; i++) f[i] = f16ToF32(dv.getUint16(i * 2, true));
  else throw new XftError(`cannot read ${name}: dtype ${from} is not a float dtype (expected F32, BF16 or F16)`, 'XFT_DTYPE');
  return f;
}

/** f32 values to file bytes of a float dtype (bf16 and f16 round to nearest even). */
export function f32ToBytes(f: Float32Array, to: FileDType): Uint8Array {
  if (to === 'F32') return new Uint8Array(f.buffer.slice(f.byteOffset, f.byteOffset + f.byteLength));
  const out = new Uint8Array(f.length * 2), dv = new DataView(out.buffer);
  if (to === 'BF16') {
    const u = new Uint32Array(f.buffer, f.byteOffset, f.length);
    for (let i = 0; i < f.length; i++) {
      const x = u[i];
      // NaN stays a (quiet) NaN; otherwise round to nearest even on the upper 16 bits
      const h = (x & 0x7fffffff) > 0x7f800000 ? (x >>> 16) | 0x40 : (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
      dv.setUint16(i * 2, h & 0xffff, true);
    }
  } else if (to === 'F16') for (let i = 0; i < f.length; i++) dv.setUint16(i * 2, f32ToF16(f[i]), true);
  else throw new XftError(`cannot write f32 values as ${to} (expected F32, BF16 or F16)`, 'XFT_DTYPE');
  return out;
}

/** Raw file bytes of `dtype` to a Tensor of `target` dtype on `device`. */
function bytesToTensor(raw: Uint8Array, from: FileDType, shape: number[], target: DType, device: Device, name: string): Tensor {
  if (TENSOR_TO_FILE[target] === from) return Tensor.fromBytes(raw, shape, { dtype: target, device });
  if (target === 'i32' || from === 'I32')
    throw new XftError(`cannot read ${name}: a ${from} tensor into ${target}`, 'XFT_DTYPE');
  if (from !== 'F32' && from !== 'BF16' && from !== 'F16')
    throw new XftError(`cannot read ${name}: dtype ${from} is not supported (expected one of ${READABLE.join(', ')})`, 'XFT_DTYPE');
  return Tensor.from(bytesToF32(raw, from, name), shape, { dtype: target, device });
}

/** A tensor's bytes in the file dtype `to`. */
function tensorToBytes(t: Tensor, to: FileDType): Uint8Array {
  if (TENSOR_TO_FILE[t.dtype] === to) return t.toBytes();
  if (to === 'F16' && t.dtype !== 'i32') {
    const v = t.toArray(), out = new Uint8Array(v.length * 2), dv = new DataView(out.buffer);
    for (let i = 0; i < v.length; i++) dv.setUint16(i * 2, f32ToF16(v[i]), true);
    return out;
  }
  if ((to === 'F32' || to === 'BF16') && t.dtype !== 'i32') {
    const c = t.cast(to === 'F32' ? 'f32' : 'bf16');
    const b = c.toBytes();
    c.dispose();
    return b;
  }
  throw new XftError(`cannot write a ${t.dtype} tensor as ${to}`, 'XFT_DTYPE');
}

// ---- reading ----

/** A safetensors checkpoint: one file, or a folder / index of shards. Reads tensor by tensor. */
export class SafetensorsReader {
  readonly tensors = new Map<string, TensorInfo>();
  readonly metadata: Record<string, string> = {};

  /** `source`: a .safetensors file, a model.safetensors.index.json, or a folder holding either. */
  constructor(readonly source: string) {
    let file = source;
    recoverFolder(source);
    if (fs.existsSync(source) && fs.statSync(source).isDirectory()) {
      const index = path.join(source, 'model.safetensors.index.json');
      const single = path.join(source, 'model.safetensors');
      if (fs.existsSync(index)) file = index;
      else if (fs.existsSync(single)) file = single;
      else throw new XftError(`${source}: no model.safetensors or model.safetensors.index.json in this folder`, 'XFT_IO');
    }
    if (file.endsWith('.index.json')) {
      let index: unknown;
      try {
        index = JSON.parse(fs.readFileSync(file, 'utf8'));
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        throw new XftError(`${file}: cannot read the shard index (${(err as Error).message})`, code === 'ENOENT' || code === 'EACCES' ? 'XFT_IO' : 'XFT_FORMAT');
      }
      if (!isObject(index) || !isObject(index.weight_map))
        throw new XftError(`${file}: the shard index has no weight_map object (received ${describe(isObject(index) ? index.weight_map : index)})`, 'XFT_FORMAT');
      const map = index.weight_map;
      for (const [name, shard] of Object.entries(map))
        if (typeof shard !== 'string' || shard === '' || path.isAbsolute(shard))
          throw new XftError(`${file}: weight_map maps ${name} to ${describe(shard)}; expected the file name of a shard`, 'XFT_FORMAT');
      const shards = [...new Set(Object.values(map) as string[])];
      for (const shard of shards) this.#add(readHeader(path.join(path.dirname(file), shard)));
      for (const name of Object.keys(map))
        if (!this.tensors.has(name)) throw new XftError(`${file}: ${name} is listed in the index but missing from ${map[name]}`, 'XFT_FORMAT');
    } else {
      this.#add(readHeader(file));
    }
  }

  #add(h: { tensors: TensorInfo[]; metadata: Record<string, string> }) {
    for (const t of h.tensors) this.tensors.set(t.name, t);
    Object.assign(this.metadata, h.metadata);
  }

  names(): string[] {
    return [...this.tensors.keys()];
  }

  has(name: string): boolean {
    return this.tensors.has(name);
  }

  info(name: string): TensorInfo {
    const info = this.tensors.get(name);
    if (!info) throw new XftError(`${this.source}: no tensor named ${name}`, 'XFT_FORMAT');
    return info;
  }

  /** The raw bytes of one tensor. */
  readBytes(name: string): Uint8Array {
    return this.readRange(name, 0, this.info(name).bytes);
  }

  /** Raw bytes [begin, end) of one tensor's data. */
  readRange(name: string, begin: number, end: number, into?: Uint8Array): Uint8Array {
    const info = this.info(name);
    if (!(begin >= 0 && end >= begin && end <= info.bytes)) throw new XftError(`${this.source}: byte range [${begin}, ${end}) outside ${name} (${info.bytes} bytes)`, 'XFT_VALUE');
    if (into && into.length < end - begin) throw new XftError(`readRange: ${end - begin} bytes do not fit a buffer of ${into.length}`, 'XFT_SHAPE');
    const buf = into ? into.subarray(0, end - begin) : new Uint8Array(end - begin);
    const fd = fs.openSync(info.file, 'r');
    try {
      let done = 0;
      while (done < buf.length) {
        const n = fs.readSync(fd, buf, done, Math.min(buf.length - done, 1 << 30), info.offset + begin + done);
        if (n <= 0) throw new XftError(`${info.file}: unexpected end of file reading ${name}`, 'XFT_FORMAT');
        done += n;
      }
    } finally {
      fs.closeSync(fd);
    }
    return buf;
  }

  /**
   * Elements [start, start + count) of a float tensor (flattened, row-major) as f32 values; with
   * `scratch` (bytes) and `out` (values) buffers, nothing is allocated (the result is a view of out).
   */
  readF32(name: string, start = 0, count?: number, buffers: { scratch?: Uint8Array; out?: Float32Array } = {}): Float32Array {
    const info = this.info(name), size = FILE_DTYPE_BYTES[info.dtype], n = numelOf(info.shape);
    const c = count ?? n - start;
    return bytesToF32(this.readRange(name, start * size, (start + c) * size, buffers.scratch), info.dtype, name, buffers.out);
  }

  /**
   * One tensor, converted to `dtype` (default: f32 for floats, i32 for I32) on `device`. With
   * `finite`, a tensor holding NaN or ±Inf is an error (XFT_FORMAT naming the file and tensor).
   */
  read(name: string, options: { dtype?: DType; device?: Device; shape?: readonly number[]; finite?: boolean } = {}): Tensor {
    const info = this.info(name);
    if (options.shape && formatShape(options.shape) !== formatShape(info.shape))
      throw new XftError(`${this.source}: ${name} has shape ${formatShape(info.shape)}, expected ${formatShape(options.shape)}`, 'XFT_SHAPE');
    const dtype = options.dtype ?? (info.dtype === 'I32' ? 'i32' : 'f32');
    const raw = this.readBytes(name);
    if (options.finite) {
      const at = firstNonFinite(raw, info.dtype);
      if (at >= 0) throw new XftError(`${info.file}: ${name} holds a non-finite value (NaN or ±Inf) at element ${at}; the checkpoint is unusable`, 'XFT_FORMAT');
    }
    return bytesToTensor(raw, info.dtype, info.shape, dtype, options.device ?? 'cpu', name);
  }
}

// ---- writing ----

/** One entry to write: its name, file dtype and shape, and a function producing its tensor (called once, in order). */
export interface WriteEntry {
  name: string;
  dtype: FileDType;
  shape: readonly number[];
  /** produces the tensor; it is disposed after writing when `dispose` is true */
  tensor?: () => Tensor;
  /** or produces the bytes, already in the file dtype (whole, or in chunks) */
  bytes?: () => Uint8Array | Iterable<Uint8Array>;
  /** called once the entry is written */
  after?: () => void;
  dispose?: boolean;
}

export interface WriteOptions {
  /** write NaN and ±Inf values too (default false: a non-finite value is an XFT_NONFINITE error and nothing is written) */
  allowNonFinite?: boolean;
}

/**
 * Writes one safetensors file atomically, producing and writing one tensor at a time. A float
 * tensor holding NaN or ±Inf (after conversion to the file dtype) stops the write with
 * XFT_NONFINITE, unless `allowNonFinite`: what was at `file` before stays as it was.
 */
export function writeSafetensors(file: string, entries: WriteEntry[], metadata: Record<string, string> = {}, options: WriteOptions = {}): void {
  const header: Record<string, unknown> = {};
  if (Object.keys(metadata).length) header.__metadata__ = metadata;
  let offset = 0;
  for (const e of entries) {
    if (!(e.dtype in FILE_DTYPE_BYTES)) throw new XftError(`writeSafetensors: unknown dtype ${e.dtype} for ${e.name}`, 'XFT_DTYPE');
    const bytes = numelOf(e.shape) * FILE_DTYPE_BYTES[e.dtype];
    header[e.name] = { dtype: e.dtype, shape: [...e.shape], data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = Buffer.from(JSON.stringify(header), 'utf8');
  const pad = (8 - (json.length % 8)) % 8; // data starts 8-byte aligned
  if (pad) json = Buffer.concat([json, Buffer.alloc(pad, 0x20)]);
  const tmp = tempName(file);
  let fd = -1;
  try {
    fd = fs.openSync(tmp, 'w');
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(json.length));
    fs.writeSync(fd, len);
    fs.writeSync(fd, json);
    // `first`: the element index of bytes[0] within the entry
    const checked = (e: WriteEntry, bytes: Uint8Array, first: number) => {
      const at = options.allowNonFinite ? -1 : firstNonFinite(bytes, e.dtype);
      if (at >= 0)
        throw new XftError(`writeSafetensors: ${e.name} holds a non-finite value (NaN or ±Inf) at element ${first + at} as ${e.dtype}; not writing ${file}`, 'XFT_NONFINITE');
      return bytes;
    };
    const write = (bytes: Uint8Array) => {
      let done = 0;
      while (done < bytes.length) done += fs.writeSync(fd, bytes, done, Math.min(bytes.length - done, 1 << 30));
    };
    for (const e of entries) {
      if (e.bytes) {
        const out = e.bytes(), want = numelOf(e.shape) * FILE_DTYPE_BYTES[e.dtype];
        let got = 0;
        for (const chunk of out instanceof Uint8Array ? [out] : out) {
          const first = got / FILE_DTYPE_BYTES[e.dtype];
          got += chunk.length;
          if (got > want) break;
          write(checked(e, chunk, first));
        }
        if (got !== want) throw new XftError(`writeSafetensors: ${e.name} was declared ${e.dtype}${formatShape(e.shape)} (${want} bytes) but produced ${got} bytes`, 'XFT_SHAPE');
        e.after?.();
        continue;
      }
      if (!e.tensor) throw new XftError(`writeSafetensors: ${e.name} has neither tensor nor bytes`, 'XFT_VALUE');
      const t = e.tensor();
      try {
        if (formatShape(t.shape) !== formatShape(e.shape))
          throw new XftError(`writeSafetensors: ${e.name} was declared ${formatShape(e.shape)} but is ${t.describe()}`, 'XFT_SHAPE');
        write(checked(e, tensorToBytes(t, e.dtype), 0));
      } finally {
        if (e.dispose) t.dispose();
      }
      e.after?.();
    }
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fd = -1;
    fs.renameSync(tmp, file);
  } catch (err) {
    if (fd >= 0) fs.closeSync(fd);
    fs.rmSync(tmp, { force: true });
    if (err instanceof XftError) throw err;
    throw new XftError(`cannot write ${file}: ${(err as Error).message}`, 'XFT_IO');
  }
}

/**
 * Writes `entries` as `model.safetensors` into `dir`, or as shards of at most `maxShardBytes`
 * (`model-00001-of-0000N.safetensors` + `model.safetensors.index.json`, the Hugging Face layout).
 */
export function writeShards(dir: string, entries: WriteEntry[], options: { maxShardBytes?: number; metadata?: Record<string, string> } & WriteOptions = {}): string[] {
  const max = options.maxShardBytes ?? 5 * 2 ** 30;
  const shards: WriteEntry[][] = [[]];
  let size = 0, total = 0;
  for (const e of entries) {
    const b = numelOf(e.shape) * FILE_DTYPE_BYTES[e.dtype];
    if (size > 0 && size + b > max) {
      shards.push([]);
      size = 0;
    }
    shards[shards.length - 1].push(e);
    size += b;
    total += b;
  }
  const metadata = { format: 'pt', ...(options.metadata ?? {}) };
  if (shards.length === 1) {
    writeSafetensors(path.join(dir, 'model.safetensors'), shards[0], metadata, options);
    return ['model.safetensors'];
  }
  const names = shards.map((_, i) => `model-${String(i + 1).padStart(5, '0')}-of-${String(shards.length).padStart(5, '0')}.safetensors`);
  const weightMap: Record<string, string> = {};
  shards.forEach((s, i) => {
    writeSafetensors(path.join(dir, names[i]), s, metadata, options);
    for (const e of s) weightMap[e.name] = names[i];
  });
  writeFileAtomic(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: { total_size: total }, weight_map: weightMap }, null, 2));
  return [...names, 'model.safetensors.index.json'];
}

/** Bytes per element of a file dtype. */
export function dtypeBytes(dtype: FileDType): number {
  return FILE_DTYPE_BYTES[dtype];
}

/** The file dtype for a tensor dtype. */
export function fileDtype(dtype: DType): FileDType {
  return TENSOR_TO_FILE[dtype];
}

export const _internal = { f16ToF32, f32ToF16 };
