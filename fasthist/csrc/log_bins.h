// The LogBins key of a float32 value (fasthist/bins.py), read off its bits, and the
// attributes every inner loop of the compiled CPU passes is built with.
//
// Bin of a value x:  bits = bits(|x|);  k = (bits >> shift) - low_key + 2, clamped to
// [1 (below range), above]; bits >= inf -> nonfinite; zero -> 0, where "zero" is decided by
// the caller (on the value before any scaling: a nonzero value whose quotient underflows
// counts below range).
#pragma once

#include <cstdint>
#include <cstring>

namespace fasthist {

#define FASTHIST_INLINE inline __attribute__((always_inline))

// One clone per instruction set (the widest the CPU has is picked at load time), so one
// build is both portable and vectorised with the machine's widest sqrt/div/fma.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTHIST_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTHIST_CLONES
#endif

constexpr uint32_t ABS_MASK = 0x7FFFFFFFu;
constexpr uint32_t INF_BITS = 0x7F800000u;

// The bins of a LogBins layout: 0 zero, 1 below range, [2, above) the log bins, above,
// nonfinite; num_bins in all.
struct Layout {
  int32_t shift, low_key, above, nonfinite, num_bins;
  static Layout of(int64_t shift, int64_t low_key, int64_t num_log_bins) {
    return Layout{int32_t(shift), int32_t(low_key), int32_t(2 + num_log_bins), int32_t(3 + num_log_bins),
                  int32_t(4 + num_log_bins)};
  }
};

FASTHIST_INLINE uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
FASTHIST_INLINE float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The LogBins key of x; `zero` says the value was exactly zero before any scaling.
FASTHIST_INLINE int32_t bin_key(float x, bool zero, const Layout& L) {
  const uint32_t bits = bits_of(x) & ABS_MASK;
  int32_t k = int32_t(bits >> L.shift) - L.low_key + 2;
  k = k < 1 ? 1 : k;  // below range, subnormals included
  k = k > L.above ? L.above : k;
  k = bits >= INF_BITS ? L.nonfinite : k;
  return zero ? 0 : k;
}

}  // namespace fasthist
