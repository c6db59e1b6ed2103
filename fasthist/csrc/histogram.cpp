// Compiled CPU histogram pass of fasthist: for tensor i of a call, with per-tensor scale c_i,
//
//     x   = float32(sqrt_rn(float32(v))) / float32(c_i)     (sqrt=false: float32(v) / float32(c_i))
//     bin = LogBins layout of bits(|x|)                       (fasthist/bins.py)
//
// written into the two windows: step[rows[i]] = counts of tensor i, total[rows[i]] += them.
// `spans` (optional, int32 [n, 2]) records each step row's nonzero span, so that the next call
// clears only that span (spans_valid: the caller vouches nothing else wrote the rows since;
// see Windows in windows.h).
// The square root and the division are IEEE (round to nearest): the vector forms (sqrtps,
// divps) are correctly rounded, and the flags exclude every value-changing shortcut
// (no -ffast-math, no reciprocal); -fno-math-errno only lets sqrt vectorise, it changes no
// result. So the bins are exactly those of fasthist.reference.histogram, which stays the
// oracle.
//
// Work: one parallel sweep over all tensors end to end, blocks of BLOCK elements binned in a
// vectorised pass (the bin arithmetic of LogBins.index, no table), counted into per-thread
// private histograms (private_hist.h) in the sweep of sweep.h.

#include <ATen/ops/view_as_real.h>
#include <torch/library.h>

#include <optional>

#include "dtype_io.h"
#include "log_bins.h"
#include "op_args.h"
#include "sweep.h"

namespace {

using namespace fasthist;

// Bins of n (<= BLOCK) elements into out; returns the span [lo, hi] they touch.
template <typename T, bool SQRT, bool DIV, bool MUL>
inline __attribute__((always_inline)) void bins_impl(const T* __restrict v, int64_t n, float c, Layout L,
                                                     int32_t* __restrict out, int32_t* lo, int32_t* hi) {
  int32_t mn = L.num_bins, mx = -1;
  for (int64_t j = 0; j < n; ++j) {
    float x = load(v[j]);
    const bool zero = (bits_of(x) & ABS_MASK) == 0;  // decided before the division: a nonzero
                                                     // value whose quotient underflows is below range
    if (SQRT) x = __builtin_sqrtf(x);
    if (DIV) x = x / c;
    if (MUL) x = x * c;  // reciprocal scales: one IEEE multiply
    const int32_t k = bin_key(x, zero, L);
    out[j] = k;
    mn = k < mn ? k : mn;
    mx = k > mx ? k : mx;
  }
  *lo = mn;
  *hi = mx;
}
#define FASTHIST_BINS(NAME, T)                                                                                 \
  FASTHIST_CLONES void NAME(const T* v, int64_t n, float c, bool sq, bool dv, bool mu, Layout L, int32_t* out, \
                            int32_t* lo, int32_t* hi) {                                                      \
    if (sq && dv)                                                                                            \
      bins_impl<T, true, true, false>(v, n, c, L, out, lo, hi);                                              \
    else if (sq && mu)                                                                                       \
      bins_impl<T, true, false, true>(v, n, c, L, out, lo, hi);                                              \
    else if (sq)                                                                                             \
      bins_impl<T, true, false, false>(v, n, c, L, out, lo, hi);                                             \
    else if (dv)                                                                                             \
      bins_impl<T, false, true, false>(v, n, c, L, out, lo, hi);                                             \
    else if (mu)                                                                                             \
      bins_impl<T, false, false, true>(v, n, c, L, out, lo, hi);                                             \
    else                                                                                                     \
      bins_impl<T, false, false, false>(v, n, c, L, out, lo, hi);                                            \
  }
FASTHIST_BINS(bins_f32, float)
FASTHIST_BINS(bins_bf16, c10::BFloat16)
FASTHIST_BINS(bins_f16, c10::Half)

void bins_block(const at::Tensor& t, int64_t begin, int64_t n, float c, bool sq, bool dv, bool mu, const Layout& L,
                int32_t* out, int32_t* lo, int32_t* hi) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return bins_f32(t.const_data_ptr<float>() + begin, n, c, sq, dv, mu, L, out, lo, hi);
    case at::kBFloat16:
      return bins_bf16(t.const_data_ptr<c10::BFloat16>() + begin, n, c, sq, dv, mu, L, out, lo, hi);
    default:
      return bins_f16(t.const_data_ptr<c10::Half>() + begin, n, c, sq, dv, mu, L, out, lo, hi);
  }
}

