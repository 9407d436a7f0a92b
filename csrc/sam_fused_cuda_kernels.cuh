// The CUDA library's kernels (its host side, which checks and launches them, is
// sam_fused_cuda.cu; what they share, sam_fused_cuda_device.cuh): one table launch each, a
// thread block per chunk row.
//
// The element math is sam_fused_math.h's functors, the CPU library's too; the kernels are
// generic over them (a variant's rules, a base), with float32 math over the storage dtype.
// No host synchronisation: the skip decision, the global sums, GradScaler's 1 / scale and the
// clipping coefficient are read from the device status vector. The statistics reduce each
// block in a fixed order (warp shuffles, then warps in index order) into one float64 partial
// per quantity; the caller sums the partials with one torch.sum.
#pragma once

#include <cstdint>

#include "sam_fused_common.h"
#include "sam_fused_cuda_device.cuh"
#include "sam_fused_math.h"

namespace sam_fused {
namespace cuda {

// ------------------------------------------------------------------ statistics
// One partial per block: the sum of u^2 (u = T v, v the rule's direction of the unscaled
// gradient) in double into partials[0], the non-finite count of the raw gradients into [1].
// Without `adaptive` and with rule GRAD it sums the squares of `grad` alone (LookSAM's ||g_v||^2).
template <typename T, typename Rule, bool ADAPTIVE>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    stats_kernel(const int64_t* g_table, const int64_t* w_table, const int64_t* aux_table, const int64_t* chunks,
                 const float* vsteps, DeviceStatus read, float eta, float c1, float c2, double* partials,
                 int64_t row_stride) {
  const Span span = span_of(chunks);
  const T* g = resolve<const T>(g_table, span);
  const T* w = g;  // the weights are read for the adaptive norm only
  if constexpr (ADAPTIVE) w = resolve<const T>(w_table, span);
  const T* aux = g;
  bool first = false;
  if constexpr (Rule::kReadsAux) {
    aux = resolve<const T>(aux_table, span);
    first = vsteps[span.count] == 0.0f;
  }
  const float inv_scale = read.inv_scale();
  double sums[2] = {0.0, 0.0};  // sum of u^2, non-finite count
  for_each_pack<VecWidth<T>::value>(span, aligned16(g, w, aux), [&](auto width, int64_t i) {
    constexpr int M = decltype(width)::value;
    const Pack<T, M> gp = load_pack<T, M>(g, i);
    Pack<T, M> wp{}, ap{};
    if constexpr (ADAPTIVE) wp = load_pack<T, M>(w, i);
    if constexpr (Rule::kReadsAux) ap = load_pack<T, M>(aux, i);
#pragma unroll
    for (int j = 0; j < M; ++j) {
      const float raw = to_f(gp.v[j]);
      sums[1] += math::nonfinite(raw);
      float state = 0.0f;
      const float v = Rule::direction(raw * inv_scale, to_f(ap.v[j]), first, c1, c2, state);
      const double u = math::ascent_t(to_f(wp.v[j]), eta, ADAPTIVE) * v;
      sums[0] += u * u;
    }
  });
  block_sums(sums);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = sums[0];
    partials[row_stride + blockIdx.x] = sums[1];
  }
}

// One partial per block of the second pass: [0] the non-finite count of the raw g_p; [1]
// <g, g_p>, [2] ||g_p||^2, [3] ||g||^2 with the kept first gradient g (FIRST); [2] also alone
// when `want_gp2` (clipping). Zeros where not asked for.
template <typename T, bool FIRST>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    descent_stats_kernel(const int64_t* gp_table, const int64_t* g_table, const int64_t* chunks, DeviceStatus read,
                         bool want_gp2, double* partials, int64_t row_stride) {
  const Span span = span_of(chunks);
  const T* gp_ptr = resolve<const T>(gp_table, span);
  const T* g_ptr = gp_ptr;
  if constexpr (FIRST) g_ptr = resolve<const T>(g_table, span);
  const float inv_scale = read.inv_scale();
  const bool gp2 = want_gp2 || FIRST;
  double sums[4] = {0.0, 0.0, 0.0, 0.0};
  for_each_pack<VecWidth<T>::value>(span, aligned16(gp_ptr, g_ptr), [&](auto width, int64_t i) {
    constexpr int M = decltype(width)::value;
    const Pack<T, M> gpk = load_pack<T, M>(gp_ptr, i);
    Pack<T, M> gk{};
    if constexpr (FIRST) gk = load_pack<T, M>(g_ptr, i);
#pragma unroll
    for (int j = 0; j < M; ++j) {
      const float raw = to_f(gpk.v[j]);
      sums[0] += math::nonfinite(raw);
      const double gp = raw * inv_scale;
      if (gp2) sums[2] += gp * gp;
      if constexpr (FIRST) {
        const double g = to_f(gk.v[j]);
        sums[1] += g * gp;
        sums[3] += g * g;
      }
    }
  });
  block_sums(sums);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < 4; ++k) partials[k * row_stride + blockIdx.x] = sums[k];
  }
}

