// The install script (scripts/install.js) in a throw-away package folder: which prebuilt addon it
// picks, what it says when one does not load or none matches, and how it compiles (cmake-js, cmake
// and the compiler are stand-ins here: the test checks the decisions and messages, in seconds).
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { native, packageRoot } from '../lib/native';

const root = packageRoot();
// the addon these tests load: a real one, whichever this machine uses
// eslint-disable-next-line @typescript-eslint/no-require-imports
const realAddon = process.env.XFT_ADDON_PATH ? path.resolve(process.env.XFT_ADDON_PATH) : (require('node-gyp-build').path(root) as string);
const realHasCuda = native.compiledWithCuda;
const target = `${process.platform}-${process.arch}`;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-install-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** A stand-in for cmake-js: records its arguments and NODE_PATH, then "builds" by copying the real addon. */
const FAKE_CMAKE_JS = `const fs = require('fs'), path = require('path');
const root = process.cwd();
fs.writeFileSync(path.join(root, 'cmake-js.json'), JSON.stringify({ args: process.argv.slice(2), nodePath: process.env.NODE_PATH ?? null }));
fs.mkdirSync(path.join(root, 'build', 'Release'), { recursive: true });
fs.copyFileSync(process.env.XFT_TEST_ADDON, path.join(root, 'build', 'Release', 'xft.node'));
`;

interface Pkg {
  dir: string;
  run: (env?: Record<string, string>, tools?: { compiler?: boolean; cmakeJs?: boolean }) => { code: number | null; out: string; err: string };
}

let count = 0;
/** A package folder with the install script, package.json and the given prebuilds (null: a file that is not an addon). */
function pkg(prebuilds: Record<string, string | null>): Pkg {
  const dir = path.join(tmp, `p${count++}`);
  fs.mkdirSync(path.join(dir, 'scripts'), { recursive: true });
  fs.copyFileSync(path.join(root, 'scripts', 'install.js'), path.join(dir, 'scripts', 'install.js'));
  fs.copyFileSync(path.join(root, 'package.json'), path.join(dir, 'package.json'));
  for (const [folder, file] of Object.entries(prebuilds)) {
    fs.mkdirSync(path.join(dir, 'prebuilds', folder), { recursive: true });
    if (file === null) fs.writeFileSync(path.join(dir, 'prebuilds', folder, 'node.napi.node'), 'not an ELF file\n');
    else fs.copyFileSync(file, path.join(dir, 'prebuilds', folder, 'node.napi.node'));
  }
  const run: Pkg['run'] = (env = {}, tools = {}) => {
    // PATH: node, plus stand-ins for cmake and c++ when a compiler is wanted
    const bin = path.join(dir, '.bin');
    fs.mkdirSync(bin, { recursive: true });
    if (!fs.existsSync(path.join(bin, 'node'))) fs.symlinkSync(process.execPath, path.join(bin, 'node'));
    for (const tool of ['cmake', 'c++']) {
      fs.rmSync(path.join(bin, tool), { force: true });
      if (tools.compiler) fs.writeFileSync(path.join(bin, tool), '#!/bin/sh\nexit 0\n', { mode: 0o755 });
    }
    if (tools.cmakeJs) {
      fs.mkdirSync(path.join(dir, 'node_modules', 'cmake-js', 'bin'), { recursive: true });
      fs.writeFileSync(path.join(dir, 'node_modules', 'cmake-js', 'bin', 'cmake-js'), FAKE_CMAKE_JS);
    }
    const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !/^(npm_|XFT_)/i.test(k)));
    const r = spawnSync(process.execPath, [path.join(dir, 'scripts', 'install.js')], {
      cwd: dir, encoding: 'utf8', env: { ...clean, PATH: bin, XFT_TEST_ADDON: realAddon, ...env },
    });
    return { code: r.status, out: r.stdout, err: r.stderr };
  };
  return { dir, run };
}

t.test('a prebuild that does not load: its real error first, then what was tried and what to do', async (t) => {
  const p = pkg({ [target]: null });
  const r = p.run();
  t.equal(r.code, 1, 'no compiler: the install fails');
  const lines = r.err.trim().split('\n');
  t.match(lines[0], new RegExp(`^xft: the prebuilt addon prebuilds/${target}/node.napi.node does not load on this machine: Error: .*(file too short|invalid ELF header)`), 'the load error comes first, as it is');
  t.match(r.err, /cannot install the native addon: compiling needs cmake \(>= 3\.18\) and a C\+\+17 compiler/);
  t.match(r.err, new RegExp(`tried: prebuilds/${target}/node.napi.node does not load`));
  t.match(r.err, /to do: install cmake .* and run npm install again/);
  t.notMatch(r.err, /Compiler toolset is not available/, 'cmake-js is not run without a compiler');
});

t.test('no prebuild for this platform and no compiler: says which platform, and that the CPU backend needs no GPU toolchain', async (t) => {
  const p = pkg({ 'linux-s390x': null });
  const r = p.run();
  t.equal(r.code, 1);
  t.match(r.err, new RegExp(`no prebuilt addon matched ${target} \\(prebuilds: linux-s390x\\)`));
  t.match(r.err, /compiling needs cmake \(>= 3\.18\) and a C\+\+17 compiler/);
  t.match(r.err, /runs on the CPU: nvcc is optional \(XFT_CUDA=OFF builds the CPU-only addon\)/);
  t.match(r.err, /prebuilt binaries ship for linux-x64 .* and linux-arm64/);
});

