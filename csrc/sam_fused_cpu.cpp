// The C++ CPU backend of sam_fused: the fused SAM operations over flat buffers, or over
// tables of tensor addresses (table buckets: FSDP2 shards, shared-memory parameters and
// others that stay where they are). The loops are the same for both; see "layouts" below.
//
// The same operations as the Triton kernels (sam_fused/kernels/*.py), written as plain
// loops over raw pointers that GCC vectorises at -O3, spread over ATen's intra-op thread
// pool (OpenMP in torch's CPU builds) in fixed-size blocks. Storage is float32, bfloat16
// or float16; all math is float32, with Adam's bias corrections in double as PyTorch
// computes them. Elementwise results do not depend on how blocks are split over threads;
// the norm statistics are reduced per slot in a fixed order (see sam_fused_common.h), so
// they are bitwise reproducible for any OMP_NUM_THREADS.
//
// Skipping non-finite steps: status lives in host memory here, so each operation reads
// the skip decision once and takes the "unchanged" path (a copy, or nothing) as a whole;
// the stored bits are the same as the Triton kernels' per-element tl.where. GradScaler's
// 1 / scale and the clipping coefficient are read from it the same way, once per call,
// and multiply each gradient in float32 as it is loaded (sam_fused_math.h).
//
// The element math itself is sam_fused_math.h's, shared with the CUDA kernels; this file
// holds the loops around it and the conversions between storage and float32.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <Python.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "sam_fused_common.h"
#include "sam_fused_math.h"

