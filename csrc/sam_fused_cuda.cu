// The CUDA C++ backend of sam_fused: the fused SAM operations as hand-written kernels.
//
// The same operations and float math as the CPU extension (sam_fused_cpu.cpp) and the
// Triton kernels (sam_fused/kernels/*.py), over the flat buffers of a bucket (flat buckets
// only: table buckets go to the Triton backend on CUDA, and the `like` argument the shared
// schemas carry for the CPU library's table launches must match the buffers here):
//
// * one launch per run (a contiguous span of the flat buffers; usually one per bucket),
//   grid-stride loops over 16-byte packs (4 float32 or 8 bfloat16/float16 elements) when
//   every pointer of the run is 16-byte aligned, which the flat layout guarantees; scalar
//   loads otherwise;
// * float32 math over the storage dtype, Adam's bias corrections in double; the element
//   math is sam_fused_math.h's, the same functions the CPU extension runs;
// * no host synchronisation: the skip decision, the global norm, GradScaler's 1 / scale
//   and the clipping coefficient are read by the kernels from the device-resident status
//   vector, step counts from the steps vector;
// * a deterministic norm: stats_kernel runs a grid that depends only on the run length,
//   each block reduces in a fixed order (warp shuffles, then warps in index order) and
//   writes one partial; the caller sums the partials with one torch.sum.

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

#include <array>
#include <atomic>
#include <cstdint>

#include "sam_fused_common.h"
#include "sam_fused_math.h"

namespace sam_fused {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// A 16-byte pack of N elements (N = 1 for the unaligned fallback).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T>
struct VecWidth {
  static constexpr int value = 16 / static_cast<int>(sizeof(T));
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p, int64_t i) {
  return *reinterpret_cast<const Pack<T, N>*>(p + i);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, int64_t i, const Pack<T, N>& x) {
  *reinterpret_cast<Pack<T, N>*>(p + i) = x;
}

template <typename T>
__device__ __forceinline__ float to_f(T x) {
  return static_cast<float>(x);
}

template <typename T>
__device__ __forceinline__ T from_f(float x) {
  return static_cast<T>(x);  // round to nearest even, as torch's .to()
}

// How a kernel reads the device status vector (float32, or float64 when the optimizer
// also holds float64 parameters): which entry unscales the gradients (kNoUnscale: none),
// whether the clipping coefficient applies, and whether a non-finite gradient skips the step.
struct StatusRead {
  const void* data;
  bool is_double;
  int unscale;
  bool clip;
  bool check;

