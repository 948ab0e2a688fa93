// The package as npm ships it: `npm pack` once, its file list against an allowlist (what a consumer
// needs, nothing else; every source map's sources shipped), then the tarball unpacked as a consumer's
// node_modules/xft (its runtime dependencies linked from this checkout's node_modules, the addon this
// machine uses as build/Release) and two consumers, CommonJS and ES module, type-checked with strict
// TypeScript and run: the exports map's import/require/types conditions, deep imports blocked.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { packageRoot } from '../lib/native';

const root = packageRoot();
const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8'));
// eslint-disable-next-line @typescript-eslint/no-require-imports
const realAddon = process.env.XFT_ADDON_PATH ? path.resolve(process.env.XFT_ADDON_PATH) : (require('node-gyp-build').path(root) as string);
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-package-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));

function run(cmd: string, args: string[], cwd: string): string {
  const r = spawnSync(cmd, args, { cwd, encoding: 'utf8', env: { ...process.env, XFT_ADDON_PATH: '', npm_config_loglevel: 'error' } });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status}):\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

// dist/ as `prepare` builds it, then the tarball (scripts not run again)
run(process.execPath, [path.join(root, 'node_modules/typescript/bin/tsc'), '-p', 'tsconfig.json'], root);
const packed = JSON.parse(run('npm', ['pack', '--ignore-scripts', '--json', '--pack-destination', tmp], root))[0] as { filename: string; size: number; files: { path: string }[] };
const files = packed.files.map((f) => f.path);

const ALLOWED = [
  /^(package\.json|README\.md|LICENSE|CMakeLists\.txt|scripts\/install\.js)$/,
  /^dist\/lib\/(\w+\/)?\w+\.(js|mjs|d\.ts|d\.mts|js\.map|mjs\.map)$/, // the build, its types and source maps (lib/optim/ …)
  /^lib\/(\w+\/)?\w+\.m?ts$/, // the sources the maps point to
  /^binding\/(cpu\/|portable\/|dist\/)?\w+\.(cc|h)$/, // what a source build compiles
  /^cuda\/\w+\.(cu|cuh|h)$/,
  /^prebuilds\/linux-(x64|x64-cpu|arm64)\/node\.napi\.node$/,
];

t.test('the tarball holds what a consumer needs, nothing else', async (t) => {
  t.same(files.filter((f) => !ALLOWED.some((re) => re.test(f))), [], 'every file is on the allowlist');
  for (const need of ['package.json', 'LICENSE', 'README.md', 'scripts/install.js', 'CMakeLists.txt', 'dist/lib/index.js', 'dist/lib/index.mjs', 'dist/lib/index.d.ts', 'dist/lib/index.d.mts', 'dist/lib/cli.js', 'dist/lib/tokenize_worker.js', 'cuda/xft_cuda.h', 'binding/addon.cc'])
    t.ok(files.includes(need), `ships ${need}`);
  t.notOk(files.some((f) => /^(cuda\/dev|test|bench)\/|gpu-check|hf_reference|mutation-check|prebuild\.js|tsconfig/.test(f)), 'no developer tools');
  for (const map of files.filter((f) => f.endsWith('.map'))) {
    const sources = JSON.parse(fs.readFileSync(path.join(root, map), 'utf8')).sources as string[];
    for (const s of sources) t.ok(files.includes(path.posix.join(path.posix.dirname(map), s)), `${map}: its source ${s} is shipped`);
  }
  t.ok(fs.readFileSync(path.join(root, 'LICENSE'), 'utf8').startsWith('MIT License'), 'LICENSE: MIT, as package.json says');
  t.equal(pkg.license, 'MIT');
  // no public repository exists yet: the fields are left out rather than invented; where present they must be real URLs
  for (const u of [pkg.repository?.url, pkg.homepage, pkg.bugs?.url].filter((x) => x !== undefined))
    t.match(u, /^(git\+)?https:\/\/(?!github\.com\/xft-project\/)/, `${u}: a real https URL`);
  const runtime = Object.keys(pkg.dependencies);
  t.same(runtime.filter((d) => /cmake-js|node-addon-api|node-api-headers|resvg|prebuildify/.test(d)), [], 'no build tools or PNG renderer among the runtime dependencies');
  t.ok(pkg.peerDependenciesMeta['@resvg/resvg-js'].optional, 'the PNG renderer is an optional peer');
  t.ok(fs.readFileSync(path.join(root, '.gitignore'), 'utf8').split('\n').includes('xft-demo/'), "the demo's default output is ignored by git");
});

// a consumer's node_modules: the tarball unpacked as xft, its runtime dependencies linked
const consumer = path.join(tmp, 'consumer');
const modules = path.join(consumer, 'node_modules');
fs.mkdirSync(modules, { recursive: true });
run('tar', ['-xzf', path.join(tmp, packed.filename), '-C', modules], tmp);
fs.renameSync(path.join(modules, 'package'), path.join(modules, 'xft'));
for (const dep of Object.keys(pkg.dependencies)) {
  fs.mkdirSync(path.dirname(path.join(modules, dep)), { recursive: true });
  fs.symlinkSync(path.join(root, 'node_modules', dep), path.join(modules, dep));
}
fs.mkdirSync(path.join(modules, 'xft/build/Release'), { recursive: true });
fs.copyFileSync(realAddon, path.join(modules, 'xft/build/Release/xft.node'));

