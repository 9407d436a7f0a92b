// The element math of both compiled libraries, each formula once: the ascent rules, the
// descent rules and the base updates, as functors, each family next to the one list that maps
// Python's numbers to them (the end of this file). The CPU loops (sam_fused_cpu_*.cpp) and the
// CUDA kernels (sam_fused_cuda*.cu*) call them on values they loaded and converted to the math
// type F (float for float32/bfloat16/float16 storage, double for float64), and store the
// results themselves.
//
// The specification is the reference backend: Variant.direction and descent_gradient
// (sam_fused/variants.py), each spec's reference_update (sam_fused/base_updates.py,
// sam_fused/lion.py). Each expression keeps its formula and order of operations: on the CPU
// (built with -ffp-contract=off) SGD's results are the reference's bit for bit
// (tests/test_backend_ops.py); nvcc contracts a*b+c into FMAs, so on a GPU they agree to an ulp.
//
// A new variant rule is one functor and one entry in AscentRules or DescentRules; a new fused
// base is one functor and one entry in Bases (its spec in Python carries the same number).
// The loops and kernels are generic over these lists: nothing else changes.
//
// Switches (a base's option bits) are plain int arguments: the CPU loops pass template
// constants, so after inlining the branches fold away and the loop vectorises; the CUDA
// kernels pass kernel arguments, uniform across a launch.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

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

// ------------------------------------------------------------------ helpers
// cond ? a : b. On the host as mask arithmetic on the bits: GCC if-converts a plain ?:
// between two computed values only sometimes, and a branch left in a loop body stops the
// loop from vectorising.
template <typename F>
SAM_FUSED_INLINE F select(bool cond, F a, F b) {
#if defined(__CUDA_ARCH__)
  return cond ? a : b;
#else
  using Bits = std::conditional_t<sizeof(F) == 8, uint64_t, uint32_t>;
  Bits ia, ib;
  memcpy(&ia, &a, sizeof(ia));
  memcpy(&ib, &b, sizeof(ib));
  const Bits mask = Bits{0} - static_cast<Bits>(cond);
  const Bits out = (ia & mask) | (ib & ~mask);
  F r;
  memcpy(&r, &out, sizeof(r));
  return r;
#endif
}

SAM_FUSED_INLINE float magnitude(float x) { return fabsf(x); }
SAM_FUSED_INLINE double magnitude(double x) { return fabs(x); }
SAM_FUSED_INLINE float root(float x) { return sqrtf(x); }
SAM_FUSED_INLINE double root(double x) { return sqrt(x); }

// 1 for an infinite or NaN gradient entry (NaN compares false too). Counted on the raw value,
// before unscaling, as the reference and the Triton kernels do.
template <typename F>
SAM_FUSED_INLINE int nonfinite(F g) {
  return magnitude(g) < static_cast<F>(INFINITY) ? 0 : 1;
}

// The status entries the rules read, in float64 (sam_fused/status.py; a caller fills them
// from its status vector, on the host or the device).
struct StatusSums {
  double sumsq;  // SUMSQ: ||u||^2 of the first pass (a one-pass step: ||g||^2)
  double gv2;    // GV2: LookSAM's ||g_v||^2
  double dot;    // DOT: <g, g_p>
  double gp2;    // GP2: ||g_p||^2
  double g2;     // G2: ||g||^2
};

// ------------------------------------------------------------------ the first pass
// The factor every perturbation is multiplied by: rho / (||u|| + norm_eps) when the variant
// normalises, else rho; formed in double (a sum of squares of finite float32 gradients may
// exceed float32's range), then rounded once, as the Triton kernel does.
template <typename F>
SAM_FUSED_INLINE F perturb_scale(double rho, double sumsq, double norm_eps, bool normalized) {
  return static_cast<F>(normalized ? rho / (sqrt(sumsq) + norm_eps) : rho);
}

