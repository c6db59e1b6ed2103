// The two int64 windows an op of the compiled CPU passes writes, and the spans that let it
// clear only what the previous call wrote in a step row.
#pragma once

#include <cstdint>
#include <cstring>

namespace fasthist {

// The two int64 windows of a call: step[rows[i]] = counts of tensor i, total[rows[i]] += them.
//
// Spans (optional, `span` non-null): span[2i], span[2i+1] = the bins [lo, hi] outside which
// step row i is zero after this call (lo > hi: all zero). With `span_valid` the caller
// guarantees that the spans it passes were written by the previous call of this op on these
// rows and that nothing wrote the step rows since (fasthist.csrc checks the step buffer's
// version counter, which every torch op and every op of this library bumps; an inference
// tensor has none, and is never vouched for); then only the old span is cleared instead of the whole row (20 KB per tensor with the default bins).
// The result is the same: row = counts of this call, exactly, zero elsewhere.
struct Windows {
  const int64_t* row;
  int64_t* step;
  int64_t step_rs;
  int64_t* total;
  int64_t total_rs;
  int64_t nb;
  int32_t* span = nullptr;
  bool span_valid = false;
  int64_t* step_row(int64_t i) const { return step + row[i] * step_rs; }
  int64_t* total_row(int64_t i) const { return total + row[i] * total_rs; }
  // Zeroes step row i (at `dst`) where it may be nonzero: the old span when it is known.
  void clear_row(int64_t i, int64_t* dst) const {
    if (span != nullptr && span_valid) {
      const int32_t lo = span[2 * i], hi = span[2 * i + 1];
      if (lo > hi) return;                            // already all zero
      if (lo >= 0 && hi < nb) {                       // a span this op wrote; else clear all
        std::memset(dst + lo, 0, (hi - lo + 1) * sizeof(int64_t));
        return;
      }
    }
    std::memset(dst, 0, nb * sizeof(int64_t));
  }
  void set_span(int64_t i, int32_t lo, int32_t hi) const {
    if (span == nullptr) return;
    span[2 * i] = lo <= hi ? lo : int32_t(nb);
    span[2 * i + 1] = lo <= hi ? hi : -1;
  }
};

// The span of step row i's nonzero bins, read off the row (tensors cut between ranges: few).
inline void set_span_of_row(const Windows& W, int64_t i) {
  if (W.span == nullptr) return;
  const int64_t* dst = W.step_row(i);
  int32_t lo = 0, hi = int32_t(W.nb) - 1;
  while (lo <= hi && dst[lo] == 0) ++lo;
  while (hi >= lo && dst[hi] == 0) --hi;
  W.set_span(i, lo, hi);
}

}  // namespace fasthist
