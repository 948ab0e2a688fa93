/**
 * The rendezvous store of a process group: a small key-value server that rank 0 runs at
 * MASTER_ADDR:MASTER_PORT in a worker thread (so it answers while rank 0's main thread waits in
 * native code). Gloo's rendezvous (the pair addresses) and NCCL's unique id go through it; the
 * native client is binding/dist_store.cc. It also watches the ranks: each client says HELLO with its
 * rank and keeps its connection for the life of the group, so a connection that closes without BYE
 * marks a rank that died; PROGRESS records which collective each rank entered last, so a timeout can
 * name the rank that never arrived.
 *
 * Wire format, little endian. Request: u8 op, u32 key length, key, u32 value length, value.
 * Reply (ops other than PROGRESS): u8 status (0 ok), u32 length, value.
 * Ops: 1 SET, 2 GET (the reply waits until the key is set), 3 HELLO (key = rank), 4 BYE,
 * 5 STATUS (value = StoreStatus JSON), 6 PROGRESS (key = "<seq> <kind>", no reply).
 */
import { Worker } from 'node:worker_threads';
import { XftError } from '../errors';

/** One rank as the store saw it. */
export interface StoreRankStatus {
  rank: number;
  /** never: not connected yet; connected; left: said BYE; lost: the connection closed without BYE */
  state: 'never' | 'connected' | 'left' | 'lost';
  /** the number of the last collective the rank entered (0: none) and its kind (lib/dist/native.ts DistKind) */
  seq: number;
  kind: number;
  /** ms since the epoch of the last state or progress change */
  since: number;
}

export interface StoreStatus {
  now: number;
  ranks: StoreRankStatus[];
}

/** The server, as plain JavaScript run by `new Worker(..., { eval: true })` (no imports, no TypeScript-only syntax at run time). */
function serve(): void {
  /* eslint-disable @typescript-eslint/no-require-imports */
  const net = require('node:net') as typeof import('node:net');
  const { parentPort, workerData } = require('node:worker_threads') as typeof import('node:worker_threads');
  const { port, size } = workerData as { port: number; size: number };
  const values = new Map<string, Buffer>();
  const waiting = new Map<string, ((v: Buffer) => void)[]>();
  const ranks = Array.from({ length: size }, (_, rank) => ({ rank, state: 'never', seq: 0, kind: -1, since: Date.now() }));
  const reply = (socket: import('node:net').Socket, status: number, value: Buffer) => {
    const head = Buffer.alloc(5);
    head.writeUInt8(status, 0);
    head.writeUInt32LE(value.length, 1);
    socket.write(Buffer.concat([head, value]));
  };
  const server = net.createServer((socket) => {
    socket.setNoDelay(true);
    let rank = -1;
    let left = false;
    let buffered: Buffer = Buffer.alloc(0);
    socket.on('data', (chunk: Buffer) => {
      buffered = buffered.length ? Buffer.concat([buffered, chunk]) : chunk;
      for (;;) {
        if (buffered.length < 5) return;
        const klen = buffered.readUInt32LE(1);
        if (buffered.length < 9 + klen) return;
        const vlen = buffered.readUInt32LE(5 + klen);
        if (buffered.length < 9 + klen + vlen) return;
        const op = buffered.readUInt8(0);
        const key = buffered.subarray(5, 5 + klen).toString('utf8');
        const value = Buffer.from(buffered.subarray(9 + klen, 9 + klen + vlen));
        buffered = buffered.subarray(9 + klen + vlen);
        if (op === 1) {
          values.set(key, value);
          for (const resolve of waiting.get(key) ?? []) resolve(value);
          waiting.delete(key);
          reply(socket, 0, Buffer.alloc(0));
        } else if (op === 2) {
          const v = values.get(key);
          if (v) reply(socket, 0, v);
          else waiting.set(key, [...(waiting.get(key) ?? []), (x) => socket.writable && reply(socket, 0, x)]);
        } else if (op === 3) {
          const r = Number(key);
          if (Number.isInteger(r) && r >= 0 && r < size) {
            rank = r;
            Object.assign(ranks[r], { state: 'connected', seq: 0, kind: -1, since: Date.now() }); // a new group counts from 0
            reply(socket, 0, Buffer.alloc(0));
          } else reply(socket, 1, Buffer.from(`rank ${key} is not in [0, ${size})`));
        } else if (op === 4) {
          left = true;
          if (rank >= 0) Object.assign(ranks[rank], { state: 'left', since: Date.now() });
          reply(socket, 0, Buffer.alloc(0));
        } else if (op === 5) {
          reply(socket, 0, Buffer.from(JSON.stringify({ now: Date.now(), ranks })));
        } else if (op === 6) {
          const [seq, kind] = key.split(' ').map(Number);
          if (rank >= 0) Object.assign(ranks[rank], { seq, kind, since: Date.now() });
        } else {
          reply(socket, 1, Buffer.from(`unknown store op ${op}`));
        }
      }
    });
    const lost = () => {
      if (rank >= 0 && !left && ranks[rank].state === 'connected') Object.assign(ranks[rank], { state: 'lost', since: Date.now() });
    };
    socket.on('close', lost);
    socket.on('error', lost);
  });
  server.on('error', (err: NodeJS.ErrnoException) => parentPort!.postMessage({ error: err.code === 'EADDRINUSE' ? 'in use' : err.message }));
  server.listen(port, () => parentPort!.postMessage({ listening: true }));
  parentPort!.on('message', (m: { close?: boolean }) => {
    if (m.close) server.close(() => parentPort!.postMessage({ closed: true }));
  });
}