t.test('prebuild flavours: the default one first; the CPU-only one when the default does not load, or with XFT_CUDA=OFF', async (t) => {
  let p = pkg({ [target]: realAddon, [`${target}-cpu`]: realAddon });
  let r = p.run({}, { cmakeJs: true });
  t.equal(r.code, 0, r.err);
  t.match(r.out, new RegExp(`using the prebuilt addon prebuilds/${target}/node.napi.node`));
  t.notOk(fs.existsSync(path.join(p.dir, 'build')), 'nothing copied: node-gyp-build finds prebuilds/<platform>-<arch> itself');
  t.notOk(fs.existsSync(path.join(p.dir, 'cmake-js.json')), 'nothing compiled');

  p = pkg({ [target]: null, [`${target}-cpu`]: realAddon });
  r = p.run();
  t.equal(r.code, 0, r.err);
  t.match(r.err, /^xft: the prebuilt addon .* does not load on this machine/, 'the default flavour\'s error is shown');
  t.match(r.out, new RegExp(`using prebuilds/${target}-cpu/node.napi.node \\(.*\\) instead`));
  t.same(fs.readFileSync(path.join(p.dir, 'build/Release/xft.node')), fs.readFileSync(realAddon), 'the CPU flavour goes where node-gyp-build looks first');

  p = pkg({ [target]: realAddon, [`${target}-cpu`]: realAddon });
  r = p.run({ XFT_CUDA: 'OFF' }, { compiler: true, cmakeJs: true });
  t.equal(r.code, 0, r.err);
  if (!realHasCuda) {
    t.match(r.out, new RegExp(`using the prebuilt addon prebuilds/${target}-cpu/node.napi.node \\(CPU only\\)`), 'XFT_CUDA=OFF: the CPU flavour first');
    t.ok(fs.existsSync(path.join(p.dir, 'build/Release/xft.node')));
  } else {
    // this machine's addon has the CUDA backend: XFT_CUDA=OFF refuses both and compiles
    t.match(r.err + r.out, /has the CUDA backend, and XFT_CUDA=OFF asks for a CPU-only addon/);
    t.same(JSON.parse(fs.readFileSync(path.join(p.dir, 'cmake-js.json'), 'utf8')).args.slice(-1), ['--CDXFT_CUDA=OFF']);
  }
});

t.test('--build-from-source (npm_config_build_from_source) compiles even when a prebuild loads', async (t) => {
  const p = pkg({ [target]: realAddon });
  let r = p.run({ npm_config_build_from_source: 'true', XFT_CUDA: 'OFF' }, { compiler: true, cmakeJs: true });
  t.equal(r.code, 0, r.err);
  t.match(r.out, /building from source \(--build-from-source\): prebuilt binaries are not used/);
  const call = JSON.parse(fs.readFileSync(path.join(p.dir, 'cmake-js.json'), 'utf8'));
  t.same(call.args, ['compile', '--out', path.join(p.dir, 'build'), '--CDXFT_CUDA=OFF'], 'cmake-js compile into build/, CPU only with XFT_CUDA=OFF');
  t.match(r.out, /built build\/Release\/xft\.node \((CPU only|CUDA backend \+ CPU)\)/);
  fs.rmSync(path.join(p.dir, 'cmake-js.json'));
  r = p.run({ npm_config_build_from_source: 'false' }, { compiler: true, cmakeJs: true });
  t.equal(r.code, 0);
  t.notOk(fs.existsSync(path.join(p.dir, 'cmake-js.json')), 'npm_config_build_from_source=false: the prebuild is used');
  r = p.run({ npm_config_build_from_source: 'true' }, { compiler: false, cmakeJs: true });
  t.equal(r.code, 1, 'asked to build without a compiler: fails');
  t.match(r.err, /compiling needs cmake/);
});

t.test("a consumer's source build installs cmake-js and node-addon-api (buildDependencies) into a temporary folder first", async (t) => {
  const p = pkg({});
  // a stand-in for npm: `install --prefix <dir> <specs>` puts a cmake-js stand-in into <dir>/node_modules
  const fakeNpm = path.join(p.dir, 'fake-npm.js');
  fs.writeFileSync(fakeNpm, `const fs = require('fs'), path = require('path');
const a = process.argv.slice(2), dir = a[a.indexOf('--prefix') + 1];
fs.writeFileSync(${JSON.stringify(path.join(p.dir, 'npm.json'))}, JSON.stringify(a));
fs.mkdirSync(path.join(dir, 'node_modules', 'cmake-js', 'bin'), { recursive: true });
fs.writeFileSync(path.join(dir, 'node_modules', 'cmake-js', 'bin', 'cmake-js'), ${JSON.stringify(FAKE_CMAKE_JS)});
`);
  const r = p.run({ npm_execpath: fakeNpm }, { compiler: true });
  t.equal(r.code, 0, r.err);
  const deps = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')).buildDependencies as Record<string, string>;
  const npmArgs = JSON.parse(fs.readFileSync(path.join(p.dir, 'npm.json'), 'utf8')) as string[];
  t.match(npmArgs, ['install', '--prefix'], 'npm install --prefix <temporary folder>');
  t.ok(npmArgs.includes('--ignore-scripts') && npmArgs.includes('--no-save'));
  t.same(npmArgs.filter((a) => a.includes('@')), Object.entries(deps).map(([n, v]) => `${n}@${v}`), 'the buildDependencies, at their versions');
  const call = JSON.parse(fs.readFileSync(path.join(p.dir, 'cmake-js.json'), 'utf8'));
  const toolDir = npmArgs[npmArgs.indexOf('--prefix') + 1];
  t.equal(call.nodePath.split(path.delimiter)[0], path.join(toolDir, 'node_modules'), 'NODE_PATH lets CMakeLists.txt find node-addon-api');
  t.notOk(fs.existsSync(toolDir), 'the temporary folder is removed after the build');
});
