// Prebuilt binaries only (XFT_PORTABLE): GCC 11+ headers make `new T[n]` call
// std::__throw_bad_array_new_length, which only libstdc++ >= 11 exports (GLIBCXX_3.4.29). A local,
// hidden definition keeps the addon loadable with the older libstdc++ of older distributions; it
// throws the same exception.
#include <new>

namespace std {
[[noreturn]] __attribute__((visibility("hidden"))) void __throw_bad_array_new_length() { throw bad_array_new_length(); }
}  // namespace std
