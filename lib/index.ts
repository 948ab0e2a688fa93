/** xft: XFT training for code LLMs (upcycle → MoE fine-tune → learned merge) on CPU and CUDA. */
export { XftError, type XftErrorCode } from './errors';
export {
  Tensor, type DType, type Device, type Shape, type TensorOptions, type RandomOptions,
  backend, cudaAvailable, memoryStats, resetPeakMemory, emptyCache, setHostCacheLimit, synchronize, manualSeed, defaultDevice, setDefaultDevice, disposeAll,
} from './tensor';
import * as xftOps from './ops';
import * as layerOps from './ops_layers';
import * as trainOps from './ops_train';
import * as routerOps from './ops_router';
import { adamw, adamwMulti, adafactor } from './optim';
/** Every op: the XFT kernels (routing, grouped GEMM, merge) and the supporting kernels of a training step. */
export const ops = { ...xftOps, ...layerOps, ...trainOps, ...routerOps, adamw, adamwMulti, adafactor };
export type { Routing, RouteOptions, GroupedGemmOptions, GroupedGemmBackwardOptions, GateUpOptions, GateUpBackwardOptions } from './ops';
export type { RmsnormOptions, RmsnormResult, RmsnormBackwardOptions, RopeOptions, RouterNoiseOptions } from './ops_layers';
export type { RouterLinearBackwardOptions, RoutingProbeLossOptions } from './ops_router';
export type {
  AttentionOptions, AttentionResult, CrossEntropyOptions, CrossEntropyBackwardOptions, PermutationOptions, LoadEstimateOptions,
} from './ops_train';
export type { NativeBackend, NativeMemoryStats, NativeStorage } from './native';
export type { NativeCudaProbe } from './backend_reason';
export * from './checkpoint';
export {
  type OptimizerKind, type OptimizerState, type Precision, OPTIMIZERS, PRECISIONS, bytesPerParameter, adafactorState, adafactorStateShapes,
  adafactorStateElements, isFactored, type AdamWOptions, type AdamWEntry, type ControlOption, type HyperOption, type AdafactorOptions, type AdafactorEntry, type AdafactorState, type StepHyper,
} from './optim';
export { type LlamaConfig, type MoeConfig, type RouterKind, llamaConfig, moeConfig, tinyConfig, hfConfigJson, parameterCount, configJsonText, readConfigJson } from './config';
export { Model, Param, Block, DenseFFN, MoeFFN, MergedFFN, type FFN, type ForwardResult, type ForwardOptions, type Context, type BackwardOptions } from './model';
export { createDense, upcycle, mergeable, toDense, copyDense, countParameters, type UpcycleOptions, type RouterInitKind, type MergeableOptions, type InitOptions } from './xft';
export { train, trainAsync, Trainer, evaluate, learningRate, saveTrainState, loadTrainState, readTrainStateInfo, useMasterWeights, disposeState, type TrainOptions, type StepInfo, type TrainState, type TrainResult, type TrainParallel } from './train';
export {
  type Example, type Sample, type Batch, type Tokenizer, ByteTokenizer, HfTokenizer, loadTokenizer, parseJsonl, readJsonl,
  encodeExample, formatPrompt, toRows, concatRows, countTargets, type TokenArray, batches, split, shuffle, MAGICODER_PROMPT,
  encodeDataFile, encodeDataFileAsync, cacheFileOf, type EncodeDataOptions, type EncodedData,
} from './data';
export {
  planMemory, formatPlan, PLAN_DEFAULTS, type PlanOptions, type PlanSource, type MemoryPlan, type MemoryBreakdown, type PlanStage, type PlanOptimizer, type PlanPrecision,
} from './plan';
export { generate, pickToken, type GenerateOptions, type GenerateResult } from './generate';
export {
  SafetensorsReader, writeSafetensors, writeShards, writeFolderAtomic, writeFileAtomic, readHeader,
  type TensorInfo, type WriteEntry, type WriteOptions, type FileDType,
} from './safetensors';
export { lockFolder, recoverFolder, type FolderLock } from './folder';
export {
  ProcessGroup, distEnv, expandNodelist, launch, DEFAULT_MASTER_PORT, DEFAULT_DIST_TIMEOUT_MS,
  type DistEnv, type DistSource, type ProcessGroupOptions, type ReduceOp, type DistBackend, type Work, type LaunchOptions, type LaunchResult,
} from './dist';
export { DataParallel, type DataParallelOptions } from './dist/ddp';
export { ZeroStage1 } from './dist/zero';
export { type Collectives, collectivesOf, SoloGroup } from './dist/collectives';
export { rankBatch, buckets, flatPieces, shardSize, assignWhole, DEFAULT_BUCKET_BYTES, type RankBatch, type Bucket, type BucketParam, type Piece } from './dist/shard';
export type { Env as DistEnvVariables } from './dist/env';
export {
  upit, upitFolders, spawnTrain, UPIT_STAGES, UPIT_DEFAULTS, assembleMoe, expandPool, seedIndices, rowLosses, assignBuckets, preoptimizeRouting, readRoutingVectors,
  checkpointSteps, listEpochCheckpoints, trainJointRouter, trunkExpert, JOINT_ROUTER_FILE,
  type JointRouterOptions, type JointRouterResult, type RouterFit, type TrunkExpertOptions,
  type UpitOptions, type UpitResult, type UpitStage, type AssembleOptions, type ExpandOptions, type ExpandResult, type ExpandRound, type BucketOptions, type BucketMode, type Buckets,
  type RouteOptions as RoutingVectorOptions, type RoutingResult, type EpochCheckpoint,
} from './upit/index';
export { type BalanceLossKind } from './config';
export type { SwitchLossOptions } from './ops_train';
export { StepLedger, zeroMany, STEP_STATUS, type StepRecord, type StepStatus } from './ledger';
export { CudaGraph } from './graph';
