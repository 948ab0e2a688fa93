// Prebuilt binaries only (XFT_PORTABLE, force-included into every C++ file): bind the libm functions whose default symbol
// version moved in glibc 2.27/2.29 (a faster exp/pow/expf/logf without the SVID error wrappers) to
// their first version, so that the CPU addon loads on glibc older than the build machine's (the floor
// in the README). Same results: the old entry points compute the same values and only differ in errno.
#pragma once
#if defined(__GLIBC__) || defined(__linux__)
#if defined(__x86_64__)
#define XFT_GLIBC_BASE "GLIBC_2.2.5"
#elif defined(__aarch64__)
#define XFT_GLIBC_BASE "GLIBC_2.17"
#endif
#ifdef XFT_GLIBC_BASE
__asm__(".symver exp,exp@" XFT_GLIBC_BASE);
__asm__(".symver pow,pow@" XFT_GLIBC_BASE);
__asm__(".symver log,log@" XFT_GLIBC_BASE);
__asm__(".symver expf,expf@" XFT_GLIBC_BASE);
__asm__(".symver logf,logf@" XFT_GLIBC_BASE);
__asm__(".symver powf,powf@" XFT_GLIBC_BASE);
#endif
#endif
