#!/usr/bin/env node
/** The `xft` command line. */
import { Command } from 'commander';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { backend, memoryStats } from './index';
import { packageRoot } from './native';

const pkg = JSON.parse(fs.readFileSync(path.join(packageRoot(), 'package.json'), 'utf8')) as { version: string };

const program = new Command();
program.name('xft').description('XFT for code LLMs: upcycle a dense Llama to a shared-expert MoE, fine-tune, merge back to dense').version(pkg.version);

program
  .command('info')
  .description('show the compute backend (GPU name, compute capability, memory, or why the CPU is used) and the build')
  .option('--json', 'print JSON')
  .action((opts: { json?: boolean }) => {
    const b = backend();
    const info = { version: pkg.version, backend: b, memory: memoryStats(), node: process.version };
    if (opts.json) {
      console.log(JSON.stringify(info, null, 2));
      return;
    }
    console.log(`xft ${pkg.version} (node ${process.version})`);
    console.log(`build:   ${b.compiledWithCuda ? 'CUDA backend (sm_80, sm_90a, PTX compute_90) + CPU' : 'CPU only'}`);
    if (b.kind === 'cuda') {
      const gib = (v = 0) => (v / 2 ** 30).toFixed(1);
      console.log(`device:  ${b.name} (compute capability ${b.computeCapability!.join('.')}, ${b.multiprocessors} SMs)`);
      console.log(`memory:  ${gib(b.freeMemory)} GiB free of ${gib(b.totalMemory)} GiB`);
      console.log(`cuda:    driver ${b.driverVersion}, runtime ${b.runtimeVersion}`);
    } else {
      console.log(`device:  CPU (${b.reason})`);
    }
  });

program.parseAsync(process.argv).catch((err: Error & { code?: string }) => {
  console.error(`xft: ${err.message}`);
  process.exit(err.code === 'XFT_VALUE' || err.code === 'XFT_TYPE' ? 2 : 1);
});
