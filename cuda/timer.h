/*
Device-side timers for profiling (bench/train --profile): a pool of timestamps, each recorded into the
op stream, read back as milliseconds between two of them. CUDA: cudaEvents recorded on the runtime's
stream (cuda/timer.cu), so the time between two is the device's, not the host's. CPU twin
(binding/cpu/timer.cc): the host's steady clock, which on the CPU backend is the ops' own time.
Functions return 0 or a cudaError_t value; slots are 0 <= slot < the count given to reset.
*/
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

int xft_cuda_timer_reset(int count);                        // a pool of `count` timestamps (0 frees it)
int xft_cuda_timer_record(int slot);                        // enqueue timestamp `slot` on the stream
int xft_cuda_timer_elapsed(int from, int to, float* ms);    // waits for `to`; ms between the two
int xft_cpu_timer_reset(int count);
int xft_cpu_timer_record(int slot);
int xft_cpu_timer_elapsed(int from, int to, float* ms);

#ifdef __cplusplus
}
#endif
