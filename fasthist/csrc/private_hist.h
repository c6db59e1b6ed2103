// A thread's private histogram for the compiled CPU passes: the bins of BLOCK elements at a
// time, counted into SUB interleaved uint32 sub-histograms (a run of equal bins does not
// serialise on one store-to-load chain), merged into an int64 row over the span [lo, hi] of
// bins touched, and left zero.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fasthist {

constexpr int64_t BLOCK = 1024;             // elements per vectorised pass
constexpr int64_t FLUSH = int64_t(1) << 30;  // uint32 sub-histograms merged at least this often
constexpr int SUB = 4;                      // interleaved sub-histograms
#define FASTHIST_PH_INLINE inline __attribute__((always_inline))

// A thread's private histogram: SUB interleaved uint32 copies, merged into an int64 row.
class PrivateHist {
 public:
  explicit PrivateHist(int64_t nb) : nb_(nb), hist_(SUB * nb, 0), idx_(BLOCK) {}
  int32_t* idx() { return idx_.data(); }

  void begin(int64_t* dst) {
    dst_ = dst;
    lo_ = int32_t(nb_);
    hi_ = -1;
    pending_ = 0;
  }
  // Counts idx()[0, n), whose bins lie in [blo, bhi].
  void add(int64_t n, int32_t blo, int32_t bhi) {
    note(n, blo, bhi);
    int64_t j = 0;
    for (; j + SUB <= n; j += SUB) count4(j);
    for (; j < n; ++j) hist_[idx_[j]]++;
    if (pending_ >= FLUSH - BLOCK) merge();
  }
  // a.add(n, alo, ahi) and b.add(n, blo, bhi) in one loop: the increments of two histograms
  // are independent, so twice as many are in flight (a run of equal bins is a chain of
  // store-to-load dependences in each).
  static void add_pair(PrivateHist& a, int32_t alo, int32_t ahi, PrivateHist& b, int32_t blo, int32_t bhi, int64_t n) {
    a.note(n, alo, ahi);
    b.note(n, blo, bhi);
    int64_t j = 0;
    for (; j + SUB <= n; j += SUB) {
      a.count4(j);
      b.count4(j);
    }
    for (; j < n; ++j) {
      a.hist_[a.idx_[j]]++;
      b.hist_[b.idx_[j]]++;
    }
    if (a.pending_ >= FLUSH - BLOCK) a.merge();
    if (b.pending_ >= FLUSH - BLOCK) b.merge();
  }
  // Merges what is pending into the row given to begin(); the span of bins touched since.
  void end(int32_t* span_lo, int32_t* span_hi) {
    merge();
    *span_lo = span_lo_;
    *span_hi = span_hi_;
    span_lo_ = int32_t(nb_);
    span_hi_ = -1;
  }

 private:
  void merge() {
    uint32_t* h = hist_.data();
    for (int32_t k = lo_; k <= hi_; ++k) {  // merge the span, and leave the private histogram zero
      dst_[k] += int64_t(h[k]) + h[nb_ + k] + h[2 * nb_ + k] + h[3 * nb_ + k];
      h[k] = h[nb_ + k] = h[2 * nb_ + k] = h[3 * nb_ + k] = 0;
    }
    span_lo_ = std::min(span_lo_, lo_);
    span_hi_ = std::max(span_hi_, hi_);
    lo_ = int32_t(nb_);
    hi_ = -1;
    pending_ = 0;
  }
  void note(int64_t n, int32_t blo, int32_t bhi) {
    lo_ = std::min(lo_, blo);
    hi_ = std::max(hi_, bhi);
    pending_ += n;
  }
  // idx()[j, j + SUB), one per sub-histogram
  FASTHIST_PH_INLINE void count4(int64_t j) {
    const int32_t* idx = idx_.data();
    uint32_t* h = hist_.data();
    h[idx[j]]++;
    h[nb_ + idx[j + 1]]++;
    h[2 * nb_ + idx[j + 2]]++;
    h[3 * nb_ + idx[j + 3]]++;
  }
  int64_t nb_;
  std::vector<uint32_t> hist_;
  std::vector<int32_t> idx_;
  int64_t* dst_ = nullptr;
  int32_t lo_ = 0, hi_ = -1, span_lo_ = INT32_MAX, span_hi_ = -1;
  int64_t pending_ = 0;
};

}  // namespace fasthist
