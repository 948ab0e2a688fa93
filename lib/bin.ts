#!/usr/bin/env node
/**
 * The `xft` executable: runs the command line (lib/cli.ts). A native addon that does not load fails
 * while the CLI's modules load, before its own error handling runs: said here in one line, exit 1.
 */
try {
  require('./cli');
} catch (err) {
  if ((err as { code?: string }).code !== 'XFT_NATIVE') throw err;
  console.error(`xft: ${(err as Error).message}`);
  process.exitCode = 1;
}
