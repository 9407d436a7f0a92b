// MSAM (momentum-SAM) in the CPU library: its operations, registered into
// torch.ops.sam_fused_cpu beside the SAM ones (a fragment of the same library, so the CUDA
// library and the shared registration macro are untouched).
//
// The rules are sam_fused/msam_rules.py's (the specification; tests/test_msam.py checks this
// file against it and against a float64 re-implementation of the official code):
//   SGD:   v' = mu v + (g + wd p),          w' = w - lr v'
//   AdamW: m' = b1 m + (1 - b1) g, s' = b2 s + (1 - b2) g^2,
//          w' = (w - lr / bc1 * m' / (sqrt(s') / sqrt(bc2) + eps)) * (1 - lr wd)
//   p <- w' - c v' from the stored (rounded) w' and v', c = rho / (||v'|| + 1e-12) per group.
// `w` is the stored copy (role unperturbed_weight), or the parameter itself while the
// tensor's update count is 0. MSAM's status is its own two float64 entries on the host:
// [0] the sum of squares of v', [1] the non-finite gradient count (a skipped step moves nothing).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "sam_fused_cpu.h"

namespace sam_fused {
namespace cpu {
namespace {

constexpr int kMsamSumsq = 0;
constexpr int kMsamBad = 1;

double* msam_status(const at::Tensor& status) {
  TORCH_CHECK(status.device().is_cpu() && status.scalar_type() == at::kDouble && status.numel() == 2 &&
                  status.is_contiguous(),
              "sam_fused: MSAM's status must be a contiguous CPU float64 tensor of 2 entries");
  return status.data_ptr<double>();
}

// The update counts (float32, one per tensor of the bucket).
const float* counts_of(const at::Tensor& steps) {
  TORCH_CHECK(steps.device().is_cpu() && steps.scalar_type() == at::kFloat && steps.is_contiguous(),
              "sam_fused: steps must be a contiguous CPU float32 tensor");
  return steps.data_ptr<float>();
}

// The new first moment: SGD's v' (ADAM false) or AdamW's m' (a holds mu or b1, b holds wd or 1 - b1).
template <typename F, bool ADAM>
SAM_FUSED_INLINE F first_moment(F g, F p, F s0, F a, F b) {
  if constexpr (ADAM) {
    return a * s0 + b * g;
  } else {
    return a * s0 + (g + b * p);
  }
}

template <typename T, bool ADAM>
struct MomentSquares {
  using F = MathOf<T>;
  const Raw<T>* __restrict g_ptr;
  const Raw<T>* __restrict p_ptr;
  const Raw<T>* __restrict s0_ptr;
  F a, b;

