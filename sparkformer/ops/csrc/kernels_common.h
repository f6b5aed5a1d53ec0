// Headers shared by the per-ISA kernel builds; included *before* any target pragma.
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.h"
#include "quant.h"
#include "sparse.h"
