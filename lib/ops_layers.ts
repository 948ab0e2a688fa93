/**
 * Typed wrappers of the layers op families (see cuda/xft_cuda.h, section [layers]).
 */
export {};