namespace sam_fused {
namespace {

// Elements per unit of parallel work for the elementwise operations: large enough that
// the thread hand-off is noise, small enough that two cores split even small buckets.
constexpr int64_t kBlock = 32768;
// Lanes of the norm accumulator: 16 independent float sums per sub-block, added in a fixed
// tree, so the vectoriser can keep them in registers without reassociating anything.
constexpr int kLanes = 16;
constexpr int64_t kSub = 2048;

inline uint32_t bits_of(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

inline float float_of(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// cond ? a : b as mask arithmetic: GCC vectorises this where it gives up on some
// chains of ?: (the float16 conversions below).
inline uint32_t pick(bool cond, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return (a & mask) | (b & ~mask);
}

// The kernels see storage as plain scalars: float, or the uint16_t bits of a bfloat16 or
// float16 value. Loops over plain scalars vectorise; loops over c10's wrapper structs
// (copied into privatised temporaries under `omp simd`) do not.
template <typename K>
using Raw = std::conditional_t<std::is_same_v<K, float>, float, uint16_t>;

// Storage -> float32 (exact), by hand as branch-free integer arithmetic so that the loops
// around it vectorise for the baseline ISA (c10's conversions have branches, or need
// F16C, which a portable build cannot assume). Bitwise the same as c10's conversions
// (checked on every one of the 2^16 float16 and bfloat16 inputs).
template <typename K>
inline float to_f(Raw<K> x) {
  if constexpr (std::is_same_v<K, float>) {
    return x;
  } else if constexpr (std::is_same_v<K, at::BFloat16>) {
    return float_of(static_cast<uint32_t>(x) << 16);  // the upper half of a float
  } else {
    const uint32_t h = x;
    const uint32_t sign = (h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1Fu;
    const uint32_t man = h & 0x3FFu;
    // normal: rebias the exponent from 15 to 127; inf/NaN: all-ones exponent
    const uint32_t normal = ((exp + 112u) << 23) | (man << 13);
    const uint32_t special = 0x7F800000u | (man << 13) | pick(man != 0, 0x400000u, 0u);  // NaNs quiet
    // zero and subnormals: man * 2^-24, exact in float
    const uint32_t small = bits_of(static_cast<float>(static_cast<int32_t>(man)) * 0x1p-24f);
    const uint32_t magnitude = pick(exp == 0, small, pick(exp == 31, special, normal));
    return float_of(sign | magnitude);
  }
}

// float32 -> storage, rounding to nearest even as torch's .to() does; branch-free as above
// and bitwise the same as c10 (bfloat16 NaN -> 0x7FC0, float16 NaN -> sign | 0x7E00;
// checked on all 2^32 float32 inputs).
template <typename K>
inline Raw<K> from_f(float x) {
  if constexpr (std::is_same_v<K, float>) {
    return x;
  } else if constexpr (std::is_same_v<K, at::BFloat16>) {
    const uint32_t bits = bits_of(x);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(pick(x != x, 0x7FC0u, rounded));
  } else {
    const uint32_t bits = bits_of(x);
    const uint32_t sign = (bits >> 16) & 0x8000u;
    const uint32_t mag = bits & 0x7FFFFFFFu;
    // normal half range (>= 2^-14): rebias the exponent, round the 13 dropped bits to
    // nearest even; a carry out of the mantissa correctly bumps the exponent
    const uint32_t rebased = mag - 0x38000000u;
    const uint32_t normal = (rebased + 0xFFFu + ((rebased >> 13) & 1u)) >> 13;
    // below 2^-14: |x| * 2^24 (exact) rounded to an integer by adding 2^23, whose float
    // addition rounds to nearest even; the integer is the subnormal's bits (1024 = 2^-14)
    const uint32_t small = bits_of(float_of(mag) * 0x1p24f + 0x1p23f) - 0x4B000000u;
    uint32_t out = pick(mag < 0x38800000u, small, normal);
    out = pick(mag >= 0x477FF000u, 0x7C00u, out);  // rounds to 65536 or above: infinity
    out = pick(mag > 0x7F800000u, 0x7E00u, out);   // NaN
    return static_cast<uint16_t>(sign | out);
  }
}

struct Span {
  int64_t start;
  int64_t stop;
  int64_t run;
};

// Cuts every run into blocks of kBlock elements: the unit the thread pool distributes.
std::vector<Span> blocks_of(const std::vector<RunSpan>& runs) {
  std::vector<Span> spans;
  for (size_t r = 0; r < runs.size(); ++r) {
    for (int64_t s = runs[r].start; s < runs[r].stop; s += kBlock) {
      spans.push_back({s, std::min(s + kBlock, runs[r].stop), static_cast<int64_t>(r)});
    }
  }
  return spans;
}

template <typename F>
void for_each_span(const std::vector<Span>& spans, const F& body) {
  at::parallel_for(0, static_cast<int64_t>(spans.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) body(spans[i]);
  });
}

// ------------------------------------------------------------------ layouts
// Every run has its own base pointer per role (param, grad, backup, a state buffer), and
// the loops index base + i for i in [start, stop). A flat bucket passes each role as its
// flat buffer: every run's base is the buffer's, start and stop are offsets into it. A
// table bucket (sam_fused/tables.py: tensors left where they are) passes each role as an
// int64 table of addresses, one entry per run: run r is tensor r, from 0 to its length.
// So the two layouts share the loops, the element math and the slot reductions, and a
// flat launch reads exactly the pointers it read before tables existed.
const at::Device kCpu(at::kCPU);

struct Layout {
  std::vector<RunSpan> runs;
  bool table;            // the roles are address tables, not flat buffers
  at::ScalarType dtype;  // the element type: an address table cannot say it, so `like` does
  int64_t numel;         // flat: the elements every buffer must hold
};

// `first_role` is any role argument: an int64 one makes the launch a table launch (the
// element types these kernels take are floating point).
Layout read_layout(const at::Tensor& first_role, const at::Tensor& like, const at::Tensor& runs_t,
                   int64_t num_params) {
  TORCH_CHECK(first_role.device().is_cpu() && like.device().is_cpu(), "sam_fused cpp backend: CPU tensors only");
  const bool table = first_role.scalar_type() == at::kLong;
  // a table run's length is its tensor's, which only the caller knows: no bound to check here
  const int64_t bound = table ? std::numeric_limits<int64_t>::max() : first_role.numel();
  return {read_runs(runs_t, bound, num_params), table, like.scalar_type(), first_role.numel()};
}

// Where one role's elements are: a flat buffer's base, or one address per run.
struct Role {
  void* flat = nullptr;
  const int64_t* addresses = nullptr;

  template <typename T>
  Raw<T>* ptr(int64_t run) const {
    void* base = addresses != nullptr ? reinterpret_cast<void*>(static_cast<uintptr_t>(addresses[run])) : flat;
    return static_cast<Raw<T>*>(base);
  }
};

Role role_of(const Layout& layout, const at::Tensor& t, const char* name) {
  if (!layout.table) {
    check_flat(t, name, layout.dtype, layout.numel, kCpu);
    return {t.data_ptr(), nullptr};
  }
  const auto runs = static_cast<int64_t>(layout.runs.size());
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous() &&
                  t.numel() == runs,
              "sam_fused: in a table launch, ", name, " must be a contiguous CPU int64 table of ", runs,
              " addresses (one per run)");
  return {nullptr, t.data_ptr<int64_t>()};
}

// An optional role (a state buffer that the update does not use): absent, or as above.
Role role_of(const Layout& layout, const c10::optional<at::Tensor>& t, const char* name) {
  return t.has_value() ? role_of(layout, *t, name) : Role{};
}

double status_at(const at::Tensor& status, int64_t i) {
  if (status.scalar_type() == at::kDouble) return status.data_ptr<double>()[i];
  return status.data_ptr<float>()[i];
}

// The float32 factor in status[index] (the reference's status[index].to(float32)), or 1
// when the operation is not asked to apply it.
float factor_at(const at::Tensor& status, int64_t index, bool wanted) {
  return wanted ? static_cast<float>(status_at(status, index)) : 1.0f;
}

bool skipped(const at::Tensor& status) {
  return status_at(status, kStatusBad1) + status_at(status, kStatusBad2) > 0;
}

void status_add(const at::Tensor& status, int64_t i, double value) {
  if (status.scalar_type() == at::kDouble) {
    status.data_ptr<double>()[i] += value;
  } else {
    status.data_ptr<float>()[i] += static_cast<float>(value);
  }
}

void write_partial(const at::Tensor& out, int64_t i, double value) {
  if (out.scalar_type() == at::kDouble) {
    out.data_ptr<double>()[i] = value;
  } else {
    out.data_ptr<float>()[i] = static_cast<float>(value);
  }
}

template <typename T>
void copy_span(T* dst, const T* src, int64_t start, int64_t stop) {
  if (dst != src) std::memcpy(dst + start, src + start, sizeof(T) * (stop - start));
}

// ------------------------------------------------------------------ norm statistics
// One element of a slot: the non-finite count of the raw gradient, and u^2 of the unscaled
// one (u = g, or (|w| + eta) * g when adaptive) into lane l.
template <typename T, bool ADAPTIVE, bool WANT_SUMSQ>
SAM_FUSED_INLINE void stats_element(const Raw<T>* __restrict g, const Raw<T>* __restrict w, int64_t i, float eta,
                                    float inv_scale, float& acc, int32_t& cnt) {
  const float gv = to_f<T>(g[i]);
  cnt += math::nonfinite(gv);
  if constexpr (WANT_SUMSQ) {
    const float u = math::ascent_u(math::unscaled(gv, inv_scale), ADAPTIVE ? to_f<T>(w[i]) : 0.0f, eta, ADAPTIVE);
    acc += u * u;
  }
}

// One slot: the sum of u^2 over [start, stop) and the number of non-finite gradient
// entries. Float lanes within a sub-block, float-to-double between sub-blocks; the order is
// fixed by the code alone.
template <typename T, bool ADAPTIVE, bool WANT_SUMSQ>
void stats_slot(const Raw<T>* __restrict g, const Raw<T>* __restrict w, int64_t start, int64_t stop, float eta,
                float inv_scale, double* sumsq, double* bad) {
  double total = 0.0;
  int64_t bad_total = 0;
  for (int64_t s = start; s < stop; s += kSub) {
    const int64_t e = std::min(s + kSub, stop);
    float acc[kLanes] = {};
    int32_t cnt[kLanes] = {};
    int64_t i = s;
    for (; i + kLanes <= e; i += kLanes) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        stats_element<T, ADAPTIVE, WANT_SUMSQ>(g, w, i + l, eta, inv_scale, acc[l], cnt[l]);
      }
    }
    for (int l = 0; i < e; ++i, ++l) {  // tail (runs are multiples of 16: normally empty)
      stats_element<T, ADAPTIVE, WANT_SUMSQ>(g, w, i, eta, inv_scale, acc[l], cnt[l]);
    }
    for (int width = kLanes / 2; width > 0; width /= 2) {
      for (int l = 0; l < width; ++l) {
        acc[l] += acc[l + width];
        cnt[l] += cnt[l + width];
      }
    }
    total += static_cast<double>(acc[0]);
    bad_total += cnt[0];
  }
  *sumsq = total;
  *bad = static_cast<double>(bad_total);
}

// ascent_stats (want_sumsq) and count_nonfinite (not): one partial per slot. unscale: the
// status entry whose 1 / scale multiplies the gradients before they are squared, or -1.
void stats(const at::Tensor& grad, const at::Tensor& param, const at::Tensor& runs_t, const at::Tensor& like,
           const c10::optional<at::Tensor>& sumsq, const at::Tensor& bad, const at::Tensor& status, int64_t unscale,
           bool adaptive, double eta) {
  const Layout layout = read_layout(grad, like, runs_t, -1);
  const auto& runs = layout.runs;
  const Role g_role = role_of(layout, grad, "grad");
  const Role w_role = role_of(layout, param, "param");
  const auto device = kCpu;
  check_status(status, device);
  check_unscale(unscale);
  const float inv_scale = factor_at(status, unscale, unscale != kNoUnscale);
  // the slots of every run, in order: (slot begin, slot end, run); a table run is one tensor,
  // so its slots are a function of that tensor's length alone
  std::vector<Span> slots;
  for (size_t r = 0; r < runs.size(); ++r) {
    const int64_t n = runs[r].stop - runs[r].start;
    const int64_t count = stats_slots(n, kCpuStatsChunk, kCpuMaxSlots);
    // a slot spans a multiple of kLanes elements, so slot boundaries do not depend on
    // anything but n; trailing slots may be empty and then write zeros
    int64_t per = (n + count - 1) / count;
    per = (per + kLanes - 1) / kLanes * kLanes;
    for (int64_t k = 0; k < count; ++k) {
      const int64_t a = std::min(runs[r].start + k * per, runs[r].stop);
      const int64_t b = std::min(a + per, runs[r].stop);
      slots.push_back({a, b, static_cast<int64_t>(r)});
    }
  }
  const int64_t total = static_cast<int64_t>(slots.size());
  check_partials(bad, "bad", total, device);
  if (sumsq.has_value()) check_partials(*sumsq, "sumsq", total, device);
  const bool want = sumsq.has_value();
  dispatch_dtype(layout.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_bool(want && adaptive, [&](auto A) {
      dispatch_bool(want, [&](auto W) {
        at::parallel_for(0, total, 1, [&](int64_t b, int64_t e) {
          for (int64_t k = b; k < e; ++k) {
            double s = 0.0, nb = 0.0;
            const int64_t run = slots[k].run;
            stats_slot<T, decltype(A)::value, decltype(W)::value>(g_role.ptr<T>(run), w_role.ptr<T>(run),
                                                                  slots[k].start, slots[k].stop,
                                                                  static_cast<float>(eta), inv_scale, &s, &nb);
            if (want) write_partial(*sumsq, k, s);
            write_partial(bad, k, nb);
          }
        });
      });
    });
  });
}

