// Shared by the CPU library (sam_fused_cpu*.cpp) and the CUDA library (sam_fused_cuda.cu):
// the ABI number, the status vector's layout, the checks of a launch's arguments, and the
// registration of the operations under one schema.
//
// Every operation is a table launch over the tensors of one plan (sam_fused/tables.py): each
// role argument (param, grad, backup, a state) is an int64 table of tensor addresses, one per
// tensor, and `like`, a tensor of the element type, says what they point at. The CPU library
// reads a host row (0, numel, count index) per tensor (read_runs below); the CUDA library reads
// the device chunk table, one row (slot, start, numel, count index) per kCudaTableChunk
// elements of a tensor (sam_fused_cuda.cu). A row's count index is the tensor's entry in the
// bucket's steps and vsteps.
//
// The statistics (sums of squares, inner products, non-finite counts) are reduced in two fixed
// stages: each tensor is cut into a number of slots that depends only on its length
// (stats_slots on the CPU; one slot per chunk row on CUDA), each slot writes one float64
// partial sum per quantity, and the caller sums the partials with one torch.sum. Nothing
// depends on the thread count or on scheduling, so the same gradients give bitwise the same
// norm. Every square is taken and summed in double: a finite float32 gradient above about
// 1.8e19 has a square float32 cannot hold.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "sam_fused_math.h"

