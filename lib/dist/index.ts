/** Distributed training's communication layer: where a process sits (env), the collectives (group), the local launcher (launch). */
export { distEnv, expandNodelist, DEFAULT_MASTER_PORT, type DistEnv, type DistSource } from './env';
export { ProcessGroup, DEFAULT_DIST_TIMEOUT_MS, type ProcessGroupOptions, type ReduceOp, type DistBackend, type Work } from './group';
export { launch, type LaunchOptions, type LaunchResult } from './launch';
