// The parallel loop of Lanner's C++ code, for its two builds (app/quant/kernels.py):
//   * the torch build (registered as torch.ops.lanner.*): at::parallel_for, torch's own OpenMP pool of the
//     size torch.set_num_threads gave;
//   * the standalone build (LANNER_STANDALONE, app/lite: workers without libtorch): OpenMP, split as ATen's
//     OpenMP backend splits (at most ceil(range / grain) tasks, one contiguous chunk each; on the calling
//     thread when the range is one grain or the call is already inside a parallel region), so both builds
//     hand a thread the same rows.
#pragma once

#include <cstdint>

#ifdef LANNER_STANDALONE
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <exception>

namespace lanner {

inline int64_t num_threads() { return omp_get_max_threads(); }

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  if (end - begin <= grain || omp_in_parallel() || num_threads() == 1) {
    f(begin, end);
    return;
  }
  // An exception must not leave an OpenMP region (std::terminate): the first one is kept and rethrown after the
  // join, as ATen does.
  std::exception_ptr error;
  std::atomic_flag failed = ATOMIC_FLAG_INIT;
  // all of the pool's threads, as ATen (a num_threads clause trips GOMP's thread pool, pytorch#32008)
#pragma omp parallel
  {
    int64_t tasks = omp_get_num_threads();
    if (grain > 0) tasks = std::min<int64_t>(tasks, (end - begin + grain - 1) / grain);
    const int64_t chunk = (end - begin + tasks - 1) / tasks;
    const int64_t b = begin + omp_get_thread_num() * chunk;
    if (b < end) {
      try {
        f(b, std::min(end, b + chunk));
      } catch (...) {
        if (!failed.test_and_set()) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace lanner
#else
#include <ATen/Parallel.h>

namespace lanner {

inline int64_t num_threads() { return at::get_num_threads(); }

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, f);
}

}  // namespace lanner
#endif