// ------------------------------------------------------------------ perturbation
template <typename T, bool ADAPTIVE>
void perturb_span(Raw<T>* __restrict w, const Raw<T>* __restrict g, Raw<T>* __restrict backup, int64_t start,
                  int64_t stop, float scale, float eta, float inv_scale) {
#pragma omp simd
  for (int64_t i = start; i < stop; ++i) {
    const Raw<T> raw = w[i];
    backup[i] = raw;
    // the variant's direction: the gradient (kernel_id 0)
    const float u = math::unscaled(to_f<T>(g[i]), inv_scale);
    w[i] = from_f<T>(math::perturb(to_f<T>(raw), u, scale, eta, ADAPTIVE));
  }
}

// backup = w (always); w <- w + eps unless a non-finite first gradient skips the step.
void perturb(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& backup,
             const at::Tensor& status, const at::Tensor& runs_t, const at::Tensor& like, double rho, double eta,
             double norm_eps, int64_t unscale, bool adaptive, bool normalized, bool check) {
  const Layout layout = read_layout(param, like, runs_t, -1);
  const Role w_role = role_of(layout, param, "param");
  const Role g_role = role_of(layout, grad, "grad");
  const Role b_role = role_of(layout, backup, "backup");
  check_status(status, kCpu);
  check_unscale(unscale);
  const bool skip = check && status_at(status, kStatusBad1) > 0;
  // as the Triton kernel: the norm in float32, then one scale per step
  const float scale = math::perturb_scale(static_cast<float>(rho), static_cast<float>(status_at(status, kStatusSumsq)),
                                          static_cast<float>(norm_eps), normalized);
  const float inv_scale = factor_at(status, unscale, unscale != kNoUnscale);
  const auto spans = blocks_of(layout.runs);
  dispatch_dtype(layout.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (skip) {
      for_each_span(spans, [&](const Span& s) { copy_span(b_role.ptr<T>(s.run), w_role.ptr<T>(s.run), s.start, s.stop); });
      return;
    }
    dispatch_bool(adaptive, [&](auto A) {
      for_each_span(spans, [&](const Span& s) {
        perturb_span<T, decltype(A)::value>(w_role.ptr<T>(s.run), g_role.ptr<T>(s.run), b_role.ptr<T>(s.run), s.start,
                                            s.stop, scale, static_cast<float>(eta), inv_scale);
      });
    });
  });
}