const USE = `
const w: RmsnormOptions = { eps: 1e-6 };
const a: AttentionOptions = { batch: 1, heads: 1 };
const route: RouteOptions = { topK: 2 };
const x = Tensor.from([1, 2, 3, 4], [2, 2]);
const r: RmsnormResult = ops.rmsnorm(x, Tensor.ones([2]), w);
const y = Array.from(r.y.toArray());
let code = '';
try {
  ops.rmsnorm(x, Tensor.ones([3]));
} catch (err) {
  if (err instanceof XftError) code = err.code;
}
const internal = ['expectTensor', 'sameDevice', 'expectInt', 'expectBool', 'describe', 'FLOAT'].filter((k) => k in ops);
`;

const FIXTURES: Record<string, { type: string; file: string; source: string }> = {
  cjs: {
    type: 'commonjs', file: 'index.ts', source: `import { Tensor, ops, XftError, type AttentionOptions, type RmsnormOptions, type RmsnormResult, type RouteOptions } from 'xft';
// @ts-expect-error deep imports are outside the exports map
import type * as deep from 'xft/dist/lib/ops_train';
${USE}
let deepCode = '';
try {
  require.resolve('xft/dist/lib/ops_train.js');
} catch (err) {
  deepCode = (err as NodeJS.ErrnoException).code ?? '';
}
const version = (require('xft/package.json') as { version: string }).version;
console.log(JSON.stringify({ y, code, internal, deepCode, version, unused: [a.batch, route.topK, typeof ({} as deep)] }));
`,
  },
  esm: {
    type: 'module', file: 'index.ts', source: `import { Tensor, ops, XftError, type AttentionOptions, type RmsnormOptions, type RmsnormResult, type RouteOptions } from 'xft';
import { createRequire } from 'node:module';
// @ts-expect-error deep imports are outside the exports map
import type * as deep from 'xft/dist/lib/ops_train.js';
${USE}
let deepCode = '';
try {
  await import('xft/dist/lib/ops_train.js' as string);
} catch (err) {
  deepCode = (err as NodeJS.ErrnoException).code ?? '';
}
const required = createRequire(import.meta.url)('xft') as typeof import('xft');
const version = (createRequire(import.meta.url)('xft/package.json') as { version: string }).version;
console.log(JSON.stringify({ y, code, internal, deepCode, version, sameClass: required.Tensor === Tensor, unused: [a.batch, route.topK, typeof ({} as deep)] }));
`,
  },
};

for (const [name, f] of Object.entries(FIXTURES)) {
  t.test(`${name === 'cjs' ? 'a CommonJS' : 'an ES module'} consumer type-checks (strict) and runs against the packed tarball`, async (t) => {
    const dir = path.join(consumer, name);
    fs.mkdirSync(dir);
    fs.writeFileSync(path.join(dir, 'package.json'), JSON.stringify({ name: `consumer-${name}`, private: true, type: f.type }));
    fs.writeFileSync(path.join(dir, 'tsconfig.json'), JSON.stringify({
      compilerOptions: {
        target: 'ES2022', module: 'node16', moduleResolution: 'node16', strict: true, outDir: 'out', skipLibCheck: false,
        types: ['node'], typeRoots: [path.join(root, 'node_modules/@types')],
      },
      files: [f.file],
    }));
    fs.writeFileSync(path.join(dir, f.file), f.source);
    const tsc = spawnSync(process.execPath, [path.join(root, 'node_modules/typescript/bin/tsc'), '-p', '.'], { cwd: dir, encoding: 'utf8' });
    t.equal(tsc.status, 0, `tsc: ${tsc.stdout}${tsc.stderr}`);
    const r = spawnSync(process.execPath, ['out/index.js'], { cwd: dir, encoding: 'utf8', env: { ...process.env, XFT_ADDON_PATH: '' } });
    t.equal(r.status, 0, r.stderr);
    const out = JSON.parse(r.stdout);
    t.equal(out.y.length, 4, 'ops run on the addon');
    t.ok(Math.abs(out.y[0] - 1 / Math.sqrt(2.5)) < 1e-5, `rmsnorm value ${out.y[0]}`);
    t.equal(out.code, 'XFT_SHAPE', 'errors are the package\'s XftError');
    t.same(out.internal, [], 'no argument-check helpers on ops');
    t.equal(out.deepCode, 'ERR_PACKAGE_PATH_NOT_EXPORTED', 'a deep import is blocked by the exports map');
    t.equal(out.version, pkg.version, "'xft/package.json' is exported");
    if (name === 'esm') t.equal(out.sameClass, true, 'import and require give one copy of the library');
  });
}

t.test("the package's xft executable runs, and a native addon that does not load is one line and exit 1", async (t) => {
  const bin = path.join(modules, 'xft', pkg.bin.xft);
  let r = spawnSync(process.execPath, [bin, '--version'], { cwd: consumer, encoding: 'utf8', env: { ...process.env, XFT_ADDON_PATH: '' } });
  t.equal(r.status, 0, r.stderr);
  t.equal(r.stdout.trim(), pkg.version);
  r = spawnSync(process.execPath, [bin, 'info'], { cwd: consumer, encoding: 'utf8', env: { ...process.env, XFT_ADDON_PATH: path.join(tmp, 'no-such-addon.node') } });
  t.equal(r.status, 1, 'exit 1');
  t.match(r.stderr, /^xft: the xft native addon XFT_ADDON_PATH=.*no-such-addon\.node could not be loaded: Cannot find module/);
  t.equal(r.stderr.trim().split('\n').length, 1, 'one line, no stack trace');
  t.notMatch(r.stderr, /build:native/);
});
