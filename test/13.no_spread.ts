// lib/ has no argument spreads (`f(...x)`, `Math.max(...v)`, `push(...xs)`, `.apply(_, xs)`) and no
// recursion except the few listed below with the bound of their depth: an argument list or a call
// stack that grows with a vocabulary, a model, a run's curves or a user's object overflows
// (`RangeError: Maximum call stack size exceeded` on Llama 3's 128K-entry vocabulary). A scan of the
// syntax trees with the TypeScript compiler API.
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as ts from 'typescript';

const LIB = path.join(__dirname, '..', 'lib');

/** `file:function`, each with why its depth is bounded. Every entry must still match something. */
const RECURSION_ALLOWED: Record<string, string> = {
  'demo.ts:walk': 'directory walks of the demo corpus, depth capped at 1 and 4',
  'errors.ts:describe': 'describes the elements of arrays of at most 8 non-object values: depth 1',
  'tokenizer.ts:#pieces': 'one level per Split pre-tokenizer of the tokenizer.json (1 to 3)',
  'config.ts:sameValue': "one level per nesting level of config.json (2 in real configs: rope_scaling; lossless-json's own parser recurses the same way)",
  'config.ts:mergeWritten': 'one level per nesting level of config.json, as sameValue',
  'optim/adafactor.ts:adafactor': 'not a recursion: `typeof optimNative.adafactor` names the native entry point in a type',
  'optim/adamw.ts:adamwMulti': 'not a recursion: `typeof optimNative.adamwMulti` names the native entry point in a type',
  'dist/launch.ts:stopAll': 'not a recursion on the stack: a timer callback escalates SIGTERM to SIGKILL once (depth 1)',
  // issue 10 (another change): disposeAll walks the user's arrays and plain objects recursively (a cyclic
  // object overflows); when it becomes iterative, this entry fails as stale: remove it then.
};
/** `file:call text` of argument spreads whose argument count is bounded by the code, not by data. */
const SPREAD_ALLOWED: Record<string, string> = {};

function sources(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? sources(path.join(dir, e.name)).map((f) => path.join(e.name, f)) : e.name.endsWith('.ts') && !e.name.endsWith('.d.ts') ? [e.name] : []);
}

interface Finding {
  kind: 'spread' | 'recursion';
  key: string;
  where: string;
}

/** Argument spreads, `.apply(x, array)` calls, and functions that refer to themselves inside their own body. */
export function scan(file: string, text: string): Finding[] {
  const src = ts.createSourceFile(file, text, ts.ScriptTarget.ES2022, true);
  const found: Finding[] = [];
  const where = (n: ts.Node) => `${file}:${src.getLineAndCharacterOfPosition(n.getStart(src)).line + 1}`;
  /** The name a function can be referred to by inside itself: `name` (a function) or `this.name` (a method). */
  const nameOf = (n: ts.Node): { name: string; method: boolean } | undefined => {
    if ((ts.isMethodDeclaration(n) || ts.isGetAccessorDeclaration(n)) && n.name) return { name: n.name.getText(src), method: true };
    if ((ts.isFunctionDeclaration(n) || ts.isFunctionExpression(n)) && n.name) return { name: n.name.text, method: false };
    if ((ts.isArrowFunction(n) || ts.isFunctionExpression(n)) && ts.isVariableDeclaration(n.parent) && ts.isIdentifier(n.parent.name)) return { name: n.parent.name.text, method: false };
    return undefined;
  };
  const visit = (n: ts.Node, enclosing: readonly { name: string; method: boolean }[]) => {
    const own = nameOf(n);
    const inside = own ? enclosing.concat([own]) : enclosing;
    if ((ts.isCallExpression(n) || ts.isNewExpression(n)) && n.arguments?.some(ts.isSpreadElement))
      found.push({ kind: 'spread', key: `${file}:${n.getText(src)}`, where: where(n) });
    if (ts.isCallExpression(n) && ts.isPropertyAccessExpression(n.expression) && n.expression.name.text === 'apply' && n.arguments.length === 2)
      found.push({ kind: 'spread', key: `${file}:${n.getText(src)}`, where: where(n) });
    // a reference to an enclosing function from inside it: a call, or the function passed on (forEach(visit))
    const p = n.parent;
    let ref: { name: string; method: boolean } | undefined;
    if (ts.isPropertyAccessExpression(n) && n.expression.kind === ts.SyntaxKind.ThisKeyword) ref = { name: n.name.getText(src), method: true };
    else if (ts.isIdentifier(n) && !(p && ts.isPropertyAccessExpression(p) && p.name === n) && !(p && (p as { name?: ts.Node }).name === n)) ref = { name: n.text, method: false };
    if (ref && enclosing.some((e) => e.name === ref.name && e.method === ref.method)) found.push({ kind: 'recursion', key: `${file}:${ref.name}`, where: where(n) });
    ts.forEachChild(n, (c) => visit(c, inside));
  };
  visit(src, []);
  return found;
}

t.test('the scan finds what it looks for', async (t) => {
  const kinds = (code: string) => scan('x.ts', code).map((f) => `${f.kind} ${f.key}`);
  t.same(kinds('const m = Math.max(...v);'), ['spread x.ts:Math.max(...v)']);
  t.same(kinds('a.push(...b);'), ['spread x.ts:a.push(...b)']);
  t.same(kinds('new Foo(...args);'), ['spread x.ts:new Foo(...args)']);
  t.same(kinds('Math.max.apply(null, v);'), ['spread x.ts:Math.max.apply(null, v)']);
  t.same(kinds('const a = [...v]; const o = { ...p }; f([1, ...v]);'), [], 'array and object spreads are not argument lists');
  t.same(kinds('function f(n) { return n ? f(n - 1) : 0; }'), ['recursion x.ts:f']);
  t.same(kinds('const visit = (v) => { v.forEach(visit); };'), ['recursion x.ts:visit'], 'passed on as a callback');
  t.same(kinds('class A { #walk(n) { this.#walk(n); } b() { this.c(); } c() {} }'), ['recursion x.ts:#walk']);
  t.same(kinds('function f() { return g(); } function g() { return 1; }'), []);
  t.same(kinds('class A { size() { return this.other.size(); } }'), [], 'a method of another object of the same name');
});

t.test('lib/ has no argument spreads and no unlisted recursion', async (t) => {
  const files = sources(LIB);
  t.ok(files.length > 10, `scanned ${files.length} files`);
  const findings = files.flatMap((f) => scan(f.split(path.sep).join('/'), fs.readFileSync(path.join(LIB, f), 'utf8')));
  const spreads = findings.filter((f) => f.kind === 'spread' && !(f.key in SPREAD_ALLOWED));
  t.same(spreads.map((f) => `${f.where}: ${f.key}`), [], 'argument spreads (use a loop)');
  const recursion = findings.filter((f) => f.kind === 'recursion' && !(f.key in RECURSION_ALLOWED));
  t.same(recursion.map((f) => `${f.where}: ${f.key}`), [], 'recursion (use a loop with an explicit stack, or list it here with its bound)');
  const used = new Set(findings.map((f) => f.key));
  t.same(Object.keys(RECURSION_ALLOWED).concat(Object.keys(SPREAD_ALLOWED)).filter((k) => !used.has(k)), [], 'no stale allow-list entries');
});
