// The CPU library's descent half: the second pass's statistics (`descent_stats`), the one
// update of every fused base (`update`: the restore fused with the base update, over the
// variant's descent gradient) and the update counts (`advance_steps`).
//
// `update` is generic over sam_fused_math.h's Bases and DescentRules: the numbers Python passes
// (BaseSpec.kernel, variants.Descent) pick the functors once per launch, and the base's static
// option bits become a template constant, so the loop instantiated for them vectorises with the
// element math inlined and its branches folded.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <array>
#include <utility>
#include <vector>

#include "sam_fused_cpu.h"

namespace sam_fused {
namespace cpu {
namespace {

// ------------------------------------------------------------------ second-pass statistics
// The non-finite count of the raw g_p; <g, g_p>, ||g_p||^2 and ||g||^2 in double (g: the kept
// first gradient, FIRST), ||g_p||^2 also alone (GP2: clipping).
template <typename T, bool FIRST, bool GP2>
struct DescentElement {
  using F = MathOf<T>;
  const Raw<T>* __restrict gp_ptr;
  const Raw<T>* __restrict g_ptr;
  F inv_scale;

  SAM_FUSED_INLINE void operator()(int64_t i, int l, double (&acc)[3][kLanes], int32_t (&cnt)[kLanes]) const {
    const F raw = to_f<T>(gp_ptr[i]);
    cnt[l] += math::nonfinite(raw);
    const double gp = static_cast<double>(raw * inv_scale);
    if constexpr (GP2 || FIRST) acc[1][l] += gp * gp;
    if constexpr (FIRST) {
      const double g = static_cast<double>(to_f<T>(g_ptr[i]));
      acc[0][l] += g * gp;
      acc[2][l] += g * g;
    }
  }
};

}  // namespace

// Per slot: partials[0] the non-finite count, [1] <g, g_p>, [2] ||g_p||^2, [3] ||g||^2 (zeros
// where not asked for: the engine sums the whole second-pass slice).
void descent_stats(const at::Tensor& grad, const OptionalTensor& first_grad, const at::Tensor& runs,
                   const at::Tensor& like, const at::Tensor& partials, const at::Tensor& status, int64_t unscale,
                   bool want_gp2) {
  const Launch launch = read_launch(runs, like, -1);
  const Role gp_role = role_of(launch, grad, "grad");
  const Role g_role = role_of(launch, first_grad, "first_grad");
  const HostStatus st = host_status(status);
  check_unscale(unscale);
  const int rows[4] = {0, 1, 2, 3};  // (bad, dot, gp2, g2)
  dispatch_dtype<true>(launch.dtype, [&](auto tag) {
    using T = decltype(tag);
    using F = MathOf<T>;
    const F inv_scale = st.factor<F>(unscale, unscale != kNoUnscale);
    dispatch_bool(g_role.present(), [&](auto first) {
      dispatch_bool(want_gp2, [&](auto gp2) {
        reduce_slots<3>(launch, partials, rows, [&](int64_t run) {
          return DescentElement<T, decltype(first)::value, decltype(gp2)::value>{gp_role.at<T>(run),
                                                                                 g_role.at<T>(run), inv_scale};
        });
      });
    });
  });
}

// ------------------------------------------------------------------ the fused update
namespace {

constexpr int kMaxStates = 3;

// The roles of an update: the weights it reads (src: the backup, which fuses the restore in,
// or the parameters) and writes (param), the gradient, the base's state in state_names()
// order, and the descent rule's inputs (aux: GSAM's and LookSAM's g, or a reuse step's g_v)
// and output (gv: LookSAM's g_v).
struct UpdateRoles {
  Role src, param, grad;
  std::array<Role, kMaxStates> state;
  Role aux, gv;
};

// What every element of a launch shares besides the base's own scalars.
template <typename F>
struct DescentScalars {
  F inv_scale;  // 1 / loss scale of the gradients, or 1
  F factor;     // max_grad_norm's coefficient (or 1), negated for maximize
  F coef;       // the descent rule's ratio of status sums
  F alpha;
};

template <typename T, typename Base, typename Descent, int OPTIONS>
void update_span(const UpdateRoles& roles, int64_t run, int64_t start, int64_t stop,
                 const typename Base::template Params<MathOf<T>>& params,
                 const typename Base::template PerTensor<MathOf<T>>& tensor, const DescentScalars<MathOf<T>>& ds) {
  using F = MathOf<T>;
  // local copies: stores through float pointers could alias the caller's, which would make the
  // loop reload them on every element
  const auto p = params;
  const auto t = tensor;
  const DescentScalars<F> d = ds;
  const Raw<T>* src = roles.src.at<T>(run);  // may be param itself: no __restrict on either
  Raw<T>* param = roles.param.at<T>(run);
  const Raw<T>* __restrict g = roles.grad.at<T>(run);
  Raw<T>* __restrict s0 = roles.state[0].at<T>(run);
  Raw<T>* __restrict s1 = roles.state[1].at<T>(run);
  Raw<T>* __restrict s2 = roles.state[2].at<T>(run);
  const Raw<T>* __restrict aux = roles.aux.at<T>(run);
  Raw<T>* __restrict gv_out = roles.gv.at<T>(run);
#pragma omp simd
  for (int64_t i = start; i < stop; ++i) {
    F gv = 0;
    F dg = Descent::gradient(to_f<T>(g[i]) * d.inv_scale, Descent::kReadsAux ? to_f<T>(aux[i]) : F(0), d.coef,
                             d.alpha, gv);
    if constexpr (Descent::kWritesGv) gv_out[i] = from_f<T>(gv);
    dg = dg * d.factor;
    F s[kMaxStates] = {Base::uses_state(0, OPTIONS) ? to_f<T>(s0[i]) : F(0),
                       Base::uses_state(1, OPTIONS) ? to_f<T>(s1[i]) : F(0),
                       Base::uses_state(2, OPTIONS) ? to_f<T>(s2[i]) : F(0)};
    const F w = Base::update(to_f<T>(src[i]), dg, s, p, t, OPTIONS);
    if constexpr (Base::uses_state(0, OPTIONS)) s0[i] = from_f<T>(s[0]);
    if constexpr (Base::uses_state(1, OPTIONS)) s1[i] = from_f<T>(s[1]);
    if constexpr (Base::uses_state(2, OPTIONS)) s2[i] = from_f<T>(s[2]);
    param[i] = from_f<T>(w);
  }
}

// Calls f(std::integral_constant<int, O>{}) for the base's static options O equal to `value`
// (Base::canonical already applied): one instantiation per combination that can occur.
template <typename Base, typename Call, int... O>
void dispatch_options(int value, const Call& call, std::integer_sequence<int, O...>) {
  const auto one = [&](auto option) {
    constexpr int V = decltype(option)::value;
    if constexpr ((V & ~Base::kStaticOptions) == 0 && Base::canonical(V) == V) {
      if (value == V) {
        call(option);
        return true;
      }
    }
    return false;
  };
  const bool found = (one(std::integral_constant<int, O>{}) || ...);
  TORCH_INTERNAL_ASSERT(found, "sam_fused: options ", value, " of base ", Base::kName, " have no instantiation");
}

}  // namespace

void update(const at::Tensor& src, const at::Tensor& param, const at::Tensor& grad, const OptionalTensor& state0,
            const OptionalTensor& state1, const OptionalTensor& state2, const OptionalTensor& aux,
            const OptionalTensor& gv, const at::Tensor& steps, const at::Tensor& status, const at::Tensor& runs,
            const at::Tensor& like, int64_t base, c10::ArrayRef<double> scalars, int64_t options,
            c10::ArrayRef<double> device_scalars, double lr, int64_t descent, double alpha, int64_t unscale,
            bool clip, bool check) {
  check_counts(steps, "steps", -1, kCpu);
  const Launch launch = read_launch(runs, like, steps.numel());
  const UpdateRoles roles{role_of(launch, src, "src"),
                          role_of(launch, param, "param"),
                          role_of(launch, grad, "grad"),
                          {role_of(launch, state0, "state0"), role_of(launch, state1, "state1"),
                           role_of(launch, state2, "state2")},
                          role_of(launch, aux, "aux"),
                          role_of(launch, gv, "gv")};
  const HostStatus st = host_status(status);
  check_unscale(unscale);
  check_number<math::Bases>(base, "base update");
  check_number<math::DescentRules>(descent, "descent rule");
  const bool skip = check && st.skipped();
  const auto spans = blocks_of(launch.runs);
  const float* counts = steps.data_ptr<float>();
  dispatch_dtype<true>(launch.dtype, [&](auto tag) {
    using T = decltype(tag);
    using F = MathOf<T>;
    math::Bases::dispatch(base, [&](auto base_tag) {
      using Base = decltype(base_tag);
      const bool states[kMaxStates] = {roles.state[0].present(), roles.state[1].present(), roles.state[2].present()};
      check_base_arguments<Base>(scalars.size(), device_scalars.size(), options, states);
      const int static_options = Base::canonical(static_cast<int>(options) & Base::kStaticOptions);
      math::DescentRules::dispatch(descent, [&](auto descent_tag) {
        using Descent = decltype(descent_tag);
        check_descent_roles<Descent>(roles.aux.present(), roles.gv.present());
        if (skip) {  // only the restore takes effect; every state keeps its bits
          for_each_span(spans, [&](const Span& s) {
            copy_span<T>(roles.param.at<T>(s.run), roles.src.at<T>(s.run), s.start, s.stop);
          });
          return;
        }
        const auto params = Base::template params<F>(lr, scalars.data(), device_scalars.data());
        std::vector<typename Base::template PerTensor<F>> per_tensor;
        per_tensor.reserve(launch.runs.size());
        for (const Run& r : launch.runs) per_tensor.push_back(Base::per_tensor(params, counts[r.count]));
        const bool maximize = (options & Base::kMaximize) != 0;
        const F clip_coef = st.factor<F>(kStatusClip, clip);
        const DescentScalars<F> ds{st.factor<F>(unscale, unscale != kNoUnscale), maximize ? -clip_coef : clip_coef,
                                   static_cast<F>(Descent::coef(status_sums(st))), static_cast<F>(alpha)};
        dispatch_options<Base>(static_options, [&](auto option) {
          constexpr int O = decltype(option)::value;
          for_each_span(spans, [&](const Span& s) {
            update_span<T, Base, Descent, O>(roles, s.run, s.start, s.stop, params, per_tensor[s.run], ds);
          });
        }, std::make_integer_sequence<int, Base::kStaticOptions + 1>{});
      });
    });
  });
}

// ------------------------------------------------------------------ update counts
// steps (base) and vsteps (variant) += mask unless the step is skipped; status[kStatusSkipped]
// += 1 for a skipped step when this bucket counts skips.
void advance_steps(const at::Tensor& steps, const at::Tensor& vsteps, const at::Tensor& mask,
                   const at::Tensor& status, bool base, bool variant, bool check, bool count_skip) {
  check_counts(steps, "steps", -1, kCpu);
  check_counts(vsteps, "vsteps", steps.numel(), kCpu);
  check_counts(mask, "mask", steps.numel(), kCpu);
  const HostStatus st = host_status(status);
  const bool skip = check && st.skipped();
  if (check && count_skip && skip) st.add(kStatusSkipped, 1.0);
  if (skip) return;
  const float* m = mask.data_ptr<float>();
  const auto advance = [&](const at::Tensor& counts) {
    float* c = counts.data_ptr<float>();
    for (int64_t i = 0; i < counts.numel(); ++i) c[i] += m[i];
  };
  if (base) advance(steps);
  if (variant) advance(vsteps);
}

}  // namespace cpu
}  // namespace sam_fused
