// The CUDA C++ backend of sam_fused: the host side of its kernels (sam_fused_cuda_kernels.cuh),
// registered as torch.ops.sam_fused_cuda.*.
//
// Every operation is one table launch over a plan's tensors: a thread block per row of the
// device chunk table (sam_fused/tables.py), kCudaTableChunk / (16-byte pack) threads each. The
// numbers Python passes (a variant's ascent and descent rules, a base's kernel number) pick
// the functors of sam_fused_math.h here, on the host, and with them the kernel instantiation;
// a base's option bits stay a kernel argument (a branch uniform across the launch). No host
// synchronisation: what depends on the step (the skip decision, the global sums, 1 / scale,
// the clipping coefficient, update counts, the tables themselves) is read on the device.

#include <ATen/core/Tensor.h>
#include <Python.h>
#include <torch/library.h>

#ifdef SAM_FUSED_CUDA_EMULATION
// Tests only (tests/emulated_cuda/): this file compiled as host C++, the kernels run on the
// CPU with one fiber per CUDA thread, so that CI checks their numbers without a GPU.
#include "cuda_emulation.h"
#define SAM_FUSED_LAUNCH(grid, block, stream, ...) ::sam_fused_emulation::launcher(grid, block, stream, __VA_ARGS__)
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
// kernel<<<grid, block, 0, stream>>>(args), spelled as a macro so that the emulation can take it
#define SAM_FUSED_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#endif

#ifndef SAM_FUSED_CUDA_OPS
#define SAM_FUSED_CUDA_OPS sam_fused_cuda  // the torch.ops namespace
#endif

#include <algorithm>
#include <climits>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "sam_fused_common.h"
#include "sam_fused_cuda_kernels.cuh"
#include "sam_fused_math.h"

