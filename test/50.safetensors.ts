// safetensors: byte-exact format, dtype conversions, shards, atomic writes, malformed files (header
// lies, overlapping offsets, null indexes), non-finite values never written.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { Tensor, XftError } from '../lib/index';
import { SafetensorsReader, readHeader, writeSafetensors, writeShards, writeFolderAtomic, firstNonFinite, _internal } from '../lib/safetensors';
import { roundBf16, rng } from './helpers/ref';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-st-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** A safetensors file built by hand from the spec, independent of the writer. */
function handMade(entries: { name: string; dtype: string; shape: number[]; data: Buffer }[]): Buffer {
  const header: Record<string, unknown> = {};
  let off = 0;
  for (const e of entries) {
    header[e.name] = { dtype: e.dtype, shape: e.shape, data_offsets: [off, off + e.data.length] };
    off += e.data.length;
  }
  const json = Buffer.from(JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  return Buffer.concat([len, json, ...entries.map((e) => e.data)]);
}

t.test('reads a file written by the spec, with conversions', async (t) => {
  const f32 = Buffer.alloc(24), bf16 = Buffer.alloc(8), f16 = Buffer.alloc(8), i32 = Buffer.alloc(8);
  [1.5, -2, 3.25, 0, 1e-3, 7].forEach((v, i) => f32.writeFloatLE(v, i * 4));
  [0x3fc0, 0xc000, 0x7f80, 0x0000].forEach((v, i) => bf16.writeUInt16LE(v, i * 2)); // 1.5, -2, inf, 0
  [0x3e00, 0xc000, 0x7bff, 0x0001].forEach((v, i) => f16.writeUInt16LE(v, i * 2)); // 1.5, -2, 65504, 2^-24
  i32.writeInt32LE(-5, 0);
  i32.writeInt32LE(123456789, 4);
  const file = path.join(tmp, 'hand.safetensors');
  fs.writeFileSync(file, handMade([
    { name: 'a', dtype: 'F32', shape: [2, 3], data: f32 },
    { name: 'b', dtype: 'BF16', shape: [4], data: bf16 },
    { name: 'c', dtype: 'F16', shape: [2, 2], data: f16 },
    { name: 'd', dtype: 'I32', shape: [2], data: i32 },
  ]));
  const r = new SafetensorsReader(file);
  t.same(r.names().sort(), ['a', 'b', 'c', 'd']);
  t.same(Array.from(r.read('a').toArray()), [1.5, -2, 3.25, 0, Math.fround(1e-3), 7]);
  t.same(r.read('a').shape, [2, 3]);
  t.same(Array.from(r.read('b').toArray()), [1.5, -2, Infinity, 0]);
  t.same(Array.from(r.read('b', { dtype: 'bf16' }).toArray()), [1.5, -2, Infinity, 0], 'BF16 into a bf16 tensor, bits kept');
  t.same(Array.from(r.read('c').toArray()), [1.5, -2, 65504, 2 ** -24], 'F16 widened exactly');
  t.same(Array.from(r.read('d').toArray()), [-5, 123456789]);
  try {
    r.read('zzz');
    t.fail('missing tensor');
  } catch (err) {
    t.equal((err as XftError).code, 'XFT_FORMAT');
  }
});

t.test('write then read back: f32, bf16, f16, i32', async (t) => {
  const R = rng(3);
  const values = Float32Array.from(R.array(1000, 10));
  const a = Tensor.from(values, [10, 100]);
  const ids = Tensor.from([1, 2, 3, -4], [4], { dtype: 'i32' });
  const file = path.join(tmp, 'rt.safetensors');
  writeSafetensors(file, [
    { name: 'x.f32', dtype: 'F32', shape: [10, 100], tensor: () => a },
    { name: 'x.bf16', dtype: 'BF16', shape: [10, 100], tensor: () => a },
    { name: 'x.f16', dtype: 'F16', shape: [10, 100], tensor: () => a },
    { name: 'ids', dtype: 'I32', shape: [4], tensor: () => ids },
  ], { source: 'xft test' });
  const r = new SafetensorsReader(file);
  t.equal(r.metadata.source, 'xft test');
  t.same(r.read('x.f32').toArray(), values);
  t.same(Array.from(r.read('x.bf16').toArray()), Array.from(values, roundBf16));
  const back16 = r.read('x.f16').toArray();
  let worst = 0;
  for (let i = 0; i < values.length; i++) worst = Math.max(worst, Math.abs(back16[i] - values[i]) / Math.max(Math.abs(values[i]), 1e-3));
  t.ok(worst < 1e-3, `f16 round trip within half precision (${worst})`);
  t.same(Array.from(r.read('ids').toArray()), [1, 2, 3, -4]);
  const h = readHeader(file);
  t.ok(h.tensors.every((x) => (x.offset - h.tensors[0].offset) % 2 === 0), 'data offsets consistent');
  t.equal((8 + Number(fs.readFileSync(file).readBigUInt64LE(0))) % 8, 0, 'data starts 8-byte aligned');
});

t.test('f16 conversion rounds to nearest even', async (t) => {
  const { f32ToF16, f16ToF32 } = _internal;
  t.equal(f32ToF16(1), 0x3c00);
  t.equal(f32ToF16(1 + 2 ** -11), 0x3c00, 'tie to even (down)');
  t.equal(f32ToF16(1 + 3 * 2 ** -11), 0x3c02, 'tie to even (up)');
  t.equal(f32ToF16(70000), 0x7c00, 'overflow to infinity');
  t.equal(f32ToF16(2 ** -25), 0, 'tie to even at the smallest subnormal rounds to 0');
  t.equal(f32ToF16(3 * 2 ** -25), 2, 'subnormal ties to even');
  t.ok(Number.isNaN(f16ToF32(f32ToF16(NaN))));
  const bad = [];
  for (let h = 0; h < 0x7c00; h++) if (f32ToF16(f16ToF32(h)) !== h || f32ToF16(-f16ToF32(h)) !== (h | 0x8000)) bad.push(h);
  t.same(bad, [], 'every finite f16 value round trips through f32');
});

t.test('shards and the index', async (t) => {
  const dir = path.join(tmp, 'sharded');
  fs.mkdirSync(dir);
  const ts = Array.from({ length: 5 }, (_, i) => Tensor.randn([64, 64], { seed: i }));
  const files = writeShards(dir, ts.map((x, i) => ({ name: `w${i}`, dtype: 'F32' as const, shape: [64, 64], tensor: () => x })), { maxShardBytes: 40000 });
  t.equal(files.length, 4, '3 shards + index');
  t.ok(fs.existsSync(path.join(dir, 'model.safetensors.index.json')));
  const index = JSON.parse(fs.readFileSync(path.join(dir, 'model.safetensors.index.json'), 'utf8'));
  t.equal(index.metadata.total_size, 5 * 64 * 64 * 4);
  const r = new SafetensorsReader(dir);
  ts.forEach((x, i) => t.same(r.read(`w${i}`).toArray(), x.toArray(), `w${i} from ${index.weight_map[`w${i}`]}`));
});

t.test('atomic writes: a failure leaves nothing under the final name', async (t) => {
  const file = path.join(tmp, 'atomic.safetensors');
  const good = Tensor.zeros([4]);
  t.throws(() => writeSafetensors(file, [
    { name: 'a', dtype: 'F32', shape: [4], tensor: () => good },
    { name: 'b', dtype: 'F32', shape: [4], tensor: () => { throw new Error('interrupted'); } },
  ]), /interrupted/);
  t.notOk(fs.existsSync(file), 'no file under the final name');
  t.same(fs.readdirSync(tmp).filter((f) => f.includes('atomic')), [], 'no temporary left behind');
  writeSafetensors(file, [{ name: 'a', dtype: 'F32', shape: [4], tensor: () => good }]);
  t.throws(() => writeSafetensors(file, [{ name: 'a', dtype: 'F32', shape: [5], tensor: () => good }]), /declared \[5\]/);
  t.same(Array.from(new SafetensorsReader(file).read('a').toArray()), [0, 0, 0, 0], 'the earlier file survives a failed overwrite');
  const dir = path.join(tmp, 'ckpt');
  writeFolderAtomic(dir, (d) => fs.writeFileSync(path.join(d, 'config.json'), '{"v":1}'));
  t.throws(() => writeFolderAtomic(dir, (d) => { fs.writeFileSync(path.join(d, 'config.json'), '{"v":2}'); throw new Error('killed'); }), /killed/);
  t.equal(fs.readFileSync(path.join(dir, 'config.json'), 'utf8'), '{"v":1}', 'the earlier checkpoint folder survives');
  writeFolderAtomic(dir, (d) => fs.writeFileSync(path.join(d, 'config.json'), '{"v":3}'));
  t.equal(fs.readFileSync(path.join(dir, 'config.json'), 'utf8'), '{"v":3}', 'a complete write replaces it');
});

t.test('malformed files get XFT_FORMAT errors', async (t) => {
  const bad = (name: string, content: Buffer) => {
    const f = path.join(tmp, name);
    fs.writeFileSync(f, content);
    try {
      new SafetensorsReader(f);
      t.fail(`${name} should fail`);
    } catch (err) {
      t.equal((err as XftError).code, 'XFT_FORMAT', `${name}: ${(err as Error).message}`);
    }
  };
  bad('short.safetensors', Buffer.from([1, 2, 3]));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(1000n);
  bad('long-header.safetensors', Buffer.concat([len, Buffer.from('{}')]));
  len.writeBigUInt64LE(5n);
  bad('not-json.safetensors', Buffer.concat([len, Buffer.from('{abc}')]));
  bad('bad-offsets.safetensors', handMade([{ name: 'a', dtype: 'F32', shape: [4], data: Buffer.alloc(8) }]));
  try {
    new SafetensorsReader(path.join(tmp, 'nope'));
    t.fail('missing file');
  } catch (err) {
    t.equal((err as XftError).code, 'XFT_IO');
  }
});

t.test('a write killed half way leaves nothing under the final name; the next write clears its temporary folder', async (t) => {
  const target = path.join(tmp, 'killed');
  const lib = path.join(__dirname, '..', 'lib', 'safetensors.ts');
  const script = `
    const { writeFolderAtomic } = require(${JSON.stringify(lib)});
    writeFolderAtomic(${JSON.stringify(target)}, (dir) => {
      require('node:fs').writeFileSync(require('node:path').join(dir, 'model.safetensors'), 'partial');
      console.log('writing');
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0); // hangs here until killed
    });`;
  const child = spawn(process.execPath, [...process.execArgv, '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((resolve) => child.stdout.on('data', () => resolve()));
  child.kill('SIGKILL');
  await new Promise((resolve) => child.on('exit', resolve));
  const temps = () => fs.readdirSync(tmp).filter((n) => n.startsWith('.killed.tmp-'));
  t.notOk(fs.existsSync(target), 'no folder under the final name');
  t.equal(temps().length, 1, 'the killed writer left its temporary folder');
  // a temporary folder of a process that still runs is left alone
  const live = path.join(tmp, `.killed.tmp-${process.ppid}-live`);
  fs.mkdirSync(live);
  writeFolderAtomic(target, (dir) => fs.writeFileSync(path.join(dir, 'a'), 'complete'));
  t.equal(fs.readFileSync(path.join(target, 'a'), 'utf8'), 'complete', 'the next write completes');
  t.same(temps(), [path.basename(live)], "the dead writer's temporary folder is gone; a live one's stays");
});

t.test('header lies are XFT_FORMAT errors that name the file', async (t) => {
  const raw = (header: string, data = Buffer.alloc(16)) => {
    const json = Buffer.from(header), len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(json.length));
    return Buffer.concat([len, json, data]);
  };
  const cases: [string, Buffer, RegExp][] = [
    ['null-header', raw('null'), /header is null, expected a JSON object/],
    ['array-header', raw('[1, 2]'), /header is \[1, 2\], expected a JSON object/],
    ['null-entry', raw('{"a": null}'), /tensor "a" has a malformed header entry null/],
    ['bad-dtype', raw('{"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}'), /unknown dtype/],
    ['bad-shape', raw('{"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}'), /shape is not a list of non-negative integers/],
    ['float-shape', raw('{"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 6]}}'), /shape is not a list/],
    ['reversed-offsets', raw('{"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}'), /0 <= begin <= end/],
    ['string-offsets', raw('{"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}'), /data_offsets is not/],
    ['size-mismatch', raw('{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}'), /12 bytes\) has data offsets \[0, 8\] of 8 bytes/],
    ['past-end', raw('{"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}'), /past the end of the file \(16 bytes of data\)/],
    ['overlap', raw('{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}'), /tensors a and b overlap/],
    ['same-range', raw('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}'), /overlap/],
    ['bad-metadata', raw('{"__metadata__": 5}'), /__metadata__ is 5/],
  ];
  for (const [name, content, msg] of cases) {
    const f = path.join(tmp, `${name}.safetensors`);
    fs.writeFileSync(f, content);
    try {
      new SafetensorsReader(f);
      t.fail(`${name} should fail`);
    } catch (err) {
      t.ok(err instanceof XftError && err.code === 'XFT_FORMAT', `${name}: XFT_FORMAT (${(err as Error).message})`);
      t.match((err as Error).message, msg, `${name}: says why`);
      t.ok((err as Error).message.includes(f), `${name}: names the file`);
    }
  }
  // adjacent, empty and out-of-order tensors are fine (only overlaps are forbidden)
  const f = path.join(tmp, 'ok-order.safetensors');
  fs.writeFileSync(f, raw('{"b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}, "e": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'));
  t.same(new SafetensorsReader(f).names().sort(), ['a', 'b', 'e']);
});

t.test('a model.safetensors that is a folder, and shard indexes with holes, name the file (XFT_FORMAT)', async (t) => {
  const dir = path.join(tmp, 'dir-as-file');
  fs.mkdirSync(path.join(dir, 'model.safetensors'), { recursive: true });
  const expectFormat = (what: string, source: string, msg: RegExp) => {
    try {
      new SafetensorsReader(source);
      t.fail(`${what} should fail`);
    } catch (err) {
      t.ok(err instanceof XftError && err.code === 'XFT_FORMAT', `${what}: XFT_FORMAT (${(err as Error).message})`);
      t.match((err as Error).message, msg, `${what}: names the file and says why`);
    }
  };
  expectFormat('a folder named model.safetensors', dir, /dir-as-file\/model\.safetensors: not a safetensors file \(a folder\)/);
  const sharded = path.join(tmp, 'bad-index');
  fs.mkdirSync(sharded);
  const index = path.join(sharded, 'model.safetensors.index.json');
  writeSafetensors(path.join(sharded, 'part.safetensors'), [{ name: 'w', dtype: 'F32', shape: [2], tensor: () => Tensor.zeros([2]) }]);
  for (const [what, content, msg] of [
    ['a null shard', '{"weight_map": {"w": "part.safetensors", "v": null}}', /model\.safetensors\.index\.json: weight_map maps v to null/],
    ['a numeric shard', '{"weight_map": {"w": 3}}', /weight_map maps w to 3/],
    ['a null weight_map', '{"weight_map": null}', /index\.json: the shard index has no weight_map object \(received null\)/],
    ['a null index', 'null', /index\.json: the shard index has no weight_map object/],
    ['garbage', '{"weight_map": ', /index\.json: cannot read the shard index/],
  ] as const) {
    fs.writeFileSync(index, content);
    expectFormat(what, sharded, msg);
  }
  fs.writeFileSync(index, '{"weight_map": {"w": "part.safetensors"}}');
  t.same(new SafetensorsReader(sharded).names(), ['w'], 'a good index reads');
});

t.test('non-finite values: never written (XFT_NONFINITE, the earlier file kept), refused on read with finite: true', async (t) => {
  const file = path.join(tmp, 'finite.safetensors');
  writeSafetensors(file, [{ name: 'w', dtype: 'F32', shape: [3], tensor: () => Tensor.from([1, 2, 3], [3]) }]);
  const good = fs.readFileSync(file);
  const attempts: [string, () => void, RegExp][] = [
    ['NaN in F32', () => writeSafetensors(file, [{ name: 'w', dtype: 'F32', shape: [3], tensor: () => Tensor.from([1, NaN, 3], [3]) }]), /w holds a non-finite value .* at element 1 as F32/],
    ['Inf in BF16', () => writeSafetensors(file, [{ name: 'w', dtype: 'BF16', shape: [3], tensor: () => Tensor.from([1, 2, -Infinity], [3]) }]), /at element 2 as BF16/],
    ['f32 overflowing F16', () => writeSafetensors(file, [{ name: 'w', dtype: 'F16', shape: [3], tensor: () => Tensor.from([70000, 2, 3], [3]) }]), /at element 0 as F16/],
    ['NaN in the second chunk of streamed bytes', () => writeSafetensors(file, [{
      name: 'w', dtype: 'F32', shape: [4], bytes: function* () {
        yield new Uint8Array(new Float32Array([1, 2]).buffer);
        yield new Uint8Array(new Float32Array([3, NaN]).buffer);
      },
    }]), /at element 3 as F32/],
  ];
  for (const [what, fn, msg] of attempts) {
    try {
      fn();
      t.fail(`${what} should be refused`);
    } catch (err) {
      t.ok(err instanceof XftError && err.code === 'XFT_NONFINITE', `${what}: XFT_NONFINITE (${(err as Error).message})`);
      t.match((err as Error).message, msg);
    }
    t.same(fs.readFileSync(file), good, `${what}: the earlier file is kept`);
  }
  t.same(fs.readdirSync(tmp).filter((n) => n.startsWith('.finite.safetensors')), [], 'no temporary left behind');
  writeSafetensors(file, [{ name: 'w', dtype: 'F32', shape: [3], tensor: () => Tensor.from([1, NaN, 3], [3]) }], {}, { allowNonFinite: true });
  const r = new SafetensorsReader(file);
  t.ok(Number.isNaN(r.read('w').toArray()[1]), 'allowNonFinite writes it');
  try {
    r.read('w', { finite: true });
    t.fail('finite: true should refuse it');
  } catch (err) {
    t.equal((err as XftError).code, 'XFT_FORMAT');
    t.match((err as Error).message, /finite\.safetensors: w holds a non-finite value \(NaN or ±Inf\) at element 1/);
  }
  const bytes = (a: number[]) => new Uint8Array(new Float32Array(a).buffer);
  t.equal(firstNonFinite(bytes([0, -0, 3.4e38, 1e-45, -1]), 'F32'), -1, 'extremes and subnormals are finite');
  t.equal(firstNonFinite(bytes([0, 1, Infinity]), 'F32'), 2);
  t.equal(firstNonFinite(bytes([0, 1, Infinity]).subarray(1, 9), 'I32'), -1, 'integers are never non-finite');
  const unaligned = new Uint8Array(13);
  unaligned.set(bytes([1, 2, NaN]), 1);
  t.equal(firstNonFinite(unaligned.subarray(1), 'F32'), 2, 'an unaligned view');
  t.equal(firstNonFinite(new Uint8Array([0x80, 0x3f, 0x80, 0x7f]), 'BF16'), 1, 'bf16 infinity');
  t.equal(firstNonFinite(new Uint8Array([0x00, 0x7c]), 'F16'), 0, 'f16 infinity');
  t.equal(firstNonFinite(new Uint8Array([0xff, 0x7b]), 'F16'), -1, 'f16 65504 is finite');
});