  __device__ __forceinline__ double at(int i) const {
    return is_double ? static_cast<const double*>(data)[i] : static_cast<double>(static_cast<const float*>(data)[i]);
  }
  // the reference's status[i].to(float32), or 1 when the factor is off
  __device__ __forceinline__ float factor(int i, bool wanted) const {
    return wanted ? static_cast<float>(at(i)) : 1.0f;
  }
  __device__ __forceinline__ float inv_scale() const { return factor(unscale, unscale != kNoUnscale); }
  __device__ __forceinline__ float clip_coef() const { return factor(kStatusClip, clip); }
  // either pass saw a non-finite gradient
  __device__ __forceinline__ bool skip() const { return check && at(kStatusBad1) + at(kStatusBad2) > 0; }
};

StatusRead status_read(const at::Tensor& status, int64_t unscale, bool clip, bool check) {
  return {status.data_ptr(), status.scalar_type() == at::kDouble, static_cast<int>(unscale), clip, check};
}

__device__ __forceinline__ int64_t thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// Sum over the block, valid in thread 0: warp shuffles, then the warps in index order.
template <typename V>
__device__ V block_sum(V x) {
  __shared__ V warp_sums[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_down_sync(0xffffffffu, x, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = x;
  __syncthreads();
  V total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
  }
  return total;
}

// ------------------------------------------------------------------ kernels
// One partial per block: the non-finite count of the raw gradients, and the sum of u^2 of
// the unscaled ones.
template <typename T, int N, bool ADAPTIVE, bool WANT_SUMSQ>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(const T* __restrict__ g, const T* __restrict__ w, int64_t n, float eta, StatusRead read,
                 void* sumsq, void* bad, bool out_double) {
  const float inv_scale = WANT_SUMSQ ? read.inv_scale() : 1.0f;
  float acc = 0.0f;
  int cnt = 0;
  const int64_t packs = n / N;
  for (int64_t k = thread_index(); k < packs; k += grid_stride()) {
    const Pack<T, N> gp = load_pack<T, N>(g, k * N);
    Pack<T, N> wp;
    if constexpr (ADAPTIVE) wp = load_pack<T, N>(w, k * N);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float gv = to_f(gp.v[j]);
      cnt += math::nonfinite(gv);
      if constexpr (WANT_SUMSQ) {
        // the variant's direction: the gradient (kernel_id 0)
        const float u = math::ascent_u(math::unscaled(gv, inv_scale), ADAPTIVE ? to_f(wp.v[j]) : 0.0f, eta, ADAPTIVE);
        acc += u * u;
      }
    }
  }
  const int total_cnt = block_sum(cnt);
  float total_acc = 0.0f;
  if constexpr (WANT_SUMSQ) total_acc = block_sum(acc);
  if (threadIdx.x == 0) {
    if (out_double) {
      if constexpr (WANT_SUMSQ) static_cast<double*>(sumsq)[blockIdx.x] = total_acc;
      static_cast<double*>(bad)[blockIdx.x] = total_cnt;
    } else {
      if constexpr (WANT_SUMSQ) static_cast<float*>(sumsq)[blockIdx.x] = total_acc;
      static_cast<float*>(bad)[blockIdx.x] = static_cast<float>(total_cnt);
    }
  }
}

template <typename T, int N, bool ADAPTIVE>
__global__ void __launch_bounds__(kThreads)
    perturb_kernel(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ backup, StatusRead read, int64_t n,
                   float rho, float eta, float norm_eps, bool normalized) {
  const float scale = math::perturb_scale(rho, normalized ? static_cast<float>(read.at(kStatusSumsq)) : 0.0f,
                                          norm_eps, normalized);
  const float inv_scale = read.inv_scale();
  const bool skip = read.check && read.at(kStatusBad1) > 0;
  const int64_t packs = n / N;
  for (int64_t k = thread_index(); k < packs; k += grid_stride()) {
    const Pack<T, N> wr = load_pack<T, N>(w, k * N);
    store_pack<T, N>(backup, k * N, wr);
    if (skip) continue;  // the backup is written; the weights keep their bits
    const Pack<T, N> gp = load_pack<T, N>(g, k * N);
    Pack<T, N> out;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      // the variant's direction: the gradient (kernel_id 0)
      out.v[j] = from_f<T>(math::perturb(to_f(wr.v[j]), math::unscaled(to_f(gp.v[j]), inv_scale), scale, eta, ADAPTIVE));
    }
    store_pack<T, N>(w, k * N, out);
  }
}

// The loop both fused updates run, with the restore fused in (src is the backup, or the
// parameters when they were restored separately): grid-stride over packs; when the step is
// skipped only the restore takes effect (the state keeps its bits), else
// update(offset, weights, gradients) computes and stores the pack.
template <typename T, int N, typename Update>
__device__ __forceinline__ void update_loop(const T* src, T* param, const T* __restrict__ g, int64_t n, bool skip,
                                            const Update& update) {
  const int64_t packs = n / N;
  for (int64_t k = thread_index(); k < packs; k += grid_stride()) {
    const Pack<T, N> wr = load_pack<T, N>(src, k * N);
    if (skip) {
      if (src != param) store_pack<T, N>(param, k * N, wr);
      continue;
    }
    update(k * N, wr, load_pack<T, N>(g, k * N));
  }
}