namespace sam_fused {
namespace cuda {
namespace {

using OptionalTensor = std::optional<at::Tensor>;

void check_cuda(const at::Tensor& t, const char* name) {
#ifdef SAM_FUSED_CUDA_EMULATION
  const bool on_device = t.is_cpu();  // the emulated kernels read host memory
#else
  const bool on_device = t.is_cuda();
#endif
  TORCH_CHECK(on_device, "sam_fused cuda backend: ", name, " must be a CUDA tensor, got ", t.device());
}

// A launch as the host sees it: the element type (an address table cannot say it, so `like`
// does), the device, and the chunk table, which stays on the device (the host cannot read it
// without a synchronisation: it is sam_fused/tables.py's, built from the tensors it keeps alive).
struct Launch {
  at::ScalarType dtype;
  at::Device device;
  const int64_t* chunks;
  int64_t rows;     // blocks of the launch
  int64_t tensors;  // entries of every role table
  unsigned threads;
};

Launch read_launch(const at::Tensor& first_role, const at::Tensor& like, const at::Tensor& chunks,
                   const char* name) {
  check_cuda(first_role, name);
  const auto device = first_role.device();
  TORCH_CHECK(chunks.device() == device && chunks.scalar_type() == at::kLong && chunks.dim() == 2 &&
                  chunks.size(1) == 4 && chunks.is_contiguous(),
              "sam_fused: a launch's runs must be its chunk table (sam_fused/tables.py): a contiguous int64 "
              "tensor of shape (C, 4) on ", device, ", got ", chunks.scalar_type(), " ", chunks.sizes(), " on ",
              chunks.device());
  TORCH_CHECK(chunks.size(0) <= INT_MAX, "sam_fused: ", chunks.size(0), " chunks exceed one launch's grid");
  unsigned threads = 0;
  dispatch_dtype<false>(like.scalar_type(), [&](auto tag) {
    threads = static_cast<unsigned>(kCudaTableChunk / VecWidth<decltype(tag)>::value);  // a pack each
  });
  return {like.scalar_type(), device, chunks.data_ptr<int64_t>(), chunks.size(0), first_role.numel(), threads};
}

// A role's address table, checked: one int64 entry per tensor, on the launch's device.
const int64_t* table_of(const Launch& launch, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == launch.device && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous() &&
                  t.numel() == launch.tensors,
              "sam_fused: ", name, " must be a contiguous int64 table of ", launch.tensors,
              " addresses (one per tensor) on ", launch.device, ", got ", t.scalar_type(), " ", t.sizes(), " on ",
              t.device());
  return t.data_ptr<int64_t>();
}

// An optional role: absent, it gets `stand_in` (a table the launch reads anyway), so that the
// kernels resolve every role without a branch and never touch an absent one's elements.
const int64_t* table_of(const Launch& launch, const OptionalTensor& t, const char* name, const int64_t* stand_in) {
  return t.has_value() ? table_of(launch, *t, name) : stand_in;
}

void check_counts_on(const at::Tensor& counts, const char* name, const Launch& launch) {
  check_counts(counts, name, -1, launch.device);
}

// No status (an operation that reads none): nothing unscaled, clipped or checked.
constexpr DeviceStatus kNoStatus{nullptr, false, static_cast<int>(kNoUnscale), false, false};

DeviceStatus device_status(const at::Tensor& status, const at::Device& device, int64_t unscale, bool clip,
                           bool check) {
  check_status(status, device);
  check_unscale(unscale);
  return {status.data_ptr(), status.scalar_type() == at::kDouble, static_cast<int>(unscale), clip, check};
}

// Launches kernel<<<launch.rows, launch.threads>>> on the device's current stream (nothing when
// the launch has no chunk: empty tensors, or none at all).
template <typename Kernel, typename... Args>
void run(const Launch& launch, Kernel kernel, Args... args) {
  if (launch.rows == 0) return;
  const c10::cuda::CUDAGuard guard(launch.device);
  auto stream = c10::cuda::getCurrentCUDAStream(launch.device.index());
  SAM_FUSED_LAUNCH(static_cast<unsigned>(launch.rows), launch.threads, stream, kernel)(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------ the operations
// [ABI version, elements per stats slot (a chunk row), most slots per tensor (-1: none, one per chunk)]
std::vector<int64_t> constants() { return {kAbiVersion, kCudaTableChunk, -1}; }

std::vector<std::string> functors() { return describe_functors(); }

void stats(const at::Tensor& grad, const OptionalTensor& param, const OptionalTensor& aux, const at::Tensor& vsteps,
           const at::Tensor& runs, const at::Tensor& like, const at::Tensor& partials, const OptionalTensor& status,
           int64_t rule, int64_t unscale, double eta, double c1, double c2) {
  const Launch launch = read_launch(grad, like, runs, "grad");
  const int64_t* g = table_of(launch, grad, "grad");
  const int64_t* w = table_of(launch, param, "param", g);
  const int64_t* a = table_of(launch, aux, "aux", g);
  check_counts_on(vsteps, "vsteps", launch);
  check_partials(partials, 2, launch.rows, launch.device);
  check_unscale(unscale);
  TORCH_CHECK(unscale == kNoUnscale || status.has_value(), "sam_fused: unscaling reads status; pass it");
  const DeviceStatus read = status.has_value() ? device_status(*status, launch.device, unscale, false, false) : kNoStatus;
  check_number<math::AscentRules>(rule, "ascent rule");
  dispatch_dtype<false>(launch.dtype, [&](auto tag) {
    using T = decltype(tag);
    math::AscentRules::dispatch(rule, [&](auto rule_tag) {
      using Rule = decltype(rule_tag);
      check_ascent_aux<Rule>(aux.has_value());
      dispatch_bool(param.has_value(), [&](auto adaptive) {
        run(launch, stats_kernel<T, Rule, decltype(adaptive)::value>, g, w, a, launch.chunks,
            vsteps.data_ptr<float>(), read, static_cast<float>(eta), static_cast<float>(c1),
            static_cast<float>(c2), partials.data_ptr<double>(), partials.stride(0));
      });
    });
  });
}

void perturb(const at::Tensor& param, const at::Tensor& src, const at::Tensor& grad, const OptionalTensor& backup,
             const OptionalTensor& aux, const OptionalTensor& keep, const OptionalTensor& prev,
             const at::Tensor& vsteps, const at::Tensor& status, const at::Tensor& runs, const at::Tensor& like,
             int64_t rule, double rho, double eta, double norm_eps, double c1, double c2, int64_t unscale,
             bool adaptive, bool normalized, bool check) {
  const Launch launch = read_launch(param, like, runs, "param");
  const int64_t* p = table_of(launch, param, "param");
  const PerturbTables tables{p,
                             table_of(launch, src, "src"),
                             table_of(launch, grad, "grad"),
                             table_of(launch, backup, "backup", p),
                             table_of(launch, aux, "aux", p),
                             table_of(launch, keep, "keep", p),
                             table_of(launch, prev, "prev", p)};
  check_counts_on(vsteps, "vsteps", launch);
  const DeviceStatus read = device_status(status, launch.device, unscale, false, check);
  check_number<math::AscentRules>(rule, "ascent rule");
  dispatch_dtype<false>(launch.dtype, [&](auto tag) {
    using T = decltype(tag);
    math::AscentRules::dispatch(rule, [&](auto rule_tag) {
      using Rule = decltype(rule_tag);
      check_ascent_roles<Rule>(aux.has_value(), prev.has_value(), backup.has_value());
      dispatch_bool(adaptive, [&](auto adaptive_tag) {
        run(launch, perturb_kernel<T, Rule, decltype(adaptive_tag)::value>, tables, launch.chunks,
            vsteps.data_ptr<float>(), read, rho, static_cast<float>(eta), norm_eps, static_cast<float>(c1),
            static_cast<float>(c2), normalized, keep.has_value());
      });
    });
  });
}

void copy(const at::Tensor& dst, const at::Tensor& src, const at::Tensor& runs, const at::Tensor& like,
          const OptionalTensor& if_skipped) {
  const Launch launch = read_launch(dst, like, runs, "dst");
  const int64_t* d = table_of(launch, dst, "dst");
  const int64_t* s = table_of(launch, src, "src");
  const DeviceStatus read =
      if_skipped.has_value() ? device_status(*if_skipped, launch.device, kNoUnscale, false, true) : kNoStatus;
  dispatch_dtype<false>(launch.dtype, [&](auto tag) {
    run(launch, copy_kernel<decltype(tag)>, d, s, launch.chunks, read, if_skipped.has_value());
  });
}

void centralize(const at::Tensor& rows, const at::Tensor& lengths, const at::Tensor& like) {
  check_cuda(rows, "rows");
  check_rows(rows, lengths, rows.device());
  TORCH_CHECK(rows.numel() <= INT_MAX, "sam_fused: ", rows.numel(), " rows exceed one launch's grid");
  constexpr unsigned kThreads = 256;
  const Launch launch{like.scalar_type(), rows.device(), nullptr, rows.numel(), 0, kThreads};
  dispatch_dtype<false>(launch.dtype, [&](auto tag) {
    run(launch, centralize_kernel<decltype(tag)>, rows.data_ptr<int64_t>(), lengths.data_ptr<int32_t>());
  });
}

void descent_stats(const at::Tensor& grad, const OptionalTensor& first_grad, const at::Tensor& runs,
                   const at::Tensor& like, const at::Tensor& partials, const at::Tensor& status, int64_t unscale,
                   bool want_gp2) {
  const Launch launch = read_launch(grad, like, runs, "grad");
  const int64_t* gp = table_of(launch, grad, "grad");
  const int64_t* g = table_of(launch, first_grad, "first_grad", gp);
  check_partials(partials, 4, launch.rows, launch.device);
  const DeviceStatus read = device_status(status, launch.device, unscale, false, false);
  dispatch_dtype<false>(launch.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_bool(first_grad.has_value(), [&](auto first) {
      run(launch, descent_stats_kernel<T, decltype(first)::value>, gp, g, launch.chunks, read, want_gp2,
          partials.data_ptr<double>(), partials.stride(0));
    });
  });
}

void update(const at::Tensor& src, const at::Tensor& param, const at::Tensor& grad, const OptionalTensor& state0,
            const OptionalTensor& state1, const OptionalTensor& state2, const OptionalTensor& aux,
            const OptionalTensor& gv, const at::Tensor& steps, const at::Tensor& status, const at::Tensor& runs,
            const at::Tensor& like, int64_t base, c10::ArrayRef<double> scalars, int64_t options,
            c10::ArrayRef<double> device_scalars, double lr, int64_t descent, double alpha, int64_t unscale,
            bool clip, bool check) {
  const Launch launch = read_launch(param, like, runs, "param");
  const int64_t* s = table_of(launch, src, "src");
  const bool states[3] = {state0.has_value(), state1.has_value(), state2.has_value()};
  const UpdateTables tables{s,
                            table_of(launch, param, "param"),
                            table_of(launch, grad, "grad"),
                            {table_of(launch, state0, "state0", s), table_of(launch, state1, "state1", s),
                             table_of(launch, state2, "state2", s)},
                            table_of(launch, aux, "aux", s),
                            table_of(launch, gv, "gv", s)};
  check_counts_on(steps, "steps", launch);
  const DeviceStatus read = device_status(status, launch.device, unscale, clip, check);
  check_number<math::Bases>(base, "base update");
  check_number<math::DescentRules>(descent, "descent rule");
  dispatch_dtype<false>(launch.dtype, [&](auto tag) {
    using T = decltype(tag);
    math::Bases::dispatch(base, [&](auto base_tag) {
      using Base = decltype(base_tag);
      check_base_arguments<Base>(scalars.size(), device_scalars.size(), options, states);
      const auto params = Base::template params<float>(lr, scalars.data(), device_scalars.data());
      math::DescentRules::dispatch(descent, [&](auto descent_tag) {
        using Descent = decltype(descent_tag);
        check_descent_roles<Descent>(aux.has_value(), gv.has_value());
        run(launch, update_kernel<T, Base, Descent>, tables, launch.chunks, steps.data_ptr<float>(), read, params,
            static_cast<int>(options), static_cast<float>(alpha));
      });
    });
  });
}

void advance_steps(const at::Tensor& steps, const at::Tensor& vsteps, const at::Tensor& mask,
                   const at::Tensor& status, bool base, bool variant, bool check, bool count_skip) {
  check_cuda(steps, "steps");
  const auto device = steps.device();
  check_counts(steps, "steps", -1, device);
  check_counts(vsteps, "vsteps", steps.numel(), device);
  check_counts(mask, "mask", steps.numel(), device);
  const DeviceStatus read = device_status(status, device, kNoUnscale, false, check);
  const int64_t n = steps.numel();
  constexpr unsigned kThreads = 256;
  const Launch launch{at::kFloat, device, nullptr, std::max<int64_t>(1, (n + kThreads - 1) / kThreads), 0, kThreads};
  run(launch, advance_steps_kernel, steps.data_ptr<float>(), vsteps.data_ptr<float>(), mask.data_ptr<float>(),
      status.data_ptr(), read, n, base, variant, count_skip);
}

#include "sam_fused_cuda_msam.cuh"  // MSAM's kernels and entries, beside the ones above

}  // namespace
}  // namespace cuda
}  // namespace sam_fused

SAM_FUSED_REGISTER_OPS(SAM_FUSED_CUDA_OPS, sam_fused::cuda)
TORCH_LIBRARY_FRAGMENT(SAM_FUSED_CUDA_OPS, m) {
  m.def(
      "msam_stats(Tensor grad, Tensor param, Tensor s0, Tensor runs, Tensor like, Tensor(a!) partials, bool adam, "
      "float a, float b) -> ()",
      &sam_fused::cuda::msam_stats);
  m.def(
      "msam_apply(Tensor(a!) param, Tensor grad, Tensor(b!) weight, Tensor(c!) s0, Tensor(d!)? s1, Tensor steps, "
      "Tensor runs, Tensor like, Tensor status, Tensor scales, int group, bool adam, float[] scalars) -> ()",
      &sam_fused::cuda::msam_apply);
  m.def(
      "msam_move(Tensor(a!) param, Tensor weight, Tensor? s0, Tensor steps, Tensor runs, Tensor like, "
      "Tensor scales, int group) -> ()",
      &sam_fused::cuda::msam_move);
}
SAM_FUSED_PYTHON_MODULE("sam_fused CUDA backend (operations in torch.ops.sam_fused_cuda)")