namespace sam_fused {

// Bumped whenever an operation's signature or meaning changes, so that Python can refuse a
// stale prebuilt library. Its one definition: sam_fused/_extension.py reads it from this file.
constexpr int64_t kAbiVersion = 6;

// CPU: a slot covers up to 64 Ki elements (256 KiB of float32 gradient), at most 1024 slots per
// tensor; a tensor of ResNet-50's largest 2.4 M elements gives 36 partial sums.
constexpr int64_t kCpuStatsChunk = 65536;
constexpr int64_t kCpuMaxSlots = 1024;
// CUDA: the elements of one chunk row, one thread block (and one partial sum) each; CHUNK in
// sam_fused/tables.py, which builds the rows (tests/test_extension.py checks the two agree).
constexpr int64_t kCudaTableChunk = 1024;

// The number of partial sums a tensor of n elements produces on the CPU: a pure function of n.
inline int64_t stats_slots(int64_t n, int64_t chunk, int64_t max_slots) {
  const int64_t wanted = (n + chunk - 1) / chunk;
  return std::max<int64_t>(1, std::min<int64_t>(wanted, max_slots));
}

// The status vector's entries, under sam_fused/status.py's names (its one definition;
// tests/test_status_constants.py fails when the two disagree). float64 (float32 only where a
// device has no float64, which these libraries never see).
constexpr int kStatusSumsq = 0;      // first pass: sum of u^2
constexpr int kStatusBad1 = 1;       // first pass: non-finite gradient entries
constexpr int kStatusSkipped = 2;    // steps skipped so far (persistent)
constexpr int kStatusGv2 = 3;        // LookSAM: ||g_v||^2 (persistent)
constexpr int kStatusBad2 = 4;       // second pass: non-finite gradient entries
constexpr int kStatusDot = 5;        // GSAM / LookSAM: <g, g_p>
constexpr int kStatusGp2 = 6;        // GSAM / LookSAM, clipping: ||g_p||^2
constexpr int kStatusG2 = 7;         // LookSAM: ||g||^2 of the first pass
constexpr int kStatusInvScale1 = 8;  // 1 / loss scale of the first pass's gradients (GradScaler)
constexpr int kStatusInvScale2 = 9;  // 1 / loss scale of the second pass's gradients
constexpr int kStatusClip = 10;      // max_grad_norm's coefficient of the descent gradient
constexpr int kStatusSize = 11;

// No unscaling: the `unscale` argument of the operations that read gradients is this, or the
// status entry whose value multiplies every gradient as it is read.
constexpr int64_t kNoUnscale = -1;

// Reads status entries as the rules need them (Status: anything with `double at(int)`).
template <typename Status>
SAM_FUSED_INLINE math::StatusSums status_sums(const Status& s) {
  return {s.at(kStatusSumsq), s.at(kStatusGv2), s.at(kStatusDot), s.at(kStatusGp2), s.at(kStatusG2)};
}

// ------------------------------------------------------------------ argument checks
// Raw pointers follow every check, so each bound is checked here, before anything is written.
inline void check_unscale(int64_t unscale) {
  TORCH_CHECK(unscale == kNoUnscale || unscale == kStatusInvScale1 || unscale == kStatusInvScale2,
              "sam_fused: unscale must be -1 (none) or a status index of 1 / loss scale (", kStatusInvScale1,
              " or ", kStatusInvScale2, "), got ", unscale);
}

inline void check_status(const at::Tensor& status, const at::Device& device) {
  TORCH_CHECK(status.device() == device && status.dim() == 1 && status.numel() >= kStatusSize &&
                  status.is_contiguous() &&
                  (status.scalar_type() == at::kFloat || status.scalar_type() == at::kDouble),
              "sam_fused: status must be a contiguous float32/float64 vector of ", kStatusSize, " entries on ",
              device);
}

inline void check_counts(const at::Tensor& steps, const char* name, int64_t numel, const at::Device& device) {
  TORCH_CHECK(steps.device() == device && steps.scalar_type() == at::kFloat && steps.dim() == 1 &&
                  steps.is_contiguous() && (numel < 0 || steps.numel() == numel),
              "sam_fused: ", name, " must be a contiguous float32 vector", numel < 0 ? "" : " of the bucket's",
              numel < 0 ? "" : " length", " on ", device, ", got ", steps.scalar_type(), " ", steps.sizes(), " on ",
              steps.device());
}

// The partial sums of a statistics launch: `rows` quantities (rows of a float64 matrix whose
// columns are contiguous slots: the engine's (4, slots) slice of its partials buffer).
inline void check_partials(const at::Tensor& t, int64_t rows, int64_t slots, const at::Device& device) {
  TORCH_CHECK(t.device() == device && t.scalar_type() == at::kDouble && t.dim() == 2 && t.size(0) >= rows &&
                  t.size(1) == slots && (slots <= 1 || t.stride(1) == 1),
              "sam_fused: partials must be a float64 matrix of at least ", rows, " rows of ", slots,
              " contiguous slots (one per partial sum) on ", device, ", got ", t.scalar_type(), " ", t.sizes(),
              " on ", t.device());
}

// GCSAM's row table (Bucket.row_table): the address of each row's first element (int64) and
// its length (int32), contiguous, on `device`.
inline void check_rows(const at::Tensor& rows, const at::Tensor& lengths, const at::Device& device) {
  TORCH_CHECK(rows.device() == device && rows.scalar_type() == at::kLong && rows.dim() == 1 &&
                  rows.is_contiguous() && lengths.device() == device && lengths.scalar_type() == at::kInt &&
                  lengths.dim() == 1 && lengths.is_contiguous() && lengths.numel() == rows.numel(),
              "sam_fused: centralize takes a row table: contiguous int64 row addresses and int32 row lengths of "
              "one length, on ", device, ", got ", rows.scalar_type(), " ", rows.sizes(), " and ",
              lengths.scalar_type(), " ", lengths.sizes());
}

// The numbers Python passes for a variant's rules and a base, each refused by name if this
// library has no functor for it (the caller asked capabilities first: this is a bug's guard).
template <typename Family>
void check_number(int64_t number, const char* what) {
  const bool known = Family::dispatch(number, [](auto) {});
  TORCH_CHECK(known, "sam_fused: this library has no ", what, " numbered ", number,
              "; its functors() lists what it runs (rebuild it from this package's csrc/)");
}

// What a variant's rules and a base need of a launch, checked before anything is written:
// the roles each reads or writes, and the scalars a base takes (its spec's kernel_scalars()
// and device_scalars()).
template <typename Rule>
void check_ascent_aux(bool aux) {
  TORCH_CHECK(!Rule::kReadsAux || aux, "sam_fused: ascent rule ", Rule::kName,
              " reads the aux role (its running state or noise); pass it");
}

template <typename Rule>
void check_ascent_roles(bool aux, bool prev, bool backup) {
  check_ascent_aux<Rule>(aux);
  TORCH_CHECK(!Rule::kUpdatesState || prev, "sam_fused: ascent rule ", Rule::kName,
              " updates its running state, whose old value goes to prev; pass it");
  TORCH_CHECK(Rule::kFromBackup != backup, "sam_fused: ascent rule ", Rule::kName,
              Rule::kFromBackup ? " perturbs from the backup taken before its noise: pass src=backup, no backup"
                                : " backs the weights up: pass backup");
}

template <typename Descent>
void check_descent_roles(bool aux, bool gv) {
  TORCH_CHECK(!Descent::kReadsAux || aux, "sam_fused: descent rule ", Descent::kName,
              " reads aux (the kept first gradient, or LookSAM's g_v); pass it");
  TORCH_CHECK(!Descent::kWritesGv || gv, "sam_fused: descent rule ", Descent::kName, " stores LookSAM's g_v; pass gv");
}

template <typename Base>
void check_base_arguments(size_t scalars, size_t device_scalars, int64_t options, const bool (&states)[3]) {
  TORCH_CHECK(static_cast<int64_t>(scalars) >= Base::kScalars &&
                  static_cast<int64_t>(device_scalars) >= Base::kDeviceScalars,
              "sam_fused: base ", Base::kName, " takes ", Base::kScalars, " scalars and ", Base::kDeviceScalars,
              " device scalars (its spec's kernel_scalars() and device_scalars()), got ", scalars, " and ",
              device_scalars);
  for (int k = 0; k < 3; ++k) {
    TORCH_CHECK(!Base::uses_state(k, static_cast<int>(options)) || states[k], "sam_fused: base ", Base::kName,
                " with options ", options, " keeps state ", k, " (its spec's state_names(), in order); pass it as state",
                k);
  }
}

// The library's report of its functors, "family:NAME=number" (the `functors` operation).
inline std::vector<std::string> describe_functors() {
  std::vector<std::string> out;
  const auto add = [&](const char* family) {
    return [&out, family](const char* name, int number) {
      out.push_back(std::string(family) + ":" + name + "=" + std::to_string(number));
    };
  };
  math::AscentRules::visit(add("ascent"));
  math::DescentRules::visit(add("descent"));
  math::Bases::visit(add("base"));
  return out;
}

// ------------------------------------------------------------------ dispatch
// Calls f with a value of the storage type (float, at::BFloat16, at::Half, and with kDouble
// double), so that one generic lambda instantiates the kernels for every dtype a library takes.
template <bool kDouble, typename F>
void dispatch_dtype(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat:
      f(float{});
      return;
    case at::kBFloat16:
      f(at::BFloat16{});
      return;
    case at::kHalf:
      f(at::Half{});
      return;
    case at::kDouble:
      if constexpr (kDouble) {
        f(double{});
        return;
      }
      break;
    default:
      break;
  }
  TORCH_CHECK(false, "sam_fused: this library takes ", kDouble ? "float64, " : "",
              "float32, bfloat16 and float16, not ", dtype, "; use backend='reference' for other dtypes");
}

