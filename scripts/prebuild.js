#!/usr/bin/env node
// Builds the prebuilt binaries the package ships (`npm run prebuilds [-- <flavour>...]`; not `prebuild`,
// which npm would run before every `npm run build`), each with
// cmake-js in its own folder (build-prebuild-<flavour>/, so a developer's build/ is left alone), linked
// for older distributions (XFT_PORTABLE) and stripped:
//   cuda   prebuilds/linux-x64/node.napi.node       CUDA backend (needs nvcc) + CPU; the default on linux-x64
//   cpu    prebuilds/linux-x64-cpu/node.napi.node   CPU only; chosen by XFT_CUDA=OFF at install
//   arm64  prebuilds/linux-arm64/node.napi.node     CPU only, cross-compiled with g++-aarch64-linux-gnu
// node-gyp-build finds prebuilds/<platform>-<arch>/ by itself; `linux-x64-cpu` is not a platform-arch
// folder to it, only scripts/install.js picks it (see there).
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const { spawnSync } = require('node:child_process');

const root = path.resolve(__dirname, '..');

const FLAVOURS = {
  cuda: { folder: 'linux-x64', args: ['--CDXFT_CUDA=ON'], strip: 'strip', cuda: true },
  cpu: { folder: 'linux-x64-cpu', args: ['--CDXFT_CUDA=OFF'], strip: 'strip' },
  arm64: {
    folder: 'linux-arm64',
    strip: 'aarch64-linux-gnu-strip',
    args: ['--CDXFT_CUDA=OFF', '--arch', 'arm64', '--CDCMAKE_SYSTEM_NAME=Linux', '--CDCMAKE_SYSTEM_PROCESSOR=aarch64',
      '--CDCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++'],
    compiler: 'aarch64-linux-gnu-g++',
  },
};

function onPath(cmd) {
  return spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
}

function run(cmd, args, env = process.env) {
  console.log(`> ${cmd} ${args.join(' ')}`);
  const r = spawnSync(cmd, args, { cwd: root, stdio: 'inherit', env });
  if (r.status !== 0) {
    console.error(`prebuild: ${cmd} failed (exit ${r.status ?? r.signal})`);
    process.exit(1);
  }
}

const wanted = process.argv.slice(2);
for (const name of wanted.length ? wanted : Object.keys(FLAVOURS)) {
  const f = FLAVOURS[name];
  if (!f) {
    console.error(`prebuild: unknown flavour ${name} (one of ${Object.keys(FLAVOURS).join(', ')})`);
    process.exit(2);
  }
  if (f.cuda && !onPath('nvcc') && !fs.existsSync('/usr/local/cuda/bin/nvcc')) {
    console.error('prebuild: the cuda flavour needs nvcc (the CUDA toolkit)');
    process.exit(1);
  }
  if (f.compiler && !onPath(f.compiler)) {
    console.error(`prebuild: the ${name} flavour needs ${f.compiler} (Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu)`);
    process.exit(1);
  }
  const out = path.join(root, `build-prebuild-${name}`);
  // XFT_CUDA in the environment would override the flavour's choice (CMakeLists.txt reads it)
  const env = { ...process.env };
  delete env.XFT_CUDA;
  run(process.execPath, [require.resolve('cmake-js/bin/cmake-js'), 'compile', '--out', out, '--CDXFT_PORTABLE=ON', ...f.args], env);
  const dest = path.join(root, 'prebuilds', f.folder, 'node.napi.node');
  fs.mkdirSync(path.dirname(dest), { recursive: true });
  fs.copyFileSync(path.join(out, 'Release', 'xft.node'), dest);
  run(f.strip, ['--strip-all', dest]);
  console.log(`prebuild: ${path.relative(root, dest)} (${(fs.statSync(dest).size / 1e6).toFixed(2)} MB)`);
}
