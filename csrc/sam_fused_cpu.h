// The CPU library: its operations (one declaration each, defined in sam_fused_cpu_ascent.cpp and
// sam_fused_cpu_descent.cpp, registered in sam_fused_cpu.cpp) and what their loops share.
//
// A launch covers the tensors of one plan, left where they are: each role is an int64 table of
// addresses, one per tensor, and the run table holds one host row (start, stop, count index)
// per tensor (sam_fused/tables.py's tensor_rows: start 0, stop its numel). The loops cut every
// tensor into blocks of kBlock elements, the unit ATen's intra-op thread pool (OpenMP in torch's
// CPU builds) hands out, and run the element math of sam_fused_math.h over plain pointers that
// GCC vectorises at -O3. Elementwise results do not depend on how blocks meet threads; the
// statistics are reduced per slot in a fixed order (sam_fused_common.h), so they are bitwise
// reproducible for any OMP_NUM_THREADS.
//
// The status vector lives in host memory here: each operation reads the skip decision, the
// global sums and GradScaler's 1 / scale once, and takes the "unchanged" path (a copy, or
// nothing) as a whole when the step is skipped; the stored bits are those of the Triton
// kernels' per-element tl.where.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "sam_fused_common.h"
#include "sam_fused_cpu_storage.h"
#include "sam_fused_math.h"

namespace sam_fused {
namespace cpu {

// ------------------------------------------------------------------ the operations
using OptionalTensor = std::optional<at::Tensor>;

std::vector<int64_t> constants();
std::vector<std::string> functors();
void stats(const at::Tensor& grad, const OptionalTensor& param, const OptionalTensor& aux, const at::Tensor& vsteps,
           const at::Tensor& runs, const at::Tensor& like, const at::Tensor& partials, const OptionalTensor& status,
           int64_t rule, int64_t unscale, double eta, double c1, double c2);
void perturb(const at::Tensor& param, const at::Tensor& src, const at::Tensor& grad, const OptionalTensor& backup,
             const OptionalTensor& aux, const OptionalTensor& keep, const OptionalTensor& prev,
             const at::Tensor& vsteps, const at::Tensor& status, const at::Tensor& runs, const at::Tensor& like,
             int64_t rule, double rho, double eta, double norm_eps, double c1, double c2, int64_t unscale,
             bool adaptive, bool normalized, bool check);
void copy(const at::Tensor& dst, const at::Tensor& src, const at::Tensor& runs, const at::Tensor& like,
          const OptionalTensor& if_skipped);
void centralize(const at::Tensor& rows, const at::Tensor& lengths, const at::Tensor& like);
void descent_stats(const at::Tensor& grad, const OptionalTensor& first_grad, const at::Tensor& runs,
                   const at::Tensor& like, const at::Tensor& partials, const at::Tensor& status, int64_t unscale,
                   bool want_gp2);
void update(const at::Tensor& src, const at::Tensor& param, const at::Tensor& grad, const OptionalTensor& state0,
            const OptionalTensor& state1, const OptionalTensor& state2, const OptionalTensor& aux,
            const OptionalTensor& gv, const at::Tensor& steps, const at::Tensor& status, const at::Tensor& runs,
            const at::Tensor& like, int64_t base, c10::ArrayRef<double> scalars, int64_t options,
            c10::ArrayRef<double> device_scalars, double lr, int64_t descent, double alpha, int64_t unscale,
            bool clip, bool check);
void advance_steps(const at::Tensor& steps, const at::Tensor& vsteps, const at::Tensor& mask,
                   const at::Tensor& status, bool base, bool variant, bool check, bool count_skip);

// ------------------------------------------------------------------ launches
const at::Device kCpu(at::kCPU);

// Elements per unit of parallel work for the elementwise operations: large enough that the
// thread hand-off is noise, small enough that two cores split even small buckets.
constexpr int64_t kBlock = 32768;

// One tensor of a launch: its elements [start, stop) and its entry in steps / vsteps.
struct Run {
  int64_t start;
  int64_t stop;
  int64_t count;
};

struct Launch {
  std::vector<Run> runs;
  at::ScalarType dtype;  // the elements' type: an address table cannot say it, so `like` does
};

// Reads and checks the run table (R, 3) against `num_counts` update counts (negative: not
// checked), and takes the element type from `like`.
inline Launch read_launch(const at::Tensor& runs, const at::Tensor& like, int64_t num_counts) {
  TORCH_CHECK(runs.device().is_cpu() && runs.scalar_type() == at::kLong && runs.dim() == 2 && runs.size(1) == 3 &&
                  runs.is_contiguous(),
              "sam_fused: the run table must be a contiguous CPU int64 tensor of shape (R, 3), one row "
              "(start, stop, count index) per tensor");
  TORCH_CHECK(like.device().is_cpu(), "sam_fused cpp backend: CPU tensors only, got `like` on ", like.device());
  const int64_t* p = runs.data_ptr<int64_t>();
  Launch launch{{}, like.scalar_type()};
  launch.runs.reserve(runs.size(0));
  for (int64_t r = 0; r < runs.size(0); ++r) {
    const Run run{p[3 * r], p[3 * r + 1], p[3 * r + 2]};
    TORCH_CHECK(0 <= run.start && run.start <= run.stop, "sam_fused: run ", r, " [", run.start, ", ", run.stop,
                ") is not a range of elements");
    TORCH_CHECK(num_counts < 0 || (0 <= run.count && run.count < num_counts), "sam_fused: run ", r,
                " names update count ", run.count, " of ", num_counts);
    launch.runs.push_back(run);
  }
  return launch;
}

// Where one role's elements are: one address per run (absent: a role the launch lacks).
struct Role {
  const int64_t* addresses = nullptr;
  bool given = false;  // (an empty launch's tables have no addresses at all)

