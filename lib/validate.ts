/**
 * Argument checks shared by every public entry point: each returns the checked value or throws an
 * XftError whose message reads "<op>: expected <what> for <name> but received <value>" (sharp's
 * invalidParameterError) and whose code says what kind of mistake it is (XFT_TYPE for the wrong kind
 * of value, XFT_VALUE for a value out of range). Entry points check all their arguments with these
 * before they allocate anything. Tensor arguments are checked by `expectTensor` in lib/ops_check.ts.
 */
import { XftError, invalidArgument } from './errors';

/** An options argument: undefined gives {}, anything but a plain object (null, 5, 'x', an array) is XFT_TYPE. */
export function expectOptions<T extends object>(op: string, options: T | undefined, what?: string, name?: string): T;
export function expectOptions<T extends object>(op: string, options: unknown, what?: string, name?: string): T;
export function expectOptions<T extends object>(op: string, options: unknown, what = 'an options object', name = 'options'): T {
  if (options === undefined) return {} as T;
  if (options === null || typeof options !== 'object' || Array.isArray(options)) throw invalidArgument(op, name, what, options, 'XFT_TYPE');
  return options as T;
}

/** A required options object (one with required fields): undefined is XFT_TYPE too. */
export function expectRequiredOptions<T extends object>(op: string, options: unknown, what: string, name = 'options'): T {
  if (options === undefined) throw invalidArgument(op, name, what, options, 'XFT_TYPE');
  return expectOptions<T>(op, options, what, name);
}

/** `v` as an integer in [min, max], else XFT_VALUE (XFT_TYPE for a non-number) naming `name`. */
export function expectInt(op: string, name: string, v: unknown, min: number, max = Number.MAX_SAFE_INTEGER): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min || v > max)
    throw invalidArgument(op, name, `an integer in [${min}, ${max}]`, v, typeof v === 'number' ? 'XFT_VALUE' : 'XFT_TYPE');
  return v;
}

/** `v` as a boolean (`fallback` when undefined and one is given), else XFT_TYPE naming `name`. */
export function expectBool(op: string, name: string, v: unknown, fallback?: boolean): boolean {
  if (v === undefined && fallback !== undefined) return fallback;
  if (typeof v !== 'boolean') throw invalidArgument(op, name, 'a boolean', v, 'XFT_TYPE');
  return v;
}

/** `v` as a finite number accepted by `ok` (described by `what`), else XFT_VALUE (XFT_TYPE for a non-number). */
export function expectNumber(op: string, name: string, v: unknown, what = 'a finite number', ok: (x: number) => boolean = () => true): number {
  if (typeof v !== 'number' || !Number.isFinite(v) || !ok(v))
    throw invalidArgument(op, name, what, v, typeof v === 'number' ? 'XFT_VALUE' : 'XFT_TYPE');
  return v;
}

export function expectFinite(op: string, name: string, v: unknown): number {
  return expectNumber(op, name, v, 'a finite number');
}

export function expectPositive(op: string, name: string, v: unknown): number {
  return expectNumber(op, name, v, 'a finite positive number', (x) => x > 0);
}

/** `v` as a dense array (no holes) of at least `min` elements, else XFT_TYPE naming `name`. */
export function expectArray<T = unknown>(op: string, name: string, v: unknown, what: string, min = 0): T[] {
  if (!Array.isArray(v)) throw invalidArgument(op, name, what, v, 'XFT_TYPE');
  if (v.length < min) throw invalidArgument(op, name, what, v, 'XFT_TYPE');
  for (let i = 0; i < v.length; i++) if (!(i in v)) throw invalidArgument(op, `${name}[${i}]`, `${what} (the array has a hole here)`, undefined, 'XFT_TYPE');
  return v as T[];
}

/** `v` as a string, else XFT_TYPE. */
export function expectString(op: string, name: string, v: unknown, what = 'a string'): string {
  if (typeof v !== 'string') throw invalidArgument(op, name, what, v, 'XFT_TYPE');
  return v;
}

/** `v` as one of `choices`, else XFT_VALUE (`code` when given). */
export function expectOneOf<T extends string>(op: string, name: string, v: unknown, choices: readonly T[], code: 'XFT_VALUE' | 'XFT_DTYPE' | 'XFT_DEVICE' = 'XFT_VALUE'): T {
  if (!choices.includes(v as T)) throw invalidArgument(op, name, `one of ${choices.map((c) => `'${c}'`).join(', ')}`, v, typeof v === 'string' ? code : 'XFT_TYPE');
  return v as T;
}

/** A seed (a safe integer or a bigint) as an unsigned 64-bit bigint, else XFT_TYPE naming it. */
export function expectSeed(op: string, seed: unknown, name = 'seed'): bigint {
  if (typeof seed === 'bigint') return BigInt.asUintN(64, seed);
  if (typeof seed === 'number' && Number.isSafeInteger(seed)) return BigInt.asUintN(64, BigInt(seed));
  throw invalidArgument(op, name, 'an integer (a safe integer or a bigint)', seed, 'XFT_TYPE');
}

/** A function, else XFT_TYPE (undefined passes when `optional`). */
export function expectFunction<F extends (...args: never[]) => unknown>(op: string, name: string, v: unknown, optional = true): F | undefined {
  if (v === undefined && optional) return undefined;
  if (typeof v !== 'function') throw invalidArgument(op, name, 'a function', v, 'XFT_TYPE');
  return v as F;
}