// ASAM's T = |w| + eta, or 1.
template <typename F>
SAM_FUSED_INLINE F ascent_t(F w, F eta, bool adaptive) {
  return adaptive ? magnitude(w) + eta : static_cast<F>(1);
}

// w + eps: eps = scale * v, or scale * t * (t * v) with t = |w| + eta (ASAM's T_w^2 v).
template <typename F>
SAM_FUSED_INLINE F perturbed(F w, F v, F scale, F eta, bool adaptive) {
  if (adaptive) {
    const F t = magnitude(w) + eta;
    return w + scale * t * (t * v);
  }
  return w + scale * v;
}

// ------------------------------------------------------------------ ascent rules
// sam_fused.variants.Ascent: the ascent direction v of one element, and the variant's running
// state's new value (Variant.direction). g: the unscaled gradient; aux: the running state before
// this step (VaSSO's d, F-SAM's m) or RSAM's noise delta; first: the running state was never
// updated; c1, c2: the variant's kernel_scalars(). kReadsAux: the rule reads the aux role;
// kUpdatesState: it writes aux's new value (and keeps the old one for a revert); kFromBackup:
// the first pass ran at w + noise, so the perturbation starts from the backup taken before it
// (and writes none).
struct AscentGrad {  // v = g: SAM, ASAM, USAM, GSAM, LookSAM, GCSAM (after centralization)
  static constexpr int kNumber = 0;
  static constexpr const char* kName = "GRAD";
  static constexpr bool kReadsAux = false;
  static constexpr bool kUpdatesState = false;
  static constexpr bool kFromBackup = false;
  template <typename F>
  SAM_FUSED_INLINE static F direction(F g, F, bool, F, F, F&) {
    return g;
  }
};

struct AscentVasso {  // d <- (1 - theta) d + theta g, d = g on the first update; v = d (c1 = theta)
  static constexpr int kNumber = 1;
  static constexpr const char* kName = "VASSO";
  static constexpr bool kReadsAux = true;
  static constexpr bool kUpdatesState = true;
  static constexpr bool kFromBackup = false;
  template <typename F>
  SAM_FUSED_INLINE static F direction(F g, F aux, bool first, F c1, F, F& state) {
    state = select(first, g, (1 - c1) * aux + c1 * g);
    return state;
  }
};

struct AscentFsam {  // v = g - sigma m (the previous m), m <- lam m + (1 - lam) g; both g at first
  static constexpr int kNumber = 2;
  static constexpr const char* kName = "FSAM";
  static constexpr bool kReadsAux = true;
  static constexpr bool kUpdatesState = true;
  static constexpr bool kFromBackup = false;
  template <typename F>
  SAM_FUSED_INLINE static F direction(F g, F aux, bool first, F c1, F c2, F& state) {
    state = select(first, g, c2 * aux + (1 - c2) * g);
    return select(first, g, g - c1 * aux);
  }
};

struct AscentRsam {  // v = delta + lam g_hat, g_hat taken at w + delta (c1 = lam)
  static constexpr int kNumber = 3;
  static constexpr const char* kName = "RSAM";
  static constexpr bool kReadsAux = true;
  static constexpr bool kUpdatesState = false;
  static constexpr bool kFromBackup = true;
  template <typename F>
  SAM_FUSED_INLINE static F direction(F g, F aux, bool, F c1, F, F&) {
    return aux + c1 * g;
  }
};

// ------------------------------------------------------------------ descent rules
// sam_fused.variants.Descent: the gradient the base update receives (descent_gradient), from
// the unscaled second-pass gradient gp. coef() is the rule's ratio of status sums, formed in
// double (0 where its denominator is 0) and rounded to F once per launch; aux: GSAM's and
// LookSAM's kept first gradient g, or a reuse step's g_v. kWritesGv: the rule stores g_v
// (unless the step is skipped).
struct DescentPlain {  // g_p
  static constexpr int kNumber = 0;
  static constexpr const char* kName = "PLAIN";
  static constexpr bool kReadsAux = false;
  static constexpr bool kWritesGv = false;
  SAM_FUSED_INLINE static double coef(const StatusSums&) { return 0; }
  template <typename F>
  SAM_FUSED_INLINE static F gradient(F gp, F, F, F, F&) {
    return gp;
  }
};

