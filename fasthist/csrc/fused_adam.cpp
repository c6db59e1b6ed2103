// Fused CPU step with the histogram of sqrt(v_hat), in one sweep: what
// torch._fused_adam_ / torch._fused_adamw_ compute on the CPU, plus, per element, the
// LogBins key of the value the update already has:
//
//     g   = grad / grad_scale                     (written back to grad, as torch does)
//     g   = -g                                    (maximize)
//     g   = fma(p, wd, g)                         (coupled L2 decay)  |  p = p * (1 - lr*wd)  (decoupled)
//     m   = fma(w - 1, g - m, g)  if w >= 0.5 else fma(w, g - m, m)     (m.lerp_(g, w), w = 1 - beta1)
//     v   = fma(c2 * g, g, v * beta2)             (c2 = 1 - beta2; the last numel % 8 elements:
//                                                  fma(v, beta2, (c2 * g) * g), torch's scalar tail)
//     vm  = max(vm, v)                            (amsgrad; the denominator uses vm)
//     x   = sqrt(v) / float32(bc2_sqrt)           bc2_sqrt = sqrt(1 - beta2**step), in float64
//     p   = p + (-step_size * m) / (x + eps)      step_size = lr / (1 - beta1**step), in float64
//     bin = LogBins key of x                      (exactly the reference's: IEEE sqrt and division)
//
// all in float32 for float32, bfloat16 and float16 tensors (loads widen exactly, stores round
// to nearest even). The fma placement is torch 2.x's as its x86 build compiles it (GCC
// contracts a*b + c in the vector body and in the scalar tail alike; the tail loop is itself
// vectorised 8 wide, and only its last numel % 8 elements contract v the other way), so on
// x86 with torch's AVX512/AVX2 kernels the states and parameters are bit-identical to
// torch's fused step (tests/test_cpu_fused.py checks this).
//
// The histogram is the reference's (adam_hist_inputs): x of the *stored* state, so
// for bfloat16/float16 it is recomputed from the rounded v; its scale is
// float32((1 - beta2**step) ** 0.5) as Python computes it, which equals torch's
// float32(sqrt(...)) but for a rare last-bit case, where the division is done twice.
//
// With staleness windows (stale_step, stale_total: same rows), the same sweep also bins
//
//     s   = |g| / max(xh, float32(eps))           g as it enters v above, xh the value binned for
//                                                 sqrt(v_hat); IEEE division; a NaN xh propagates
//                                                 (torch.clamp_min); bins of s, zero when s == 0
//
// exactly as fasthist.reference.staleness does (sqrt=False, scale 1). Without them the loop
// is the one above: staleness is a template parameter, chosen once per block. The update loop
// parks the bits of x (and s) in the block's index buffers; their keys are taken in a loop of
// their own over the block (in L1), which leaves the update loop fewer live registers.
//
// A step with found_inf == 1 changes nothing (torch's rule); the windows (both pairs) are left
// as they were whenever found_inf is nonzero (the reference's rule).

#include <torch/library.h>

#include <cmath>
#include <optional>

#include "dtype_io.h"
#include "log_bins.h"
#include "op_args.h"
#include "sweep.h"