// ------------------------------------------------------------------ perturbation
// The roles of a perturbation: param (written), src (w, or RSAM's backup), grad, backup
// (absent for RSAM), aux (the running state, or RSAM's noise), keep (the first gradient, for
// GSAM and LookSAM), prev (the running state's old value).
struct PerturbTables {
  const int64_t *param, *src, *grad, *backup, *aux, *keep, *prev;
};

// backup <- w; keep <- g, unscaled; prev <- aux and aux <- its new value; w <- src + eps, the
// weights and running state unchanged when a non-finite first gradient skips the step.
template <typename T, typename Rule, bool ADAPTIVE>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    perturb_kernel(PerturbTables tables, const int64_t* chunks, const float* vsteps, DeviceStatus read, double rho,
                   float eta, double norm_eps, float c1, float c2, bool normalized, bool keep_first) {
  const float scale = math::perturb_scale<float>(rho, read.at(kStatusSumsq), norm_eps, normalized);
  const Span span = span_of(chunks);
  T* w = resolve<T>(tables.param, span);
  const T* src = resolve<const T>(tables.src, span);
  const T* g = resolve<const T>(tables.grad, span);
  T* backup = resolve<T>(tables.backup, span);
  T* aux = resolve<T>(tables.aux, span);
  T* keep = resolve<T>(tables.keep, span);
  T* prev = resolve<T>(tables.prev, span);
  const bool first = Rule::kReadsAux && vsteps[span.count] == 0.0f;
  const float inv_scale = read.inv_scale();
  const bool skip = read.check && read.at(kStatusBad1) > 0;
  for_each_pack<VecWidth<T>::value>(span, aligned16(w, src, g, backup, aux, keep, prev), [&](auto width, int64_t i) {
    constexpr int M = decltype(width)::value;
    const Pack<T, M> wr = load_pack<T, M>(src, i);
    if constexpr (!Rule::kFromBackup) store_pack<T, M>(backup, i, wr);
    const Pack<T, M> gp = load_pack<T, M>(g, i);
    Pack<T, M> ap{};
    if constexpr (Rule::kReadsAux) ap = load_pack<T, M>(aux, i);
    Pack<T, M> out, kept, state_out;
#pragma unroll
    for (int j = 0; j < M; ++j) {
      const float gu = to_f(gp.v[j]) * inv_scale;
      kept.v[j] = from_f<T>(gu);
      float state = 0.0f;
      const float v = Rule::direction(gu, to_f(ap.v[j]), first, c1, c2, state);
      state_out.v[j] = from_f<T>(state);
      out.v[j] = from_f<T>(math::perturbed(to_f(wr.v[j]), v, scale, eta, ADAPTIVE));
    }
    if (keep_first) store_pack<T, M>(keep, i, kept);  // GSAM and LookSAM read g again after the second pass
    if constexpr (Rule::kUpdatesState) {
      // the old value too: a non-finite second pass or an abandoned step undoes this update
      store_pack<T, M>(prev, i, ap);
      if (!skip) store_pack<T, M>(aux, i, state_out);
    }
    if (!skip) store_pack<T, M>(w, i, out);
  });
}

// dst <- src (restores); with `skip_only`, only when the step is skipped (a reverted
// running state).
template <typename T>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    copy_kernel(const int64_t* dst_table, const int64_t* src_table, const int64_t* chunks, DeviceStatus read,
                bool skip_only) {
  if (skip_only && !read.skipped()) return;
  const Span span = span_of(chunks);
  T* dst = resolve<T>(dst_table, span);
  const T* src = resolve<const T>(src_table, span);
  for_each_pack<VecWidth<T>::value>(span, aligned16(dst, src), [&](auto width, int64_t i) {
    constexpr int M = decltype(width)::value;
    store_pack<T, M>(dst, i, load_pack<T, M>(src, i));
  });
}

// GCSAM: block b's row (rows[b], lengths[b] elements) loses its mean, in place: summed in
// double in the block's fixed order, subtracted in float32.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    centralize_kernel(const int64_t* rows, const int32_t* lengths) {
  T* g = reinterpret_cast<T*>(static_cast<uintptr_t>(rows[blockIdx.x]));
  const int n = lengths[blockIdx.x];
  double sum[1] = {0.0};
  for (int i = threadIdx.x; i < n; i += blockDim.x) sum[0] += to_f(g[i]);
  block_sums(sum);
  __shared__ float mean;
  if (threadIdx.x == 0) mean = static_cast<float>(sum[0] / n);
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) g[i] = from_f<T>(to_f(g[i]) - mean);
}

// ------------------------------------------------------------------ the fused update
// The roles of an update: the weights it reads (src: the backup, which fuses the restore in,
// or the parameters) and writes, the gradient, the base's state in state_names() order, the
// descent rule's input (aux) and LookSAM's g_v (gv).
struct UpdateTables {
  const int64_t *src, *param, *grad, *state[3], *aux, *gv;
};

