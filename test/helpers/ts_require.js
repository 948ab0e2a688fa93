// A light `require` hook for the TypeScript children of the multi-process tests (test/68.dist.ts):
// transpiles each .ts file on load with TypeScript's transpileModule (no type check) and keeps the
// output in a cache under the system's temporary folder (keyed by path, size and mtime), so that a
// child starts in a fraction of the time tap's loader takes, which several processes per test would
// pay each. Usage: node -r ./test/helpers/ts_require.js -e "require('./file.ts')"
const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const cacheDir = path.join(os.tmpdir(), `xft-ts-require-${typeof process.getuid === 'function' ? process.getuid() : 'user'}`);
let ts;

function transpile(filename) {
  const st = fs.statSync(filename);
  const key = crypto.createHash('sha1').update(`${filename}\0${st.size}\0${st.mtimeMs}`).digest('hex');
  const cached = path.join(cacheDir, `${key}.js`);
  try {
    return fs.readFileSync(cached, 'utf8');
  } catch {
    /* not cached yet */
  }
  ts ??= require('typescript');
  const options = { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2022, esModuleInterop: true, inlineSourceMap: true };
  const { outputText } = ts.transpileModule(fs.readFileSync(filename, 'utf8'), { compilerOptions: options, fileName: filename });
  try {
    fs.mkdirSync(cacheDir, { recursive: true });
    const tmp = `${cached}.${process.pid}.tmp`;
    fs.writeFileSync(tmp, outputText);
    fs.renameSync(tmp, cached); // atomic: concurrent children never read a partial file
  } catch {
    /* no cache, still correct */
  }
  return outputText;
}

require.extensions['.ts'] = (module, filename) => module._compile(transpile(filename), filename);
