// What the ops of the compiled CPU passes check and read alike: see op_args.h.

#include "op_args.h"

#include <optional>

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