  bool present() const { return given; }

  template <typename T>
  Raw<T>* at(int64_t run) const {
    return addresses == nullptr ? nullptr : reinterpret_cast<Raw<T>*>(static_cast<uintptr_t>(addresses[run]));
  }
};

inline Role role_of(const Launch& launch, const at::Tensor& t, const char* name) {
  const auto runs = static_cast<int64_t>(launch.runs.size());
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous() &&
                  t.numel() == runs,
              "sam_fused: ", name, " must be a contiguous CPU int64 table of ", runs,
              " addresses (one per tensor), got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
  return {t.data_ptr<int64_t>(), true};
}

inline Role role_of(const Launch& launch, const OptionalTensor& t, const char* name) {
  return t.has_value() ? role_of(launch, *t, name) : Role{};
}

// A piece of one run: elements [start, stop) of tensor `run`.
struct Span {
  int64_t start;
  int64_t stop;
  int64_t run;
};

// Cuts every run into blocks of kBlock elements: the unit the thread pool distributes.
inline std::vector<Span> blocks_of(const std::vector<Run>& runs) {
  std::vector<Span> spans;
  for (size_t r = 0; r < runs.size(); ++r) {
    for (int64_t s = runs[r].start; s < runs[r].stop; s += kBlock) {
      spans.push_back({s, std::min(s + kBlock, runs[r].stop), static_cast<int64_t>(r)});
    }
  }
  return spans;
}

template <typename F>
void for_each_span(const std::vector<Span>& spans, const F& body) {
  at::parallel_for(0, static_cast<int64_t>(spans.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) body(spans[i]);
  });
}

template <typename T>
void copy_span(Raw<T>* dst, const Raw<T>* src, int64_t start, int64_t stop) {
  if (dst != src) std::memcpy(dst + start, src + start, sizeof(Raw<T>) * (stop - start));
}

// ------------------------------------------------------------------ status
// The host status vector, read as float64 (status_sums, the skip decision, gradient factors).
struct HostStatus {
  const at::Tensor& t;

