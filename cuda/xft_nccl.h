/*
The NCCL side of the communicator (cuda/nccl.cu): NCCL loaded at run time with dlopen, so that the
build needs no NCCL and a host without it gets a clear error. Plain C, like xft_cuda.h; the binding
(binding/dist/nccl.cc) drives it.

Streams: every collective runs on one communication stream (the "side" stream), in issue order, so
that the communicator sees the same order on every rank. xft_nccl_begin makes the side stream wait
for the work queued so far on xft's stream (xft_cuda_stream); xft_nccl_end records an event after
the collective; xft_nccl_join makes xft's stream wait for that event (no host wait), so later kernels
see the result while the host goes on.

Every function returns 0 on success; otherwise xft_nccl_last_error() says what failed (a CUDA or
NCCL error, with its name and number).
*/
#pragma once
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define XFT_NCCL_ID_BYTES 128

// Loads libnccl.so.2: `paths` is a newline-separated list of files to try in order (e.g. XFT_NCCL_LIBRARY,
// then "libnccl.so.2" from the loader's search path, then the pip wheels' nvidia/nccl/lib); on failure
// the last error lists every attempt. Idempotent. `version` gets NCCL's version code (e.g. 22105).
int xft_nccl_load(const char* paths, int* version);
const char* xft_nccl_last_error(void);

int xft_nccl_unique_id(void* id);  // XFT_NCCL_ID_BYTES bytes
// The communicator of `rank` of `size` (blocking until every rank joined); creates the side stream.
int xft_nccl_comm_init(void** comm, int size, const void* id, int rank);
// ncclCommGetAsyncError: *failed = 1 and the last error set when the communicator met an error.
int xft_nccl_comm_check(void* comm, int* failed);
int xft_nccl_comm_abort(void* comm);    // ends its kernels in flight; frees it
int xft_nccl_comm_destroy(void* comm);  // waits for its work; frees it

// dtype: xft_dtype (F32 or BF16; 3 here means f64 and 4 u8, for the host helpers). op: 0 sum, 1 avg.
int xft_nccl_begin(void);
int xft_nccl_group_start(void);
int xft_nccl_group_end(void);
int xft_nccl_all_reduce(void* comm, const void* send, void* recv, size_t count, int dtype, int op);
int xft_nccl_reduce_scatter(void* comm, const void* send, void* recv, size_t recv_count, int dtype, int op);
int xft_nccl_all_gather(void* comm, const void* send, void* recv, size_t send_count, int dtype);
int xft_nccl_broadcast(void* comm, void* buf, size_t count, int dtype, int root);
int xft_nccl_end(void** event);  // a new event after the side stream's work
// 0 done, 1 not yet (never an error: errors come back as 0 with the last error set, *failed = 1)
int xft_nccl_event_done(void* event, int* failed);
int xft_nccl_join(void* event);  // xft's stream waits for it (no host wait)
int xft_nccl_event_free(void* event);
// Makes the calling thread use the device of xft's stream (for a watchdog thread).
int xft_nccl_bind_thread(void);

#ifdef __cplusplus
}
#endif