// Elements [a, b) of tensor t, counted into hist.
void count_segment(const at::Tensor& t, int64_t a, int64_t b, float c, bool sq, bool dv, bool mu, const Layout& L,
                   PrivateHist& hist) {
  for (int64_t j0 = a; j0 < b; j0 += BLOCK) {
    const int64_t n = std::min(BLOCK, b - j0);
    int32_t blo, bhi;
    bins_block(t, j0, n, c, sq, dv, mu, L, hist.idx(), &blo, &bhi);
    hist.add(n, blo, bhi);
  }
}

void histogram_(at::TensorList values, const at::Tensor& scale, const std::optional<at::Tensor>& found_inf, bool sqrt,
                bool reciprocal, int64_t shift, int64_t low_key, int64_t num_log_bins, const at::Tensor& rows,
                const at::Tensor& step, const at::Tensor& total, const std::optional<at::Tensor>& spans,
                bool spans_valid) {
  const int64_t nt = int64_t(values.size());
  const Layout L = Layout::of(shift, low_key, num_log_bins);
  TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.numel() == nt,
              "fasthist histogram_: scale must be ", nt, " contiguous CPU float32 values, got ", scale.numel(), " ",
              scale.scalar_type(), " on ", scale.device());
  Windows W = check_windows("histogram_", nt, L.num_bins, rows, step, total);
  if (spans.has_value() && spans->defined()) {
    TORCH_CHECK(spans->device().is_cpu() && spans->scalar_type() == at::kInt && spans->is_contiguous() &&
                    spans->numel() == 2 * nt,
                "fasthist histogram_: spans must be ", 2 * nt, " contiguous CPU int32, got ", spans->numel(), " ",
                spans->scalar_type());
    W.span = spans->data_ptr<int32_t>();
    W.span_valid = spans_valid;
  }
  if (skipped(found_inf, "histogram_")) return;  // a skipped step leaves both windows as they were
  std::vector<int64_t> sizes(nt);
  std::vector<at::Tensor> flat(nt);  // complex as (re, im) pairs, contiguous (a copy only where needed)
  for (int64_t i = 0; i < nt; ++i) {
    flat[i] = (values[i].is_complex() ? at::view_as_real(values[i]) : values[i]).contiguous();
    const at::Tensor& t = flat[i];
    TORCH_CHECK(t.device().is_cpu() &&
                    (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 ||
                     t.scalar_type() == at::kHalf),
                "fasthist histogram_: values must be CPU float32, bfloat16 or float16 (or complex of them), got ",
                t.scalar_type(), " on ", t.device());
    sizes[i] = t.numel();
  }
  const float* c32 = scale.const_data_ptr<float>();  // float32(c), as the reference divides (or multiplies)
  sweep(sizes, W, true, [&](int64_t i, int64_t a, int64_t b, PrivateHist& hist) {
    const bool scaled = c32[i] != 1.0f;
    count_segment(flat[i], a, b, c32[i], sqrt, scaled && !reciprocal, scaled && reciprocal, L, hist);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fasthist, m) {
  m.def(
      "histogram_(Tensor[] values, Tensor scale, Tensor? found_inf, bool sqrt, bool reciprocal, int shift, int low_key, int num_log_bins, "
      "Tensor rows, Tensor(a!) step, Tensor(b!) total, Tensor(c!)? spans=None, bool spans_valid=False) -> ()");
}

TORCH_LIBRARY_IMPL(fasthist, CPU, m) { m.impl("histogram_", &histogram_); }
