// NcclComm: the GPU communicator over NCCL, loaded at run time by cuda/nccl.cu (CUDA builds only;
// a build without CUDA has no NCCL process groups).
#include "dist.h"

#ifndef XFT_WITH_CUDA
namespace xft {
namespace dist {
bool NcclCompiled() { return false; }
std::unique_ptr<Comm> MakeNcclComm(const CommOptions&, std::shared_ptr<StoreClient>) {
  throw MissingLibrary("this build of xft has no CUDA backend, so no NCCL");
}
}  // namespace dist
}  // namespace xft
#endif