// w <- backup, an exact copy.
void restore(const at::Tensor& param, const at::Tensor& backup, const at::Tensor& runs_t, const at::Tensor& like) {
  const Layout layout = read_layout(param, like, runs_t, -1);
  const Role w_role = role_of(layout, param, "param");
  const Role b_role = role_of(layout, backup, "backup");
  const auto spans = blocks_of(layout.runs);
  dispatch_dtype(layout.dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_span(spans, [&](const Span& s) { copy_span(w_role.ptr<T>(s.run), b_role.ptr<T>(s.run), s.start, s.stop); });
  });
}

// ------------------------------------------------------------------ SGD
// torch.optim.SGD with the restore fused in: w is read from src (the backup, or the
// parameters when they were restored separately) and written to param.
template <typename T, bool WD, bool MOMENTUM, bool NESTEROV>
void sgd_span(const Raw<T>* src, Raw<T>* param, const Raw<T>* __restrict g, Raw<T>* __restrict buf, int64_t start,
              int64_t stop, const math::SgdScalars& hyper, float inv_scale, float clip, bool maximize, bool first) {
  // a local copy: stores through param and buf (float pointers for float32 storage) could
  // alias the caller's, which would make the loop reload them on every element
  const math::SgdScalars s = hyper;
#pragma omp simd
  for (int64_t i = start; i < stop; ++i) {
    float b = MOMENTUM ? to_f<T>(buf[i]) : 0.0f;
    const float d = math::descent_grad(to_f<T>(g[i]), inv_scale, clip);
    const float w = math::sgd(to_f<T>(src[i]), d, b, first, s, WD, MOMENTUM, NESTEROV, maximize);
    if constexpr (MOMENTUM) buf[i] = from_f<T>(b);
    param[i] = from_f<T>(w);
  }
}

