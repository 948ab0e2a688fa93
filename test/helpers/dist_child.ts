// Child of test/68.dist.ts: one rank of a CPU (Gloo) process group, started with torchrun's variables.
// XFT_TEST_DIST is "<scenario> <victim> <timeoutMs>", the scenario: 'collectives' runs every collective on inputs made from (rank, seed) and
// prints the results as one JSON line; 'die' / 'hang' make rank `victim` exit or stall before the
// second collective and print what the other ranks' collective threw; 'bench' prints the all-reduce bandwidth.
import { ProcessGroup } from '../../lib/dist';
import { Tensor } from '../../lib/tensor';
import { distInput } from './dist_inputs';

const [scenario, victimArg, timeoutArg] = (process.env.XFT_TEST_DIST ?? '').split(' ');
const victim = Number(victimArg ?? -1);
const timeoutMs = Number(timeoutArg ?? 10_000);

const bits = (t: Tensor) => Buffer.from(t.toBytes()).toString('hex');
const values = (t: Tensor) => Array.from(t.toArray());

async function collectives(g: ProcessGroup) {
  const r = g.rank;
  const out: Record<string, unknown> = {};
  // all-reduce, uneven sizes, several tensors in one call, a view, f32 and bf16, sum and avg
  for (const dtype of ['f32', 'bf16'] as const) {
    for (const op of ['sum', 'avg'] as const) {
      const ts = [1, 5, 1031].map((n, i) => Tensor.from(distInput(r, n, 10 * i + (dtype === 'bf16' ? 100 : 0)), [n], { dtype }));
      g.allReduce(ts, op);
      out[`allReduce.${dtype}.${op}`] = ts.map(values);
      out[`allReduce.${dtype}.${op}.bits`] = ts.map(bits);
    }
    const one = Tensor.from(distInput(r, 4099, 7), [4099], { dtype });
    g.allReduce(one);
    out[`allReduce1.${dtype}`] = values(one);
    out[`allReduce1.${dtype}.bits`] = bits(one);
    // a narrowed view: rows 1..2 of a [4, 3] tensor, the rest untouched
    const base = Tensor.from(distInput(r, 12, 9), [4, 3], { dtype });
    g.allReduce(base.narrow(1, 2));
    out[`view.${dtype}`] = values(base);
    // reduce-scatter: input worldSize x 3
    const rsIn = Tensor.from(distInput(r, 3 * g.worldSize, 11), [3 * g.worldSize], { dtype });
    const rsOut = Tensor.zeros([3], { dtype });
    g.reduceScatter(rsIn, rsOut, 'sum');
    out[`reduceScatter.${dtype}`] = values(rsOut);
    // all-gather: 5 per rank
    const agIn = Tensor.from(distInput(r, 5, 13), [5], { dtype });
    const agOut = Tensor.zeros([5 * g.worldSize], { dtype });
    g.allGather(agIn, agOut);
    out[`allGather.${dtype}`] = values(agOut);
    // broadcast from the last rank, two tensors
    const b1 = Tensor.from(distInput(r, 6, 15), [6], { dtype });
    const b2 = Tensor.from(distInput(r, 2, 17), [2], { dtype });
    g.broadcast([b1, b2], g.worldSize - 1);
    out[`broadcast.${dtype}`] = [values(b1), values(b2)];
  }
  // empty tensors are fine
  const empty = Tensor.zeros([0]);
  g.allReduce(empty);
  // async: overlapped with work on this thread, then waited
  const a = Tensor.from(distInput(r, 2000, 19), [2000]);
  const work = g.allReduceAsync([a], 'avg');
  let busy = 0;
  for (let i = 0; i < 1e5; i++) busy += Math.sqrt(i);
  work.wait();
  out.async = values(a);
  out.asyncBits = bits(a);
  out.asyncDone = work.done && busy > 0;
  out.numbers = g.allReduceNumbers([r + 0.5, 1e-3 * r], 'sum');
  out.numbersAvg = g.allReduceNumbers([r], 'avg');
  out.json = g.broadcastJson(r === 1 ? { step: 7, from: r, note: 'ünïcode' } : null, 1);
  g.barrier();
  return out;
}

async function main() {
  const g = await ProcessGroup.init({ timeoutMs, initTimeoutMs: 60_000 });
  const result: Record<string, unknown> = { rank: g.rank, worldSize: g.worldSize, backend: g.backend };
  if (scenario === 'collectives') Object.assign(result, await collectives(g));
  else if (scenario === 'die' || scenario === 'hang') {
    const t = Tensor.ones([1000]);
    g.allReduce(t);
    if (g.rank === victim) {
      if (scenario === 'die') process.exit(7);
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 3 * timeoutMs + 5000); // stalls, then leaves quietly
      process.exit(0);
    }
    const start = Date.now();
    try {
      g.allReduce(t);
      result.error = null;
    } catch (e) {
      const err = e as Error & { code?: string };
      result.error = { name: err.name, code: err.code, message: err.message };
      try {
        g.allReduce(t);
      } catch (e2) {
        result.after = (e2 as Error).message;
      }
    }
    result.ms = Date.now() - start;
    // report, then hold the group (rank 0: the store) until the parent has every survivor's report
    console.log(JSON.stringify(result));
    await new Promise<void>((resolve) => {
      process.stdin.on('end', resolve).on('error', resolve);
      process.stdin.resume();
    });
    g.dispose();
    return;
  } else if (scenario === 'bench') {
    const n = 16 << 20; // 64 MiB of f32
    const t = Tensor.ones([n]);
    g.allReduce(t);
    const reps = 5;
    const start = process.hrtime.bigint();
    for (let i = 0; i < reps; i++) g.allReduce(t);
    const s = Number(process.hrtime.bigint() - start) / 1e9 / reps;
    // bus bandwidth as nccl-tests: algbw x 2 (n - 1) / n
    result.seconds = s;
    result.algGBps = (n * 4) / s / 1e9;
    result.busGBps = (((n * 4) / s / 1e9) * 2 * (g.worldSize - 1)) / g.worldSize;
  }
  g.dispose();
  if (scenario === 'collectives') {
    // a second group right after: rank 0's store is taken over, not reopened on a port still in use
    const g2 = await ProcessGroup.init({ timeoutMs, initTimeoutMs: 60_000 });
    const t = Tensor.ones([3]);
    g2.allReduce(t);
    result.second = values(t);
    g2.dispose();
  }
  console.log(JSON.stringify(result));
}

main().catch((e) => {
  console.error(`rank ${process.env.RANK}: ${(e as Error).stack}`);
  process.exit(1);
});
