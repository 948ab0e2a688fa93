// Assertion helpers shared by the op tests.
import t from 'tap';
import { XftError } from '../../lib/index';
import { relErr } from './ref';

type Test = tap.Test;

export function throwsCode(t: Test, fn: () => unknown, code: string, match: RegExp, what: string): void {
  try {
    fn();
    t.fail(`${what}: should throw ${code}`);
  } catch (err) {
    t.ok(err instanceof XftError && err.code === code, `${what}: XftError ${code} (${(err as Error).message})`);
    t.match((err as Error).message, match, `${what}: the message names the argument`);
  }
}

export function close(t: Test, got: ArrayLike<number>, want: ArrayLike<number>, tol: number, what: string): void {
  const e = relErr(got, want);
  t.ok(e <= tol, `${what}: relative error ${e.toExponential(2)} <= ${tol}`);
}

/** Element for element equal, as numbers (-0 equals 0); a NaN on either side is a mismatch. */
export function exact(t: Test, got: ArrayLike<number>, want: ArrayLike<number>, what: string): void {
  let bad = got.length === want.length ? -1 : Math.min(got.length, want.length);
  for (let i = 0; bad < 0 && i < got.length; i++) if (!(got[i] === want[i])) bad = i;
  t.ok(bad < 0, bad < 0 ? what : `${what}: first mismatch at ${bad} (got ${got[bad]}, want ${want[bad]}; lengths ${got.length}, ${want.length})`);
}
