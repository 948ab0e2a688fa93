#!/usr/bin/env node
// npm install hook: use a prebuilt addon (prebuilds/) or an existing build (build/) when one
// loads on this machine; otherwise compile with cmake-js (CUDA backend when nvcc is found,
// CPU-only otherwise or with XFT_CUDA=OFF). XFT_FORCE_BUILD=1 always compiles.
'use strict';
const path = require('node:path');
const { spawnSync } = require('node:child_process');

const root = path.resolve(__dirname, '..');

function loads() {
  try {
    require('node-gyp-build')(root);
    return true;
  } catch {
    return false;
  }
}

if (process.env.XFT_FORCE_BUILD !== '1' && loads()) {
  console.log('xft: using the prebuilt native addon');
  process.exit(0);
}

const cmakeJs = require.resolve('cmake-js/bin/cmake-js');
const args = [cmakeJs, 'compile', '--out', path.join(root, 'build')];
if (process.env.XFT_CUDA === 'OFF' || process.env.XFT_CUDA === '0') args.push('--CDXFT_CUDA=OFF');
console.log('xft: building the native addon with cmake-js');
const r = spawnSync(process.execPath, args, { cwd: root, stdio: 'inherit' });
if (r.status !== 0) {
  console.error(
    'xft: the native build failed. It needs cmake >= 3.18 and a C++17 compiler ' +
      '(and nvcc for the CUDA backend; set XFT_CUDA=OFF to build for the CPU only).',
  );
  process.exit(r.status ?? 1);
}
