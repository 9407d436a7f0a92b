// The CUDA C++ backend of sam_fused: the fused SAM operations as hand-written kernels.
//
// The same operations and float math as the CPU extension (sam_fused_cpu.cpp) and the
// Triton kernels (sam_fused/kernels/*.py), over the flat buffers of a bucket:
//
// * one launch per run (a contiguous span of the flat buffers; usually one per bucket),
//   grid-stride loops over 16-byte packs (4 float32 or 8 bfloat16/float16 elements) when
//   every pointer of the run is 16-byte aligned, which the flat layout guarantees; scalar
//   loads otherwise;
// * float32 math over the storage dtype, Adam's bias corrections in double;
// * no host synchronisation: the skip decision and the global norm are read by the
//   kernels from the device-resident status vector, step counts from the steps vector;
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

#include <atomic>
#include <cmath>
#include <cstdint>

#include "sam_fused_common.h"

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

// status is float32, or float64 when the optimizer also holds float64 parameters.
__device__ __forceinline__ double status_at(const void* status, bool is_double, int i) {
  return is_double ? static_cast<const double*>(status)[i]
                   : static_cast<double>(static_cast<const float*>(status)[i]);
}

__device__ __forceinline__ bool skipped(const void* status, bool is_double) {
  return status_at(status, is_double, kStatusBad1) + status_at(status, is_double, kStatusBad2) > 0;
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
template <typename T, int N, bool ADAPTIVE, bool WANT_SUMSQ>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(const T* __restrict__ g, const T* __restrict__ w, int64_t n, float eta, void* sumsq,
                 void* bad, bool out_double) {
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
      cnt += fabsf(gv) < INFINITY ? 0 : 1;  // NaN compares false too
      if constexpr (WANT_SUMSQ) {
        float u = gv;  // the variant's direction: the gradient (kernel_id 0)
        if constexpr (ADAPTIVE) u = (fabsf(to_f(wp.v[j])) + eta) * u;
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
    perturb_kernel(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ backup, const void* status,
                   bool status_double, int64_t n, float rho, float eta, float norm_eps, bool normalized,
                   bool check) {
  float scale = rho;
  if (normalized) {
    const float norm = sqrtf(static_cast<float>(status_at(status, status_double, kStatusSumsq)));
    scale = rho / (norm + norm_eps);
  }
  const bool skip = check && status_at(status, status_double, kStatusBad1) > 0;
  const int64_t packs = n / N;
  for (int64_t k = thread_index(); k < packs; k += grid_stride()) {
    const Pack<T, N> wr = load_pack<T, N>(w, k * N);
    store_pack<T, N>(backup, k * N, wr);
    if (skip) continue;  // the backup is written; the weights keep their bits
    const Pack<T, N> gp = load_pack<T, N>(g, k * N);
    Pack<T, N> out;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float wf = to_f(wr.v[j]);
      const float u = to_f(gp.v[j]);
      float eps;
      if constexpr (ADAPTIVE) {
        const float t = fabsf(wf) + eta;
        eps = scale * t * (t * u);
      } else {
        eps = scale * u;
      }
      out.v[j] = from_f<T>(wf + eps);
    }
    store_pack<T, N>(w, k * N, out);
  }
}

// restore + torch.optim.SGD; src is the backup (restore fused) or the parameters.
template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    sgd_kernel(const T* src, T* param, const T* __restrict__ g, T* __restrict__ buf,
               const float* __restrict__ step_count, const void* status, bool status_double, int64_t n,
               float lr, float momentum, float one_minus_dampening, float weight_decay, bool has_wd,
               bool has_momentum, bool nesterov, float gsign, bool check) {
  const bool skip = check && skipped(status, status_double);
  const bool first = has_momentum && *step_count == 0.0f;
  const int64_t packs = n / N;
  for (int64_t k = thread_index(); k < packs; k += grid_stride()) {
    const Pack<T, N> wr = load_pack<T, N>(src, k * N);
    if (skip) {  // only the restore takes effect; the buffer keeps its bits
      if (src != param) store_pack<T, N>(param, k * N, wr);
      continue;
    }
    const Pack<T, N> gp = load_pack<T, N>(g, k * N);
    Pack<T, N> bp;
    if (has_momentum) bp = load_pack<T, N>(buf, k * N);
    Pack<T, N> out;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float w = to_f(wr.v[j]);
      const float gv = to_f(gp.v[j]) * gsign;
      float d = has_wd ? gv + weight_decay * w : gv;
      if (has_momentum) {
        const float b = first ? d : momentum * to_f(bp.v[j]) + one_minus_dampening * d;
        bp.v[j] = from_f<T>(b);
        d = nesterov ? d + momentum * b : b;
      }
      out.v[j] = from_f<T>(w - lr * d);
    }
    if (has_momentum) store_pack<T, N>(buf, k * N, bp);
    store_pack<T, N>(param, k * N, out);
  }
}

// restore + torch.optim.Adam/AdamW. decay: 0 none, 1 L2 (Adam), 2 decoupled (AdamW).
template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(const T* src, T* param, const T* __restrict__ g, T* __restrict__ m_ptr,
                T* __restrict__ v_ptr, T* __restrict__ vmax_ptr, const float* __restrict__ step_count,
                const void* status, bool status_double, int64_t n, double lr, double beta1, double beta2,
                float weight, bool small_weight, float one_minus_beta2, float eps, float weight_decay,
                float decay_factor, int decay, bool amsgrad, float gsign, bool check) {
  const bool skip = check && skipped(status, status_double);
  // bias corrections in double from the device-resident step count, as PyTorch does
  const double t = static_cast<double>(*step_count + 1.0f);
  const float step_size = static_cast<float>(lr / (1.0 - pow(beta1, t)));
  const float bc2_sqrt = static_cast<float>(sqrt(1.0 - pow(beta2, t)));
  const float beta2_f = static_cast<float>(beta2);
  const int64_t packs = n / N;
  for (int64_t k = thread_index(); k < packs; k += grid_stride()) {
    const Pack<T, N> wr = load_pack<T, N>(src, k * N);
    if (skip) {  // only the restore takes effect; the moments keep their bits
      if (src != param) store_pack<T, N>(param, k * N, wr);
      continue;
    }
    const Pack<T, N> gp = load_pack<T, N>(g, k * N);
    Pack<T, N> mp = load_pack<T, N>(m_ptr, k * N);
    Pack<T, N> vp = load_pack<T, N>(v_ptr, k * N);
    Pack<T, N> vmp;
    if (amsgrad) vmp = load_pack<T, N>(vmax_ptr, k * N);
    Pack<T, N> out;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float w = to_f(wr.v[j]);
      float gv = to_f(gp.v[j]) * gsign;
      if (decay == 2) w = w * decay_factor;
      if (decay == 1) gv = gv + weight_decay * w;
      const float m0 = to_f(mp.v[j]);
      // torch.lerp(m, g, weight), with its two branches chosen by |weight| < 0.5
      const float m = small_weight ? m0 + weight * (gv - m0) : gv - (gv - m0) * (1.0f - weight);
      const float v = beta2_f * to_f(vp.v[j]) + one_minus_beta2 * gv * gv;
      float denom;
      if (amsgrad) {
        const float vm0 = to_f(vmp.v[j]);
        const float vm = (isnan(vm0) || vm0 > v) ? vm0 : v;  // torch.maximum keeps NaN
        vmp.v[j] = from_f<T>(vm);
        denom = sqrtf(vm) / bc2_sqrt + eps;
      } else {
        denom = sqrtf(v) / bc2_sqrt + eps;
      }
      mp.v[j] = from_f<T>(m);
      vp.v[j] = from_f<T>(v);
      out.v[j] = from_f<T>(w - step_size * (m / denom));
    }
    store_pack<T, N>(m_ptr, k * N, mp);
    store_pack<T, N>(v_ptr, k * N, vp);
    if (amsgrad) store_pack<T, N>(vmax_ptr, k * N, vmp);
    store_pack<T, N>(param, k * N, out);
  }
}

