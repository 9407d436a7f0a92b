// The CPU library's ascent half: the first pass's statistics (`stats`), the perturbation
// (`perturb`) and the copies that undo it (`copy`: restores, reverted running state).
//
// Every loop is generic over the variant's ascent rule (sam_fused_math.h's AscentRules): the
// rule number Python passes picks the functor once per launch, and the loop instantiated for
// it vectorises with the rule's math inlined.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include "sam_fused_cpu.h"

namespace sam_fused {
namespace cpu {
namespace {

// The first tensor update of the variant's running state: its vsteps count is 0 (read only
// for a rule that reads aux: the others need no per-tensor vector).
inline std::vector<char> first_updates(const Launch& launch, const at::Tensor& vsteps, bool wanted) {
  check_counts(vsteps, "vsteps", -1, kCpu);
  const float* counts = vsteps.data_ptr<float>();
  std::vector<char> first(wanted ? launch.runs.size() : 0);
  if (!wanted) return first;
  for (size_t r = 0; r < launch.runs.size(); ++r) {
    TORCH_CHECK(launch.runs[r].count < vsteps.numel(), "sam_fused: run ", r, " names update count ",
                launch.runs[r].count, " of ", vsteps.numel());
    first[r] = counts[launch.runs[r].count] == 0.0f;
  }
  return first;
}

// ------------------------------------------------------------------ first-pass statistics
// One element of the first pass: the non-finite count of the raw gradient, and u^2 (u = T v,
// v the rule's direction of the unscaled gradient) into a double lane.
template <typename T, typename Rule, bool ADAPTIVE>
struct AscentElement {
  using F = MathOf<T>;
  const Raw<T>* __restrict g;
  const Raw<T>* __restrict w;
  const Raw<T>* __restrict aux;
  F inv_scale, eta, c1, c2;
  bool first;

