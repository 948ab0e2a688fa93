/**
 * Where this process sits in a distributed run, read from the environment the way the launchers
 * people already use set it: torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
 * `MASTER_ADDR`, `MASTER_PORT`; xft's own launcher sets the same plus `XFT_DIST_LAUNCHER=1`), else
 * Slurm's srun (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, the first host of
 * `SLURM_NODELIST` as the master), else a single process. A bad value is an XftError that names the
 * variable; nothing here touches the network.
 */
import { XftError, describe } from '../errors';

/** The rendezvous port when none is given (torchrun's default too). */
export const DEFAULT_MASTER_PORT = 29500;

/** Who said how the run is laid out. */
export type DistSource = 'torchrun' | 'slurm' | 'xft' | 'single';

/** This process's place in the run. */
export interface DistEnv {
  /** 0 .. worldSize - 1 over all processes of the run. */
  rank: number;
  worldSize: number;
  /** 0 .. localWorldSize - 1 over the processes of this node (picks the GPU). */
  localRank: number;
  localWorldSize: number;
  /** Host and port of rank 0's rendezvous store. */
  masterAddr: string;
  masterPort: number;
  source: DistSource;
}

/** Environment variables as distEnv reads them (process.env by default). */
export type Env = Record<string, string | undefined>;

function bad(name: string, expected: string, value: unknown): XftError {
  return new XftError(`distEnv: expected ${expected} for the environment variable ${name} but received ${describe(value)}`, 'XFT_VALUE');
}

/** The variable as an integer in [min, max]; `fallback` when unset (undefined fallback: required). */
function intVar(env: Env, name: string, min: number, max: number, fallback?: number): number {
  const raw = env[name];
  if (raw === undefined || raw.trim() === '') {
    if (fallback !== undefined) return fallback;
    throw new XftError(`distEnv: the environment variable ${name} is required here but is not set`, 'XFT_VALUE');
  }
  const text = raw.trim();
  if (!/^\d+$/.test(text)) throw bad(name, `an integer in [${min}, ${max}]`, raw);
  const v = Number(text);
  if (!Number.isSafeInteger(v) || v < min || v > max) throw bad(name, `an integer in [${min}, ${max}]`, raw);
  return v;
}

function hostVar(env: Env, name: string, fallback?: string): string {
  const raw = env[name];
  if (raw === undefined || raw.trim() === '') {
    if (fallback !== undefined) return fallback;
    throw new XftError(`distEnv: the environment variable ${name} is required here but is not set`, 'XFT_VALUE');
  }
  const host = raw.trim();
  if (/[\s/,[\]]/.test(host) && !/^\[[0-9a-fA-F:.]+\]$/.test(host)) throw bad(name, 'a host name or address', raw);
  return host.startsWith('[') ? host.slice(1, -1) : host;
}

/**
 * The host names of a Slurm node list: `a,b`, `node[01-04]`, `node[1-3,7],gpu[10-11]`,
 * `rack[1-2]-n[01-02]` (several bracket groups: every combination, in Slurm's order). Zero padding
 * follows the width of the range's first bound. Malformed lists throw naming `name`.
 */
export function expandNodelist(list: string, name = 'SLURM_NODELIST'): string[] {
  const fail = () => bad(name, 'a Slurm node list such as node[01-04],gpu7', list);
  const hosts: string[] = [];
  // split at the commas outside brackets
  const parts: string[] = [];
  let depth = 0;
  let start = 0;
  for (let i = 0; i < list.length; i++) {
    const c = list[i];
    if (c === '[') {
      if (depth++ > 0) throw fail();
    } else if (c === ']') {
      if (--depth < 0) throw fail();
    } else if (c === ',' && depth === 0) {
      parts.push(list.slice(start, i));
      start = i + 1;
    }
  }
  if (depth !== 0) throw fail();
  parts.push(list.slice(start));
  for (const part of parts) {
    if (!part || /\s/.test(part)) throw fail();
    // alternate literal text and bracket groups
    let expansions = [''];
    const re = /([^[\]]*)(?:\[([^\]]*)\])?/g;
    let m: RegExpExecArray | null;
    let consumed = 0;
    while ((m = re.exec(part)) !== null && m[0] !== '') {
      consumed += m[0].length;
      const [, literal, group] = m;
      expansions = expansions.map((e) => e + literal);
      if (group !== undefined) {
        const items: string[] = [];
        for (const item of group.split(',')) {
          const r = /^(\d+)(?:-(\d+))?$/.exec(item);
          if (!r) throw fail();
          const lo = Number(r[1]);
          const hi = r[2] === undefined ? lo : Number(r[2]);
          if (hi < lo || hi - lo > 100000) throw fail();
          for (let v = lo; v <= hi; v++) items.push(String(v).padStart(r[1].length, '0'));
        }
        expansions = expansions.flatMap((e) => items.map((x) => e + x));
      }
    }
    if (consumed !== part.length) throw fail();
    for (const h of expansions) hosts.push(h);
  }
  return hosts;
}

