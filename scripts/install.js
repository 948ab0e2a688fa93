#!/usr/bin/env node
// npm install hook: pick the prebuilt addon for this machine, or compile one.
//
//   1. Unless a source build is asked for (`npm install --build-from-source`, i.e.
//      npm_config_build_from_source, or XFT_FORCE_BUILD=1), test-load the prebuilds that fit
//      <platform>-<arch>: prebuilds/linux-x64/ (CUDA backend + CPU; the default), then
//      prebuilds/linux-x64-cpu/ (CPU only; first with XFT_CUDA=OFF), prebuilds/linux-arm64/ (CPU only).
//      The first that loads is used; a flavour node-gyp-build would not find by itself is copied to
//      build/Release/xft.node, which it loads first.
//   2. Otherwise compile with cmake-js (CUDA backend when nvcc is found, CPU-only otherwise or with
//      XFT_CUDA=OFF). cmake and a C++ compiler are looked for first; cmake-js and node-addon-api (the
//      package's buildDependencies) are installed into a temporary folder when they are missing, so
//      that a consumer of the prebuilt binary never downloads them.
// Every load error is printed first, as it is, then what was tried and what to do.
'use strict';
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { spawnSync } = require('node:child_process');

const root = path.resolve(__dirname, '..');
const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8'));
const target = `${process.platform}-${process.arch}`;
const cpuOnly = /^(off|0|false|no)$/i.test(process.env.XFT_CUDA ?? '');
const fromSource = buildFromSource();
const log = (line) => console.log(`xft: ${line}`);
const warn = (line) => console.error(`xft: ${line}`);

/** `npm install --build-from-source` sets npm_config_build_from_source to "true" (or to package names, as prebuild-install reads it). */
function buildFromSource() {
  if (process.env.XFT_FORCE_BUILD === '1') return true;
  const v = (process.env.npm_config_build_from_source ?? '').trim();
  if (v === '' || /^(false|0)$/i.test(v)) return false;
  return /^(true|1)$/i.test(v) || v.split(/[\s,]+/).includes(pkg.name);
}

/** The prebuilt binaries to try on this machine, in order of preference. */
function prebuildCandidates() {
  const folders = fs.existsSync(path.join(root, 'prebuilds')) ? fs.readdirSync(path.join(root, 'prebuilds')) : [];
  const main = folders.includes(target) ? [{ file: path.join(root, 'prebuilds', target, 'node.napi.node'), copy: false }] : [];
  const cpu = folders.includes(`${target}-cpu`) ? [{ file: path.join(root, 'prebuilds', `${target}-cpu`, 'node.napi.node'), copy: true }] : [];
  return (cpuOnly ? [...cpu, ...main] : [...main, ...cpu]).filter((c) => fs.existsSync(c.file));
}

/** Loads an addon in a child process (a crash there cannot take the install down); its backend or its error. */
function tryLoad(file) {
  const probe = `const a = require(${JSON.stringify(file)}); process.stdout.write(JSON.stringify({ compiledWithCuda: a.compiledWithCuda }))`;
  const r = spawnSync(process.execPath, ['-e', probe], { encoding: 'utf8' });
  if (r.status === 0) {
    try {
      return { ok: true, ...JSON.parse(r.stdout) };
    } catch {
      /* fall through */
    }
  }
  const error = (r.stderr || '').split('\n').find((l) => /Error|error:/.test(l)) || r.stderr.trim() || `exit ${r.status ?? r.signal}`;
  return { ok: false, error: error.trim() };
}

const rel = (f) => path.relative(root, f);
const failures = [];

if (fromSource) {
  log(`building from source (${process.env.XFT_FORCE_BUILD === '1' ? 'XFT_FORCE_BUILD=1' : '--build-from-source'}): prebuilt binaries are not used`);
} else {
  const candidates = prebuildCandidates();
  for (const c of candidates) {
    const r = tryLoad(c.file);
    if (!r.ok) {
      failures.push(`${rel(c.file)} does not load: ${r.error}`);
      warn(`the prebuilt addon ${rel(c.file)} does not load on this machine: ${r.error}`);
      continue;
    }
    if (cpuOnly && r.compiledWithCuda) {
      failures.push(`${rel(c.file)} has the CUDA backend, and XFT_CUDA=OFF asks for a CPU-only addon`);
      log(`not using ${rel(c.file)}: it has the CUDA backend, and XFT_CUDA=OFF asks for a CPU-only addon`);
      continue;
    }
    // build/Release is where node-gyp-build looks first: the chosen flavour goes there, and a stale
    // build of another flavour must not shadow the prebuild chosen now
    const release = path.join(root, 'build', 'Release', 'xft.node');
    if (c.copy) {
      fs.mkdirSync(path.dirname(release), { recursive: true });
      fs.copyFileSync(c.file, release);
    } else if (fs.existsSync(release) && candidates.some((o) => o.copy && fs.readFileSync(o.file).equals(fs.readFileSync(release)))) {
      fs.rmSync(release); // a flavour an earlier install copied there (never a developer's own build)
    }
    const what = r.compiledWithCuda ? 'CUDA backend + CPU' : 'CPU only';
    if (failures.length) log(`using ${rel(c.file)} (${what}) instead`);
    else log(`using the prebuilt addon ${rel(c.file)} (${what})`);
    process.exit(0);
  }
  if (candidates.length === 0) {
    const shipped = fs.existsSync(path.join(root, 'prebuilds')) ? fs.readdirSync(path.join(root, 'prebuilds')).join(', ') : 'none';
    warn(`no prebuilt addon matched ${target} (prebuilds: ${shipped || 'none'}); compiling one from source`);
    failures.push(`no prebuilt addon matched ${target}`);
  } else {
    warn('no prebuilt addon loads here; compiling one from source');
  }
}

