// Compiled CPU histogram pass of fasthist: for tensor i of a call, with per-tensor scale c_i,
//
//     x   = float32(sqrt_rn(float32(v))) / float32(c_i)     (sqrt=false: float32(v) / float32(c_i))
//     bin = LogBins layout of bits(|x|)                       (fasthist/bins.py)
//
// written into the two windows: step[rows[i]] = counts of tensor i, total[rows[i]] += them.
// The square root and the division are IEEE (round to nearest): the vector forms (sqrtps,
// divps) are correctly rounded, and the flags exclude every value-changing shortcut
// (no -ffast-math, no reciprocal); -fno-math-errno only lets sqrt vectorise, it changes no
// result. So the bins are exactly those of fasthist.reference.histogram, which stays the
// oracle.
//
// Work: the elements of all tensors, end to end, are cut into one contiguous range per
// thread (at::parallel_for, torch's own OpenMP pool). A range bins blocks of BLOCK elements
// in a vectorised pass (the bin arithmetic of LogBins.index, no table), then increments four
// interleaved private sub-histograms (uint32, so a run of equal bins does not serialise on
// one store-to-load chain). A tensor a range holds whole is written straight into its rows
// of the windows; a tensor cut between ranges is summed in per-range partial rows and
// written after the parallel region. Only the span [lo, hi] of bins a block touched is
// merged and cleared, so small tensors cost little beyond their own elements.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace {

constexpr int64_t BLOCK = 1024;             // elements binned per vectorised pass
constexpr int64_t FLUSH = int64_t(1) << 30;  // uint32 sub-histograms merged at least this often
constexpr int SUB = 4;                      // interleaved sub-histograms
constexpr uint32_t ABS_MASK = 0x7FFFFFFFu;
constexpr uint32_t INF_BITS = 0x7F800000u;

struct Layout {
  int32_t shift, low_key, above, nonfinite, num_bins;
};

