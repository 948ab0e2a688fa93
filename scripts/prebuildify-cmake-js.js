#!/usr/bin/env node
// A node-gyp stand-in for prebuildify (`prebuildify --napi --node-gyp scripts/prebuildify-cmake-js.js`):
// prebuildify runs `<node-gyp> rebuild --target=... --devdir=... ...`; this builds the N-API addon
// with cmake-js instead (offline: N-API headers come from node-api-headers) into build/Release,
// where prebuildify picks it up.
'use strict';
const path = require('node:path');
const { spawnSync } = require('node:child_process');

const root = path.resolve(__dirname, '..');
const cmd = process.argv.slice(2).find((a) => !a.startsWith('-')) ?? 'rebuild';
const cmakeJs = require.resolve('cmake-js/bin/cmake-js');
const args = [cmakeJs, cmd === 'rebuild' ? 'rebuild' : 'compile', '--out', path.join(root, 'build')];
if (process.env.XFT_CUDA === 'OFF') args.push('--CDXFT_CUDA=OFF');
const r = spawnSync(process.execPath, args, { cwd: root, stdio: 'inherit' });
process.exit(r.status ?? 1);
