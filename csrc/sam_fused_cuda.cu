// The CUDA C++ backend of sam_fused: the fused SAM operations as hand-written kernels.
//
// The same operations and float math as the CPU extension (sam_fused_cpu.cpp) and the
// Triton kernels (sam_fused/kernels/*.py), over either layout of a bucket ("layouts" below):
//
// * flat buckets: one launch per run (a contiguous span of the flat buffers; usually one
//   per bucket), grid-stride loops over 16-byte packs (4 float32 or 8 bfloat16/float16
//   elements) when every pointer of the run is 16-byte aligned, which the flat layout
//   guarantees; scalar loads otherwise;
// * table buckets (tensors left where they are, sam_fused/tables.py): one launch per
//   operation, whatever the number of tensors; block b works on row b of the chunk table,
//   in 16-byte packs when the addresses it reads are aligned;
// * float32 math over the storage dtype, Adam's bias corrections in double; the element
//   math is sam_fused_math.h's, the same functions the CPU extension runs;
// * no host synchronisation: the skip decision, the global norm, GradScaler's 1 / scale
//   and the clipping coefficient are read by the kernels from the device-resident status
//   vector, step counts from the steps vector, a table launch's tables from the device;
// * a deterministic norm: stats_kernel runs a grid that depends only on the run length
//   (flat) or on the tensors' lengths (one block per chunk row), each block reduces in a
//   fixed order (warp shuffles, then warps in index order) and writes one partial; the
//   caller sums the partials with one torch.sum.

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
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

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

template <int N>
using Width = std::integral_constant<int, N>;

// The emulation's accesses check the alignment the device requires (a misaligned vector
// access faults there, and is reported as an error here).
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p, int64_t i) {
#ifdef SAM_FUSED_CUDA_EMULATION
  return ::sam_fused_emulation::vector_load<Pack<T, N>>(p + i);
#else
  return *reinterpret_cast<const Pack<T, N>*>(p + i);
#endif
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, int64_t i, const Pack<T, N>& x) {
#ifdef SAM_FUSED_CUDA_EMULATION
  ::sam_fused_emulation::vector_store(p + i, x);
#else
  *reinterpret_cast<Pack<T, N>*>(p + i) = x;
#endif
}

template <typename T>
__device__ __forceinline__ float to_f(T x) {
  return static_cast<float>(x);
}

template <typename T>
__device__ __forceinline__ T from_f(float x) {
  return static_cast<T>(x);  // round to nearest even, as torch's .to()
}

// Whether every pointer given can be read in 16-byte packs (nullptr, an absent role, can).
template <typename... P>
__host__ __device__ __forceinline__ bool aligned16(const P*... p) {
  return ((reinterpret_cast<uintptr_t>(p) % 16 == 0) && ...);
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
    for (unsigned w = 0; w < blockDim.x / 32; ++w) total += warp_sums[w];
  }
  return total;
}

// ------------------------------------------------------------------ layouts
// Every kernel runs either layout, chosen by its TABLE template argument:
//
// * flat (TABLE false): each role argument (param, grad, backup, a state buffer) points at
//   a run's first element in the bucket's flat buffer; the whole grid strides over the run's
//   n elements in packs of N, the width the host chose for the run (16 bytes when every
//   pointer is aligned and n a multiple of the pack, else 1). One launch per run.
// * table (TABLE true): each role argument is that role's device table of tensor addresses
//   (one int64 per tensor), and block b reads row b of the chunk table (sam_fused/tables.py),
//   (slot, start, numel, count index): its tensor is entry `slot` of every role table, its
//   elements [start, min(start + kCudaTableChunk, numel)), its update count steps[count
//   index]. The block's threads stride over the chunk in 16-byte packs when every address
//   it resolved is 16-byte aligned (the caching allocator's usual case, checked per block on
//   the addresses it reads anyway; chunks start at multiples of kCudaTableChunk, so a
//   tensor's alignment is its chunks'), then take the last numel % N elements one by one.
//   One launch per operation, whatever the number of tensors.
//
// So the element loops, the skip logic, the status reads and the element math are the same
// code for both; only where a block finds its elements differs.
template <typename T, bool TABLE>
using RoleArg = std::conditional_t<TABLE, const int64_t*, T*>;

// The extent of a launch: a flat run's length, or a table launch's chunk table.
struct Extent {
  int64_t n;              // flat: the run's elements
  const int64_t* chunks;  // table: the (C, 4) chunk table, row b for block b
};

