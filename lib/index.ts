/** xft: XFT training for code LLMs (upcycle → MoE fine-tune → learned merge) on CPU and CUDA. */
export { XftError, type XftErrorCode } from './errors';
export {
  Tensor, type DType, type Device, type Shape, type TensorOptions, type RandomOptions,
  backend, cudaAvailable, memoryStats, synchronize, manualSeed, defaultDevice, setDefaultDevice, disposeAll,
} from './tensor';
import * as ops from './ops';
export { ops };
export type { Routing, RouteOptions, GroupedGemmOptions, GroupedGemmBackwardOptions } from './ops';