  SAM_FUSED_INLINE void operator()(int64_t i, int l, double (&acc)[1][kLanes], int32_t (&cnt)[kLanes]) const {
    const F raw = to_f<T>(g[i]);
    cnt[l] += math::nonfinite(raw);
    F state = 0;
    const F v = Rule::direction(raw * inv_scale, Rule::kReadsAux ? to_f<T>(aux[i]) : F(0), first, c1, c2, state);
    const double u = static_cast<double>(math::ascent_t(ADAPTIVE ? to_f<T>(w[i]) : F(0), eta, ADAPTIVE) * v);
    acc[0][l] += u * u;
  }
};

}  // namespace

// ascent_stats, and LookSAM's ||g_v||^2 (grad: a state, rule GRAD, no status): per slot, the
// sum of u^2 into partials[0] and the non-finite count into partials[1].
void stats(const at::Tensor& grad, const OptionalTensor& param, const OptionalTensor& aux, const at::Tensor& vsteps,
           const at::Tensor& runs, const at::Tensor& like, const at::Tensor& partials, const OptionalTensor& status,
           int64_t rule, int64_t unscale, double eta, double c1, double c2) {
  const Launch launch = read_launch(runs, like, -1);
  const Role g_role = role_of(launch, grad, "grad");
  const Role w_role = role_of(launch, param, "param");  // given: the adaptive norm (ASAM)
  const Role a_role = role_of(launch, aux, "aux");
  check_unscale(unscale);
  TORCH_CHECK(unscale == kNoUnscale || status.has_value(), "sam_fused: unscaling reads status; pass it");
  check_number<math::AscentRules>(rule, "ascent rule");
  check_counts(vsteps, "vsteps", -1, kCpu);
  const double inv_scale = unscale == kNoUnscale ? 1.0 : host_status(*status).at(static_cast<int>(unscale));
  const int rows[2] = {1, 0};  // (bad, sumsq)
  dispatch_dtype<true>(launch.dtype, [&](auto tag) {
    using T = decltype(tag);
    using F = MathOf<T>;
    math::AscentRules::dispatch(rule, [&](auto rule_tag) {
      using Rule = decltype(rule_tag);
      check_ascent_aux<Rule>(a_role.present());
      const auto first = first_updates(launch, vsteps, Rule::kReadsAux);
      dispatch_bool(w_role.present(), [&](auto adaptive) {
        constexpr bool A = decltype(adaptive)::value;
        reduce_slots<1>(launch, partials, rows, [&](int64_t run) {
          return AscentElement<T, Rule, A>{g_role.at<T>(run), w_role.at<T>(run),  a_role.at<T>(run),
                                           static_cast<F>(inv_scale), static_cast<F>(eta), static_cast<F>(c1),
                                           static_cast<F>(c2),     Rule::kReadsAux && first[run] != 0};
        });
      });
    });
  });
}

// ------------------------------------------------------------------ perturbation
namespace {

// What one perturbation writes besides w: the backup (absent for RSAM, whose backup is the
// noise's), the kept first gradient (GSAM, LookSAM), and the running state's old value.
struct PerturbRoles {
  Role param, src, grad, backup, aux, keep, prev;
};

// backup <- w (unless kFromBackup); keep <- g, unscaled (KEEP); prev <- aux and aux <- its new
// value (kUpdatesState); w <- src + eps. SKIP: the step is skipped: w and aux keep their bits,
// the rest is written.
template <typename T, typename Rule, bool ADAPTIVE, bool KEEP, bool SKIP>
void perturb_span(const PerturbRoles& roles, int64_t run, int64_t start, int64_t stop, MathOf<T> scale,
                  MathOf<T> eta, MathOf<T> inv_scale, MathOf<T> c1, MathOf<T> c2, bool first) {
  using F = MathOf<T>;
  Raw<T>* w = roles.param.at<T>(run);
  const Raw<T>* src = roles.src.at<T>(run);  // w itself (so no __restrict), or RSAM's backup
  const Raw<T>* __restrict g = roles.grad.at<T>(run);
  Raw<T>* __restrict backup = roles.backup.at<T>(run);
  Raw<T>* __restrict aux = roles.aux.at<T>(run);
  Raw<T>* __restrict keep = roles.keep.at<T>(run);
  Raw<T>* __restrict prev = roles.prev.at<T>(run);
#pragma omp simd
  for (int64_t i = start; i < stop; ++i) {
    const Raw<T> w_raw = src[i];
    const F gu = to_f<T>(g[i]) * inv_scale;
    if constexpr (!Rule::kFromBackup) backup[i] = w_raw;
    if constexpr (KEEP) keep[i] = from_f<T>(gu);
    Raw<T> a_raw{};
    if constexpr (Rule::kReadsAux) a_raw = aux[i];
    F state = 0;
    const F v = Rule::direction(gu, to_f<T>(a_raw), first, c1, c2, state);
    if constexpr (Rule::kUpdatesState) {
      prev[i] = a_raw;
      if constexpr (!SKIP) aux[i] = from_f<T>(state);
    }
    if constexpr (!SKIP) w[i] = from_f<T>(math::perturbed(to_f<T>(w_raw), v, scale, eta, ADAPTIVE));
  }
}

}  // namespace

void perturb(const at::Tensor& param, const at::Tensor& src, const at::Tensor& grad, const OptionalTensor& backup,
             const OptionalTensor& aux, const OptionalTensor& keep, const OptionalTensor& prev,
             const at::Tensor& vsteps, const at::Tensor& status, const at::Tensor& runs, const at::Tensor& like,
             int64_t rule, double rho, double eta, double norm_eps, double c1, double c2, int64_t unscale,
             bool adaptive, bool normalized, bool check) {
  const Launch launch = read_launch(runs, like, -1);
  const PerturbRoles roles{role_of(launch, param, "param"), role_of(launch, src, "src"),
                           role_of(launch, grad, "grad"),   role_of(launch, backup, "backup"),
                           role_of(launch, aux, "aux"),     role_of(launch, keep, "keep"),
                           role_of(launch, prev, "prev")};
  const HostStatus st = host_status(status);
  check_unscale(unscale);
  check_number<math::AscentRules>(rule, "ascent rule");
  check_counts(vsteps, "vsteps", -1, kCpu);
  const bool skip = check && st.at(kStatusBad1) > 0;
  const auto spans = blocks_of(launch.runs);
  dispatch_dtype<true>(launch.dtype, [&](auto tag) {
    using T = decltype(tag);
    using F = MathOf<T>;
    const F scale = math::perturb_scale<F>(rho, st.at(kStatusSumsq), norm_eps, normalized);
    const F inv_scale = st.factor<F>(unscale, unscale != kNoUnscale);
    math::AscentRules::dispatch(rule, [&](auto rule_tag) {
      using Rule = decltype(rule_tag);
      check_ascent_roles<Rule>(roles.aux.present(), roles.prev.present(), roles.backup.present());
      const auto first = first_updates(launch, vsteps, Rule::kReadsAux);
      dispatch_bool(adaptive, [&](auto adaptive_tag) {
        dispatch_bool(roles.keep.present(), [&](auto keep_tag) {
          dispatch_bool(skip, [&](auto skip_tag) {
            for_each_span(spans, [&](const Span& s) {
              perturb_span<T, Rule, decltype(adaptive_tag)::value, decltype(keep_tag)::value,
                           decltype(skip_tag)::value>(roles, s.run, s.start, s.stop, scale, static_cast<F>(eta),
                                                      inv_scale, static_cast<F>(c1), static_cast<F>(c2),
                                                      Rule::kReadsAux && first[s.run] != 0);
            });
          });
        });
      });
    });
  });
}

// ------------------------------------------------------------------ centralization
namespace {

// One element of a row's sum (no non-finite count: the statistics count those).
template <typename T>
struct RowElement {
  const Raw<T>* __restrict g;

