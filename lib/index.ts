/** xft: XFT training for code LLMs (upcycle → MoE fine-tune → learned merge) on CPU and CUDA. */
export { XftError, type XftErrorCode } from './errors';
export {
  Tensor, type DType, type Device, type Shape, type TensorOptions, type RandomOptions,
  backend, cudaAvailable, memoryStats, synchronize, manualSeed, defaultDevice, setDefaultDevice, disposeAll,
} from './tensor';
import * as xftOps from './ops';
import * as layerOps from './ops_layers';
import * as trainOps from './ops_train';
/** Every op: the XFT kernels (routing, grouped GEMM, merge) and the supporting kernels of a training step. */
export const ops = { ...xftOps, ...layerOps, ...trainOps };
export type { Routing, RouteOptions, GroupedGemmOptions, GroupedGemmBackwardOptions } from './ops';