struct DescentGsam {  // g_p - alpha (g - (<g, g_p> / ||g_p||^2) g_p)
  static constexpr int kNumber = 1;
  static constexpr const char* kName = "GSAM";
  static constexpr bool kReadsAux = true;
  static constexpr bool kWritesGv = false;
  SAM_FUSED_INLINE static double coef(const StatusSums& s) { return s.gp2 > 0 ? s.dot / s.gp2 : 0; }
  template <typename F>
  SAM_FUSED_INLINE static F gradient(F gp, F g, F coef, F alpha, F&) {
    return gp - alpha * (g - coef * gp);
  }
};

struct DescentLooksamFull {  // g_p, storing g_v = g_p - (<g_p, g> / ||g||^2) g
  static constexpr int kNumber = 2;
  static constexpr const char* kName = "LOOKSAM_FULL";
  static constexpr bool kReadsAux = true;
  static constexpr bool kWritesGv = true;
  SAM_FUSED_INLINE static double coef(const StatusSums& s) { return s.g2 > 0 ? s.dot / s.g2 : 0; }
  template <typename F>
  SAM_FUSED_INLINE static F gradient(F gp, F g, F coef, F, F& gv) {
    gv = gp - coef * g;
    return gp;
  }
};

struct DescentLooksamReuse {  // one pass: g + alpha (||g|| / ||g_v||) g_v (gp is this pass's g)
  static constexpr int kNumber = 3;
  static constexpr const char* kName = "LOOKSAM_REUSE";
  static constexpr bool kReadsAux = true;
  static constexpr bool kWritesGv = false;
  SAM_FUSED_INLINE static double coef(const StatusSums& s) { return s.gv2 > 0 ? sqrt(s.sumsq) / sqrt(s.gv2) : 0; }
  template <typename F>
  SAM_FUSED_INLINE static F gradient(F gp, F gv, F coef, F alpha, F&) {
    return gp + alpha * coef * gv;
  }
};

// ------------------------------------------------------------------ base updates
// A base update is the functor of one BaseSpec (its kernel number): from the spec's
// kernel_scalars() h, device_scalars() dev and the learning rate, params() makes the launch's
// scalars; per_tensor() what depends on a tensor's update count; update() one element: the new
// weight, and the state s[0..2] (the spec's state_names(), in order) in and out. The option
// bits are the spec's kernel_options(); kStaticOptions are those the CPU loops instantiate
// (canonical() drops bits without effect), kMaximize the one the caller applies itself, by
// negating the descent gradient before update() (every base starts that way); uses_state(k, o)
// says whether state k is read and written. The weight decay factor 1 - lr wd is formed here
// in double, as torch forms it.
template <typename F>
struct NoPerTensor {};

struct Sgd {  // torch.optim.SGD; h: momentum, 1 - dampening, weight decay
  static constexpr int kNumber = 0;
  static constexpr const char* kName = "SGD";
  static constexpr int kScalars = 3, kDeviceScalars = 0;
  static constexpr int kWeightDecay = 1, kMomentum = 2, kNesterov = 4, kMaximize = 8;
  static constexpr int kStaticOptions = kWeightDecay | kMomentum | kNesterov;
  static constexpr int canonical(int o) { return (o & kMomentum) ? o : o & ~kNesterov; }
  SAM_FUSED_INLINE static constexpr bool uses_state(int k, int o) { return k == 0 && (o & kMomentum); }

