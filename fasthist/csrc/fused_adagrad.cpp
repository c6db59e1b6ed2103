// Fused CPU step with the histogram of sqrt(state_sum), in one sweep: what
// torch._fused_adagrad_ computes on the CPU, plus, per element, the LogBins key of the value
// eps is added to:
//
//     g   = grad / grad_scale                     (written back to grad, as torch does; the
//                                                  update goes on with the unrounded quotient)
//     g   = -g                                    (maximize)
//     g   = fma(p, wd, g)                         (weight_decay != 0)
//     s   = fma(g, g, s)                          (state_sum)
//     std = sqrt(s) + eps                         (s before any rounding to the dtype)
//     p   = p - (clr * g) / std                   clr = lr / (1 + (step - 1) * lr_decay), float64
//     bin = LogBins key of sqrt(s)                (exactly the reference's: IEEE sqrt)
//
// all in float32 for float32, bfloat16 and float16 tensors (loads widen exactly, stores round
// to nearest even). Where torch's x86 build (AVX512 and AVX2 kernels alike) rounds, found by
// probing torch 2.13: GCC contracts both a*b + c above into fma, in the vector body and the
// scalar tail; for bfloat16/float16 the body (all but the last numel % 16 elements) takes
// wd, eps and clr rounded to the parameter dtype and back (float(T(float(x)))), the tail takes
// float32(x). The same split is done here (tail_mod = 16; 0 elsewhere: only the tolerances
// of the tests are claimed), so on x86 the states and parameters are bit-identical to torch's
// fused step (tests/test_cpu_fused_adagrad.py checks this).
//
// The histogram is the reference's (adagrad_hist_inputs): sqrt of the *stored* sum,
// so for bfloat16/float16 it is recomputed from the rounded s; an element whose stored sum is
// zero counts as zero. A step with found_inf == 1 changes nothing (torch's rule); the windows
// are left as they were whenever found_inf is nonzero (the reference's rule).

#include <torch/library.h>

#include <cmath>
#include <optional>

#include "dtype_io.h"
#include "log_bins.h"
#include "op_args.h"
#include "sweep.h"

