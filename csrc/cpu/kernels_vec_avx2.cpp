// The CPU passes with ATen's AVX2 at::vec implementation. setup.py compiles
// this file alone with -mavx2 -mfma -mf16c, as ATen compiles its per-capability
// files (a `#pragma GCC target` breaks libstdc++'s always_inline functions on
// GCC 13); the passes run only after a run-time check (cpu::use_avx2).
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2

#include "cpu/kernels_impl.h"

namespace resnet_fused::cpu {
bool avx2_built() {
  return true;
}
} // namespace resnet_fused::cpu

#else

#include "cpu/kernels.h"

namespace resnet_fused::cpu {
bool avx2_built() {
  return false;
}
namespace AVX2 {
void epilogue_pass(const EpilogueArgs&) {
  TORCH_CHECK(false, "resnet_fused: built without AVX2 kernels");
}
void backward_pass(const BackwardArgs&) {
  TORCH_CHECK(false, "resnet_fused: built without AVX2 kernels");
}
} // namespace AVX2
} // namespace resnet_fused::cpu

#endif