  template <typename F>
  struct Params {
    F lr, momentum, one_minus_dampening, weight_decay;
  };
  template <typename F>
  struct PerTensor {
    bool first;  // the parameter's first update: the buffer is d itself
  };
  template <typename F>
  static Params<F> params(double lr, const double* h, const double*) {
    return {static_cast<F>(lr), static_cast<F>(h[0]), static_cast<F>(h[1]), static_cast<F>(h[2])};
  }
  template <typename F>
  SAM_FUSED_INLINE static PerTensor<F> per_tensor(const Params<F>&, float count) {
    return {count == 0.0f};
  }
  template <typename F>
  SAM_FUSED_INLINE static F update(F w, F d, F (&s)[3], const Params<F>& p, const PerTensor<F>& t, int o) {
    if (o & kWeightDecay) d = d + p.weight_decay * w;
    if (o & kMomentum) {
      s[0] = select(t.first, d, p.momentum * s[0] + p.one_minus_dampening * d);
      d = (o & kNesterov) ? d + p.momentum * s[0] : s[0];
    }
    return w - p.lr * d;
  }
};

struct Adam {  // torch.optim.Adam / AdamW; h: 1 - beta1, beta2, 1 - beta2, eps, weight decay; dev: beta1, beta2
  static constexpr int kNumber = 1;
  static constexpr const char* kName = "ADAM";
  static constexpr int kScalars = 5, kDeviceScalars = 2;
  static constexpr int kWeightDecay = 1, kDecoupled = 2, kAmsgrad = 4, kMaximize = 8;
  static constexpr int kStaticOptions = kWeightDecay | kDecoupled | kAmsgrad;
  static constexpr int canonical(int o) { return (o & kWeightDecay) ? o : o & ~kDecoupled; }
  SAM_FUSED_INLINE static constexpr bool uses_state(int k, int o) { return k < 2 || (k == 2 && (o & kAmsgrad)); }

  template <typename F>
  struct Params {
    // torch.lerp(m, g, weight), weight = 1 - beta1, as torch rounds it: m + weight (g - m) when
    // |weight| < 0.5, else g - (g - m)(1 - weight); both are select(small, m, g) + (g - m) k,
    // with k = weight or -(1 - weight) (exact: negating a product negates its rounding)
    bool small_weight;
    F lerp_k, beta2, one_minus_beta2, eps, weight_decay, decay;
    double lr, beta1_64, beta2_64;  // the bias corrections' inputs, in double
  };
  template <typename F>
  struct PerTensor {
    F step_size;  // lr / (1 - beta1^t)
    F bc2_sqrt;   // sqrt(1 - beta2^t)
  };
  template <typename F>
  static Params<F> params(double lr, const double* h, const double* dev) {
    Params<F> p{};
    const F weight = static_cast<F>(h[0]);
    p.small_weight = magnitude(weight) < static_cast<F>(0.5);
    p.lerp_k = p.small_weight ? weight : -(static_cast<F>(1) - weight);
    p.beta2 = static_cast<F>(h[1]);
    p.one_minus_beta2 = static_cast<F>(h[2]);
    p.eps = static_cast<F>(h[3]);
    p.weight_decay = static_cast<F>(h[4]);
    p.decay = static_cast<F>(1.0 - lr * h[4]);
    p.lr = lr;
    p.beta1_64 = dev[0];
    p.beta2_64 = dev[1];
    return p;
  }
  // update count + 1 in double, as PyTorch computes the corrections on the host (1 - beta^t
  // loses digits in float32)
  template <typename F>
  SAM_FUSED_INLINE static PerTensor<F> per_tensor(const Params<F>& p, float count) {
    const double t = static_cast<double>(count) + 1.0;
    return {static_cast<F>(p.lr / (1.0 - pow(p.beta1_64, t))), static_cast<F>(sqrt(1.0 - pow(p.beta2_64, t)))};
  }
  template <typename F>
  SAM_FUSED_INLINE static F update(F w, F g, F (&s)[3], const Params<F>& p, const PerTensor<F>& t, int o) {
    if ((o & kWeightDecay) && (o & kDecoupled)) w = w * p.decay;
    if ((o & kWeightDecay) && !(o & kDecoupled)) g = g + p.weight_decay * w;
    s[0] = select(p.small_weight, s[0], g) + (g - s[0]) * p.lerp_k;
    // beta2 * v + (1 - beta2) * g * g, left to right as the reference evaluates it
    s[1] = p.beta2 * s[1] + p.one_minus_beta2 * g * g;
    F second = s[1];
    if (o & kAmsgrad) {
      // torch.maximum: a NaN on either side wins. `|`, not `||`: no branch in a CPU loop body
      s[2] = select((s[2] != s[2]) | (s[2] > s[1]), s[2], s[1]);
      second = s[2];
    }
    return w - t.step_size * (s[0] / (root(second) / t.bc2_sqrt + p.eps));
  }
};