// steps += mask * (not skipped); block 0 also counts a skipped step in status[kStatusSkipped].
__global__ void advance_steps_kernel(float* steps, const float* mask, void* status, bool status_double,
                                     int64_t n, bool check, bool count_skip) {
  const bool skip = check && skipped(status, status_double);
  if (check && count_skip && skip && blockIdx.x == 0 && threadIdx.x == 0) {
    if (status_double) {
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

// Calls f with the pack width: 16 bytes when n and every pointer allow it, else 1.
template <typename T, typename F>
void with_width(int64_t n, std::initializer_list<const void*> ptrs, const F& f) {
  constexpr int V = VecWidth<T>::value;
  bool ok = n % V == 0;
  for (const void* p : ptrs) ok = ok && (p == nullptr || aligned16(p));
  if (ok) {
    f(std::integral_constant<int, V>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

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

void stats(const at::Tensor& grad, const at::Tensor& param, const at::Tensor& runs_t,
           const std::optional<at::Tensor>& sumsq, const at::Tensor& bad, bool adaptive, double eta) {
  check_cuda(grad, "grad");
  const auto device = grad.device();
  const c10::cuda::CUDAGuard guard(device);
  const auto runs = read_runs(runs_t, grad.numel(), -1);
  check_flat(grad, "grad", grad.scalar_type(), grad.numel(), device);
  check_flat(param, "param", grad.scalar_type(), grad.numel(), device);
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
  auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  dispatch_dtype(grad.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    int64_t offset = 0;
    for (const auto& r : runs) {
      const int64_t n = r.stop - r.start;
      const int64_t slots = stats_slots(n, kCudaStatsChunk, kCudaMaxSlots);
      const T* g = ptr_at<T>(grad, r.start);
      const T* w = ptr_at<T>(param, r.start);
      void* s_out = want ? static_cast<char*>(sumsq->data_ptr()) + offset * out_size : nullptr;
      void* b_out = static_cast<char*>(bad.data_ptr()) + offset * out_size;
      with_width<T>(n, {g, want && adaptive ? w : nullptr}, [&](auto width) {
        constexpr int N = decltype(width)::value;
        dispatch_bool(want && adaptive, [&](auto A) {
          dispatch_bool(want, [&](auto W) {
            const unsigned grid = static_cast<unsigned>(slots);  // one block per partial
            SAM_FUSED_LAUNCH(grid, kThreads, stream, stats_kernel<T, N, decltype(A)::value, decltype(W)::value>)(
                g, w, n, static_cast<float>(eta), s_out, b_out, out_double);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
      });
      offset += slots;
    }
  });
}

void perturb(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& backup,
             const at::Tensor& status, const at::Tensor& runs_t, double rho, double eta, double norm_eps,
             bool adaptive, bool normalized, bool check) {
  check_cuda(param, "param");
  const auto device = param.device();
  const c10::cuda::CUDAGuard guard(device);
  const auto dtype = param.scalar_type();
  const auto runs = read_runs(runs_t, param.numel(), -1);
  check_flat(param, "param", dtype, param.numel(), device);
  check_flat(grad, "grad", dtype, param.numel(), device);
  check_flat(backup, "backup", dtype, param.numel(), device);
  check_status(status, device);
  const bool status_double = status.scalar_type() == at::kDouble;
  auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    for (const auto& r : runs) {
      const int64_t n = r.stop - r.start;
      T* w = ptr_at<T>(param, r.start);
      const T* g = ptr_at<T>(grad, r.start);
      T* b = ptr_at<T>(backup, r.start);
      with_width<T>(n, {w, g, b}, [&](auto width) {
        constexpr int N = decltype(width)::value;
        const unsigned blocks = elementwise_blocks(n / N, device.index());
        dispatch_bool(adaptive, [&](auto A) {
          SAM_FUSED_LAUNCH(blocks, kThreads, stream, perturb_kernel<T, N, decltype(A)::value>)(
              w, g, b, status.data_ptr(), status_double, n, static_cast<float>(rho), static_cast<float>(eta),
              static_cast<float>(norm_eps), normalized, check);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    }
  });
}

void restore(const at::Tensor& param, const at::Tensor& backup, const at::Tensor& runs_t) {
  check_cuda(param, "param");
  const auto device = param.device();
  const c10::cuda::CUDAGuard guard(device);
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


void sgd(const at::Tensor& src, const at::Tensor& param, const at::Tensor& grad,
         const std::optional<at::Tensor>& buf, const at::Tensor& steps, const at::Tensor& status,
         const at::Tensor& runs_t, double lr, double momentum, double one_minus_dampening,
         double weight_decay, bool nesterov, bool maximize, bool check) {
  check_cuda(param, "param");
  const auto device = param.device();
  const c10::cuda::CUDAGuard guard(device);
  const auto dtype = param.scalar_type();
  const bool has_momentum = buf.has_value();
  const auto runs = check_update_args(src, param, grad, steps, status, runs_t,
                                      {{"momentum_buffer", has_momentum ? &*buf : nullptr}});
  const bool status_double = status.scalar_type() == at::kDouble;
  auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    for (const auto& r : runs) {
      const int64_t n = r.stop - r.start;
      const T* s = ptr_at<T>(src, r.start);
      T* w = ptr_at<T>(param, r.start);
      const T* g = ptr_at<T>(grad, r.start);
      T* b = has_momentum ? ptr_at<T>(*buf, r.start) : nullptr;
      with_width<T>(n, {s, w, g, b}, [&](auto width) {
        constexpr int N = decltype(width)::value;
        SAM_FUSED_LAUNCH(elementwise_blocks(n / N, device.index()), kThreads, stream, sgd_kernel<T, N>)(
            s, w, g, b, steps.data_ptr<float>() + r.first, status.data_ptr(), status_double, n,
            static_cast<float>(lr), static_cast<float>(momentum), static_cast<float>(one_minus_dampening),
            static_cast<float>(weight_decay), weight_decay != 0, has_momentum, nesterov && has_momentum,
            maximize ? -1.0f : 1.0f, check);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  });
}

void adam(const at::Tensor& src, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
          const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq,
          const at::Tensor& steps, const at::Tensor& status, const at::Tensor& runs_t, double lr,
          double beta1, double beta2, double eps, double weight_decay, bool decoupled, bool maximize,
          bool check) {
  check_cuda(param, "param");
  const auto device = param.device();
  const c10::cuda::CUDAGuard guard(device);
  const auto dtype = param.scalar_type();
  const bool amsgrad = max_exp_avg_sq.has_value();
  const auto runs = check_update_args(
      src, param, grad, steps, status, runs_t,
      {{"exp_avg", &exp_avg}, {"exp_avg_sq", &exp_avg_sq}, {"max_exp_avg_sq", amsgrad ? &*max_exp_avg_sq : nullptr}});
  const bool status_double = status.scalar_type() == at::kDouble;
  const float weight = static_cast<float>(1.0 - beta1);
  const int decay = weight_decay == 0 ? 0 : (decoupled ? 2 : 1);
  auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    for (const auto& r : runs) {
      const int64_t n = r.stop - r.start;
      const T* s = ptr_at<T>(src, r.start);
      T* w = ptr_at<T>(param, r.start);
      const T* g = ptr_at<T>(grad, r.start);
      T* m = ptr_at<T>(exp_avg, r.start);
      T* v = ptr_at<T>(exp_avg_sq, r.start);
      T* vmax = amsgrad ? ptr_at<T>(*max_exp_avg_sq, r.start) : nullptr;
      with_width<T>(n, {s, w, g, m, v, vmax}, [&](auto width) {
        constexpr int N = decltype(width)::value;
        SAM_FUSED_LAUNCH(elementwise_blocks(n / N, device.index()), kThreads, stream, adam_kernel<T, N>)(
            s, w, g, m, v, vmax, steps.data_ptr<float>() + r.first, status.data_ptr(), status_double, n, lr,
            beta1, beta2, weight, std::fabs(weight) < 0.5f, static_cast<float>(1.0 - beta2),
            static_cast<float>(eps), static_cast<float>(weight_decay),
            static_cast<float>(1.0 - lr * weight_decay), decay, amsgrad, maximize ? -1.0f : 1.0f, check);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
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
      steps.data_ptr<float>(), mask.data_ptr<float>(), status.data_ptr(), status.scalar_type() == at::kDouble, n,
      check, count_skip);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// [ABI version, elements per stats slot, most slots per run]
std::vector<int64_t> constants() { return {kAbiVersion, kCudaStatsChunk, kCudaMaxSlots}; }

}  // namespace
}  // namespace sam_fused

SAM_FUSED_REGISTER_OPS(SAM_FUSED_CUDA_OPS)
SAM_FUSED_PYTHON_MODULE("sam_fused CUDA backend (operations in torch.ops.sam_fused_cuda)")