  SAM_FUSED_INLINE void operator()(int64_t i, int l, double (&acc)[1][kLanes], int32_t (&cnt)[kLanes]) const {
    const F g = to_f<T>(g_ptr[i]);
    cnt[l] += math::nonfinite(g);
    const F p = ADAM ? F(0) : to_f<T>(p_ptr[i]);
    const double v = static_cast<double>(first_moment<F, ADAM>(g, p, to_f<T>(s0_ptr[i]), a, b));
    acc[0][l] += v * v;
  }
};

}  // namespace

void msam_stats(const at::Tensor& grad, const at::Tensor& param, const at::Tensor& s0, const at::Tensor& runs,
                const at::Tensor& like, const at::Tensor& status, bool adam, double a, double b) {
  const Launch launch = read_launch(runs, like, -1);
  const Role g_role = role_of(launch, grad, "grad");
  const Role p_role = role_of(launch, param, "param");
  const Role s0_role = role_of(launch, s0, "s0");
  double* st = msam_status(status);
  const auto slots = slots_of(launch.runs);
  std::vector<double> sums(slots.size());
  std::vector<int64_t> bads(slots.size());
  dispatch_dtype<true>(launch.dtype, [&](auto tag) {
    using T = decltype(tag);
    using F = MathOf<T>;
    dispatch_bool(adam, [&](auto is_adam) {
      constexpr bool ADAM = decltype(is_adam)::value;
      at::parallel_for(0, static_cast<int64_t>(slots.size()), 1, [&](int64_t lo, int64_t hi) {
        for (int64_t k = lo; k < hi; ++k) {
          const int64_t run = slots[k].run;
          const MomentSquares<T, ADAM> element{g_role.at<T>(run), p_role.at<T>(run), s0_role.at<T>(run),
                                               static_cast<F>(a), static_cast<F>(b)};
          double one[1];
          reduce_slot<1>(slots[k].start, slots[k].stop, element, one, bads[k]);
          sums[k] = one[0];
        }
      });
    });
  });
  for (size_t k = 0; k < slots.size(); ++k) {  // in slot order: the same bits for any thread count
    st[kMsamSumsq] += sums[k];
    st[kMsamBad] += static_cast<double>(bads[k]);
  }
}

// scalars: SGD (mu, wd, lr); AdamW (b1, 1 - b1, b2, 1 - b2, eps, lr, 1 - lr wd); `scale`: the group's c.
void msam_apply(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& s0,
                const std::optional<at::Tensor>& s1, const at::Tensor& steps, const at::Tensor& runs,
                const at::Tensor& like, const at::Tensor& status, bool adam, c10::ArrayRef<double> scalars,
                double scale) {
  const Launch launch = read_launch(runs, like, steps.numel());
  if (msam_status(status)[kMsamBad] > 0) return;  // skipped: nothing moves
  const float* counts = counts_of(steps);
  TORCH_CHECK(scalars.size() == (adam ? 7u : 3u), "sam_fused: msam_apply takes ", adam ? 7 : 3, " scalars");
  const Role p_role = role_of(launch, param, "param");
  const Role g_role = role_of(launch, grad, "grad");
  const Role w_role = role_of(launch, weight, "weight");
  const Role s0_role = role_of(launch, s0, "s0");
  const Role s1_role = role_of(launch, s1, "s1");
  TORCH_CHECK(s1_role.present() == adam, "sam_fused: msam_apply needs s1 exactly for AdamW");
  const auto spans = blocks_of(launch.runs);
  dispatch_dtype<true>(launch.dtype, [&](auto tag) {
    using T = decltype(tag);
    using F = MathOf<T>;
    const F c = static_cast<F>(scale);
    for_each_span(spans, [&](const Span& span) {
      const Run& run = launch.runs[span.run];
      Raw<T>* __restrict p = p_role.at<T>(span.run);
      const Raw<T>* __restrict g = g_role.at<T>(span.run);
      Raw<T>* __restrict w = w_role.at<T>(span.run);
      Raw<T>* __restrict v = s0_role.at<T>(span.run);
      const bool held = counts[run.count] > 0;  // else the parameter is w
      if (!adam) {
        const F mu = static_cast<F>(scalars[0]), wd = static_cast<F>(scalars[1]), lr = static_cast<F>(scalars[2]);
        for (int64_t i = span.start; i < span.stop; ++i) {
          const F pi = to_f<T>(p[i]);
          const F vi = first_moment<F, false>(to_f<T>(g[i]), pi, to_f<T>(v[i]), mu, wd);
          const F wi = held ? to_f<T>(w[i]) : pi;
          w[i] = from_f<T>(wi - lr * vi);
          v[i] = from_f<T>(vi);
          p[i] = from_f<T>(to_f<T>(w[i]) - c * to_f<T>(v[i]));
        }
        return;
      }
      Raw<T>* __restrict s = s1_role.at<T>(span.run);
      const double t = static_cast<double>(counts[run.count]) + 1.0;
      const F b1 = static_cast<F>(scalars[0]), omb1 = static_cast<F>(scalars[1]);
      const F b2 = static_cast<F>(scalars[2]), omb2 = static_cast<F>(scalars[3]), eps = static_cast<F>(scalars[4]);
      const F step_size = static_cast<F>(scalars[5] / (1.0 - std::pow(scalars[0], t)));
      const F bc2_sqrt = static_cast<F>(std::sqrt(1.0 - std::pow(scalars[2], t)));
      const F decay = static_cast<F>(scalars[6]);
      for (int64_t i = span.start; i < span.stop; ++i) {
        const F gi = to_f<T>(g[i]);
        const F pi = to_f<T>(p[i]);
        const F mi = first_moment<F, true>(gi, F(0), to_f<T>(v[i]), b1, omb1);
        const F si = b2 * to_f<T>(s[i]) + omb2 * (gi * gi);
        const F wi = held ? to_f<T>(w[i]) : pi;
        w[i] = from_f<T>((wi - step_size * (mi / (std::sqrt(si) / bc2_sqrt + eps))) * decay);
        v[i] = from_f<T>(mi);
        s[i] = from_f<T>(si);
        p[i] = from_f<T>(to_f<T>(w[i]) - c * to_f<T>(v[i]));
      }
    });
  });
  at::parallel_for(0, static_cast<int64_t>(launch.runs.size()), 1024, [&](int64_t lo, int64_t hi) {
    float* out = steps.data_ptr<float>();
    for (int64_t r = lo; r < hi; ++r) out[launch.runs[r].count] += 1.0f;
  });
}

// p <- w (restore: scale ignored) or p <- w - c v (perturb), where a w is stored.
void msam_move(const at::Tensor& param, const at::Tensor& weight, const std::optional<at::Tensor>& s0,
               const at::Tensor& steps, const at::Tensor& runs, const at::Tensor& like, double scale) {
  const Launch launch = read_launch(runs, like, steps.numel());
  const float* counts = counts_of(steps);
  const auto spans = blocks_of(launch.runs);
  const Role p_role = role_of(launch, param, "param"), w_role = role_of(launch, weight, "weight");
  const Role s0_role = role_of(launch, s0, "s0");  // absent: restore
  dispatch_dtype<true>(launch.dtype, [&](auto tag) {
    using T = decltype(tag);
    const MathOf<T> c = static_cast<MathOf<T>>(scale);
    for_each_span(spans, [&](const Span& span) {
      if (!(counts[launch.runs[span.run].count] > 0)) return;
      Raw<T>* __restrict p = p_role.at<T>(span.run);
      const Raw<T>* __restrict w = w_role.at<T>(span.run);
      if (!s0_role.present()) {
        copy_span<T>(p, w, span.start, span.stop);
        return;
      }
      const Raw<T>* __restrict v = s0_role.at<T>(span.run);
      for (int64_t i = span.start; i < span.stop; ++i) p[i] = from_f<T>(to_f<T>(w[i]) - c * to_f<T>(v[i]));
    });
  });
}

}  // namespace cpu
}  // namespace sam_fused

TORCH_LIBRARY_FRAGMENT(sam_fused_cpu, m) {
  m.def(
      "msam_stats(Tensor grad, Tensor param, Tensor s0, Tensor runs, Tensor like, Tensor(a!) status, bool adam, "
      "float a, float b) -> ()",
      &sam_fused::cpu::msam_stats);
  m.def(
      "msam_apply(Tensor(a!) param, Tensor grad, Tensor(b!) weight, Tensor(c!) s0, Tensor(d!)? s1, "
      "Tensor(e!) steps, Tensor runs, Tensor like, Tensor status, bool adam, float[] scalars, float scale) -> ()",
      &sam_fused::cpu::msam_apply);
  m.def(
      "msam_move(Tensor(a!) param, Tensor weight, Tensor? s0, Tensor steps, Tensor runs, Tensor like, "
      "float scale) -> ()",
      &sam_fused::cpu::msam_move);
}
