/**
 * Typed wrappers of the train op families (see cuda/xft_cuda.h, section [train]).
 */
export {};