// The elements a block works on and how its threads share them.
struct Span {
  int64_t begin, end;  // elements [begin, end) of the run (flat) or of the block's tensor (table)
  int64_t first;       // this thread's first pack (or element) after begin
  int64_t stride;      // and the distance to its next: the grid's threads (flat) or the block's
  int64_t slot;        // table: the tensor's entry in every role table
  int64_t count;       // table: the tensor's entry in steps; flat: 0 (the host offsets steps)
};

template <bool TABLE>
__device__ __forceinline__ Span span_of(const Extent& extent) {
  if constexpr (TABLE) {
    const int64_t* row = extent.chunks + 4 * static_cast<int64_t>(blockIdx.x);
    const int64_t start = row[1];
    const int64_t stop = start + kCudaTableChunk < row[2] ? start + kCudaTableChunk : row[2];
    return {start, stop, threadIdx.x, blockDim.x, row[0], row[3]};
  } else {
    return {0, extent.n, thread_index(), grid_stride(), 0, 0};
  }
}

// A role's elements for this block: the flat argument itself (nullptr for a role the
// operation does not use), or the address in the role's table (the host gives an unused
// role another role's table, so that there is always one to read).
template <typename T, bool TABLE>
__device__ __forceinline__ T* resolve(RoleArg<T, TABLE> arg, const Span& span) {
  if constexpr (TABLE) {
    T* p = reinterpret_cast<T*>(static_cast<uintptr_t>(arg[span.slot]));
#ifdef __CUDA_ARCH__
    // an address read from memory could be in any state space, and generic loads and stores
    // (LD/ST) it would get; it is global memory, which lets the compiler use LDG/STG as for a
    // kernel's pointer arguments. (Merged with a null pointer, the fact is lost: hence no
    // `role ? resolve(...) : nullptr` in the kernels.)
    __builtin_assume(__isGlobal(p));
#endif
    return p;
  } else {
    return arg;
  }
}

// Calls f(Width<M>{}, i) for each pack of M elements at i that this thread covers. A flat
// run is packs of N alone (the host packs a run only when n is a multiple of N), its loop
// unrolled UNROLL times. A table chunk is packs of N when `packed`, then the elements left
// over one by one (M = 1); all of it one by one when not `packed`.
template <int N, bool TABLE, int UNROLL = 1, typename F>
__device__ __forceinline__ void for_each_pack(const Span& s, bool packed, const F& f) {
  if constexpr (!TABLE) {
    const int64_t packs = s.end / N;  // a flat span begins at 0
#pragma unroll UNROLL
    for (int64_t k = s.first; k < packs; k += s.stride) f(Width<N>{}, k * N);
  } else {
    int64_t tail = s.begin;
    if (packed) {
      const int64_t packs = (s.end - s.begin) / N;
      for (int64_t k = s.first; k < packs; k += s.stride) f(Width<N>{}, s.begin + k * N);
      tail = s.begin + packs * N;
    }
    for (int64_t i = tail + s.first; i < s.end; i += s.stride) f(Width<1>{}, i);
  }
}