  SAM_FUSED_INLINE void operator()(int64_t i, int l, double (&acc)[1][kLanes], int32_t (&)[kLanes]) const {
    acc[0][l] += static_cast<double>(to_f<T>(g[i]));
  }
};

}  // namespace

// GCSAM: every row (all dimensions of a gradient but the first) loses its mean, in place; the
// mean is summed in double in a fixed order, subtracted in the math type. Rows go to the
// thread pool one by one.
void centralize(const at::Tensor& rows, const at::Tensor& lengths, const at::Tensor& like) {
  check_rows(rows, lengths, kCpu);
  const int64_t* starts = rows.data_ptr<int64_t>();
  const int32_t* lens = lengths.data_ptr<int32_t>();
  dispatch_dtype<true>(like.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using F = MathOf<T>;
    at::parallel_for(0, rows.numel(), 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        Raw<T>* g = reinterpret_cast<Raw<T>*>(static_cast<uintptr_t>(starts[r]));
        const int64_t n = lens[r];
        if (n <= 0) continue;
        double sum[1];
        int64_t unused = 0;
        reduce_slot<1>(0, n, RowElement<T>{g}, sum, unused);
        const F mean = static_cast<F>(sum[0] / static_cast<double>(n));
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) g[i] = from_f<T>(to_f<T>(g[i]) - mean);
      }
    });
  });
}

// dst <- src, an exact copy (restores; with `if_skipped`, a running state's revert, only when
// that status says the step is skipped).
void copy(const at::Tensor& dst, const at::Tensor& src, const at::Tensor& runs, const at::Tensor& like,
          const OptionalTensor& if_skipped) {
  const Launch launch = read_launch(runs, like, -1);
  const Role d_role = role_of(launch, dst, "dst");
  const Role s_role = role_of(launch, src, "src");
  if (if_skipped.has_value() && !host_status(*if_skipped).skipped()) return;
  const auto spans = blocks_of(launch.runs);
  dispatch_dtype<true>(launch.dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_span(spans, [&](const Span& s) { copy_span<T>(d_role.at<T>(s.run), s_role.at<T>(s.run), s.start, s.stop); });
  });
}

}  // namespace cpu
}  // namespace sam_fused