namespace {

using namespace fasthist;

// Per-tensor coefficients, all float32; l2 is 1 or 0 (no bool: GCC 12 does not vectorise a
// loop that selects on a bool loaded from memory, so the switch is derived by a comparison).
struct AdagradCoef {
  float clr, eps, wd, l2, gscale, sign;
};

// One block of n elements: the update in place, bins of sqrt(s) into out, span into lo/hi.
template <typename T, bool SCALE>
FASTHIST_INLINE void adagrad_impl(T* __restrict p, T* __restrict g, T* __restrict s, int64_t n, const AdagradCoef& k,
                                  Layout L, int32_t* __restrict out, int32_t* lo, int32_t* hi) {
  // the coefficients in locals: no store below can change them
  const float clr = k.clr, eps = k.eps, wd = k.wd, gscale = k.gscale, sign = k.sign;
  const bool l2 = k.l2 != 0.0f;
  constexpr bool reuse = std::is_same_v<T, float>;  // the update's sqrt(s) is the histogram's
  int32_t mn = L.num_bins, mx = -1;
  for (int64_t j = 0; j < n; ++j) {
    float pv = load(p[j]);
    float gv = load(g[j]);
    if (SCALE) {
      gv = gv / gscale;
      store(&g[j], gv);
    }
    gv = gv * sign;  // maximize: -1 (exact)
    gv = l2 ? __builtin_fmaf(pv, wd, gv) : gv;
    const float sv = __builtin_fmaf(gv, gv, load(s[j]));
    store(&s[j], sv);
    const float x = __builtin_sqrtf(sv);
    pv = pv - (clr * gv) / (x + eps);
    store(&p[j], pv);
    // the reference bins the stored state: rounded for bfloat16/float16
    const float ss = load(s[j]);
    const bool zero = (bits_of(ss) & ABS_MASK) == 0;
    const float xh = reuse ? x : __builtin_sqrtf(ss);
    const int32_t key = bin_key(xh, zero, L);
    out[j] = key;
    mn = key < mn ? key : mn;
    mx = key > mx ? key : mx;
  }
  *lo = mn;
  *hi = mx;
}

#define FASTHIST_ADAGRAD(NAME, T)                                                                                 \
  FASTHIST_CLONES void NAME(T* p, T* g, T* s, int64_t n, const AdagradCoef& k, bool scale, Layout L, int32_t* out, \
                            int32_t* lo, int32_t* hi) {                                                           \
    scale ? adagrad_impl<T, true>(p, g, s, n, k, L, out, lo, hi)                                                  \
          : adagrad_impl<T, false>(p, g, s, n, k, L, out, lo, hi);                                                \
  }
FASTHIST_ADAGRAD(adagrad_f32, float)
FASTHIST_ADAGRAD(adagrad_bf16, c10::BFloat16)
FASTHIST_ADAGRAD(adagrad_f16, c10::Half)

// Elements [a, b) of one tensor; `body` holds torch's vector-body coefficients, `tail` its
// scalar tail's (the last numel % tail_mod elements).
template <typename T>
void adagrad_segment(const at::Tensor* t, int64_t a, int64_t b, const AdagradCoef& body, const AdagradCoef& tail,
                     bool scale, int64_t tail_mod, bool count, const Layout& L, PrivateHist& hist) {
  T* ptr[3];
  for (int s = 0; s < 3; ++s) ptr[s] = t[s].data_ptr<T>();
  const int64_t numel = t[0].numel();
  const int64_t body_end = tail_mod > 0 ? numel - numel % tail_mod : numel;
  for (int64_t j0 = a; j0 < b;) {
    const int64_t stop = j0 < body_end ? std::min(b, body_end) : b;
    const int64_t n = std::min(BLOCK, stop - j0);
    const AdagradCoef& k = j0 < body_end ? body : tail;
    int32_t* out = hist.idx();  // binned even when not counted (found_inf in (0, 1)): no branch per element
    int32_t lo, hi;
    if constexpr (std::is_same_v<T, float>)
      adagrad_f32(ptr[0] + j0, ptr[1] + j0, ptr[2] + j0, n, k, scale, L, out, &lo, &hi);
    else if constexpr (std::is_same_v<T, c10::BFloat16>)
      adagrad_bf16(ptr[0] + j0, ptr[1] + j0, ptr[2] + j0, n, k, scale, L, out, &lo, &hi);
    else
      adagrad_f16(ptr[0] + j0, ptr[1] + j0, ptr[2] + j0, n, k, scale, L, out, &lo, &hi);
    if (count) hist.add(n, lo, hi);
    j0 += n;
  }
}

// float(T(float(x))): a float64 coefficient as torch's vector body for dtype T sees it.
float in_dtype(double x, at::ScalarType dtype) {
  if (dtype == at::kBFloat16) return float(c10::BFloat16(float(x)));
  if (dtype == at::kHalf) return float(c10::Half(float(x)));
  return float(x);
}

void fused_adagrad_hist_(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                         at::TensorList state_steps, double lr, const std::optional<at::Tensor>& lr_tensor,
                         double lr_decay, double weight_decay, double eps, bool maximize,
                         const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                         int64_t tail_mod, int64_t shift, int64_t low_key, int64_t num_log_bins, const at::Tensor& rows,
                         const at::Tensor& step, const at::Tensor& total) {
  const char* op = "fused_adagrad_hist_";
  const int64_t nt = int64_t(params.size());
  const Layout L = Layout::of(shift, low_key, num_log_bins);
  const Windows W = check_windows(op, nt, L.num_bins, rows, step, total);
  std::vector<int64_t> sizes;
  const at::ScalarType dtype = check_fused_lists(op, {params, grads, state_sums}, sizes);
  TORCH_CHECK(int64_t(state_steps.size()) == nt, "fasthist ", op, ": expected ", nt, " tensors in every list");
  const StepScalars S = step_scalars(op, found_inf, grad_scale, lr_tensor, lr);
  if (!S.update) return;
  const bool count = S.count;
  const float* gs = S.grad_scale;
  lr = S.lr;
  std::vector<AdagradCoef> body(nt), tail(nt);
  for (int64_t i = 0; i < nt; ++i) {  // float64 on the host, as torch's fused step
    const double s = state_steps[i].item<float>();
    const double clr = lr / (1.0 + (s - 1.0) * lr_decay);
    const float l2 = weight_decay != 0.0 ? 1.0f : 0.0f, g = gs ? *gs : 1.0f, sign = maximize ? -1.0f : 1.0f;
    body[i] = AdagradCoef{in_dtype(clr, dtype), in_dtype(eps, dtype), in_dtype(weight_decay, dtype), l2, g, sign};
    tail[i] = AdagradCoef{float(clr), float(eps), float(weight_decay), l2, g, sign};
  }
  sweep(sizes, W, count, [&](int64_t i, int64_t a, int64_t b, PrivateHist& hist) {
    const at::Tensor t[3] = {params[i], grads[i], state_sums[i]};
    with_dtype(dtype, [&](auto tag) {
      adagrad_segment<decltype(tag)>(t, a, b, body[i], tail[i], gs != nullptr, tail_mod, count, L, hist);
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fasthist, m) {
  m.def(
      "fused_adagrad_hist_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] state_sums, Tensor[] state_steps, "
      "*, float lr, Tensor? lr_tensor, float lr_decay, float weight_decay, float eps, bool maximize, "
      "Tensor? grad_scale, Tensor? found_inf, int tail_mod, int shift, int low_key, int num_log_bins, Tensor rows, "
      "Tensor(d!) step, Tensor(e!) total) -> ()");
}

TORCH_LIBRARY_IMPL(fasthist, CPU, m) { m.impl("fused_adagrad_hist_", &fused_adagrad_hist_); }
