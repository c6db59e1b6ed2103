// What the ops of the compiled CPU passes check and read alike (op_args.cpp): the rows and
// windows of every op, found_inf, and the lists and host scalars of the fused steps.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <vector>

#include "windows.h"

namespace fasthist {

// True when found_inf (one CPU value, or absent) is nonzero: the reference's "skipped".
bool skipped(const std::optional<at::Tensor>& found_inf, const char* op);

// Checks the rows and windows of an op, bumps both windows' version counters (they are about
// to be written: a custom op's mutable arguments are not bumped by the dispatcher, and the
// spans of windows.h rely on every writer bumping; an inference tensor has no counter), and
// returns them.
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

}  // namespace fasthist