// ---- a source build ----

function onPath(cmd) {
  return spawnSync('/bin/sh', ['-c', 'command -v "$0"', cmd], { stdio: 'ignore' }).status === 0;
}

function cxxCompiler() {
  if (process.env.CXX) return onPath(process.env.CXX.split(/\s+/)[0]) ? process.env.CXX : null;
  return ['c++', 'g++', 'clang++'].find(onPath) ?? null;
}

const fallback =
  'Without a GPU toolchain xft still builds and runs on the CPU: nvcc is optional (XFT_CUDA=OFF builds the CPU-only addon); ' +
  'prebuilt binaries ship for linux-x64 (CUDA + CPU, and CPU only) and linux-arm64 (CPU only).';

function giveUp(reason, todo) {
  warn(`cannot install the native addon: ${reason}`);
  if (failures.length) warn(`tried: ${failures.join('; ')}`);
  warn(`to do: ${todo}`);
  warn(fallback);
  process.exit(1);
}

const missing = [!onPath('cmake') && 'cmake (>= 3.18)', !cxxCompiler() && 'a C++17 compiler (c++, g++ or clang++; or set CXX)'].filter(Boolean);
if (missing.length)
  giveUp(`compiling needs ${missing.join(' and ')}, not found on PATH`,
    `install ${missing.join(' and ')} (Debian/Ubuntu: apt-get install cmake g++) and run npm install again${fromSource ? '' : ', or install on a platform with a prebuilt binary'}`);

/** cmake-js and node-addon-api: the package's own (a development checkout) or installed now into a temporary folder. */
function buildTools() {
  try {
    return { cmakeJs: require.resolve('cmake-js/bin/cmake-js', { paths: [root] }), nodePath: null, cleanup() {} };
  } catch {
    /* a consumer's install: fetch them */
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-build-tools-'));
  const specs = Object.entries(pkg.buildDependencies ?? {}).map(([n, v]) => `${n}@${v}`);
  log(`installing the build tools (${specs.join(', ')}) into ${dir}`);
  const npm = process.env.npm_execpath ? [process.execPath, process.env.npm_execpath] : ['npm'];
  const r = spawnSync(npm[0], [...npm.slice(1), 'install', '--prefix', dir, '--no-save', '--no-package-lock', '--ignore-scripts', '--no-audit', '--no-fund', ...specs], { stdio: 'inherit' });
  const cleanup = () => fs.rmSync(dir, { recursive: true, force: true });
  if (r.status !== 0) {
    cleanup();
    giveUp(`npm could not install the build tools (${specs.join(', ')})`, 'check the network or npm registry, or install from a checkout with `npm install` (devDependencies include them)');
  }
  return { cmakeJs: require.resolve('cmake-js/bin/cmake-js', { paths: [dir] }), nodePath: path.join(dir, 'node_modules'), cleanup };
}

const tools = buildTools();
const args = [tools.cmakeJs, 'compile', '--out', path.join(root, 'build')];
if (cpuOnly) args.push('--CDXFT_CUDA=OFF');
log(`compiling the native addon with cmake-js${cpuOnly ? ' (CPU only: XFT_CUDA=OFF)' : ' (the CUDA backend too when nvcc is found)'}`);
const env = { ...process.env };
if (tools.nodePath) env.NODE_PATH = [tools.nodePath, process.env.NODE_PATH].filter(Boolean).join(path.delimiter);
const r = spawnSync(process.execPath, args, { cwd: root, stdio: 'inherit', env });
tools.cleanup();
if (r.status !== 0)
  giveUp(`the native build failed (cmake-js exit ${r.status ?? r.signal}; its output is above)`,
    'fix what the compiler says above (cmake >= 3.18 and a C++17 compiler are needed; nvcc for the CUDA backend), or set XFT_CUDA=OFF to build for the CPU only');
const built = tryLoad(path.join(root, 'build', 'Release', 'xft.node'));
if (!built.ok) giveUp(`the addon just built does not load: ${built.error}`, 'report this with the output above');
log(`built build/Release/xft.node (${built.compiledWithCuda ? 'CUDA backend + CPU' : 'CPU only'})`);