// ------------------------------------------------------------------ kernels
// One partial per block: the non-finite count of the raw gradients, and the sum of u^2 of
// the unscaled ones.
template <typename T, int N, bool TABLE, bool ADAPTIVE, bool WANT_SUMSQ>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(RoleArg<const T, TABLE> __restrict__ g_arg, RoleArg<const T, TABLE> __restrict__ w_arg,
                 Extent extent, float eta, StatusRead read, void* sumsq, void* bad, bool out_double) {
  const Span span = span_of<TABLE>(extent);
  const T* g = resolve<const T, TABLE>(g_arg, span);
  const T* w = nullptr;  // the weights are read for the adaptive norm only
  if constexpr (ADAPTIVE) w = resolve<const T, TABLE>(w_arg, span);
  const float inv_scale = WANT_SUMSQ ? read.inv_scale() : 1.0f;
  float acc = 0.0f;
  int cnt = 0;
  // unrolled 4 times over a flat run: its grid is at most kCudaMaxSlots blocks, so a thread
  // covers many packs, and four independent loads in flight keep the memory system busy
  for_each_pack<N, TABLE, 4>(span, aligned16(g, w), [&](auto width, int64_t i) {
    constexpr int M = decltype(width)::value;
    const Pack<T, M> gp = load_pack<T, M>(g, i);
    Pack<T, M> wp;
    if constexpr (ADAPTIVE) wp = load_pack<T, M>(w, i);
#pragma unroll
    for (int j = 0; j < M; ++j) {
      const float gv = to_f(gp.v[j]);
      cnt += math::nonfinite(gv);
      if constexpr (WANT_SUMSQ) {
        // the variant's direction: the gradient (kernel_id 0)
        const float u = math::ascent_u(math::unscaled(gv, inv_scale), ADAPTIVE ? to_f(wp.v[j]) : 0.0f, eta, ADAPTIVE);
        acc += u * u;
      }
    }
  });
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

template <typename T, int N, bool TABLE, bool ADAPTIVE>
__global__ void __launch_bounds__(kThreads)
    perturb_kernel(RoleArg<T, TABLE> __restrict__ w_arg, RoleArg<const T, TABLE> __restrict__ g_arg,
                   RoleArg<T, TABLE> __restrict__ backup_arg, Extent extent, StatusRead read, float rho, float eta,
                   float norm_eps, bool normalized) {
  const Span span = span_of<TABLE>(extent);
  T* w = resolve<T, TABLE>(w_arg, span);
  const T* g = resolve<const T, TABLE>(g_arg, span);
  T* backup = resolve<T, TABLE>(backup_arg, span);
  const float scale = math::perturb_scale(rho, normalized ? static_cast<float>(read.at(kStatusSumsq)) : 0.0f,
                                          norm_eps, normalized);
  const float inv_scale = read.inv_scale();
  const bool skip = read.check && read.at(kStatusBad1) > 0;
  for_each_pack<N, TABLE>(span, aligned16(w, g, backup), [&](auto width, int64_t i) {
    constexpr int M = decltype(width)::value;
    const Pack<T, M> wr = load_pack<T, M>(w, i);
    store_pack<T, M>(backup, i, wr);
    if (skip) return;  // the backup is written; the weights keep their bits
    const Pack<T, M> gp = load_pack<T, M>(g, i);
    Pack<T, M> out;
#pragma unroll
    for (int j = 0; j < M; ++j) {
      // the variant's direction: the gradient (kernel_id 0)
      out.v[j] = from_f<T>(math::perturb(to_f(wr.v[j]), math::unscaled(to_f(gp.v[j]), inv_scale), scale, eta, ADAPTIVE));
    }
    store_pack<T, M>(w, i, out);
  });
}

// dst <- src: a table launch's restore (a flat run's is one cudaMemcpyAsync).
template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    copy_kernel(RoleArg<T, true> __restrict__ dst_arg, RoleArg<const T, true> __restrict__ src_arg, Extent extent) {
  const Span span = span_of<true>(extent);
  T* dst = resolve<T, true>(dst_arg, span);
  const T* src = resolve<const T, true>(src_arg, span);
  for_each_pack<N, true>(span, aligned16(dst, src), [&](auto width, int64_t i) {
    constexpr int M = decltype(width)::value;
    store_pack<T, M>(dst, i, load_pack<T, M>(src, i));
  });
}

// The loop both fused updates run, with the restore fused in (src is the backup, or the
// parameters when they were restored separately): when the step is skipped only the restore
// takes effect (the state keeps its bits), else update(width, offset, weights, gradients)
// computes and stores the pack.
template <typename T, int N, bool TABLE, typename Update>
__device__ __forceinline__ void update_loop(const Span& span, bool packed, const T* src, T* param, const T* g,
                                            bool skip, const Update& update) {
  for_each_pack<N, TABLE>(span, packed, [&](auto width, int64_t i) {
    constexpr int M = decltype(width)::value;
    const Pack<T, M> wr = load_pack<T, M>(src, i);
    if (skip) {
      if (src != param) store_pack<T, M>(param, i, wr);
      return;
    }
    update(width, i, wr, load_pack<T, M>(g, i));
  });
}

// restore + torch.optim.SGD
template <typename T, int N, bool TABLE>
__global__ void __launch_bounds__(kThreads)
    sgd_kernel(RoleArg<const T, TABLE> src_arg, RoleArg<T, TABLE> param_arg, RoleArg<const T, TABLE> __restrict__ g_arg,
               RoleArg<T, TABLE> __restrict__ buf_arg, const float* __restrict__ step_counts, Extent extent,
               StatusRead read, math::SgdScalars s, bool has_wd, bool has_momentum, bool nesterov, bool maximize) {
  const Span span = span_of<TABLE>(extent);
  const T* src = resolve<const T, TABLE>(src_arg, span);
  T* param = resolve<T, TABLE>(param_arg, span);
  const T* g = resolve<const T, TABLE>(g_arg, span);
  T* buf = resolve<T, TABLE>(buf_arg, span);  // read and written only with momentum
  const float inv_scale = read.inv_scale();
  const float clip = read.clip_coef();
  const bool first = has_momentum && step_counts[span.count] == 0.0f;
  update_loop<T, N, TABLE>(span, aligned16(src, param, g, buf), src, param, g, read.skip(),
                    [&](auto width, int64_t i, const auto& wr, const auto& gp) {
                      constexpr int M = decltype(width)::value;
                      Pack<T, M> bp{};
                      if (has_momentum) bp = load_pack<T, M>(buf, i);
                      Pack<T, M> out;
#pragma unroll
                      for (int j = 0; j < M; ++j) {
                        float b = has_momentum ? to_f(bp.v[j]) : 0.0f;
                        const float d = math::descent_grad(to_f(gp.v[j]), inv_scale, clip);
                        out.v[j] = from_f<T>(
                            math::sgd(to_f(wr.v[j]), d, b, first, s, has_wd, has_momentum, nesterov, maximize));
                        if (has_momentum) bp.v[j] = from_f<T>(b);
                      }
                      if (has_momentum) store_pack<T, M>(buf, i, bp);
                      store_pack<T, M>(param, i, out);
                    });
}

// Adam's step_size and bc2_sqrt for update count `*count` + 1, in double as PyTorch computes
// them on the host. A flat run's threads each compute them: a few thousand threads, each
// over many packs. A table block's threads cover one pack each, and two double pows per
// pack would cost a table launch a large share of its time next to its memory traffic, so
// thread 0 computes them once per block (one tensor, one count) and hands them over
// through shared memory.
template <bool TABLE>
__device__ __forceinline__ void bias_corrections(const float* count, double lr, double beta1, double beta2,
                                                 math::AdamScalars& s) {
  if constexpr (TABLE) {
    __shared__ float corrections[2];
    if (threadIdx.x == 0) math::adam_bias_corrections(*count, lr, beta1, beta2, corrections[0], corrections[1]);
    __syncthreads();
    s.step_size = corrections[0];
    s.bc2_sqrt = corrections[1];
  } else {
    math::adam_bias_corrections(*count, lr, beta1, beta2, s.step_size, s.bc2_sqrt);
  }
}

// restore + torch.optim.Adam/AdamW; s.step_size and s.bc2_sqrt are filled in here, from the
// device-resident step count of the run (flat) or of the block's tensor (table).
template <typename T, int N, bool TABLE>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(RoleArg<const T, TABLE> src_arg, RoleArg<T, TABLE> param_arg, RoleArg<const T, TABLE> __restrict__ g_arg,
                RoleArg<T, TABLE> __restrict__ m_arg, RoleArg<T, TABLE> __restrict__ v_arg,
                RoleArg<T, TABLE> __restrict__ vmax_arg, const float* __restrict__ step_counts, Extent extent,
                StatusRead read, math::AdamScalars s, double lr, double beta1, double beta2, int decay, bool amsgrad,
                bool small_weight, bool maximize) {
  const Span span = span_of<TABLE>(extent);
  const T* src = resolve<const T, TABLE>(src_arg, span);
  T* param = resolve<T, TABLE>(param_arg, span);
  const T* g = resolve<const T, TABLE>(g_arg, span);
  T* m_ptr = resolve<T, TABLE>(m_arg, span);
  T* v_ptr = resolve<T, TABLE>(v_arg, span);
  T* vmax_ptr = resolve<T, TABLE>(vmax_arg, span);  // read and written only with amsgrad
  const float inv_scale = read.inv_scale();
  const float clip = read.clip_coef();
  bias_corrections<TABLE>(step_counts + span.count, lr, beta1, beta2, s);
  update_loop<T, N, TABLE>(
      span, aligned16(src, param, g, m_ptr, v_ptr, vmax_ptr), src, param, g, read.skip(),
      [&](auto width, int64_t i, const auto& wr, const auto& gp) {
        constexpr int M = decltype(width)::value;
        Pack<T, M> mp = load_pack<T, M>(m_ptr, i);
        Pack<T, M> vp = load_pack<T, M>(v_ptr, i);
        Pack<T, M> vmp;
        if (amsgrad) vmp = load_pack<T, M>(vmax_ptr, i);
        Pack<T, M> out;
#pragma unroll
        for (int j = 0; j < M; ++j) {
          float m = to_f(mp.v[j]);
          float v = to_f(vp.v[j]);
          float vmax = amsgrad ? to_f(vmp.v[j]) : 0.0f;
          const float d = math::descent_grad(to_f(gp.v[j]), inv_scale, clip);
          out.v[j] = from_f<T>(math::adam(to_f(wr.v[j]), d, m, v, vmax, s, decay, amsgrad, small_weight, maximize));
          mp.v[j] = from_f<T>(m);
          vp.v[j] = from_f<T>(v);
          if (amsgrad) vmp.v[j] = from_f<T>(vmax);
        }
        store_pack<T, M>(m_ptr, i, mp);
        store_pack<T, M>(v_ptr, i, vp);
        if (amsgrad) store_pack<T, M>(vmax_ptr, i, vmp);
        store_pack<T, M>(param, i, out);
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

void check_cuda(const at::Tensor& t, const char* name) {
#ifdef SAM_FUSED_CUDA_EMULATION
  const bool on_device = t.is_cpu();  // the emulated kernels read host memory
#else
  const bool on_device = t.is_cuda();
#endif
  TORCH_CHECK(on_device, "sam_fused cuda backend: ", name, " must be a CUDA tensor, got ", t.device());
}

// A launch as the host sees it. An int64 role argument makes it a table launch: the element
// types these kernels take are floating point, so a role of int64 can only be an address table.
struct Layout {
  bool table;
  at::ScalarType dtype;  // the elements' type: an address table cannot say it, so `like` does
  at::Device device;
  std::vector<RunSpan> runs;  // flat: the runs, one launch each
  int64_t numel = 0;          // flat: the elements every buffer must hold
  const int64_t* chunks = nullptr;  // table: the chunk table on the device, one block per row
  int64_t rows = 0;
  int64_t tensors = 0;  // table: the entries of every role table
};

// Reads and checks the launch: `first_role` is any role argument, `runs_t` the flat run table
// (R, 3) on the host, or a table launch's chunk table (C, 4) on the device; `num_params`
// bounds a flat run's count index (negative: not checked). A table launch's rows and
// addresses stay on the device, where the host cannot read them without a synchronisation:
// they are sam_fused/tables.py's, which builds them from the tensors it keeps alive.
Layout read_layout(const at::Tensor& first_role, const at::Tensor& like, const at::Tensor& runs_t,
                   const char* name, int64_t num_params) {
  check_cuda(first_role, name);
  const auto device = first_role.device();
  if (first_role.scalar_type() != at::kLong) {
    TORCH_CHECK(like.scalar_type() == first_role.scalar_type(), "sam_fused: `like` is ", like.scalar_type(),
                " but the flat buffers are ", first_role.scalar_type(), "; it names the element type");
    Layout layout{false, first_role.scalar_type(), device};
    layout.numel = first_role.numel();
    layout.runs = read_runs(runs_t, layout.numel, num_params);
    return layout;
  }
  TORCH_CHECK(runs_t.device() == device && runs_t.scalar_type() == at::kLong && runs_t.dim() == 2 &&
                  runs_t.size(1) == 4 && runs_t.is_contiguous(),
              "sam_fused: a table launch's runs must be its chunk table (sam_fused/tables.py): a contiguous int64 "
              "tensor of shape (C, 4) on ", device, ", got ", runs_t.scalar_type(), " ", runs_t.sizes(), " on ",
              runs_t.device());
  TORCH_CHECK(runs_t.size(0) <= INT_MAX, "sam_fused: ", runs_t.size(0), " chunks exceed one launch's grid");
  Layout layout{true, like.scalar_type(), device};
  layout.chunks = runs_t.data_ptr<int64_t>();
  layout.rows = runs_t.size(0);
  layout.tensors = first_role.numel();
  return layout;
}

// Checks one role argument against the launch: a flat buffer of the element type holding
// every run, or an address table with one entry per tensor.
void check_role(const Layout& layout, const at::Tensor& t, const char* name) {
  if (!layout.table) {
    check_flat(t, name, layout.dtype, layout.numel, layout.device);
    return;
  }
  TORCH_CHECK(t.device() == layout.device && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous() &&
                  t.numel() == layout.tensors,
              "sam_fused: in a table launch, ", name, " must be a contiguous int64 table of ", layout.tensors,
              " addresses (one per tensor) on ", layout.device, ", got ", t.scalar_type(), " ", t.sizes(), " on ",
              t.device());
}

// The most role arguments one kernel takes: Adam's src, param, grad and three moments.
constexpr size_t kMaxRoles = 6;

// What one kernel launch is given besides the operation's own arguments.
struct LaunchArgs {
  std::array<void*, kMaxRoles> roles;  // flat: the run's first element of each buffer; table: each
                                       // role's address table; nullptr: a role not used
  Extent extent;
  int64_t first;  // flat: the run's index into steps; table: 0 (each row names its own)
  unsigned blocks;
  unsigned threads;
};

// A role's kernel argument from its host pointer: T* (flat) or the int64 table (table).
template <typename T, bool TABLE>
RoleArg<T, TABLE> role_arg(void* p) {
  if constexpr (TABLE) {
    return static_cast<const int64_t*>(p);
  } else {
    return static_cast<T*>(p);
  }
}

// Calls f(TABLE, N, LaunchArgs) for each launch the operation takes: one per flat run, with
// flat_blocks(n, N) blocks of kThreads and the widest pack the run's pointers and length
// allow; or one table launch with a block per chunk row, kCudaTableChunk / N threads (a pack
// each) and N the 16-byte pack (each block falls back to single elements on its own when an
// address it reads is not aligned). `roles` are checked here; nullptr: a role not used (roles[0]
// is always used).
template <typename T, typename Blocks, typename F>
void for_each_launch(const Layout& layout, const std::array<const at::Tensor*, kMaxRoles>& roles,
                     const std::array<const char*, kMaxRoles>& names, const Blocks& flat_blocks, const F& f) {
  constexpr int V = VecWidth<T>::value;
  for (size_t k = 0; k < kMaxRoles; ++k) {
    if (roles[k] != nullptr) check_role(layout, *roles[k], names[k]);
  }
  if (layout.table) {
    if (layout.rows == 0) return;  // no elements (empty tensors, or none at all)
    LaunchArgs a{{}, {0, layout.chunks}, 0, static_cast<unsigned>(layout.rows),
                 static_cast<unsigned>(kCudaTableChunk / V)};
    // a role the operation does not use gets the first role's table: the kernels then resolve
    // every role without a branch (an address that may be null is one the compiler cannot
    // keep in global memory's state space, see resolve), and never touch its elements
    for (size_t k = 0; k < kMaxRoles; ++k) a.roles[k] = (roles[k] != nullptr ? roles[k] : roles[0])->data_ptr();
    f(std::true_type{}, Width<V>{}, a);
    return;
  }
  for (const auto& r : layout.runs) {
    const int64_t n = r.stop - r.start;
    LaunchArgs a{{}, {n, nullptr}, r.first, 0, kThreads};
    bool packed = n % V == 0;
    for (size_t k = 0; k < kMaxRoles; ++k) {
      if (roles[k] == nullptr) continue;
      a.roles[k] = static_cast<char*>(roles[k]->data_ptr()) + r.start * static_cast<int64_t>(sizeof(T));
      packed = packed && aligned16(a.roles[k]);
    }
    if (packed) {
      a.blocks = flat_blocks(n, V);
      f(std::false_type{}, Width<V>{}, a);
    } else {
      a.blocks = flat_blocks(n, 1);
      f(std::false_type{}, Width<1>{}, a);
    }
  }
}

// The elementwise grid of a flat run: enough blocks for every SM, or for every pack.
auto elementwise_grid(const at::Device& device) {
  return [index = device.index()](int64_t n, int width) { return elementwise_blocks(n / width, index); };
}

void stats(const at::Tensor& grad, const at::Tensor& param, const at::Tensor& runs_t, const at::Tensor& like,
           const std::optional<at::Tensor>& sumsq, const at::Tensor& bad, const at::Tensor& status, int64_t unscale,
           bool adaptive, double eta) {
  const Layout layout = read_layout(grad, like, runs_t, "grad", -1);
  const auto device = layout.device;
  const c10::cuda::CUDAGuard guard(device);
  check_status(status, device);
  check_unscale(unscale);
  // one partial per block: a flat run's slots (a function of its length), a table's chunks
  int64_t total = layout.rows;
  if (!layout.table) {
    total = 0;
    for (const auto& r : layout.runs) total += stats_slots(r.stop - r.start, kCudaStatsChunk, kCudaMaxSlots);
  }
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
  const auto slots = [](int64_t n, int) { return static_cast<unsigned>(stats_slots(n, kCudaStatsChunk, kCudaMaxSlots)); };
  check_role(layout, param, "param");  // read only for the adaptive norm, but checked always
  dispatch_dtype(layout.dtype, [&](auto tag) {
    using T = decltype(tag);
    int64_t offset = 0;
    // the weights are read (and their alignment matters) only for the adaptive norm
    for_each_launch<T>(layout, {&grad, want && adaptive ? &param : nullptr}, {"grad", "param"}, slots,
                       [&](auto table, auto width, const LaunchArgs& a) {
                         constexpr bool TABLE = decltype(table)::value;
                         constexpr int N = decltype(width)::value;
                         void* s_out = want ? static_cast<char*>(sumsq->data_ptr()) + offset * out_size : nullptr;
                         void* b_out = static_cast<char*>(bad.data_ptr()) + offset * out_size;
                         dispatch_bool(want && adaptive, [&](auto A) {
                           dispatch_bool(want, [&](auto W) {
                             SAM_FUSED_LAUNCH(a.blocks, a.threads, stream,
                                              stats_kernel<T, N, TABLE, decltype(A)::value, decltype(W)::value>)(
                                 role_arg<const T, TABLE>(a.roles[0]), role_arg<const T, TABLE>(a.roles[1]), a.extent,
                                 static_cast<float>(eta), read, s_out, b_out, out_double);
                             C10_CUDA_KERNEL_LAUNCH_CHECK();
                           });
                         });
                         offset += a.blocks;  // one partial per block
                       });
  });
}

void perturb(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& backup,
             const at::Tensor& status, const at::Tensor& runs_t, const at::Tensor& like, double rho, double eta,
             double norm_eps, int64_t unscale, bool adaptive, bool normalized, bool check) {
  const Layout layout = read_layout(param, like, runs_t, "param", -1);
  const auto device = layout.device;
  const c10::cuda::CUDAGuard guard(device);
  check_status(status, device);
  check_unscale(unscale);
  const StatusRead read = status_read(status, unscale, false, check);
  auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  dispatch_dtype(layout.dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_launch<T>(layout, {&param, &grad, &backup}, {"param", "grad", "backup"}, elementwise_grid(device),
                       [&](auto table, auto width, const LaunchArgs& a) {
                         constexpr bool TABLE = decltype(table)::value;
                         constexpr int N = decltype(width)::value;
                         dispatch_bool(adaptive, [&](auto A) {
                           SAM_FUSED_LAUNCH(a.blocks, a.threads, stream, perturb_kernel<T, N, TABLE, decltype(A)::value>)(
                               role_arg<T, TABLE>(a.roles[0]), role_arg<const T, TABLE>(a.roles[1]),
                               role_arg<T, TABLE>(a.roles[2]), a.extent, read, static_cast<float>(rho),
                               static_cast<float>(eta), static_cast<float>(norm_eps), normalized);
                           C10_CUDA_KERNEL_LAUNCH_CHECK();
                         });
                       });
  });
}

void restore(const at::Tensor& param, const at::Tensor& backup, const at::Tensor& runs_t, const at::Tensor& like) {
  const Layout layout = read_layout(param, like, runs_t, "param", -1);
  const auto device = layout.device;
  const c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  dispatch_dtype(layout.dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_launch<T>(layout, {&param, &backup}, {"param", "backup"}, elementwise_grid(device),
                       [&](auto table, auto width, const LaunchArgs& a) {
                         constexpr int N = decltype(width)::value;
                         if constexpr (decltype(table)::value) {
                           SAM_FUSED_LAUNCH(a.blocks, a.threads, stream, copy_kernel<T, N>)(
                               role_arg<T, true>(a.roles[0]), role_arg<const T, true>(a.roles[1]), a.extent);
                           C10_CUDA_KERNEL_LAUNCH_CHECK();
                         } else {  // a flat run: one copy of its bytes
                           C10_CUDA_CHECK(cudaMemcpyAsync(a.roles[0], a.roles[1], a.extent.n * sizeof(T),
                                                          cudaMemcpyDeviceToDevice, stream));
                         }
                       });
  });
}

// What the SGD and Adam launchers share: the checks, the device guard, the status reads and
// launch(T tag, TABLE, N, LaunchArgs, step counts, stream) per launch. The roles are src,
// param, grad, then the state buffers (nullptr: absent).
template <typename Launch>
void launch_update(const at::Tensor& src, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& steps,
                   const at::Tensor& status, const at::Tensor& runs_t, const at::Tensor& like,
                   std::initializer_list<std::pair<const char*, const at::Tensor*>> state, int64_t unscale, bool clip,
                   bool check, const Launch& launch) {
  check_cuda(param, "param");
  check_steps(steps, param.device());
  const Layout layout = read_layout(param, like, runs_t, "param", steps.numel());
  const auto device = layout.device;
  const c10::cuda::CUDAGuard guard(device);
  check_status(status, device);
  check_unscale(unscale);
  TORCH_INTERNAL_ASSERT(state.size() <= kMaxRoles - 3);
  std::array<const at::Tensor*, kMaxRoles> roles{&src, &param, &grad};
  std::array<const char*, kMaxRoles> names{"src", "param", "grad"};
  size_t k = 3;
  for (const auto& [name, tensor] : state) {
    names[k] = name;
    roles[k++] = tensor;
  }
  const StatusRead read = status_read(status, unscale, clip, check);
  auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  dispatch_dtype(layout.dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_launch<T>(layout, roles, names, elementwise_grid(device), [&](auto table, auto width, const LaunchArgs& a) {
      launch(tag, table, width, a, steps.data_ptr<float>() + a.first, read, stream);
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
  launch_update(src, param, grad, steps, status, runs_t, like, {{"momentum_buffer", has_momentum ? &*buf : nullptr}},
                unscale, clip, check,
                [&](auto tag, auto table, auto width, const LaunchArgs& a, const float* counts, StatusRead read,
                    const auto& stream) {
                  using T = decltype(tag);
                  constexpr bool TABLE = decltype(table)::value;
                  constexpr int N = decltype(width)::value;
                  SAM_FUSED_LAUNCH(a.blocks, a.threads, stream, sgd_kernel<T, N, TABLE>)(
                      role_arg<const T, TABLE>(a.roles[0]), role_arg<T, TABLE>(a.roles[1]),
                      role_arg<const T, TABLE>(a.roles[2]), role_arg<T, TABLE>(a.roles[3]), counts, a.extent, read, s,
                      weight_decay != 0, has_momentum, nesterov && has_momentum, maximize);
                });
}

void adam(const at::Tensor& src, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
          const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq,
          const at::Tensor& steps, const at::Tensor& status, const at::Tensor& runs_t, const at::Tensor& like,
          double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled, bool maximize,
          int64_t unscale, bool clip, bool check) {
  const bool amsgrad = max_exp_avg_sq.has_value();
  // step_size and bc2_sqrt are filled in by the kernels, from the step counts
  const math::AdamScalars s = math::adam_scalars(lr, beta1, beta2, eps, weight_decay);
  const int decay = math::adam_decay(weight_decay, decoupled);
  launch_update(
      src, param, grad, steps, status, runs_t, like,
      {{"exp_avg", &exp_avg}, {"exp_avg_sq", &exp_avg_sq}, {"max_exp_avg_sq", amsgrad ? &*max_exp_avg_sq : nullptr}},
      unscale, clip, check,
      [&](auto tag, auto table, auto width, const LaunchArgs& a, const float* counts, StatusRead read,
          const auto& stream) {
        using T = decltype(tag);
        constexpr bool TABLE = decltype(table)::value;
        constexpr int N = decltype(width)::value;
        SAM_FUSED_LAUNCH(a.blocks, a.threads, stream, adam_kernel<T, N, TABLE>)(
            role_arg<const T, TABLE>(a.roles[0]), role_arg<T, TABLE>(a.roles[1]), role_arg<const T, TABLE>(a.roles[2]),
            role_arg<T, TABLE>(a.roles[3]), role_arg<T, TABLE>(a.roles[4]), role_arg<T, TABLE>(a.roles[5]), counts,
            a.extent, read, s, lr, beta1, beta2, decay, amsgrad, math::lerp_weight_is_small(s.weight), maximize);
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
