// What every compiled CPU pass of fasthist shares: the LogBins key of a float32 value, the
// loads and stores of the parameter dtypes, per-thread private histograms, and the one
// parallel sweep over all tensors of a call end to end.
//
// Bin of a value x (fasthist/bins.py):  bits = bits(|x|);  k = (bits >> shift) - low_key + 2,
// clamped to [1 (below range), above]; bits >= inf -> nonfinite; zero -> 0, where "zero" is
// decided by the caller (on the value before any scaling: a nonzero value whose quotient
// underflows counts below range).
//
// Work split: the elements of all tensors, end to end, are cut into one contiguous range per
// thread (at::parallel_for, torch's own pool; at least MIN_PER_THREAD elements each). A range
// processes blocks of BLOCK elements; each block's bins go into four interleaved uint32
// sub-histograms (a run of equal bins does not serialise on one store-to-load chain). A
// tensor a range holds whole is written straight into its rows of the windows; a tensor cut
// between ranges is summed in per-range partial rows and written after the parallel region.
// Only the span [lo, hi] of bins a tensor touched is merged and cleared; with spans
// (Windows::span) only the previous step's span of a step row is cleared, not the whole row.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <vector>

namespace fasthist {

constexpr int64_t BLOCK = 1024;             // elements per vectorised pass
constexpr int64_t FLUSH = int64_t(1) << 30;  // uint32 sub-histograms merged at least this often
constexpr int64_t MIN_PER_THREAD = 65536;   // smaller calls run on fewer threads
constexpr int SUB = 4;                      // interleaved sub-histograms
constexpr uint32_t ABS_MASK = 0x7FFFFFFFu;
constexpr uint32_t INF_BITS = 0x7F800000u;

struct Layout {
  int32_t shift, low_key, above, nonfinite, num_bins;
  static Layout of(int64_t shift, int64_t low_key, int64_t num_log_bins) {
    return Layout{int32_t(shift), int32_t(low_key), int32_t(2 + num_log_bins), int32_t(3 + num_log_bins),
                  int32_t(4 + num_log_bins)};
  }
};

#define FASTHIST_INLINE inline __attribute__((always_inline))

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

// The LogBins key of x; `zero` says the value was exactly zero before any scaling.
FASTHIST_INLINE int32_t bin_key(float x, bool zero, const Layout& L) {
  const uint32_t bits = bits_of(x) & ABS_MASK;
  int32_t k = int32_t(bits >> L.shift) - L.low_key + 2;
  k = k < 1 ? 1 : k;  // below range, subnormals included
  k = k > L.above ? L.above : k;
  k = bits >= INF_BITS ? L.nonfinite : k;
  return zero ? 0 : k;
}

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
    lo_ = std::min(lo_, blo);
    hi_ = std::max(hi_, bhi);
    const int32_t* idx = idx_.data();
    uint32_t* h = hist_.data();
    int64_t j = 0;
    for (; j + SUB <= n; j += SUB) {
      h[idx[j]]++;
      h[nb_ + idx[j + 1]]++;
      h[2 * nb_ + idx[j + 2]]++;
      h[3 * nb_ + idx[j + 3]]++;
    }
    for (; j < n; ++j) h[idx[j]]++;
    pending_ += n;
    if (pending_ >= FLUSH - BLOCK) merge();
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
  int64_t nb_;
  std::vector<uint32_t> hist_;
  std::vector<int32_t> idx_;
  int64_t* dst_ = nullptr;
  int32_t lo_ = 0, hi_ = -1, span_lo_ = INT32_MAX, span_hi_ = -1;
  int64_t pending_ = 0;
};

// The two int64 windows of a call: step[rows[i]] = counts of tensor i, total[rows[i]] += them.
//
// Spans (optional, `span` non-null): span[2i], span[2i+1] = the bins [lo, hi] outside which
// step row i is zero after this call (lo > hi: all zero). With `span_valid` the caller
// guarantees that the spans it passes were written by the previous call of this op on these
// rows and that nothing wrote the step rows since (fasthist.csrc checks the step buffer's
// version counter, which every torch op and every op of this library bumps); then only the
// old span is cleared instead of the whole row (20 KB per tensor with the default bins).
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

// True when found_inf (one CPU value, or absent) is nonzero: the reference's "skipped".
bool skipped(const std::optional<at::Tensor>& found_inf, const char* op);

// Checks the rows and windows of an op, bumps both windows' version counters (they are about
// to be written: a custom op's mutable arguments are not bumped by the dispatcher, and the
// spans above rely on every writer bumping), and returns them.
Windows check_windows(const char* op, int64_t nt, int64_t nb, const at::Tensor& rows, const at::Tensor& step,
                      const at::Tensor& total);

// What the fused ops (fused_adam.cpp, fused_adagrad.cpp) check and read alike.
//
// Their tensors: one dtype (float32, bfloat16 or float16) over every list, and for each i
// contiguous CPU tensors of params[i]'s size; returns the dtype and fills sizes.
at::ScalarType check_fused_lists(const char* op, std::initializer_list<at::TensorList> lists,
                                 std::vector<int64_t>& sizes);

