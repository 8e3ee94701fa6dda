// 16-byte vector loads and stores of the CUDA kernels.
#pragma once

#include <cstdint>

namespace resnet_fused::cuda {

constexpr int kVecBytes = 16;

// Elements of scalar_t in one 16-byte access.
template <typename scalar_t>
constexpr int vec_size() {
  return kVecBytes / static_cast<int>(sizeof(scalar_t));
}

// N elements moved as one access of sizeof(T) * N bytes.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// One 16-byte load/store of a Vec. The store is an explicit st.global.v4
// (as CUTLASS does): a struct or int4 assignment was split by NVVM into four
// 32-bit stores in the backward kernels, and __stwb compiles to a strong
// (STG.E.128.STRONG.SM) store.
template <typename V>
__device__ __forceinline__ V load_vec(const void* p) {
  if constexpr (sizeof(V) == kVecBytes) {
    union {
      int4 raw;
      V vec;
    } u;
    u.raw = *reinterpret_cast<const int4*>(p);
    return u.vec;
  } else {
    return *reinterpret_cast<const V*>(p);
  }
}

template <typename V>
__device__ __forceinline__ void store_vec(void* p, const V& v) {
  if constexpr (sizeof(V) == kVecBytes) {
    union {
      V vec;
      int4 raw;
    } u;
    u.vec = v;
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p),
                 "r"(u.raw.x), "r"(u.raw.y), "r"(u.raw.z), "r"(u.raw.w)
                 : "memory");
  } else {
    *reinterpret_cast<V*>(p) = v;
  }
}

inline bool is_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0;
}

} // namespace resnet_fused::cuda