namespace {

using namespace fasthist;

// Per-tensor coefficients, all float32. No bool: GCC 12 does not vectorise a loop that
// selects on a bool loaded from memory, so the switches are derived by comparisons.
struct AdamCoef {
  float w, w_m1, b2, c2, eps, neg_step, wd_l2, decay, gscale, cu, ch, sign;
};

// One block of n elements: the update in place, bins of x into out_x, span into lo[0]/hi[0];
// STALE: bins of the staleness into out_s, span into lo[1]/hi[1]. TAIL selects torch's
// scalar-tail contraction of v.
template <typename T, bool AMS, bool SCALE, bool TAIL, bool STALE>
FASTHIST_INLINE void adam_impl(T* __restrict p, T* __restrict g, T* __restrict m, T* __restrict v, T* __restrict vm,
                               int64_t n, const AdamCoef& k, Layout L, int32_t* __restrict out_x,
                               int32_t* __restrict out_s, int32_t* lo, int32_t* hi) {
  // the coefficients in locals: no store below can change them
  const float w = k.w, w_m1 = k.w_m1, b2 = k.b2, c2 = k.c2, eps = k.eps, neg_step = k.neg_step, wd = k.wd_l2;
  const float decay = k.decay, gscale = k.gscale, cu = k.cu, ch = k.ch, sign = k.sign;
  const bool small = (w < 0.5f) & (w > -0.5f);  // torch's lerp: |weight| < 0.5
  const float coeff = small ? w : w_m1;
  const uint32_t keep_m = small ? 0xFFFFFFFFu : 0u;  // the lerp's base, m or g, chosen by bits
  const bool l2 = wd != 0.0f;
  const bool reuse = std::is_same_v<T, float> && cu == ch;  // the update's x is the histogram's
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
    pv = pv * decay;  // decoupled decay: 1 - lr*wd (1 otherwise: exact)
    float mv = load(m[j]);
    const float base = float_of((bits_of(mv) & keep_m) | (bits_of(gv) & ~keep_m));
    mv = __builtin_fmaf(coeff, gv - mv, base);
    float vv = load(v[j]);
    vv = TAIL ? __builtin_fmaf(vv, b2, (c2 * gv) * gv) : __builtin_fmaf(c2 * gv, gv, vv * b2);
    store(&m[j], mv);
    store(&v[j], vv);
    if (AMS) {
      const float old = load(vm[j]);
      const float hi = old > vv ? old : vv;  // ATen's maximum: a NaN in either propagates
      vv = old != old ? old : hi;
      store(&vm[j], vv);
    }
    const float x = __builtin_sqrtf(vv) / cu;
    pv = pv + (neg_step * mv) / (x + eps);
    store(&p[j], pv);
    // the reference bins the stored state: rounded for bfloat16/float16
    const float vs = AMS ? load(vm[j]) : load(v[j]);
    const bool zero = (bits_of(vs) & ABS_MASK) == 0;
    const float xh = reuse ? x : __builtin_sqrtf(vs) / ch;
    out_x[j] = zero ? -1 : int32_t(bits_of(xh) & ABS_MASK);  // binned below; -1: v == 0 (bin 0)
    // s, its bits parked in out_s, binned below
    if (STALE) out_s[j] = int32_t(bits_of(__builtin_fabsf(gv) / (xh < eps ? eps : xh)));  // clamp_min: NaN stays
  }
  for (int64_t j = 0; j < n; ++j) {  // the bins, in a loop of their own: fewer live registers above
    const int32_t u = out_x[j];
    const int32_t key = bin_key(float_of(uint32_t(u)), u < 0, L);
    out_x[j] = key;
    mn = key < mn ? key : mn;
    mx = key > mx ? key : mx;
  }
  lo[0] = mn;
  hi[0] = mx;
  if (STALE) {
    int32_t mn_s = L.num_bins, mx_s = -1;
    for (int64_t j = 0; j < n; ++j) {
      const float s = float_of(uint32_t(out_s[j]));
      const int32_t ks = bin_key(s, (bits_of(s) & ABS_MASK) == 0, L);
      out_s[j] = ks;
      mn_s = ks < mn_s ? ks : mn_s;
      mx_s = ks > mx_s ? ks : mx_s;
    }
    lo[1] = mn_s;
    hi[1] = mx_s;
  }
}

// One case per (ams, scale, tail, stale), spelled out: a template or a lambda would not be
// compiled for each instruction set of FASTHIST_CLONES.
#define FASTHIST_ADAM_CASE(T, C)                                                                              \
  case C:                                                                                                     \
    return adam_impl<T, bool((C) & 8), bool((C) & 4), bool((C) & 2), bool((C) & 1)>(p, g, m, v, vm, n, k, L, \
                                                                                     out[0], out[1], lo, hi);
