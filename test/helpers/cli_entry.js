// `xft` from its TypeScript sources for the multi-process tests: the cached transpile hook, then
// lib/cli.ts (a .js entry, so that Node's CommonJS loader runs it whatever loader the test has).
require('./ts_require.js');
require('../../lib/cli.ts');