  double at(int i) const {
    return t.scalar_type() == at::kDouble ? t.data_ptr<double>()[i] : static_cast<double>(t.data_ptr<float>()[i]);
  }
  // either pass saw a non-finite gradient
  bool skipped() const { return at(kStatusBad1) + at(kStatusBad2) > 0; }
  // the factor in entry `index` in the math type (the reference's status[index].to(dtype)),
  // or 1 when the operation does not apply it
  template <typename F>
  F factor(int64_t index, bool wanted) const {
    return wanted ? static_cast<F>(at(static_cast<int>(index))) : static_cast<F>(1);
  }
  void add(int i, double value) const {
    if (t.scalar_type() == at::kDouble) {
      t.data_ptr<double>()[i] += value;
    } else {
      t.data_ptr<float>()[i] += static_cast<float>(value);
    }
  }
};

inline HostStatus host_status(const at::Tensor& status) {
  check_status(status, kCpu);
  return {status};
}

// ------------------------------------------------------------------ statistics
// Lanes of a slot's accumulators: 8 independent double sums per quantity within a sub-block of
// kSub elements, added in a fixed tree, so the vectoriser can keep them in registers without
// reassociating anything; sub-blocks are added in order.
constexpr int kLanes = 8;
constexpr int64_t kSub = 2048;

// A square taken and summed in double costs a float32 element three SSE2 instructions per two
// elements (widen, multiply, add), twice the float sum's: the statistics pass, which only
// reads, became compute-bound (2x slower on the project's CPU machine). On x86-64 Linux the
// slot reduction is therefore also compiled for AVX2 (4 doubles an instruction), the copy the
// loader picks where the CPU has it (GCC's target_clones, an ifunc); the default copy keeps the
// baseline ISA. Both give the same bits: the same IEEE operations in the same order (no FMA:
// -ffp-contract=off), only more lanes at a time.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define SAM_FUSED_STATS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SAM_FUSED_STATS_CLONES
#endif

// The slots of every run, in order: a function of each tensor's length alone. A slot spans a
// multiple of kLanes elements, so its boundaries depend on nothing but the length; trailing
// slots may be empty (and write zeros).
inline std::vector<Span> slots_of(const std::vector<Run>& runs) {
  std::vector<Span> slots;
  for (size_t r = 0; r < runs.size(); ++r) {
    const int64_t n = runs[r].stop - runs[r].start;
    const int64_t count = stats_slots(n, kCpuStatsChunk, kCpuMaxSlots);
    int64_t per = (n + count - 1) / count;
    per = (per + kLanes - 1) / kLanes * kLanes;
    for (int64_t k = 0; k < count; ++k) {
      const int64_t a = std::min(runs[r].start + k * per, runs[r].stop);
      slots.push_back({a, std::min(a + per, runs[r].stop), static_cast<int64_t>(r)});
    }
  }
  return slots;
}

// One slot's K sums and its non-finite count: element(i, lane, sums, count) adds element i
// into lane `lane` of each of the K double accumulators and of the count.
template <int K, typename Element>
SAM_FUSED_STATS_CLONES void reduce_slot(int64_t start, int64_t stop, const Element& element, double (&sums)[K],
                                        int64_t& bad) {
  for (int k = 0; k < K; ++k) sums[k] = 0.0;
  bad = 0;
  for (int64_t s = start; s < stop; s += kSub) {
    const int64_t e = std::min(s + kSub, stop);
    double acc[K][kLanes] = {};
    int32_t cnt[kLanes] = {};
    int64_t i = s;
    for (; i + kLanes <= e; i += kLanes) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) element(i + l, l, acc, cnt);
    }
    for (int l = 0; i < e; ++i, ++l) element(i, l, acc, cnt);  // the tail of a tensor
    for (int width = kLanes / 2; width > 0; width /= 2) {
      for (int l = 0; l < width; ++l) {
        for (int k = 0; k < K; ++k) acc[k][l] += acc[k][l + width];
        cnt[l] += cnt[l + width];
      }
    }
    for (int k = 0; k < K; ++k) sums[k] += acc[k][0];
    bad += cnt[0];
  }
}

// Runs the slots of a statistics launch over the thread pool: slot k writes its partial sums
// into column k of `partials`, rows (bad, quantity 0, ..., quantity K-1) as `rows` orders them.
template <int K, typename MakeElement>
void reduce_slots(const Launch& launch, const at::Tensor& partials, const int (&rows)[K + 1],
                  const MakeElement& make_element) {
  const auto slots = slots_of(launch.runs);
  const int64_t total = static_cast<int64_t>(slots.size());
  check_partials(partials, *std::max_element(rows, rows + K + 1) + 1, total, kCpu);
  double* out = partials.data_ptr<double>();
  const int64_t row_stride = partials.stride(0);
  at::parallel_for(0, total, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      double sums[K];
      int64_t bad = 0;
      reduce_slot<K>(slots[k].start, slots[k].stop, make_element(slots[k].run), sums, bad);
      out[rows[0] * row_stride + k] = static_cast<double>(bad);
      for (int q = 0; q < K; ++q) out[rows[q + 1] * row_stride + k] = sums[q];
    }
  });
}

}  // namespace cpu
}  // namespace sam_fused