// The roles of a fused update: the weights it reads (src) and writes (param), the gradient,
// and up to three state buffers in the order the entry point names them (absent: empty).
struct UpdateRoles {
  Role src, param, grad;
  std::array<Role, 3> state;
};

// What the SGD and Adam entry points share: the checks, the skip decision, the gradient
// factors, and one restore-only pass when the step is skipped. Calls update(T tag, runs,
// spans, roles, inv_scale, clip) otherwise.
template <typename F>
void run_update(const at::Tensor& src, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& steps,
                const at::Tensor& status, const at::Tensor& runs_t, const at::Tensor& like,
                std::initializer_list<std::pair<const char*, const c10::optional<at::Tensor>*>> state,
                int64_t unscale, bool clip, bool check, const F& update) {
  check_steps(steps, kCpu);
  const Layout layout = read_layout(param, like, runs_t, steps.numel());
  UpdateRoles roles{role_of(layout, src, "src"), role_of(layout, param, "param"), role_of(layout, grad, "grad"), {}};
  TORCH_INTERNAL_ASSERT(state.size() <= roles.state.size());
  size_t k = 0;
  for (const auto& [name, tensor] : state) roles.state[k++] = role_of(layout, *tensor, name);
  check_status(status, kCpu);
  check_unscale(unscale);
  const auto spans = blocks_of(layout.runs);
  const bool skip = check && skipped(status);
  const float inv_scale = factor_at(status, unscale, unscale != kNoUnscale);
  const float clip_coef = factor_at(status, kStatusClip, clip);
  dispatch_dtype(layout.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (skip) {  // only the restore takes effect; the state keeps its bits
      for_each_span(spans, [&](const Span& sp) {
        copy_span(roles.param.ptr<T>(sp.run), roles.src.ptr<T>(sp.run), sp.start, sp.stop);
      });
      return;
    }
    update(tag, layout.runs, spans, roles, inv_scale, clip_coef);
  });
}

