// Shared by the CPU (sam_fused_cpu.cpp) and CUDA (sam_fused_cuda.cu) extensions.
//
// Both extensions work on the flat buffers of a bucket (sam_fused/layout.py). A "run" is
// a contiguous span [start, stop) of those buffers whose parameters share one update
// count, read from steps[first]. Python passes the runs of a plan as a CPU int64 tensor
// of shape (R, 3): start, stop, first. Every operation takes the whole flat buffers plus
// that table, so one Python call covers a bucket however many runs it has, and `like`, a
// tensor of the element type. Both extensions also take table buckets (sam_fused/tables.py):
// each buffer argument is then an int64 table of tensor addresses and `like` names the
// element type. The CPU extension reads a host row (0, numel, first) per tensor
// (sam_fused_cpu.cpp, "layouts"); the CUDA extension reads the device chunk table, one
// row (slot, start, numel, count index) per kCudaTableChunk elements of a tensor
// (sam_fused_cuda.cu, "layouts").
//
// The gradient-norm statistics are reduced in two fixed stages: each run is cut into a
// number of slots that depends only on the run's length (stats_slots; a CUDA table launch:
// one slot per chunk row), each slot writes one partial sum, and the caller sums the
// partials with one torch.sum. Nothing depends on the thread count or on scheduling, so the
// same gradients give bitwise the same norm.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <initializer_list>
#include <utility>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace sam_fused {

// Bumped whenever an operation's signature or meaning changes, so that Python can refuse
// a stale prebuilt library (sam_fused/_extension.py: ABI_VERSION).
constexpr int64_t kAbiVersion = 5;

// CPU: a slot covers up to 64 Ki elements (256 KiB of float32 gradient), at most 1024
// slots per run; a run of ResNet-50's 25.6 M elements gives 391 partial sums.
constexpr int64_t kCpuStatsChunk = 65536;
constexpr int64_t kCpuMaxSlots = 1024;
// CUDA: one thread block per slot, as the Triton kernel's programs (4096 elements each,
// at most 1024 blocks that stride over the run).
constexpr int64_t kCudaStatsChunk = 4096;
constexpr int64_t kCudaMaxSlots = 1024;
// CUDA table launches: the elements of one chunk row, one thread block each; CHUNK in
// sam_fused/tables.py, which builds the rows (tests/test_extension.py checks the two agree).
constexpr int64_t kCudaTableChunk = 1024;

// The number of partial sums a run of n elements produces: a pure function of n.
inline int64_t stats_slots(int64_t n, int64_t chunk, int64_t max_slots) {
  const int64_t wanted = (n + chunk - 1) / chunk;
  return std::max<int64_t>(1, std::min<int64_t>(wanted, max_slots));
}

struct RunSpan {
  int64_t start;
  int64_t stop;
  int64_t first;  // index into steps of the run's first parameter
};

// Reads and validates the (R, 3) run table against a buffer of `numel` elements and a
// steps vector of `num_params` entries (negative: not checked). Raw pointers follow, so
// every bound is checked here once.
inline std::vector<RunSpan> read_runs(const at::Tensor& runs, int64_t numel, int64_t num_params) {
  TORCH_CHECK(runs.device().is_cpu() && runs.scalar_type() == at::kLong && runs.dim() == 2 &&
                  runs.size(1) == 3 && runs.is_contiguous(),
              "sam_fused: the run table must be a contiguous CPU int64 tensor of shape (R, 3)");
  const int64_t* p = runs.data_ptr<int64_t>();
  std::vector<RunSpan> out;
  out.reserve(runs.size(0));
  for (int64_t r = 0; r < runs.size(0); ++r) {
    RunSpan s{p[3 * r], p[3 * r + 1], p[3 * r + 2]};
    TORCH_CHECK(0 <= s.start && s.start <= s.stop && s.stop <= numel,
                "sam_fused: run ", r, " [", s.start, ", ", s.stop, ") is outside the buffer of ", numel,
                " elements");
    TORCH_CHECK(num_params < 0 || (0 <= s.first && s.first < num_params), "sam_fused: run ", r,
                " names parameter ", s.first, " of ", num_params);
    out.push_back(s);
  }
  return out;
}

// Checks that a flat buffer is usable through a raw pointer of the bucket's dtype.
inline void check_flat(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel,
                       const at::Device& device) {
  TORCH_CHECK(t.device() == device, "sam_fused: ", name, " is on ", t.device(), ", expected ", device);
  TORCH_CHECK(t.scalar_type() == dtype, "sam_fused: ", name, " is ", t.scalar_type(), ", expected ",
              dtype);
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous() && t.numel() >= numel, "sam_fused: ", name,
              " must be a contiguous 1-D buffer of at least ", numel, " elements");
}

