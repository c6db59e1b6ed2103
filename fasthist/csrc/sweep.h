// The one parallel sweep of every compiled CPU pass over all tensors of a call, end to end.
//
// Work split: the elements of all tensors, end to end, are cut into one contiguous range per
// thread (at::parallel_for, torch's own pool; at least MIN_PER_THREAD elements each). A range
// processes blocks of BLOCK elements, counted into its private histogram (private_hist.h). A
// tensor a range holds whole is written straight into its rows of the windows; a tensor cut
// between ranges is summed in per-range partial rows and written after the parallel region.
// Only the span [lo, hi] of bins a tensor touched is merged and cleared; with spans
// (Windows::span, windows.h) only the previous step's span of a step row is cleared, not the
// whole row. Several quantities (sweep_n) are binned in the same sweep, each into its own
// private histogram and its own windows, at the same rows.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "private_hist.h"
#include "windows.h"

namespace fasthist {

constexpr int64_t MIN_PER_THREAD = 65536;  // smaller calls run on fewer threads

// After sweep_n's parallel region, quantity q's rows of W: the tensors cut between ranges
// (their partial counts, in range order: a tensor's parts are adjacent), and the empty ones.
template <class Ranges>
void write_cut_and_empty(const Windows& W, const std::vector<int64_t>& sizes, const Ranges& ranges, int q) {
  int64_t current = -1;
  int64_t* dst = nullptr;
  for (const auto& R : ranges) {
    for (int s = 0; s < 2; ++s) {
      const int64_t i = R.cut[s];
      if (i < 0) continue;
      if (i != current) {
        if (current >= 0) set_span_of_row(W, current);
        current = i;
        dst = W.step_row(i);
        W.clear_row(i, dst);
      }
      const int64_t* p = R.partial[q][s].data();
      int64_t* tot = W.total_row(i);
      for (int64_t k = 0; k < W.nb; ++k) {
        dst[k] += p[k];
        tot[k] += p[k];
      }
    }
  }
  if (current >= 0) set_span_of_row(W, current);
  for (int64_t i = 0; i < int64_t(sizes.size()); ++i) {
    if (sizes[i] == 0) {
      W.clear_row(i, W.step_row(i));
      W.set_span(i, 1, 0);
    }
  }
}

// Runs seg(i, a, b, hists) over elements [a, b) of every tensor i (sizes[i] elements), in
// parallel ranges; seg counts its elements of quantity q into hists[q], written into the
// windows W[q] (Q quantities binned in the same sweep, at the same rows; begin/end are done
// here). With count=false no window is written (seg is still run, and must not touch `hists`).
template <int Q, class Seg>
void sweep_n(const std::vector<int64_t>& sizes, const Windows (&W)[Q], bool count, Seg&& seg) {
  const int64_t nt = int64_t(sizes.size());
  std::vector<int64_t> offset(nt + 1, 0);
  for (int64_t i = 0; i < nt; ++i) offset[i + 1] = offset[i] + sizes[i];
  const int64_t n_all = offset[nt];
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_all / MIN_PER_THREAD));
  struct Range {
    int64_t begin, end;
    int64_t cut[2] = {-1, -1};           // tensors this range holds only part of
    std::vector<int64_t> partial[Q][2];  // their counts, per quantity
  };
  std::vector<Range> ranges(nthreads);
  for (int64_t r = 0; r < nthreads; ++r) {
    ranges[r].begin = n_all * r / nthreads;
    ranges[r].end = n_all * (r + 1) / nthreads;
  }
  const int64_t nb = W[0].nb;
  at::parallel_for(0, nthreads, 1, [&](int64_t r0, int64_t r1) {
    std::vector<PrivateHist> hists;
    hists.reserve(Q);
    for (int q = 0; q < Q; ++q) hists.emplace_back(count ? nb : 0);
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
          seg(i, a, b, hists.data());
          continue;
        }
        const bool whole = a == 0 && b == sizes[i];
        int64_t* dst[Q];
        for (int q = 0; q < Q; ++q) {
          if (whole) {
            dst[q] = W[q].step_row(i);
            W[q].clear_row(i, dst[q]);
          } else {
            R.partial[q][ncut].assign(nb, 0);
            dst[q] = R.partial[q][ncut].data();
          }
          hists[q].begin(dst[q]);
        }
        if (!whole) R.cut[ncut++] = i;
        seg(i, a, b, hists.data());
        for (int q = 0; q < Q; ++q) {
          int32_t lo, hi;
          hists[q].end(&lo, &hi);
          if (whole) {
            int64_t* tot = W[q].total_row(i);
            for (int32_t k = lo; k <= hi; ++k) tot[k] += dst[q][k];
            W[q].set_span(i, lo, hi);  // the row is zero outside [lo, hi]: merge() wrote only there
          }
        }
      }
    }
  });
  if (!count) return;
  for (int q = 0; q < Q; ++q) write_cut_and_empty(W[q], sizes, ranges, q);
}

// sweep_n of one quantity: seg(i, a, b, hist) counts into `hist`, written into W.
template <class Seg>
void sweep(const std::vector<int64_t>& sizes, const Windows& W, bool count, Seg&& seg) {
  const Windows one[1] = {W};
  sweep_n<1>(sizes, one, count, [&](int64_t i, int64_t a, int64_t b, PrivateHist* hists) { seg(i, a, b, hists[0]); });
}

}  // namespace fasthist