void sgd(const at::Tensor& src, const at::Tensor& param, const at::Tensor& grad,
         const c10::optional<at::Tensor>& buf, const at::Tensor& steps, const at::Tensor& status,
         const at::Tensor& runs_t, const at::Tensor& like, double lr, double momentum, double one_minus_dampening,
         double weight_decay, bool nesterov, bool maximize, int64_t unscale, bool clip, bool check) {
  const bool has_momentum = buf.has_value();
  const math::SgdScalars hyper = math::sgd_scalars(lr, momentum, one_minus_dampening, weight_decay);
  run_update(src, param, grad, steps, status, runs_t, like, {{"momentum_buffer", &buf}}, unscale, clip, check,
             [&](auto tag, const auto& runs, const auto& spans, const UpdateRoles& r, float inv_scale,
                 float clip_coef) {
               using T = decltype(tag);
               const float* step_counts = steps.data_ptr<float>();
               dispatch_bool(weight_decay != 0, [&](auto WD) {
                 dispatch_bool(has_momentum, [&](auto M) {
                   dispatch_bool(nesterov && has_momentum, [&](auto NEST) {
                     for_each_span(spans, [&](const Span& sp) {
                       const bool first = step_counts[runs[sp.run].first] == 0.0f;
                       sgd_span<T, decltype(WD)::value, decltype(M)::value, decltype(NEST)::value>(
                           r.src.ptr<T>(sp.run), r.param.ptr<T>(sp.run), r.grad.ptr<T>(sp.run),
                           r.state[0].ptr<T>(sp.run), sp.start, sp.stop, hyper, inv_scale, clip_coef, maximize,
                           first);
                     });
                   });
                 });
               });
             });
}

// ------------------------------------------------------------------ Adam / AdamW
template <typename T, int DECAY, bool AMSGRAD, bool SMALL_WEIGHT>
void adam_span(const Raw<T>* src, Raw<T>* param, const Raw<T>* __restrict g, Raw<T>* __restrict m_ptr,
               Raw<T>* __restrict v_ptr, Raw<T>* __restrict vmax_ptr, int64_t start, int64_t stop,
               const math::AdamScalars& hyper, float inv_scale, float clip, bool maximize) {
  const math::AdamScalars s = hyper;  // a local copy, as sgd_span's
#pragma omp simd
  for (int64_t i = start; i < stop; ++i) {
    float m = to_f<T>(m_ptr[i]);
    float v = to_f<T>(v_ptr[i]);
    float vmax = AMSGRAD ? to_f<T>(vmax_ptr[i]) : 0.0f;
    const float d = math::descent_grad(to_f<T>(g[i]), inv_scale, clip);
    const float w = math::adam(to_f<T>(src[i]), d, m, v, vmax, s, DECAY, AMSGRAD, SMALL_WEIGHT, maximize);
    if constexpr (AMSGRAD) vmax_ptr[i] = from_f<T>(vmax);
    m_ptr[i] = from_f<T>(m);
    v_ptr[i] = from_f<T>(v);
    param[i] = from_f<T>(w);
  }
}