// The status vector's entries, under sam_fused/status.py's names (its one definition;
// tests/test_status_constants.py fails when the two disagree). float32, or float64 when
// an optimizer also holds float64 parameters. These backends run the variants whose
// entries they read; the others (GV2, DOT, G2) are here so that the layout is whole.
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

// No unscaling: the `unscale` argument of stats, perturb, sgd and adam is this, or the
// status entry whose value multiplies every gradient as it is read.
constexpr int64_t kNoUnscale = -1;

inline void check_unscale(int64_t unscale) {
  TORCH_CHECK(unscale == kNoUnscale || unscale == kStatusInvScale1 || unscale == kStatusInvScale2,
              "sam_fused: unscale must be -1 (none) or a status index of 1 / loss scale (", kStatusInvScale1,
              " or ", kStatusInvScale2, "), got ", unscale);
}

inline void check_status(const at::Tensor& status, const at::Device& device) {
  TORCH_CHECK(status.device() == device && status.dim() == 1 && status.numel() >= kStatusSize &&
                  status.is_contiguous() &&
                  (status.scalar_type() == at::kFloat || status.scalar_type() == at::kDouble),
              "sam_fused: status must be a contiguous float32/float64 vector of ", kStatusSize, " entries on ", device);
}

inline void check_steps(const at::Tensor& steps, const at::Device& device) {
  TORCH_CHECK(steps.device() == device && steps.scalar_type() == at::kFloat && steps.is_contiguous(),
              "sam_fused: steps must be a contiguous float32 tensor on ", device);
}

inline void check_partials(const at::Tensor& t, const char* name, int64_t slots, const at::Device& device) {
  TORCH_CHECK(t.device() == device && t.dim() == 1 && t.numel() == slots && t.stride(0) == 1 &&
                  (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
              "sam_fused: ", name, " must be a float32/float64 vector of ", slots,
              " contiguous slots (one per partial sum) on ", device, ", got ", t.sizes(), " ",
              t.scalar_type());
}

// Calls f with a value of the storage type (float, at::BFloat16 or at::Half), so that one
// generic lambda instantiates the kernels for the three dtypes the fused backends take.
template <typename F>
void dispatch_dtype(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(at::BFloat16{});
      break;
    case at::kHalf:
      f(at::Half{});
      break;
    default:
      TORCH_CHECK(false, "sam_fused: the compiled backends take float32, bfloat16 and float16, not ", dtype,
                  "; use backend='reference' for other dtypes");
  }
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
// defined in namespace sam_fused of the including file. The dispatcher is used instead of
// pybind11, which keeps the first-use build short; alias annotations mark what each writes.
#define SAM_FUSED_REGISTER_OPS(ns)                                                                        \
  TORCH_LIBRARY(ns, m) {                                                                                  \
    using namespace sam_fused;                                                                            \
    m.def("constants() -> int[]", &constants);                                                            \
    m.def(                                                                                                \
        "stats(Tensor grad, Tensor param, Tensor runs, Tensor like, Tensor(a!)? sumsq, Tensor(b!) bad, Tensor status, " \
        "int unscale, bool adaptive, float eta) -> ()",                                                   \
        &stats);                                                                                          \
    m.def(                                                                                                \
        "perturb(Tensor(a!) param, Tensor grad, Tensor(b!) backup, Tensor status, Tensor runs, Tensor like, " \
        "float rho, float eta, float norm_eps, int unscale, bool adaptive, bool normalized, bool check) -> ()",      \
        &perturb);                                                                                        \
    m.def("restore(Tensor(a!) param, Tensor backup, Tensor runs, Tensor like) -> ()", &restore);          \
    m.def(                                                                                                \
        "sgd(Tensor src, Tensor(a!) param, Tensor grad, Tensor(b!)? buf, Tensor steps, Tensor status, "   \
        "Tensor runs, Tensor like, float lr, float momentum, float one_minus_dampening, float weight_decay, "          \
        "bool nesterov, bool maximize, int unscale, bool clip, bool check) -> ()",                        \
        &sgd);                                                                                            \
    m.def(                                                                                                \
        "adam(Tensor src, Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "     \
        "Tensor(d!)? max_exp_avg_sq, Tensor steps, Tensor status, Tensor runs, Tensor like, float lr, "   \
        "float beta1, float beta2, float eps, float weight_decay, bool decoupled, bool maximize, int unscale, "        \
        "bool clip, bool check) -> ()",                                                                   \
        &adam);                                                                                           \
    m.def(                                                                                                \
        "advance_steps(Tensor(a!) steps, Tensor mask, Tensor(b!) status, bool check, bool count_skip) -> ()", \
        &advance_steps);                                                                                  \
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