struct Lion {  // sam_fused.Lion; h: beta1, 1 - beta1, beta2, 1 - beta2, weight decay
  static constexpr int kNumber = 2;
  static constexpr const char* kName = "LION";
  static constexpr int kScalars = 5, kDeviceScalars = 0;
  static constexpr int kWeightDecay = 1, kMaximize = 2;
  static constexpr int kStaticOptions = kWeightDecay;
  static constexpr int canonical(int o) { return o; }
  SAM_FUSED_INLINE static constexpr bool uses_state(int k, int) { return k == 0; }

  template <typename F>
  struct Params {
    F lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay;
  };
  template <typename F>
  using PerTensor = NoPerTensor<F>;
  template <typename F>
  static Params<F> params(double lr, const double* h, const double*) {
    return {static_cast<F>(lr),   static_cast<F>(h[0]), static_cast<F>(h[1]),
            static_cast<F>(h[2]), static_cast<F>(h[3]), static_cast<F>(1.0 - lr * h[4])};
  }
  template <typename F>
  SAM_FUSED_INLINE static PerTensor<F> per_tensor(const Params<F>&, float) {
    return {};
  }
  template <typename F>
  SAM_FUSED_INLINE static F update(F w, F g, F (&s)[3], const Params<F>& p, const PerTensor<F>&, int o) {
    if (o & kWeightDecay) w = w * p.decay;
    const F c = s[0] * p.beta1 + g * p.one_minus_beta1;
    // torch.sign: (0 < c) - (c < 0), so NaN gives 0
    const F sign = select(c > 0, static_cast<F>(1), select(c < 0, static_cast<F>(-1), static_cast<F>(0)));
    s[0] = s[0] * p.beta2 + g * p.one_minus_beta2;
    return w - p.lr * sign;
  }
};

// ------------------------------------------------------------------ the numbers' one map
// Each list maps the numbers Python passes (variants.Ascent, variants.Descent, BaseSpec.kernel)
// to the functors above: dispatch(number, f) calls f(Functor{}) and says whether one matched.
// The libraries report every list (their `functors` operation), so that Python knows what a
// loaded library fuses; tests/test_status_constants.py compares the numbers with Python's.
template <typename... Functors>
struct Family {
  template <typename Call>
  static bool dispatch(int64_t number, const Call& call) {
    return ((number == Functors::kNumber ? (call(Functors{}), true) : false) || ...);
  }
  // calls f(kName, kNumber) for every member
  template <typename Visit>
  static void visit(const Visit& f) {
    (f(Functors::kName, Functors::kNumber), ...);
  }
};

using AscentRules = Family<AscentGrad, AscentVasso, AscentFsam, AscentRsam>;
using DescentRules = Family<DescentPlain, DescentGsam, DescentLooksamFull, DescentLooksamReuse>;
using Bases = Family<Sgd, Adam, Lion>;

}  // namespace math
}  // namespace sam_fused
