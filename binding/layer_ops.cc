// Bindings of the layer op families (see cuda/xft_cuda.h, section [layers]).
#include "common.h"

namespace xft {

void RegisterLayerOps(Napi::Env env, Napi::Object exports) { (void)env, (void)exports; }

}  // namespace xft