#define FASTHIST_ADAM(NAME, T)                                                                                  \
  FASTHIST_CLONES void NAME(T* p, T* g, T* m, T* v, T* vm, int64_t n, const AdamCoef& k, bool ams, bool scale,  \
                            bool tail, bool stale, Layout L, int32_t* const* out, int32_t* lo, int32_t* hi) {   \
    switch (int(ams) << 3 | int(scale) << 2 | int(tail) << 1 | int(stale)) {                                    \
      FASTHIST_ADAM_CASE(T, 0) FASTHIST_ADAM_CASE(T, 1) FASTHIST_ADAM_CASE(T, 2) FASTHIST_ADAM_CASE(T, 3)       \
      FASTHIST_ADAM_CASE(T, 4) FASTHIST_ADAM_CASE(T, 5) FASTHIST_ADAM_CASE(T, 6) FASTHIST_ADAM_CASE(T, 7)       \
      FASTHIST_ADAM_CASE(T, 8) FASTHIST_ADAM_CASE(T, 9) FASTHIST_ADAM_CASE(T, 10) FASTHIST_ADAM_CASE(T, 11)     \
      FASTHIST_ADAM_CASE(T, 12) FASTHIST_ADAM_CASE(T, 13) FASTHIST_ADAM_CASE(T, 14) FASTHIST_ADAM_CASE(T, 15)   \
    }                                                                                                           \
  }
FASTHIST_ADAM(adam_f32, float)
FASTHIST_ADAM(adam_bf16, c10::BFloat16)
FASTHIST_ADAM(adam_f16, c10::Half)

// Elements [a, b) of tensor t (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs), in
// blocks, counted into hist[0] (sqrt(v_hat)) and, with `stale`, hist[1] (staleness).
template <typename T>
void adam_segment(const at::Tensor* t, int64_t a, int64_t b, const AdamCoef& k, bool ams, bool scale, int64_t tail_mod,
                  bool count, bool stale, const Layout& L, PrivateHist* hist) {
  T* ptr[5];
  for (int s = 0; s < 5; ++s) ptr[s] = (s < 4 || ams) ? t[s].data_ptr<T>() : nullptr;
  const int64_t numel = t[0].numel();
  const int64_t body_end = tail_mod > 0 ? numel - numel % tail_mod : numel;  // torch's scalar tail starts here
  // binned even when not counted (found_inf in (0, 1)): no branch per element
  int32_t* out[2] = {hist[0].idx(), stale ? hist[1].idx() : nullptr};
  for (int64_t j0 = a; j0 < b;) {
    const int64_t stop = j0 < body_end ? std::min(b, body_end) : b;
    const int64_t n = std::min(BLOCK, stop - j0);
    T* vm = ams ? ptr[4] + j0 : nullptr;
    const bool tail = j0 >= body_end;
    int32_t lo[2], hi[2];
    if constexpr (std::is_same_v<T, float>)
      adam_f32(ptr[0] + j0, ptr[1] + j0, ptr[2] + j0, ptr[3] + j0, vm, n, k, ams, scale, tail, stale, L, out, lo, hi);
    else if constexpr (std::is_same_v<T, c10::BFloat16>)
      adam_bf16(ptr[0] + j0, ptr[1] + j0, ptr[2] + j0, ptr[3] + j0, vm, n, k, ams, scale, tail, stale, L, out, lo, hi);
    else
      adam_f16(ptr[0] + j0, ptr[1] + j0, ptr[2] + j0, ptr[3] + j0, vm, n, k, ams, scale, tail, stale, L, out, lo, hi);
    if (count && stale)
      PrivateHist::add_pair(hist[0], lo[0], hi[0], hist[1], lo[1], hi[1], n);
    else if (count)
      hist[0].add(n, lo[0], hi[0]);
    j0 += n;
  }
}

