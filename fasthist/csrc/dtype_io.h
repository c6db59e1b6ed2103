// Loads and stores of the parameter dtypes the compiled CPU passes take (float32, bfloat16,
// float16), all computing in float32, and the dispatch over them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "log_bins.h"

namespace fasthist {

// float32 from each parameter dtype: exact (bf16 is the top half of a float32's bits).
FASTHIST_INLINE float load(float v) { return v; }
FASTHIST_INLINE float load(c10::BFloat16 v) { return float_of(uint32_t(v.x) << 16); }
#if defined(__FLT16_MAX__)  // the compiler's _Float16: IEEE conversions that vectorise (F16C, AVX512-FP16)
FASTHIST_INLINE float load(c10::Half v) {
  _Float16 h;
  std::memcpy(&h, &v.x, 2);
  return float(h);
}
#else
FASTHIST_INLINE float load(c10::Half v) { return c10::detail::fp16_ieee_to_fp32_value(v.x); }
#endif

// float32 to each dtype, rounded to nearest even as c10 and ATen's vector conversions do.
FASTHIST_INLINE void store(float* p, float f) { *p = f; }
FASTHIST_INLINE void store(c10::BFloat16* p, float f) {
  const uint32_t u = bits_of(f);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  p->x = uint16_t((u & ABS_MASK) > INF_BITS ? 0x7FC0u : r);
}
#if defined(__FLT16_MAX__)
FASTHIST_INLINE void store(c10::Half* p, float f) {
  const _Float16 h = _Float16(f);
  std::memcpy(&p->x, &h, 2);
}
#else
FASTHIST_INLINE void store(c10::Half* p, float f) { p->x = c10::detail::fp16_ieee_from_fp32_value(f); }
#endif

// f(T{}) with T the element type of dtype (one of the three above; the ops check it first).
template <class F>
void with_dtype(at::ScalarType dtype, F&& f) {
  if (dtype == at::kFloat)
    f(float{});
  else if (dtype == at::kBFloat16)
    f(c10::BFloat16{});
  else
    f(c10::Half{});
}

}  // namespace fasthist
