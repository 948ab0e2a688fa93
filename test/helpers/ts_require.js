// A light `require` hook for the TypeScript children of the multi-process tests (test/68.dist.ts):
// transpiles each .ts file on load with TypeScript's transpileModule (no type check), at a fraction of
// the start-up cost of tap's loader, which several processes per test would pay each.
// Usage: node -r ./test/helpers/ts_require.js file.ts
const fs = require('node:fs');
const ts = require('typescript');

const options = { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2022, esModuleInterop: true, inlineSourceMap: true };
require.extensions['.ts'] = (module, filename) => {
  const { outputText } = ts.transpileModule(fs.readFileSync(filename, 'utf8'), { compilerOptions: options, fileName: filename });
  module._compile(outputText, filename);
};