/** A running store server; `close()` stops it. */
export interface StoreServer {
  readonly port: number;
  close(): Promise<void>;
}

/** The servers this process runs, by port: a group made right after another one's dispose() takes over its
 * server (still open for the others' BYE) instead of failing with the port in use. */
const running = new Map<number, { server: Promise<StoreServer>; users: number; size: number; timer?: NodeJS.Timeout }>();

/** The store server of this process on `port`, started (or taken over) for one more group of `size` ranks. */
export async function acquireStore(port: number, size: number): Promise<StoreServer> {
  const open = running.get(port);
  if (open && open.size === size) {
    if (open.timer) clearTimeout(open.timer);
    open.timer = undefined;
    open.users++;
    return open.server;
  }
  const entry = { server: startStore(port, size), users: 1, size, timer: undefined as NodeJS.Timeout | undefined };
  running.set(port, entry);
  entry.server.catch(() => running.delete(port));
  return entry.server;
}

/** One group is done with the server: the last one closes it after `delayMs` (the other ranks' BYE still arrive). */
export function releaseStore(port: number, delayMs = 200): void {
  const open = running.get(port);
  if (!open || --open.users > 0) return;
  open.timer = setTimeout(() => {
    running.delete(port);
    void open.server.then((s) => s.close());
  }, delayMs);
  open.timer.unref();
}

/** Starts the store server on `port` (all interfaces) for a group of `size` ranks, in a worker thread. */
export async function startStore(port: number, size: number): Promise<StoreServer> {
  const worker = new Worker(`(${serve.toString()})()`, { eval: true, workerData: { port, size } });
  worker.unref();
  await new Promise<void>((resolve, reject) => {
    worker.once('message', (m: { listening?: boolean; error?: string }) => {
      if (m.listening) resolve();
      else {
        void worker.terminate();
        reject(
          new XftError(
            m.error === 'in use'
              ? `ProcessGroup.init: rank 0 cannot serve the rendezvous store: MASTER_PORT ${port} is in use on this host (pick another port)`
              : `ProcessGroup.init: rank 0 cannot serve the rendezvous store on port ${port}: ${m.error}`,
            'XFT_DIST',
          ),
        );
      }
    });
    worker.once('error', (err) => reject(new XftError(`ProcessGroup.init: the rendezvous store failed: ${err.message}`, 'XFT_DIST')));
  });
  return {
    port,
    close: () => worker.terminate().then(() => undefined),
  };
}
