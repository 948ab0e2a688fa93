// Bindings of the train op families (see cuda/xft_cuda.h, section [train]).
#include "common.h"

namespace xft {

void RegisterTrainOps(Napi::Env env, Napi::Object exports) { (void)env, (void)exports; }

}  // namespace xft