// restore + torch.optim.SGD
template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    sgd_kernel(const T* src, T* param, const T* __restrict__ g, T* __restrict__ buf,
               const float* __restrict__ step_count, StatusRead read, int64_t n, math::SgdScalars s, bool has_wd,
               bool has_momentum, bool nesterov, bool maximize) {
  const float inv_scale = read.inv_scale();
  const float clip = read.clip_coef();
  const bool first = has_momentum && *step_count == 0.0f;
  update_loop<T, N>(src, param, g, n, read.skip(), [&](int64_t i, const Pack<T, N>& wr, const Pack<T, N>& gp) {
    Pack<T, N> bp;
    if (has_momentum) bp = load_pack<T, N>(buf, i);
    Pack<T, N> out;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float b = has_momentum ? to_f(bp.v[j]) : 0.0f;
      const float d = math::descent_grad(to_f(gp.v[j]), inv_scale, clip);
      out.v[j] = from_f<T>(math::sgd(to_f(wr.v[j]), d, b, first, s, has_wd, has_momentum, nesterov, maximize));
      if (has_momentum) bp.v[j] = from_f<T>(b);
    }
    if (has_momentum) store_pack<T, N>(buf, i, bp);
    store_pack<T, N>(param, i, out);
  });
}

// restore + torch.optim.Adam/AdamW; s.step_size and s.bc2_sqrt are filled in here, in
// double from the device-resident step count, as PyTorch computes them on the host.
template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(const T* src, T* param, const T* __restrict__ g, T* __restrict__ m_ptr, T* __restrict__ v_ptr,
                T* __restrict__ vmax_ptr, const float* __restrict__ step_count, StatusRead read, int64_t n,
                math::AdamScalars s, double lr, double beta1, double beta2, int decay, bool amsgrad,
                bool small_weight, bool maximize) {
  const float inv_scale = read.inv_scale();
  const float clip = read.clip_coef();
  math::adam_bias_corrections(*step_count, lr, beta1, beta2, s.step_size, s.bc2_sqrt);
  update_loop<T, N>(src, param, g, n, read.skip(), [&](int64_t i, const Pack<T, N>& wr, const Pack<T, N>& gp) {
    Pack<T, N> mp = load_pack<T, N>(m_ptr, i);
    Pack<T, N> vp = load_pack<T, N>(v_ptr, i);
    Pack<T, N> vmp;
    if (amsgrad) vmp = load_pack<T, N>(vmax_ptr, i);
    Pack<T, N> out;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float m = to_f(mp.v[j]);
      float v = to_f(vp.v[j]);
      float vmax = amsgrad ? to_f(vmp.v[j]) : 0.0f;
      const float d = math::descent_grad(to_f(gp.v[j]), inv_scale, clip);
      out.v[j] = from_f<T>(math::adam(to_f(wr.v[j]), d, m, v, vmax, s, decay, amsgrad, small_weight, maximize));
      mp.v[j] = from_f<T>(m);
      vp.v[j] = from_f<T>(v);
      if (amsgrad) vmp.v[j] = from_f<T>(vmax);
    }
    store_pack<T, N>(m_ptr, i, mp);
    store_pack<T, N>(v_ptr, i, vp);
    if (amsgrad) store_pack<T, N>(vmax_ptr, i, vmp);
    store_pack<T, N>(param, i, out);
  });
}

// steps += mask * (not skipped); block 0 also counts a skipped step in status[kStatusSkipped].
__global__ void advance_steps_kernel(float* steps, const float* mask, void* status, StatusRead read, int64_t n,
                                     bool count_skip) {
  const bool skip = read.skip();
  if (count_skip && skip && blockIdx.x == 0 && threadIdx.x == 0) {
    if (read.is_double) {
      static_cast<double*>(status)[kStatusSkipped] += 1.0;
    } else {
      static_cast<float*>(status)[kStatusSkipped] += 1.0f;
    }
  }
  const int64_t i = thread_index();
  if (i < n && !skip) steps[i] += mask[i];
}

