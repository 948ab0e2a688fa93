// The Python with numpy that the reference tests run: XFT_PYTHON picks the interpreter (CI: Debian's
// /usr/bin/python3 with python3-numpy); with XFT_REQUIRE_REFERENCES=1 (CI) a missing numpy fails the
// file instead of skipping it.
import { spawnSync } from 'node:child_process';
import type { Test } from 'tap';

export const PYTHON = process.env.XFT_PYTHON ?? 'python3';

/** `skip` for the file's tests: false when numpy is there, else why (and, when required, the file has failed). */
export function numpyOrSkip(t: Test): string | false {
  const required = process.env.XFT_REQUIRE_REFERENCES === '1';
  const probe = spawnSync(PYTHON, ['-c', 'import numpy'], { encoding: 'utf8' });
  const missing = probe.status === 0 ? null : `${PYTHON} with numpy is not available (${(probe.stderr ?? String(probe.error)).trim().split('\n').at(-1)})`;
  if (missing && required) t.fail(`XFT_REQUIRE_REFERENCES=1: ${missing}`);
  return missing && !required ? missing : false;
}
