/** xft's ES module entry: the CommonJS build's exports, so that `import` and `require` share one copy of the library (one Tensor class, one native addon). */
export * from './index.js';