// ------------------------------------------------------------------ host side
int sm_count(int device) {
  static std::atomic<int> cache[64];  // static storage: zero-initialised
  if (device < 0 || device >= 64) device = 0;
  int count = cache[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

// Enough resident blocks to keep every SM busy; the grid-stride loops cover the rest.
unsigned elementwise_blocks(int64_t packs, int device) {
  const int64_t wanted = (packs + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sm_count(device)) * 8;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(wanted, cap)));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void check_cuda(const at::Tensor& t, const char* name) {
#ifdef SAM_FUSED_CUDA_EMULATION
  const bool on_device = t.is_cpu();  // the emulated kernels read host memory
#else
  const bool on_device = t.is_cuda();
#endif
  TORCH_CHECK(on_device, "sam_fused cuda backend: ", name, " must be a CUDA tensor, got ", t.device());
}

template <typename T>
T* ptr_at(const at::Tensor& t, int64_t offset) {
  return t.data_ptr<T>() + offset;
}

// The most flat buffers one kernel takes: Adam's src, param, grad and three moments.
constexpr size_t kMaxBuffers = 6;

// One launch per run: calls f(run, n, p, width), where p[k] points at the run's first
// element of buffers[k] (nullptr for an absent buffer) and width is the pack of 16 bytes
// when n and every pointer allow it, else 1.
template <typename T, typename F>
void for_each_run(const std::vector<RunSpan>& runs, std::initializer_list<const at::Tensor*> buffers, const F& f) {
  TORCH_INTERNAL_ASSERT(buffers.size() <= kMaxBuffers);
  constexpr int V = VecWidth<T>::value;
  for (const auto& r : runs) {
    const int64_t n = r.stop - r.start;
    std::array<T*, kMaxBuffers> p{};
    bool packed = n % V == 0;
    size_t k = 0;
    for (const at::Tensor* buffer : buffers) {
      if (buffer != nullptr) {
        p[k] = ptr_at<T>(*buffer, r.start);
        packed = packed && aligned16(p[k]);
      }
      ++k;
    }
    if (packed) {
      f(r, n, p, std::integral_constant<int, V>{});
    } else {
      f(r, n, p, std::integral_constant<int, 1>{});
    }
  }
}

void stats(const at::Tensor& grad, const at::Tensor& param, const at::Tensor& runs_t, const at::Tensor& like,
           const std::optional<at::Tensor>& sumsq, const at::Tensor& bad, const at::Tensor& status, int64_t unscale,
           bool adaptive, double eta) {
  check_cuda(grad, "grad");
  const auto device = grad.device();
  const c10::cuda::CUDAGuard guard(device);
  check_flat_launch(like, grad);
  const auto runs = read_runs(runs_t, grad.numel(), -1);
  check_flat(grad, "grad", grad.scalar_type(), grad.numel(), device);
  check_flat(param, "param", grad.scalar_type(), grad.numel(), device);
  check_status(status, device);
  check_unscale(unscale);
  int64_t total = 0;
  for (const auto& r : runs) total += stats_slots(r.stop - r.start, kCudaStatsChunk, kCudaMaxSlots);
  check_partials(bad, "bad", total, device);
  const bool want = sumsq.has_value();
  if (want) {
    check_partials(*sumsq, "sumsq", total, device);
    TORCH_CHECK(sumsq->scalar_type() == bad.scalar_type(), "sam_fused: partials of one dtype");
  }
  const bool out_double = bad.scalar_type() == at::kDouble;
  const size_t out_size = out_double ? sizeof(double) : sizeof(float);
  const StatusRead read = status_read(status, unscale, false, false);
  auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  dispatch_dtype(grad.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    int64_t offset = 0;
    // the weights are read (and aligned) only for the adaptive norm
    for_each_run<T>(runs, {&grad, want && adaptive ? &param : nullptr}, [&](const RunSpan&, int64_t n, const auto& p,
                                                                              auto width) {
      constexpr int N = decltype(width)::value;
      const int64_t slots = stats_slots(n, kCudaStatsChunk, kCudaMaxSlots);
      void* s_out = want ? static_cast<char*>(sumsq->data_ptr()) + offset * out_size : nullptr;
      void* b_out = static_cast<char*>(bad.data_ptr()) + offset * out_size;
      dispatch_bool(want && adaptive, [&](auto A) {
        dispatch_bool(want, [&](auto W) {
          const unsigned grid = static_cast<unsigned>(slots);  // one block per partial
          SAM_FUSED_LAUNCH(grid, kThreads, stream, stats_kernel<T, N, decltype(A)::value, decltype(W)::value>)(
              p[0], p[1], n, static_cast<float>(eta), read, s_out, b_out, out_double);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
      offset += slots;
    });
  });
}

void perturb(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& backup,
             const at::Tensor& status, const at::Tensor& runs_t, const at::Tensor& like, double rho, double eta,
             double norm_eps, int64_t unscale, bool adaptive, bool normalized, bool check) {
  check_cuda(param, "param");
  const auto device = param.device();
  const c10::cuda::CUDAGuard guard(device);
  const auto dtype = param.scalar_type();
  check_flat_launch(like, param);
  const auto runs = read_runs(runs_t, param.numel(), -1);
  check_flat(param, "param", dtype, param.numel(), device);
  check_flat(grad, "grad", dtype, param.numel(), device);
  check_flat(backup, "backup", dtype, param.numel(), device);
  check_status(status, device);
  check_unscale(unscale);
  const StatusRead read = status_read(status, unscale, false, check);
  auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_run<T>(runs, {&param, &grad, &backup}, [&](const RunSpan&, int64_t n, const auto& p, auto width) {
      constexpr int N = decltype(width)::value;
      const unsigned blocks = elementwise_blocks(n / N, device.index());
      dispatch_bool(adaptive, [&](auto A) {
        SAM_FUSED_LAUNCH(blocks, kThreads, stream, perturb_kernel<T, N, decltype(A)::value>)(
            p[0], p[1], p[2], read, n, static_cast<float>(rho), static_cast<float>(eta),
            static_cast<float>(norm_eps), normalized);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

void restore(const at::Tensor& param, const at::Tensor& backup, const at::Tensor& runs_t, const at::Tensor& like) {
  check_cuda(param, "param");
  const auto device = param.device();
  const c10::cuda::CUDAGuard guard(device);
  check_flat_launch(like, param);
  const auto runs = read_runs(runs_t, param.numel(), -1);
  check_flat(param, "param", param.scalar_type(), param.numel(), device);
  check_flat(backup, "backup", param.scalar_type(), param.numel(), device);
  auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  const size_t size = param.element_size();
  for (const auto& r : runs) {
    C10_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(param.data_ptr()) + r.start * size,
                                   static_cast<const char*>(backup.data_ptr()) + r.start * size,
                                   (r.stop - r.start) * size, cudaMemcpyDeviceToDevice, stream));
  }
}

// What one launch of a fused update is given besides its hyperparameters.
template <typename T>
struct UpdateLaunch {
  std::array<T*, kMaxBuffers> p;  // src, param, grad, then the state buffers
  int64_t n;
  unsigned blocks;
  const float* step_count;
  StatusRead read;
};

// What the SGD and Adam launchers share: the checks, the device guard, the status reads and
// one launch(T tag, width, UpdateLaunch<T>, stream) per run.
template <typename Launch>
void launch_update(const at::Tensor& src, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& steps,
                   const at::Tensor& status, const at::Tensor& runs_t, const at::Tensor& like,
                   std::initializer_list<std::pair<const char*, const at::Tensor*>> state, int64_t unscale, bool clip,
                   bool check, const Launch& launch) {
  check_cuda(param, "param");
  const auto device = param.device();
  const c10::cuda::CUDAGuard guard(device);
  check_flat_launch(like, param);
  const auto runs = check_update_args(src, param, grad, steps, status, runs_t, state, unscale);
  TORCH_INTERNAL_ASSERT(state.size() <= kMaxBuffers - 3);
  std::array<const at::Tensor*, kMaxBuffers> buffers{&src, &param, &grad};
  size_t k = 3;
  for (const auto& entry : state) buffers[k++] = entry.second;
  const StatusRead read = status_read(status, unscale, clip, check);
  auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  dispatch_dtype(param.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    for_each_run<T>(runs, {buffers[0], buffers[1], buffers[2], buffers[3], buffers[4], buffers[5]},
                    [&](const RunSpan& r, int64_t n, const auto& p, auto width) {
                      constexpr int N = decltype(width)::value;
                      const UpdateLaunch<T> l{p, n, elementwise_blocks(n / N, device.index()),
                                              steps.data_ptr<float>() + r.first, read};
                      launch(tag, width, l, stream);
                      C10_CUDA_KERNEL_LAUNCH_CHECK();
                    });
  });
}

void sgd(const at::Tensor& src, const at::Tensor& param, const at::Tensor& grad,
         const std::optional<at::Tensor>& buf, const at::Tensor& steps, const at::Tensor& status,
         const at::Tensor& runs_t, const at::Tensor& like, double lr, double momentum, double one_minus_dampening,
         double weight_decay, bool nesterov, bool maximize, int64_t unscale, bool clip, bool check) {
  const bool has_momentum = buf.has_value();
  const math::SgdScalars s = math::sgd_scalars(lr, momentum, one_minus_dampening, weight_decay);
  launch_update(src, param, grad, steps, status, runs_t, like, {{"momentum_buffer", has_momentum ? &*buf : nullptr}}, unscale,
                clip, check, [&](auto tag, auto width, const auto& l, const auto& stream) {
                  using T = decltype(tag);
                  constexpr int N = decltype(width)::value;
                  SAM_FUSED_LAUNCH(l.blocks, kThreads, stream, sgd_kernel<T, N>)(
                      l.p[0], l.p[1], l.p[2], l.p[3], l.step_count, l.read, l.n, s, weight_decay != 0, has_momentum,
                      nesterov && has_momentum, maximize);
                });
}

void adam(const at::Tensor& src, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
          const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq,
          const at::Tensor& steps, const at::Tensor& status, const at::Tensor& runs_t, const at::Tensor& like,
          double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled, bool maximize,
          int64_t unscale, bool clip, bool check) {
  const bool amsgrad = max_exp_avg_sq.has_value();
  // step_size and bc2_sqrt are filled in by each launch, from its run's step count
  const math::AdamScalars s = math::adam_scalars(lr, beta1, beta2, eps, weight_decay);
  const int decay = math::adam_decay(weight_decay, decoupled);
  launch_update(
      src, param, grad, steps, status, runs_t, like,
      {{"exp_avg", &exp_avg}, {"exp_avg_sq", &exp_avg_sq}, {"max_exp_avg_sq", amsgrad ? &*max_exp_avg_sq : nullptr}},
      unscale, clip, check, [&](auto tag, auto width, const auto& l, const auto& stream) {
        using T = decltype(tag);
        constexpr int N = decltype(width)::value;
        SAM_FUSED_LAUNCH(l.blocks, kThreads, stream, adam_kernel<T, N>)(
            l.p[0], l.p[1], l.p[2], l.p[3], l.p[4], l.p[5], l.step_count, l.read, l.n, s, lr, beta1, beta2, decay,
            amsgrad, math::lerp_weight_is_small(s.weight), maximize);
      });
}

void advance_steps(const at::Tensor& steps, const at::Tensor& mask, const at::Tensor& status, bool check,
                   bool count_skip) {
  check_cuda(steps, "steps");
  const auto device = steps.device();
  const c10::cuda::CUDAGuard guard(device);
  check_steps(steps, device);
  TORCH_CHECK(mask.device() == device && mask.scalar_type() == at::kFloat && mask.is_contiguous() &&
                  mask.numel() == steps.numel(),
              "sam_fused: mask must be a contiguous float32 tensor like steps");
  check_status(status, device);
  const int64_t n = steps.numel();
  if (n == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  const unsigned blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
  SAM_FUSED_LAUNCH(blocks, kThreads, stream, advance_steps_kernel)(
      steps.data_ptr<float>(), mask.data_ptr<float>(), status.data_ptr(), status_read(status, kNoUnscale, false, check),
      n, count_skip);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// [ABI version, elements per stats slot, most slots per run]
std::vector<int64_t> constants() { return {kAbiVersion, kCudaStatsChunk, kCudaMaxSlots}; }

}  // namespace
}  // namespace sam_fused

SAM_FUSED_REGISTER_OPS(SAM_FUSED_CUDA_OPS)
SAM_FUSED_PYTHON_MODULE("sam_fused CUDA backend (operations in torch.ops.sam_fused_cuda)")