// What a block computes once for its tensor (thread 0, handed over through shared memory): the
// base's per-tensor scalars from the tensor's update count (Adam's bias corrections: two
// double pows, too many for every thread of a block that covers one pack each) and the descent
// rule's ratio of status sums.
template <typename Base>
struct BlockScalars {
  typename Base::template PerTensor<float> tensor;
  float coef;
};

// Restore fused with the base update of every tensor, over the variant's descent gradient: when
// the step is skipped only the restore takes effect (every state keeps its bits).
template <typename T, typename Base, typename Descent>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    update_kernel(UpdateTables tables, const int64_t* chunks, const float* steps, DeviceStatus read,
                  typename Base::template Params<float> params, int options, float alpha) {
  const Span span = span_of(chunks);
  __shared__ BlockScalars<Base> shared;
  if (threadIdx.x == 0) {
    shared.tensor = Base::per_tensor(params, steps[span.count]);
    shared.coef = static_cast<float>(Descent::coef(status_sums(read)));
  }
  __syncthreads();
  const BlockScalars<Base> block = shared;
  const T* src = resolve<const T>(tables.src, span);
  T* param = resolve<T>(tables.param, span);
  const T* g = resolve<const T>(tables.grad, span);
  T* s0 = resolve<T>(tables.state[0], span);
  T* s1 = resolve<T>(tables.state[1], span);
  T* s2 = resolve<T>(tables.state[2], span);
  const T* aux = resolve<const T>(tables.aux, span);
  T* gv_out = resolve<T>(tables.gv, span);
  const bool packed = aligned16(src, param, g, s0, s1, s2, aux, gv_out);
  if (read.skip()) {
    if (src != param) {
      for_each_pack<VecWidth<T>::value>(span, packed, [&](auto width, int64_t i) {
        constexpr int M = decltype(width)::value;
        store_pack<T, M>(param, i, load_pack<T, M>(src, i));
      });
    }
    return;
  }
  const float inv_scale = read.inv_scale();
  const float clip = read.clip_coef();
  const float factor = (options & Base::kMaximize) ? -clip : clip;  // maximize: the base descends along -d
  const bool use0 = Base::uses_state(0, options), use1 = Base::uses_state(1, options),
             use2 = Base::uses_state(2, options);
  for_each_pack<VecWidth<T>::value>(span, packed, [&](auto width, int64_t i) {
    constexpr int M = decltype(width)::value;
    const Pack<T, M> wr = load_pack<T, M>(src, i);
    const Pack<T, M> gp = load_pack<T, M>(g, i);
    Pack<T, M> ap{}, p0{}, p1{}, p2{}, out, gvp;
    if constexpr (Descent::kReadsAux) ap = load_pack<T, M>(aux, i);
    if (use0) p0 = load_pack<T, M>(s0, i);
    if (use1) p1 = load_pack<T, M>(s1, i);
    if (use2) p2 = load_pack<T, M>(s2, i);
#pragma unroll
    for (int j = 0; j < M; ++j) {
      float gv = 0.0f;
      float d = Descent::gradient(to_f(gp.v[j]) * inv_scale, to_f(ap.v[j]), block.coef, alpha, gv);
      gvp.v[j] = from_f<T>(gv);
      d = d * factor;
      float s[3] = {to_f(p0.v[j]), to_f(p1.v[j]), to_f(p2.v[j])};
      out.v[j] = from_f<T>(Base::update(to_f(wr.v[j]), d, s, params, block.tensor, options));
      p0.v[j] = from_f<T>(s[0]);
      p1.v[j] = from_f<T>(s[1]);
      p2.v[j] = from_f<T>(s[2]);
    }
    if constexpr (Descent::kWritesGv) store_pack<T, M>(gv_out, i, gvp);
    if (use0) store_pack<T, M>(s0, i, p0);
    if (use1) store_pack<T, M>(s1, i, p1);
    if (use2) store_pack<T, M>(s2, i, p2);
    store_pack<T, M>(param, i, out);
  });
}

// steps (base) and vsteps (variant) += mask unless the step is skipped; block 0 also counts a
// skipped step in status[kStatusSkipped] (count_skip).
__global__ void advance_steps_kernel(float* steps, float* vsteps, const float* mask, void* status, DeviceStatus read,
                                     int64_t n, bool base, bool variant, bool count_skip) {
  const bool skip = read.skip();
  if (count_skip && skip && blockIdx.x == 0 && threadIdx.x == 0) {
    if (read.is_double) {
      static_cast<double*>(status)[kStatusSkipped] += 1.0;
    } else {
      static_cast<float*>(status)[kStatusSkipped] += 1.0f;
    }
  }
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n || skip) return;
  if (base) steps[i] += mask[i];
  if (variant) vsteps[i] += mask[i];
}

}  // namespace cuda
}  // namespace sam_fused
