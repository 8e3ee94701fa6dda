// The CPU passes with ATen's portable at::vec implementation.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT

#include "cpu/kernels_impl.h"
