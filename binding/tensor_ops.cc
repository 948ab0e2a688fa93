// Tensor plumbing: host <-> device transfers, copies, fills, casts.
#include <string.h>

#include <vector>

#include "common.h"

namespace xft {

namespace {

// upload(storage, dtype, typedArray, offsetElements): host values into a storage.
// f32 and bf16 take a Float32Array (bf16 rounds to nearest even), i32 an Int32Array.
Napi::Value Upload(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "upload";
  Storage* s = ArgStorage(info, 0, op, "storage");
  int dtype = ArgDtype(info, 1, op, "dtype");
  if (!info[2].IsTypedArray()) Throw(env, "XFT_TYPE", "upload: data must be a typed array");
  Napi::TypedArray ta = info[2].As<Napi::TypedArray>();
  napi_typedarray_type want = dtype == XFT_I32 ? napi_int32_array : napi_float32_array;
  if (ta.TypedArrayType() != want)
    Throw(env, "XFT_DTYPE", std::string("upload: data for a ") + DtypeName(dtype) + " tensor must be a " +
                                (dtype == XFT_I32 ? "Int32Array" : "Float32Array"));
  size_t offset = (size_t)ArgInt(info, 3, op, "offset");
  size_t n = ta.ElementLength();
  RequireBytes(env, s, offset + n, dtype, op, "storage");
  const void* src = (const char*)ta.ArrayBuffer().Data() + ta.ByteOffset();
  char* dst = (char*)s->data + offset * DtypeSize(dtype);
  // `staged` (and the JS array) may go as soon as this returns: xft_cuda_memcpy_h2d copies through
  // pinned staging buffers, so the asynchronous DMA never reads them (cuda/runtime.cu)
  std::vector<uint16_t> staged;
  if (dtype == XFT_BF16) {
    staged.resize(n);
    const float* f = (const float*)src;
    for (size_t i = 0; i < n; i++) staged[i] = xft_f32_to_bf16(f[i]);
    src = staged.data();
  }
  size_t nbytes = n * DtypeSize(dtype);
  if (s->device == DEV_CPU) {
    if (nbytes) memcpy(dst, src, nbytes);
  } else {
#ifdef XFT_WITH_CUDA
    CheckStatus(env, op, xft_cuda_memcpy_h2d(dst, src, nbytes));
#endif
  }
  return env.Undefined();
}

// download(storage, dtype, n, offsetElements) -> Float32Array (f32, bf16) or Int32Array (i32).
// Waits for the queued work that produces the values.
Napi::Value Download(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "toArray";
  Storage* s = ArgStorage(info, 0, op, "storage");
  int dtype = ArgDtype(info, 1, op, "dtype");
  size_t n = (size_t)ArgInt(info, 2, op, "n");
  size_t offset = (size_t)ArgInt(info, 3, op, "offset");
  RequireBytes(env, s, offset + n, dtype, op, "storage");
  const char* src = (const char*)s->data + offset * DtypeSize(dtype);
  size_t nbytes = n * DtypeSize(dtype);
  Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, n * 4);
  std::vector<uint16_t> staged;
  void* dst = ab.Data();
  if (dtype == XFT_BF16) {
    staged.resize(n);
    dst = staged.data();
  }
  if (s->device == DEV_CPU) {
    if (nbytes) memcpy(dst, src, nbytes);
  } else {
#ifdef XFT_WITH_CUDA
    CheckSynced(env, "toArray (or a kernel queued before it)", xft_cuda_memcpy_d2h(dst, src, nbytes));
#endif
  }
  if (dtype == XFT_BF16) {
    float* f = (float*)ab.Data();
    for (size_t i = 0; i < n; i++) f[i] = xft_bf16_to_f32(staged[i]);
  }
  if (dtype == XFT_I32) return Napi::Int32Array::New(env, n, ab, 0);
  return Napi::Float32Array::New(env, n, ab, 0);
}

// uploadBytes(storage, Uint8Array, offsetBytes): raw bytes into a storage (checkpoint loading).
Napi::Value UploadBytes(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "uploadBytes";
  Storage* s = ArgStorage(info, 0, op, "storage");
  if (!info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array)
    Throw(env, "XFT_TYPE", "uploadBytes: data must be a Uint8Array");
  Napi::Uint8Array a = info[1].As<Napi::Uint8Array>();
  size_t offset = (size_t)ArgInt(info, 2, op, "offset");
  if (offset + a.ByteLength() > s->bytes) Throw(env, "XFT_SHAPE", "uploadBytes: range out of bounds");
  char* dst = (char*)s->data + offset;
  if (s->device == DEV_CPU) {
    if (a.ByteLength()) memcpy(dst, a.Data(), a.ByteLength());
  } else {
#ifdef XFT_WITH_CUDA
    CheckStatus(env, op, xft_cuda_memcpy_h2d(dst, a.Data(), a.ByteLength()));
#endif
  }
  return env.Undefined();
}

// downloadBytes(storage, bytes, offsetBytes) -> Uint8Array: raw bytes out (checkpoint saving). Waits.
Napi::Value DownloadBytes(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "downloadBytes";
  Storage* s = ArgStorage(info, 0, op, "storage");
  size_t n = (size_t)ArgInt(info, 1, op, "bytes");
  size_t offset = (size_t)ArgInt(info, 2, op, "offset");
  if (offset + n > s->bytes) Throw(env, "XFT_SHAPE", "downloadBytes: range out of bounds");
  Napi::Uint8Array out = Napi::Uint8Array::New(env, n);
  const char* src = (const char*)s->data + offset;
  if (s->device == DEV_CPU) {
    if (n) memcpy(out.Data(), src, n);
  } else {
#ifdef XFT_WITH_CUDA
    CheckSynced(env, "downloadBytes (or a kernel queued before it)", xft_cuda_memcpy_d2h(out.Data(), src, n));
#endif
  }
  return out;
}

// copy(dst, src, bytes, dstOffsetBytes, srcOffsetBytes): between any two devices.
Napi::Value Copy(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "copy";
  Storage* dst = ArgStorage(info, 0, op, "dst");
  Storage* src = ArgStorage(info, 1, op, "src");
  size_t nbytes = (size_t)ArgInt(info, 2, op, "bytes");
  size_t doff = (size_t)ArgInt(info, 3, op, "dstOffset");
  size_t soff = (size_t)ArgInt(info, 4, op, "srcOffset");
  if (doff + nbytes > dst->bytes || soff + nbytes > src->bytes)
    Throw(env, "XFT_SHAPE", "copy: range out of bounds");
  char* d = (char*)dst->data + doff;
  const char* s = (const char*)src->data + soff;
  if (dst->device == DEV_CPU && src->device == DEV_CPU) {
    if (nbytes) memmove(d, s, nbytes);
    return env.Undefined();
  }
#ifdef XFT_WITH_CUDA
  if (dst->device == DEV_CUDA && src->device == DEV_CUDA) CheckStatus(env, op, xft_cuda_memcpy_d2d(d, s, nbytes));
  else if (dst->device == DEV_CUDA) CheckStatus(env, op, xft_cuda_memcpy_h2d(d, s, nbytes));
  else CheckSynced(env, op, xft_cuda_memcpy_d2h(d, s, nbytes));
#endif
  return env.Undefined();
}

// fillRandom(storage, dtype, n, kind, seed, a, b): kind 0 uniform [a, b), 1 normal(mean a, std b)
Napi::Value FillRandom(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "fillRandom";
  Storage* s = ArgStorage(info, 0, op, "storage");
  int dtype = ArgDtype(info, 1, op, "dtype");
  size_t n = (size_t)ArgInt(info, 2, op, "n");
  int kind = (int)ArgInt(info, 3, op, "kind");
  uint64_t seed = (uint64_t)ArgInt(info, 4, op, "seed");
  float a = (float)ArgNumber(info, 5, op, "a"), b = (float)ArgNumber(info, 6, op, "b");
  RequireBytes(env, s, n, dtype, op, "storage");
  XFT_DISPATCH(env, op, s->device, fill_random, s->data, dtype, n, kind, seed, a, b);
  return env.Undefined();
}

// fillValue(storage, dtype, n, value)
Napi::Value FillValue(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "fillValue";
  Storage* s = ArgStorage(info, 0, op, "storage");
  int dtype = ArgDtype(info, 1, op, "dtype");
  size_t n = (size_t)ArgInt(info, 2, op, "n");
  double value = ArgNumber(info, 3, op, "value");
  RequireBytes(env, s, n, dtype, op, "storage");
  XFT_DISPATCH(env, op, s->device, fill_value, s->data, dtype, n, value);
  return env.Undefined();
}

// cast(dst, dstDtype, src, srcDtype, n): on one device
Napi::Value Cast(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "cast";
  Storage* dst = ArgStorage(info, 0, op, "dst");
  int ddt = ArgDtype(info, 1, op, "dstDtype");
  Storage* src = ArgStorage(info, 2, op, "src");
  int sdt = ArgDtype(info, 3, op, "srcDtype");
  size_t n = (size_t)ArgInt(info, 4, op, "n");
  RequireBytes(env, dst, n, ddt, op, "dst");
  RequireBytes(env, src, n, sdt, op, "src");
  int device = CommonDevice(env, op, {dst, src});
  XFT_DISPATCH(env, op, device, cast, dst->data, ddt, src->data, sdt, n);
  return env.Undefined();
}

}  // namespace

void RegisterTensorOps(Napi::Env env, Napi::Object exports) {
  exports.Set("upload", Napi::Function::New(env, Upload, "upload"));
  exports.Set("download", Napi::Function::New(env, Download, "download"));
  exports.Set("copy", Napi::Function::New(env, Copy, "copy"));
  exports.Set("uploadBytes", Napi::Function::New(env, UploadBytes, "uploadBytes"));
  exports.Set("downloadBytes", Napi::Function::New(env, DownloadBytes, "downloadBytes"));
  exports.Set("fillRandom", Napi::Function::New(env, FillRandom, "fillRandom"));
  exports.Set("fillValue", Napi::Function::New(env, FillValue, "fillValue"));
  exports.Set("cast", Napi::Function::New(env, Cast, "cast"));
}

}  // namespace xft
