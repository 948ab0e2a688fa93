/**
 * The tensor-argument checks every op file shares (lib/ops.ts, ops_layers.ts, ops_train.ts, model.ts):
 * internal, not part of the public `ops` object. Scalar and option checks are in lib/validate.ts.
 */
import { XftError, invalidArgument } from './errors';
import { DType, Tensor, formatShape } from './tensor';

export interface Expect {
  dtype?: readonly DType[];
  rank?: number;
  /** expected sizes; null = any */
  shape?: readonly (number | null)[];
  /** how the shape reads, e.g. "[T, E-1]" */
  shapeName?: string;
}

/** Checks `t` is a live tensor of the expected dtype and shape, else throws naming `name`. */
export function expectTensor(op: string, name: string, t: unknown, e: Expect = {}): Tensor {
  if (!Tensor.isTensor(t)) throw invalidArgument(op, name, 'a Tensor', t, 'XFT_TYPE');
  if (t.disposed) throw new XftError(`${op}: ${name} (${t.describe()}) was used after dispose()`, 'XFT_DISPOSED');
  if (t.offset !== 0) throw new XftError(`${op}: ${name} (${t.describe()}) is a view that starts inside its storage (narrow); ops take whole tensors: clone() it`, 'XFT_SHAPE');
  const want = e.shapeName ? ` ${e.shapeName}` : '';
  if (e.dtype && !e.dtype.includes(t.dtype))
    throw new XftError(`${op}: expected ${name} to be a ${e.dtype.join(' or ')} tensor${want}, got ${t.describe()}`, 'XFT_DTYPE');
  const rank = e.shape ? e.shape.length : e.rank;
  if (rank !== undefined && t.rank !== rank)
    throw new XftError(`${op}: expected ${name} to be ${rank}-D${want}, got ${t.describe()}`, 'XFT_SHAPE');
  if (e.shape)
    e.shape.forEach((d, i) => {
      if (d !== null && t.shape[i] !== d)
        throw new XftError(`${op}: expected ${name} of shape ${e.shapeName ?? formatShape(e.shape!.map((x) => x ?? '*') as number[])}` +
          ` with dimension ${i} = ${d}, got ${t.describe()}`, 'XFT_SHAPE');
    });
  return t;
}

/** All tensors on one device, which is returned. */
export function sameDevice(op: string, tensors: Record<string, Tensor | null | undefined>): 'cpu' | 'cuda' {
  let first: [string, Tensor] | undefined;
  for (const [name, t] of Object.entries(tensors)) {
    if (!t) continue;
    if (!first) first = [name, t];
    else if (t.device !== first[1].device)
      throw new XftError(`${op}: ${name} is on ${t.device} but ${first[0]} is on ${first[1].device}; all tensors must be on one device`, 'XFT_DEVICE');
  }
  return first ? first[1].device : 'cpu';
}

/** The floating-point dtypes. */
export const FLOAT: readonly DType[] = ['f32', 'bf16'];