void adam(const at::Tensor& src, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
          const at::Tensor& exp_avg_sq, const c10::optional<at::Tensor>& max_exp_avg_sq,
          const at::Tensor& steps, const at::Tensor& status, const at::Tensor& runs_t, const at::Tensor& like,
          double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled, bool maximize,
          int64_t unscale, bool clip, bool check) {
  const bool amsgrad = max_exp_avg_sq.has_value();
  const math::AdamScalars hyper = math::adam_scalars(lr, beta1, beta2, eps, weight_decay);
  const int decay = math::adam_decay(weight_decay, decoupled);
  const c10::optional<at::Tensor> m_opt = exp_avg, v_opt = exp_avg_sq;
  run_update(
      src, param, grad, steps, status, runs_t, like,
      {{"exp_avg", &m_opt}, {"exp_avg_sq", &v_opt}, {"max_exp_avg_sq", &max_exp_avg_sq}}, unscale, clip, check,
      [&](auto tag, const auto& runs, const auto& spans, const UpdateRoles& r, float inv_scale, float clip_coef) {
        using T = decltype(tag);
        // per-run bias corrections, from each run's step count
        const float* step_counts = steps.data_ptr<float>();
        std::vector<math::AdamScalars> per_run(runs.size(), hyper);
        for (size_t r = 0; r < runs.size(); ++r) {
          math::adam_bias_corrections(step_counts[runs[r].first], lr, beta1, beta2, per_run[r].step_size,
                                      per_run[r].bc2_sqrt);
        }
        auto run_all = [&](auto decay_tag) {
          constexpr int D = decltype(decay_tag)::value;
          dispatch_bool(amsgrad, [&](auto AMS) {
            dispatch_bool(math::lerp_weight_is_small(hyper.weight), [&](auto SMALL) {
              for_each_span(spans, [&](const Span& sp) {
                const int64_t run = sp.run;
                adam_span<T, D, decltype(AMS)::value, decltype(SMALL)::value>(
                    r.src.ptr<T>(run), r.param.ptr<T>(run), r.grad.ptr<T>(run), r.state[0].ptr<T>(run),
                    r.state[1].ptr<T>(run), r.state[2].ptr<T>(run), sp.start, sp.stop, per_run[run], inv_scale,
                    clip_coef, maximize);
              });
            });
          });
        };
        if (decay == math::kNoDecay) run_all(std::integral_constant<int, math::kNoDecay>{});
        if (decay == math::kL2Decay) run_all(std::integral_constant<int, math::kL2Decay>{});
        if (decay == math::kDecoupledDecay) run_all(std::integral_constant<int, math::kDecoupledDecay>{});
      });
}

// ------------------------------------------------------------------ step counters
// steps += mask * (not skipped); status[kStatusSkipped] += skipped when this bucket counts skips.
void advance_steps(const at::Tensor& steps, const at::Tensor& mask, const at::Tensor& status, bool check,
                   bool count_skip) {
  TORCH_CHECK(steps.device().is_cpu() && steps.scalar_type() == at::kFloat && steps.is_contiguous() &&
                  mask.device().is_cpu() && mask.scalar_type() == at::kFloat && mask.is_contiguous() &&
                  mask.numel() == steps.numel(),
              "sam_fused: steps and mask must be contiguous float32 CPU tensors of one length");
  check_status(status, steps.device());
  const bool skip = check && skipped(status);
  if (check && count_skip && skip) status_add(status, kStatusSkipped, 1.0);
  if (skip) return;
  float* s = steps.data_ptr<float>();
  const float* m = mask.data_ptr<float>();
  for (int64_t i = 0; i < steps.numel(); ++i) s[i] += m[i];
}

// [ABI version, elements per stats slot, most slots per run]
std::vector<int64_t> constants() { return {kAbiVersion, kCpuStatsChunk, kCpuMaxSlots}; }

}  // namespace
}  // namespace sam_fused

SAM_FUSED_REGISTER_OPS(sam_fused_cpu)
extern PyMethodDef sam_fused_host_methods[];  // sam_fused_host.cpp
SAM_FUSED_PYTHON_MODULE_WITH_METHODS("sam_fused C++ CPU backend (operations in torch.ops.sam_fused_cpu)",
                                     sam_fused_host_methods)
