// The float math of one element, the one copy that both compiled backends run: the CPU
// loops of sam_fused_cpu.cpp and the CUDA kernels of sam_fused_cuda.cu call these on
// float32 values they loaded (and convert the results back to storage themselves).
//
// The specification is the reference backend (sam_fused/backends/reference.py and the
// update rules of sam_fused/base_updates.py). Each expression keeps the reference's
// formula and order of operations, all in float32: on the CPU (built with
// -ffp-contract=off) SGD's results are the reference's bit for bit
// (tests/test_backend_ops.py); nvcc contracts a*b+c into FMAs, so on a GPU they agree to
// an ulp instead.
//
// The switches (adaptive, has_momentum, amsgrad...) are plain bool/int arguments: the CPU
// loops pass template constants, so that after inlining the branches fold away and the
// loop vectorises; the CUDA kernels pass kernel arguments, uniform across a launch.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define SAM_FUSED_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
// always: a call left in a loop body would stop it from vectorising
#define SAM_FUSED_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define SAM_FUSED_INLINE __forceinline
#else
#define SAM_FUSED_INLINE inline
#endif

namespace sam_fused {
namespace math {

// cond ? a : b. On the host as mask arithmetic on the bits: GCC if-converts a plain ?:
// between two computed values only sometimes, and a branch left in a loop body (next to
// the storage conversions of sam_fused_cpu.cpp) stops the loop from vectorising.
SAM_FUSED_INLINE float select(bool cond, float a, float b) {
#if defined(__CUDA_ARCH__)
  return cond ? a : b;
#else
  uint32_t ia, ib;
  memcpy(&ia, &a, sizeof(ia));
  memcpy(&ib, &b, sizeof(ib));
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  const uint32_t out = (ia & mask) | (ib & ~mask);
  float r;
  memcpy(&r, &out, sizeof(r));
  return r;
#endif
}

// ------------------------------------------------------------------ gradients
// 1 for an infinite or NaN gradient entry (NaN compares false too). Counted on the raw
// value, before unscaling, as the reference and the Triton kernels do.
SAM_FUSED_INLINE int nonfinite(float g) { return fabsf(g) < INFINITY ? 0 : 1; }

// GradScaler's gradients hold scale * g: multiplied by 1 / scale in float32 once loaded
// (the reference's g.float() * inv_scale), not in the storage dtype beforehand, where a
// float16 gradient below 2^-24 * scale would lose bits or flush to zero. inv_scale is 1
// when nothing is scaled, and x * 1 is exact: the unscaled path keeps its bits without a
// separate instantiation.
SAM_FUSED_INLINE float unscaled(float g, float inv_scale) { return g * inv_scale; }

// The gradient a fused update descends along: unscaled, then times max_grad_norm's clipping
// coefficient (1 when off), in the reference's order.
SAM_FUSED_INLINE float descent_grad(float g, float inv_scale, float clip) { return unscaled(g, inv_scale) * clip; }

// ------------------------------------------------------------------ ascent
// The ascent direction whose squared norm the first pass sums: g, or (|w| + eta) * g (ASAM).
SAM_FUSED_INLINE float ascent_u(float g, float w, float eta, bool adaptive) {
  return adaptive ? (fabsf(w) + eta) * g : g;
}

// The factor every perturbation is multiplied by: rho / (||u|| + norm_eps) when the
// variant normalises (the norm in float32, from the float sum of squares), else rho.
SAM_FUSED_INLINE float perturb_scale(float rho, float sumsq, float norm_eps, bool normalized) {
  return normalized ? rho / (sqrtf(sumsq) + norm_eps) : rho;
}

// w + eps: eps = scale * g, or scale * t * (t * g) with t = |w| + eta (ASAM's T_w^2 g).
SAM_FUSED_INLINE float perturb(float w, float g, float scale, float eta, bool adaptive) {
  if (adaptive) {
    const float t = fabsf(w) + eta;
    return w + scale * t * (t * g);
  }
  return w + scale * g;
}

// ------------------------------------------------------------------ SGD
struct SgdScalars {
  float lr;
  float momentum;
  float one_minus_dampening;
  float weight_decay;
};

// A group's scalars in float32, as the reference's Python floats reach its float32 tensors.
SAM_FUSED_INLINE SgdScalars sgd_scalars(double lr, double momentum, double one_minus_dampening, double weight_decay) {
  return {static_cast<float>(lr), static_cast<float>(momentum), static_cast<float>(one_minus_dampening),
          static_cast<float>(weight_decay)};
}

// torch.optim.SGD on one element: returns the new weight; buf is the momentum buffer in
// and its new value out (left alone without momentum). first: the parameter's first update,
// whose buffer is d itself. maximize multiplies by -1 (as the kernels always have: the
// sign of a NaN result is then the gradient's).
SAM_FUSED_INLINE float sgd(float w, float g, float& buf, bool first, const SgdScalars& s, bool has_weight_decay,
                           bool has_momentum, bool nesterov, bool maximize) {
  float d = g * (maximize ? -1.0f : 1.0f);
  if (has_weight_decay) d = d + s.weight_decay * w;
  if (has_momentum) {
    buf = select(first, d, s.momentum * buf + s.one_minus_dampening * d);
    d = nesterov ? d + s.momentum * buf : buf;
  }
  return w - s.lr * d;
}

// ------------------------------------------------------------------ Adam / AdamW
// torch.lerp(a, b, weight) as torch rounds it: two formulas, chosen by |weight| < 0.5
// (small_weight, decided once per launch by lerp_weight_is_small).
SAM_FUSED_INLINE bool lerp_weight_is_small(float weight) { return fabsf(weight) < 0.5f; }

SAM_FUSED_INLINE float lerp(float a, float b, float weight, bool small_weight) {
  return small_weight ? a + weight * (b - a) : b - (b - a) * (1.0f - weight);
}

// Adam's weight decay: none, L2 (Adam: g += wd * w) or decoupled (AdamW: w *= 1 - lr * wd).
enum Decay : int { kNoDecay = 0, kL2Decay = 1, kDecoupledDecay = 2 };

struct AdamScalars {
  float weight;  // 1 - beta1, the lerp weight of the first moment
  float beta2;
  float one_minus_beta2;
  float eps;
  float weight_decay;
  float decay_factor;  // 1 - lr * weight_decay, formed in double
  float step_size;     // lr / (1 - beta1^t)
  float bc2_sqrt;      // sqrt(1 - beta2^t)
};

// Adam's decay rule for a group: none, or L2 / decoupled (AdamW).
SAM_FUSED_INLINE int adam_decay(double weight_decay, bool decoupled) {
  return weight_decay == 0 ? kNoDecay : (decoupled ? kDecoupledDecay : kL2Decay);
}

// A group's scalars in float32, as sgd_scalars; step_size and bc2_sqrt are per update count
// (adam_bias_corrections).
SAM_FUSED_INLINE AdamScalars adam_scalars(double lr, double beta1, double beta2, double eps, double weight_decay) {
  AdamScalars s{};
  s.weight = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  s.weight_decay = static_cast<float>(weight_decay);
  s.decay_factor = static_cast<float>(1.0 - lr * weight_decay);
  return s;
}

// The bias-corrected step size and sqrt(1 - beta2^t) of update count step_count + 1, in
// double as PyTorch computes them on the host (1 - beta^t loses digits in float32).
SAM_FUSED_INLINE void adam_bias_corrections(float step_count, double lr, double beta1, double beta2,
                                            float& step_size, float& bc2_sqrt) {
  const double t = static_cast<double>(step_count + 1.0f);
  step_size = static_cast<float>(lr / (1.0 - pow(beta1, t)));
  bc2_sqrt = static_cast<float>(sqrt(1.0 - pow(beta2, t)));
}

// torch.optim.Adam/AdamW on one element: returns the new weight; m, v and (with amsgrad)
// vmax are the moments in and their new values out.
SAM_FUSED_INLINE float adam(float w, float g, float& m, float& v, float& vmax, const AdamScalars& s, int decay,
                            bool amsgrad, bool small_weight, bool maximize) {
  g = g * (maximize ? -1.0f : 1.0f);
  if (decay == kDecoupledDecay) w = w * s.decay_factor;
  if (decay == kL2Decay) g = g + s.weight_decay * w;
  m = lerp(m, g, s.weight, small_weight);
  // beta2 * v + (1 - beta2) * g * g, left to right as the reference evaluates it
  v = s.beta2 * v + s.one_minus_beta2 * g * g;
  float second = v;
  if (amsgrad) {
    // torch.maximum: a NaN on either side wins. `|`, not `||`: no branch in a CPU loop body
    vmax = select((vmax != vmax) | (vmax > v), vmax, v);
    second = vmax;
  }
  return w - s.step_size * (m / (sqrtf(second) / s.bc2_sqrt + s.eps));
}

}  // namespace math
}  // namespace sam_fused