inline float load(float v) { return v; }
inline float load(c10::BFloat16 v) {
  uint32_t bits = uint32_t(v.x) << 16;  // bf16 -> float32 is exact: the top half of the bits
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline float load(c10::Half v) { return c10::detail::fp16_ieee_to_fp32_value(v.x); }

// Bins of n (<= BLOCK) elements into out; returns the span [lo, hi] they touch.
template <typename T, bool SQRT, bool DIV, bool MUL>
inline __attribute__((always_inline)) void bins_impl(const T* __restrict v, int64_t n, float c, Layout L,
                                                     int32_t* __restrict out, int32_t* lo, int32_t* hi) {
  int32_t mn = L.num_bins, mx = -1;
  for (int64_t j = 0; j < n; ++j) {
    float x = load(v[j]);
    uint32_t vbits;
    std::memcpy(&vbits, &x, 4);
    const bool zero = (vbits & ABS_MASK) == 0;  // zero is decided before the division: a nonzero
                                                // value whose quotient underflows is below range
    if (SQRT) x = __builtin_sqrtf(x);
    if (DIV) x = x / c;
    if (MUL) x = x * c;  // reciprocal scales: one IEEE multiply
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    bits &= ABS_MASK;
    int32_t k = int32_t(bits >> L.shift) - L.low_key + 2;
    k = k < 1 ? 1 : k;  // below range, subnormals included
    k = k > L.above ? L.above : k;
    k = bits >= INF_BITS ? L.nonfinite : k;
    k = zero ? 0 : k;
    out[j] = k;
    mn = k < mn ? k : mn;
    mx = k > mx ? k : mx;
  }
  *lo = mn;
  *hi = mx;
}

// One clone per instruction set (the widest the CPU has is picked at load time), so one
// build is both portable and vectorised with the machine's widest sqrt/div.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTHIST_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTHIST_CLONES
#endif

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

// What one thread owns: a private histogram and the partial rows of its cut tensors.
struct Range {
  int64_t begin, end;                // elements, over all tensors end to end
  int64_t cut[2] = {-1, -1};         // tensors this range holds only part of
  std::vector<int64_t> partial[2];   // their counts
};

// Elements [a, b) of tensor t into dst (int64, num_bins); returns the span of bins touched.
void count_segment(const at::Tensor& t, int64_t a, int64_t b, float c, bool sq, bool dv, bool mu, const Layout& L,
                   uint32_t* hist, int32_t* idx, int64_t* dst, int32_t* span_lo, int32_t* span_hi) {
  const int64_t nb = L.num_bins;
  for (int64_t f0 = a; f0 < b; f0 += FLUSH) {
    const int64_t f1 = std::min(b, f0 + FLUSH);
    int32_t lo = L.num_bins, hi = -1;
    for (int64_t j0 = f0; j0 < f1; j0 += BLOCK) {
      const int64_t n = std::min(BLOCK, f1 - j0);
      int32_t blo, bhi;
      bins_block(t, j0, n, c, sq, dv, mu, L, idx, &blo, &bhi);
      lo = std::min(lo, blo);
      hi = std::max(hi, bhi);
      int64_t j = 0;
      for (; j + SUB <= n; j += SUB) {
        hist[idx[j]]++;
        hist[nb + idx[j + 1]]++;
        hist[2 * nb + idx[j + 2]]++;
        hist[3 * nb + idx[j + 3]]++;
      }
      for (; j < n; ++j) hist[idx[j]]++;
    }
    for (int32_t k = lo; k <= hi; ++k) {  // merge the span, and leave the private histogram zero
      dst[k] += int64_t(hist[k]) + hist[nb + k] + hist[2 * nb + k] + hist[3 * nb + k];
      hist[k] = hist[nb + k] = hist[2 * nb + k] = hist[3 * nb + k] = 0;
    }
    *span_lo = std::min(*span_lo, lo);
    *span_hi = std::max(*span_hi, hi);
  }
}

void histogram_(at::TensorList values, const at::Tensor& scale, const std::optional<at::Tensor>& found_inf, bool sqrt,
                bool reciprocal, int64_t shift, int64_t low_key, int64_t num_log_bins, const at::Tensor& rows,
                const at::Tensor& step, const at::Tensor& total) {
  const int64_t nt = int64_t(values.size());
  const Layout L{int32_t(shift), int32_t(low_key), int32_t(2 + num_log_bins), int32_t(3 + num_log_bins),
                 int32_t(4 + num_log_bins)};
  const int64_t nb = L.num_bins;
  TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.numel() == nt,
              "fasthist histogram_: scale must be ", nt, " contiguous CPU float32 values, got ", scale.numel(), " ",
              scale.scalar_type(), " on ", scale.device());
  if (found_inf.has_value() && found_inf->defined()) {
    TORCH_CHECK(found_inf->device().is_cpu() && found_inf->numel() == 1,
                "fasthist histogram_: found_inf must be one CPU value, got ", found_inf->numel(), " on ",
                found_inf->device());
    if (found_inf->to(at::kFloat).item<float>() != 0.0f) return;  // a skipped step leaves both windows as they were
  }
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.numel() == nt,
              "fasthist histogram_: rows must be ", nt, " contiguous int64");
  for (const at::Tensor* w : {&step, &total}) {
    TORCH_CHECK(w->scalar_type() == at::kLong && w->dim() == 2 && w->size(1) == nb && w->stride(1) == 1 &&
                    w->device().is_cpu(),
                "fasthist histogram_: step/total must be CPU int64 [R, ", nb, "] with contiguous rows");
  }
  std::vector<int64_t> offset(nt + 1, 0);
  for (int64_t i = 0; i < nt; ++i) {
    const at::Tensor& t = values[i];
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() &&
                    (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 ||
                     t.scalar_type() == at::kHalf),
                "fasthist histogram_: values must be contiguous CPU float32, bfloat16 or float16, got ",
                t.scalar_type(), " on ", t.device());
    offset[i + 1] = offset[i] + t.numel();
  }
  const int64_t* row = rows.const_data_ptr<int64_t>();
  int64_t* step_p = step.data_ptr<int64_t>();
  int64_t* total_p = total.data_ptr<int64_t>();
  const int64_t step_rs = step.stride(0), total_rs = total.stride(0);
  const float* c32 = scale.const_data_ptr<float>();  // float32(c), as the reference divides (or multiplies)
  bool div = false;
  for (int64_t i = 0; i < nt; ++i) div = div || c32[i] != 1.0f;

  const int64_t n_all = offset[nt];
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_all / 65536));
  std::vector<Range> ranges(nthreads);
  for (int64_t r = 0; r < nthreads; ++r) {
    ranges[r].begin = n_all * r / nthreads;
    ranges[r].end = n_all * (r + 1) / nthreads;
  }

  at::parallel_for(0, nthreads, 1, [&](int64_t r0, int64_t r1) {
    std::vector<uint32_t> hist(SUB * nb, 0);
    std::vector<int32_t> idx(BLOCK);
    for (int64_t r = r0; r < r1; ++r) {
      Range& R = ranges[r];
      if (R.begin == R.end) continue;
      // first tensor with elements in [begin, end)
      int64_t i = std::upper_bound(offset.begin(), offset.end(), R.begin) - offset.begin() - 1;
      int ncut = 0;
      for (; i < nt && offset[i] < R.end; ++i) {
        const int64_t a = std::max(R.begin, offset[i]) - offset[i];
        const int64_t b = std::min(R.end, offset[i + 1]) - offset[i];
        if (a >= b) continue;  // empty tensors are written after the parallel region
        const bool whole = a == 0 && b == values[i].numel();
        int64_t* dst;
        if (whole) {
          dst = step_p + row[i] * step_rs;
          std::memset(dst, 0, nb * sizeof(int64_t));
        } else {
          R.cut[ncut] = i;
          R.partial[ncut].assign(nb, 0);
          dst = R.partial[ncut].data();
          ++ncut;
        }
        int32_t lo = L.num_bins, hi = -1;
        count_segment(values[i], a, b, c32[i], sqrt, !reciprocal && div && c32[i] != 1.0f, reciprocal && c32[i] != 1.0f, L, hist.data(), idx.data(), dst, &lo,
                      &hi);
        if (whole) {
          int64_t* tot = total_p + row[i] * total_rs;
          for (int32_t k = lo; k <= hi; ++k) tot[k] += dst[k];
        }
      }
    }
  });

  // tensors cut between ranges, in range order (a tensor's parts are adjacent), and empty ones
  int64_t current = -1;
  int64_t* dst = nullptr;
  for (const Range& R : ranges) {
    for (int s = 0; s < 2; ++s) {
      const int64_t i = R.cut[s];
      if (i < 0) continue;
      if (i != current) {
        current = i;
        dst = step_p + row[i] * step_rs;
        std::memset(dst, 0, nb * sizeof(int64_t));
      }
      const int64_t* p = R.partial[s].data();
      int64_t* tot = total_p + row[i] * total_rs;
      for (int64_t k = 0; k < nb; ++k) {
        dst[k] += p[k];
        tot[k] += p[k];
      }
    }
  }
  for (int64_t i = 0; i < nt; ++i) {
    if (values[i].numel() == 0) std::memset(step_p + row[i] * step_rs, 0, nb * sizeof(int64_t));
  }
}

}  // namespace

TORCH_LIBRARY(fasthist, m) {
  m.def(
      "histogram_(Tensor[] values, Tensor scale, Tensor? found_inf, bool sqrt, bool reciprocal, int shift, int low_key, int num_log_bins, "
      "Tensor rows, Tensor(a!) step, Tensor(b!) total) -> ()");
}

TORCH_LIBRARY_IMPL(fasthist, CPU, m) { m.impl("histogram_", &histogram_); }