void fused_adam_hist_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                      at::TensorList max_exp_avg_sqs, at::TensorList state_steps, bool amsgrad,
                      bool decoupled_weight_decay, double lr, const std::optional<at::Tensor>& lr_tensor, double beta1,
                      double beta2, double weight_decay, double eps, bool maximize,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                      int64_t tail_mod, int64_t shift, int64_t low_key, int64_t num_log_bins, const at::Tensor& rows,
                      const at::Tensor& step, const at::Tensor& total, const std::optional<at::Tensor>& stale_step,
                      const std::optional<at::Tensor>& stale_total) {
  const char* op = "fused_adam_hist_";
  const int64_t nt = int64_t(params.size());
  const Layout L = Layout::of(shift, low_key, num_log_bins);
  const bool stale = stale_step.has_value() && stale_step->defined();
  TORCH_CHECK(stale == (stale_total.has_value() && stale_total->defined()), "fasthist ", op,
              ": stale_step and stale_total go together");
  const Windows W[2] = {check_windows(op, nt, L.num_bins, rows, step, total),
                        stale ? check_windows(op, nt, L.num_bins, rows, *stale_step, *stale_total) : Windows{}};
  std::vector<int64_t> sizes;
  const at::ScalarType dtype =
      amsgrad ? check_fused_lists(op, {params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, sizes)
              : check_fused_lists(op, {params, grads, exp_avgs, exp_avg_sqs}, sizes);
  TORCH_CHECK(int64_t(state_steps.size()) == nt, "fasthist ", op, ": expected ", nt, " tensors in every list");
  const StepScalars S = step_scalars(op, found_inf, grad_scale, lr_tensor, lr);
  if (!S.update) return;
  const bool count = S.count;
  const float* gs = S.grad_scale;
  lr = S.lr;
  std::vector<AdamCoef> coef(nt);
  for (int64_t i = 0; i < nt; ++i) {  // float64 on the host, as torch's fused step
    const double s = state_steps[i].item<float>();
    const double bc1 = 1 - std::pow(beta1, s), bc2 = 1 - std::pow(beta2, s);
    const float w = float(1 - beta1);
    coef[i] = AdamCoef{w,
                       w - 1.0f,
                       float(beta2),
                       float(1 - beta2),
                       float(eps),
                       float(-(lr / bc1)),
                       decoupled_weight_decay ? 0.0f : float(weight_decay),
                       decoupled_weight_decay && weight_decay != 0 ? float(1 - lr * weight_decay) : 1.0f,
                       gs ? *gs : 1.0f,
                       float(std::sqrt(bc2)),
                       float(std::pow(bc2, 0.5)),  // Python's (1 - beta2**step) ** 0.5: the reference's scale
                       maximize ? -1.0f : 1.0f};
  }
  const auto seg = [&](int64_t i, int64_t a, int64_t b, PrivateHist* hist) {
    const at::Tensor t[5] = {params[i], grads[i], exp_avgs[i], exp_avg_sqs[i],
                             amsgrad ? max_exp_avg_sqs[i] : at::Tensor()};
    with_dtype(dtype, [&](auto tag) {
      adam_segment<decltype(tag)>(t, a, b, coef[i], amsgrad, gs != nullptr, tail_mod, count, stale, L, hist);
    });
  };
  if (stale)
    sweep_n<2>(sizes, W, count, seg);
  else
    sweep_n<1>(sizes, {W[0]}, count, seg);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fasthist, m) {
  m.def(
      "fused_adam_hist_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] max_exp_avg_sqs, Tensor[] state_steps, *, bool amsgrad, bool decoupled_weight_decay, float lr, "
      "Tensor? lr_tensor, float beta1, float beta2, float weight_decay, float eps, bool maximize, Tensor? grad_scale, "
      "Tensor? found_inf, int tail_mod, int shift, int low_key, int num_log_bins, Tensor rows, Tensor(f!) step, "
      "Tensor(g!) total, Tensor(h!)? stale_step=None, Tensor(i!)? stale_total=None) -> ()");
}

TORCH_LIBRARY_IMPL(fasthist, CPU, m) { m.impl("fused_adam_hist_", &fused_adam_hist_); }
