// The CPU passes with ATen's AVX2 at::vec implementation. setup.py compiles
// every file with one set of flags, so this file turns AVX2 on for itself;
// it runs only after a run-time check (cpu::use_avx2).
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c")
#pragma GCC diagnostic ignored "-Wpsabi"
// The target pragma does not define these; sleef's and ATen's headers test them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2

#include "cpu/kernels_impl.h"

#else

#include "cpu/kernels.h"

namespace resnet_fused::cpu::AVX2 {
void epilogue_pass(const EpilogueArgs&) {
  TORCH_CHECK(false, "resnet_fused: built without AVX2 kernels");
}
void backward_pass(const BackwardArgs&) {
  TORCH_CHECK(false, "resnet_fused: built without AVX2 kernels");
}
} // namespace resnet_fused::cpu::AVX2

#endif
