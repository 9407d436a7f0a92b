// What the CUDA library's kernels (sam_fused_cuda_kernels.cuh) share: storage packs, the
// device status vector, where a block finds its chunk, and the block reductions.
//
// Every kernel is a table launch: block b works on row b of the chunk table
// (sam_fused/tables.py), (slot, start, numel, count index): its tensor is entry `slot` of every
// role's address table, its elements [start, min(start + kCudaTableChunk, numel)), its update
// counts steps / vsteps[count index]. A block's threads stride over its chunk in 16-byte packs
// when every address it resolved is 16-byte aligned (the caching allocator's usual case;
// chunks start at multiples of kCudaTableChunk, so a tensor's alignment is its chunks'), then
// take the last elements one by one.
#pragma once

#include <cstdint>
#include <type_traits>

#include "sam_fused_common.h"

namespace sam_fused {
namespace cuda {

// A block has kCudaTableChunk / (16 / sizeof(T)) threads: 256 at most. kMinBlocks resident
// blocks of that size give the compiler up to 64 registers a thread; left to itself, ptxas
// aimed one perturbation kernel (float16, VaSSO) at 32 and spilled.
constexpr int kMaxThreads = 256;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kMinBlocks = 4;

// ------------------------------------------------------------------ storage
// A 16-byte pack of N elements (N = 1 for single elements).
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

// Whether every pointer given can be read in 16-byte packs.
template <typename... P>
__host__ __device__ __forceinline__ bool aligned16(const P*... p) {
  return ((reinterpret_cast<uintptr_t>(p) % 16 == 0) && ...);
}

// ------------------------------------------------------------------ status
// How a kernel reads the device status vector (float64; float32 accepted): which entry
// unscales the gradients (kNoUnscale: none), whether the clipping coefficient applies, and
// whether a non-finite gradient skips the step.
struct DeviceStatus {
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
  // either pass saw a non-finite gradient (always asked: check)
  __device__ __forceinline__ bool skipped() const { return at(kStatusBad1) + at(kStatusBad2) > 0; }
  __device__ __forceinline__ bool skip() const { return check && skipped(); }
};

// ------------------------------------------------------------------ a block's chunk
struct Span {
  int64_t begin, end;  // elements [begin, end) of the block's tensor
  int64_t slot;        // the tensor's entry in every role table
  int64_t count;       // the tensor's entry in steps / vsteps
};

__device__ __forceinline__ Span span_of(const int64_t* chunks) {
  const int64_t* row = chunks + 4 * static_cast<int64_t>(blockIdx.x);
  const int64_t start = row[1];
  const int64_t stop = start + kCudaTableChunk < row[2] ? start + kCudaTableChunk : row[2];
  return {start, stop, row[0], row[3]};
}

// A role's elements for this block: the address in the role's table (the host gives a role
// the launch lacks another role's table, so there is always one to read, never touched).
template <typename T>
__device__ __forceinline__ T* resolve(const int64_t* table, const Span& span) {
  T* p = reinterpret_cast<T*>(static_cast<uintptr_t>(table[span.slot]));
#ifdef __CUDA_ARCH__
  // an address read from memory could be in any state space, and generic loads and stores
  // (LD/ST) it would get; it is global memory, which lets the compiler use LDG/STG as for a
  // kernel's pointer arguments. (Merged with a null pointer, the fact is lost: hence a stand-in
  // table for an absent role rather than a null one.)
  __builtin_assume(__isGlobal(p));
#endif
  return p;
}

// Calls f(Width<M>{}, i) for each pack of M elements at i that this thread covers: packs of N
// when `packed`, then the elements left over one by one (M = 1); all of it one by one when not.
// The loops count in 32 bits from the chunk's start (a chunk is at most kCudaTableChunk
// elements): a 64-bit trip count would be a division by blockDim.x, a call on the device.
template <int N, typename F>
__device__ __forceinline__ void for_each_pack(const Span& s, bool packed, const F& f) {
  const int n = static_cast<int>(s.end - s.begin);
  const int stride = static_cast<int>(blockDim.x);
  int tail = 0;
  if (packed) {
    const int packs = n / N;
    for (int k = threadIdx.x; k < packs; k += stride) f(Width<N>{}, s.begin + k * N);
    tail = packs * N;
  }
  for (int i = tail + threadIdx.x; i < n; i += stride) f(Width<1>{}, s.begin + i);
}

// Sums of K values over the block, valid in thread 0: warp shuffles, then the warps in index
// order (a fixed order: the same inputs give the same bits).
template <int K>
__device__ void block_sums(double (&x)[K]) {
  __shared__ double warp_sums[K][kMaxWarps];
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) x[k] += __shfl_down_sync(0xffffffffu, x[k], offset);
    if (threadIdx.x % 32 == 0) warp_sums[k][threadIdx.x / 32] = x[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      double total = 0;
      for (unsigned w = 0; w < blockDim.x / 32; ++w) total += warp_sums[k][w];
      x[k] = total;
    }
  }
}

}  // namespace cuda
}  // namespace sam_fused