// The host scalars of a fused step. `update`: false when found_inf is 1 (torch's fused steps
// skip the update then); `count`: false when found_inf is nonzero (the reference leaves both
// windows as they were); `grad_scale`: one CPU float32 or null; `lr`: lr_tensor's value if
// given, else `lr`.
struct StepScalars {
  bool update, count;
  const float* grad_scale;
  double lr;
};
StepScalars step_scalars(const char* op, const std::optional<at::Tensor>& found_inf,
                         const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& lr_tensor,
                         double lr);

// f(T{}) with T the element type of dtype (one of the three fused_lists accepts).
template <class F>
void with_dtype(at::ScalarType dtype, F&& f) {
  if (dtype == at::kFloat)
    f(float{});
  else if (dtype == at::kBFloat16)
    f(c10::BFloat16{});
  else
    f(c10::Half{});
}

// The span of step row i's nonzero bins, read off the row (tensors cut between ranges: few).
inline void set_span_of_row(const Windows& W, int64_t i) {
  if (W.span == nullptr) return;
  const int64_t* dst = W.step_row(i);
  int32_t lo = 0, hi = int32_t(W.nb) - 1;
  while (lo <= hi && dst[lo] == 0) ++lo;
  while (hi >= lo && dst[hi] == 0) --hi;
  W.set_span(i, lo, hi);
}

// Runs seg(i, a, b, hist) over elements [a, b) of every tensor i (sizes[i] elements), in
// parallel ranges; seg counts its elements into `hist` (begin/end are done here). With
// count=false no window is written (seg is still run, and must not touch `hist`).
template <class Seg>
void sweep(const std::vector<int64_t>& sizes, const Windows& W, bool count, Seg&& seg) {
  const int64_t nt = int64_t(sizes.size());
  std::vector<int64_t> offset(nt + 1, 0);
  for (int64_t i = 0; i < nt; ++i) offset[i + 1] = offset[i] + sizes[i];
  const int64_t n_all = offset[nt];
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_all / MIN_PER_THREAD));
  struct Range {
    int64_t begin, end;
    int64_t cut[2] = {-1, -1};        // tensors this range holds only part of
    std::vector<int64_t> partial[2];  // their counts
  };
  std::vector<Range> ranges(nthreads);
  for (int64_t r = 0; r < nthreads; ++r) {
    ranges[r].begin = n_all * r / nthreads;
    ranges[r].end = n_all * (r + 1) / nthreads;
  }
  const int64_t nb = W.nb;
  at::parallel_for(0, nthreads, 1, [&](int64_t r0, int64_t r1) {
    PrivateHist hist(count ? nb : 0);
    for (int64_t r = r0; r < r1; ++r) {
      Range& R = ranges[r];
      if (R.begin == R.end) continue;
      int64_t i = std::upper_bound(offset.begin(), offset.end(), R.begin) - offset.begin() - 1;
      int ncut = 0;
      for (; i < nt && offset[i] < R.end; ++i) {
        const int64_t a = std::max(R.begin, offset[i]) - offset[i];
        const int64_t b = std::min(R.end, offset[i + 1]) - offset[i];
        if (a >= b) continue;  // empty tensors are written after the parallel region
        if (!count) {
          seg(i, a, b, hist);
          continue;
        }
        const bool whole = a == 0 && b == sizes[i];
        int64_t* dst;
        if (whole) {
          dst = W.step_row(i);
          W.clear_row(i, dst);
        } else {
          R.cut[ncut] = i;
          R.partial[ncut].assign(nb, 0);
          dst = R.partial[ncut].data();
          ++ncut;
        }
        hist.begin(dst);
        seg(i, a, b, hist);
        int32_t lo, hi;
        hist.end(&lo, &hi);
        if (whole) {
          int64_t* tot = W.total_row(i);
          for (int32_t k = lo; k <= hi; ++k) tot[k] += dst[k];
          W.set_span(i, lo, hi);  // the row is zero outside [lo, hi]: merge() wrote only there
        }
      }
    }
  });
  if (!count) return;
  // tensors cut between ranges, in range order (a tensor's parts are adjacent), and empty ones
  int64_t current = -1;
  int64_t* dst = nullptr;
  for (const Range& R : ranges) {
    for (int s = 0; s < 2; ++s) {
      const int64_t i = R.cut[s];
      if (i < 0) continue;
      if (i != current) {
        if (current >= 0) set_span_of_row(W, current);
        current = i;
        dst = W.step_row(i);
        W.clear_row(i, dst);
      }
      const int64_t* p = R.partial[s].data();
      int64_t* tot = W.total_row(i);
      for (int64_t k = 0; k < nb; ++k) {
        dst[k] += p[k];
        tot[k] += p[k];
      }
    }
  }
  if (current >= 0) set_span_of_row(W, current);
  for (int64_t i = 0; i < nt; ++i) {
    if (sizes[i] == 0) {
      W.clear_row(i, W.step_row(i));
      W.set_span(i, 1, 0);
    }
  }
}

// One clone per instruction set (the widest the CPU has is picked at load time), so one
// build is both portable and vectorised with the machine's widest sqrt/div/fma.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTHIST_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTHIST_CLONES
#endif

}  // namespace fasthist