// Calls f with std::true_type or std::false_type: a runtime flag as a template argument.
template <typename F>
void dispatch_bool(bool value, const F& f) {
  if (value) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace sam_fused

// ------------------------------------------------------------------ registration
// Both libraries register the same operations under their own namespace
// (torch.ops.sam_fused_cpu.* / torch.ops.sam_fused_cuda.*), from functions of the same names
// in namespace `impl`. The dispatcher is used instead of pybind11, which keeps the first-use
// build short; Python calls them with named arguments (sam_fused/backends/cpp.py). The role
// arguments are address tables: their alias annotations mark which roles' memory a launch
// writes. Optional roles are None where a variant or base has no such tensor.
#define SAM_FUSED_REGISTER_OPS(ns, impl)                                                                    \
  TORCH_LIBRARY(ns, m) {                                                                                    \
    m.def("constants() -> int[]", &impl::constants);                                                        \
    m.def("functors() -> str[]", &impl::functors);                                                          \
    m.def(                                                                                                  \
        "stats(Tensor grad, Tensor? param, Tensor? aux, Tensor vsteps, Tensor runs, Tensor like, "          \
        "Tensor(a!) partials, Tensor? status, int rule, int unscale, float eta, float c1, float c2) -> ()", \
        &impl::stats);                                                                                      \
    m.def(                                                                                                  \
        "perturb(Tensor(a!) param, Tensor src, Tensor grad, Tensor(b!)? backup, Tensor(c!)? aux, "          \
        "Tensor(d!)? keep, Tensor(e!)? prev, Tensor vsteps, Tensor status, Tensor runs, Tensor like, "      \
        "int rule, float rho, float eta, float norm_eps, float c1, float c2, int unscale, bool adaptive, "  \
        "bool normalized, bool check) -> ()",                                                               \
        &impl::perturb);                                                                                    \
    m.def("copy(Tensor(a!) dst, Tensor src, Tensor runs, Tensor like, Tensor? if_skipped) -> ()",           \
          &impl::copy);                                                                                     \
    m.def("centralize(Tensor(a!) rows, Tensor lengths, Tensor like) -> ()", &impl::centralize);             \
    m.def(                                                                                                  \
        "descent_stats(Tensor grad, Tensor? first_grad, Tensor runs, Tensor like, Tensor(a!) partials, "    \
        "Tensor status, int unscale, bool want_gp2) -> ()",                                                 \
        &impl::descent_stats);                                                                              \
    m.def(                                                                                                  \
        "update(Tensor src, Tensor(a!) param, Tensor grad, Tensor(b!)? state0, Tensor(c!)? state1, "        \
        "Tensor(d!)? state2, Tensor? aux, Tensor(e!)? gv, Tensor steps, Tensor status, Tensor runs, "       \
        "Tensor like, int base, float[] scalars, int options, float[] device_scalars, float lr, "           \
        "int descent, float alpha, int unscale, bool clip, bool check) -> ()",                              \
        &impl::update);                                                                                     \
    m.def(                                                                                                  \
        "advance_steps(Tensor(a!) steps, Tensor(b!) vsteps, Tensor mask, Tensor(c!) status, bool base, "    \
        "bool variant, bool check, bool count_skip) -> ()",                                                 \
        &impl::advance_steps);                                                                              \
  }

// An empty Python module named TORCH_EXTENSION_NAME, so that the library loads with a plain
// import (setup.py builds it as sam_fused._C_cpu / _C_cuda) as well as through torch's JIT
// loader; importing it registers the operations.
#define SAM_FUSED_CONCAT_(a, b) a##b
#define SAM_FUSED_CONCAT(a, b) SAM_FUSED_CONCAT_(a, b)
#define SAM_FUSED_STR_(a) #a
#define SAM_FUSED_STR(a) SAM_FUSED_STR_(a)
#define SAM_FUSED_PYTHON_MODULE(doc) SAM_FUSED_PYTHON_MODULE_WITH_METHODS(doc, nullptr)
// ... with module-level functions (the CPU library's host helpers, sam_fused_host.cpp)
#define SAM_FUSED_PYTHON_MODULE_WITH_METHODS(doc, methods)                                               \
  static PyModuleDef sam_fused_module = {PyModuleDef_HEAD_INIT, SAM_FUSED_STR(TORCH_EXTENSION_NAME), \
                                         doc, -1, methods, nullptr, nullptr, nullptr, nullptr};     \
  PyMODINIT_FUNC SAM_FUSED_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {                            \
    return PyModule_Create(&sam_fused_module);                                                      \
  }
