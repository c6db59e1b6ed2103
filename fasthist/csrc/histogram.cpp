// Compiled CPU histogram pass of fasthist: for tensor i of a call, with per-tensor scale c_i,
//
//     x   = float32(sqrt_rn(float32(v))) / float32(c_i)     (sqrt=false: float32(v) / float32(c_i))
//     bin = LogBins layout of bits(|x|)                       (fasthist/bins.py)
//
// written into the two windows: step[rows[i]] = counts of tensor i, total[rows[i]] += them.
// `spans` (optional, int32 [n, 2]) records each step row's nonzero span, so that the next call
// clears only that span (spans_valid: the caller vouches nothing else wrote the rows since;
// see Windows in private_hist.h).
// The square root and the division are IEEE (round to nearest): the vector forms (sqrtps,
// divps) are correctly rounded, and the flags exclude every value-changing shortcut
// (no -ffast-math, no reciprocal); -fno-math-errno only lets sqrt vectorise, it changes no
// result. So the bins are exactly those of fasthist.reference.histogram, which stays the
// oracle.
//
// Work: one parallel sweep over all tensors end to end, blocks of BLOCK elements binned in a
// vectorised pass (the bin arithmetic of LogBins.index, no table), counted into per-thread
// private histograms (private_hist.h).

#include <ATen/ops/view_as_real.h>
#include <torch/library.h>

#include <optional>

#include "private_hist.h"

namespace fasthist {

Windows check_windows(const char* op, int64_t nt, int64_t nb, const at::Tensor& rows, const at::Tensor& step,
                      const at::Tensor& total) {
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.numel() == nt,
              "fasthist ", op, ": rows must be ", nt, " contiguous CPU int64, got ", rows.numel(), " ",
              rows.scalar_type());
  for (const at::Tensor* w : {&step, &total}) {
    TORCH_CHECK(w->scalar_type() == at::kLong && w->dim() == 2 && w->size(1) == nb && w->stride(1) == 1 &&
                    w->device().is_cpu(),
                "fasthist ", op, ": step/total must be CPU int64 [R, ", nb, "] with contiguous rows");
  }
  for (const at::Tensor* w : {&step, &total}) {
    if (!w->is_inference()) w->unsafeGetTensorImpl()->bump_version();
  }
  const int64_t* row = rows.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < nt; ++i) {
    TORCH_CHECK(row[i] >= 0 && row[i] < step.size(0) && row[i] < total.size(0), "fasthist ", op, ": row ", row[i],
                " of tensor ", i, " is outside the windows (", step.size(0), " rows)");
  }
  return Windows{row, step.data_ptr<int64_t>(), step.stride(0), total.data_ptr<int64_t>(), total.stride(0), nb};
}

// True when found_inf (a CPU value, or absent) says the step was skipped: nonzero.
bool skipped(const std::optional<at::Tensor>& found_inf, const char* op) {
  if (!found_inf.has_value() || !found_inf->defined()) return false;
  TORCH_CHECK(found_inf->device().is_cpu() && found_inf->numel() == 1, "fasthist ", op,
              ": found_inf must be one CPU value, got ", found_inf->numel(), " on ", found_inf->device());
  return found_inf->to(at::kFloat).item<float>() != 0.0f;
}

at::ScalarType check_fused_lists(const char* op, std::initializer_list<at::TensorList> lists,
                                 std::vector<int64_t>& sizes) {
  const at::TensorList params = *lists.begin();
  const int64_t nt = int64_t(params.size());
  for (const at::TensorList& list : lists)
    TORCH_CHECK(int64_t(list.size()) == nt, "fasthist ", op, ": expected ", nt, " tensors in every list");
  const at::ScalarType dtype = nt ? params[0].scalar_type() : at::kFloat;
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "fasthist ", op,
              ": params must be float32, bfloat16 or float16, got ", dtype);
  sizes.assign(nt, 0);
  for (int64_t i = 0; i < nt; ++i) {
    for (const at::TensorList& list : lists) {
      const at::Tensor& t = list[i];
      TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype &&
                      t.numel() == params[i].numel(),
                  "fasthist ", op, ": tensor ", i, " of every list must be a contiguous CPU ", dtype,
                  " tensor of its parameter's size, got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
    }
    sizes[i] = params[i].numel();
  }
  return dtype;
}

StepScalars step_scalars(const char* op, const std::optional<at::Tensor>& found_inf,
                         const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& lr_tensor,
                         double lr) {
  StepScalars S{true, !skipped(found_inf, op), nullptr, lr};
  if (!S.count) S.update = found_inf->to(at::kFloat).item<float>() != 1.0f;  // torch's fused skip
  if (grad_scale.has_value() && grad_scale->defined()) {
    TORCH_CHECK(grad_scale->device().is_cpu() && grad_scale->scalar_type() == at::kFloat && grad_scale->numel() == 1,
                "fasthist ", op, ": grad_scale must be one CPU float32 value");
    S.grad_scale = grad_scale->const_data_ptr<float>();
  }
  if (lr_tensor.has_value() && lr_tensor->defined()) S.lr = lr_tensor->item<double>();
  return S;
}

}  // namespace fasthist

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