/** The first count of a Slurm tasks-per-node list such as `4(x2),3` (4), or undefined when unset or malformed. */
function firstTaskCount(value: string | undefined): number | undefined {
  const m = value ? /^(\d+)/.exec(value.trim()) : null;
  return m ? Number(m[1]) : undefined;
}

/**
 * This process's place in the run, from `env` (default `process.env`): torchrun-style variables
 * when `RANK` or `WORLD_SIZE` is set, else Slurm's when `SLURM_PROCID` and `SLURM_NTASKS` are,
 * else a single process (rank 0 of 1). `MASTER_ADDR`/`MASTER_PORT` override Slurm's master (the
 * first node of `SLURM_NODELIST`, port 29500).
 */
export function distEnv(env: Env = process.env): DistEnv {
  if (env === null || typeof env !== 'object') throw new XftError(`distEnv: expected an environment object for env but received ${describe(env)}`, 'XFT_TYPE');
  const set = (name: string) => env[name] !== undefined && env[name]!.trim() !== '';
  if (set('RANK') || set('WORLD_SIZE')) {
    const worldSize = intVar(env, 'WORLD_SIZE', 1, 1 << 20);
    const rank = intVar(env, 'RANK', 0, worldSize - 1);
    const localWorldSize = intVar(env, 'LOCAL_WORLD_SIZE', 1, worldSize, set('LOCAL_RANK') ? undefined : 1);
    const localRank = intVar(env, 'LOCAL_RANK', 0, localWorldSize - 1, localWorldSize === 1 ? 0 : undefined);
    const many = worldSize > 1;
    return {
      rank, worldSize, localRank, localWorldSize,
      masterAddr: hostVar(env, 'MASTER_ADDR', many ? undefined : '127.0.0.1'),
      masterPort: intVar(env, 'MASTER_PORT', 1, 65535, many ? undefined : DEFAULT_MASTER_PORT),
      source: env.XFT_DIST_LAUNCHER === '1' ? 'xft' : 'torchrun',
    };
  }
  if (set('SLURM_PROCID') && set('SLURM_NTASKS')) {
    // srun sets SLURM_STEP_NUM_TASKS to the step's task count (SLURM_NTASKS can be the allocation's)
    const ntasksName = set('SLURM_STEP_NUM_TASKS') ? 'SLURM_STEP_NUM_TASKS' : 'SLURM_NTASKS';
    const worldSize = intVar(env, ntasksName, 1, 1 << 20);
    const rank = intVar(env, 'SLURM_PROCID', 0, worldSize - 1);
    const perNode = firstTaskCount(env.SLURM_STEP_TASKS_PER_NODE ?? env.SLURM_TASKS_PER_NODE ?? env.SLURM_NTASKS_PER_NODE);
    const localWorldSize = Math.min(worldSize, Math.max(1, perNode ?? worldSize));
    const localRank = intVar(env, 'SLURM_LOCALID', 0, localWorldSize - 1, worldSize === 1 ? 0 : undefined);
    let masterAddr: string;
    if (set('MASTER_ADDR')) masterAddr = hostVar(env, 'MASTER_ADDR');
    else {
      const listName = set('SLURM_STEP_NODELIST') ? 'SLURM_STEP_NODELIST' : set('SLURM_NODELIST') ? 'SLURM_NODELIST' : 'SLURM_JOB_NODELIST';
      if (!set(listName)) {
        if (worldSize > 1) throw new XftError('distEnv: the environment variable SLURM_NODELIST (or MASTER_ADDR) is required here but is not set', 'XFT_VALUE');
        masterAddr = '127.0.0.1';
      } else masterAddr = expandNodelist(env[listName]!.trim(), listName)[0];
    }
    return { rank, worldSize, localRank, localWorldSize, masterAddr, masterPort: intVar(env, 'MASTER_PORT', 1, 65535, DEFAULT_MASTER_PORT), source: 'slurm' };
  }
  return { rank: 0, worldSize: 1, localRank: 0, localWorldSize: 1, masterAddr: '127.0.0.1', masterPort: DEFAULT_MASTER_PORT, source: 'single' };
}
