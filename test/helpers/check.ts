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

export function exact(t: Test, got: ArrayLike<number>, want: ArrayLike<number>, what: string): void {
  t.same(Array.from(got), Array.from(want), what);
}
