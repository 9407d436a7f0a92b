// MSAM (momentum-SAM) in the CUDA library: its kernels and host entries, included by
// sam_fused_cuda.cu inside its namespace (they use its Launch, table_of and run), and
// registered there into the same torch.ops namespace. The rules are sam_fused/msam_rules.py's
// (see csrc/sam_fused_cpu_msam.cpp, the CPU twin); MSAM's status is its own two float64
// entries on the device: [0] the sum of squares of v', [1] the non-finite gradient count.
// Nothing is read on the host: a skipped step's kernel returns before it stores anything.

// The new first moment: SGD's v' = a v + (g + b p) (a = mu, b = wd), AdamW's m' = a m + b g
// (a = b1, b = 1 - b1).
template <bool ADAM>
__device__ __forceinline__ float msam_moment(float g, float p, float s0, float a, float b) {
  if constexpr (ADAM) {
    return a * s0 + b * g;
  } else {
    return a * s0 + (g + b * p);
  }
}

// One partial per block: [0] the sum of v'^2, [1] the non-finite count of g.
template <typename T, bool ADAM>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    msam_stats_kernel(const int64_t* g_table, const int64_t* p_table, const int64_t* s0_table, const int64_t* chunks,
                      float a, float b, double* partials, int64_t row_stride) {
  const Span span = span_of(chunks);
  const T* g = resolve<const T>(g_table, span);
  const T* p = resolve<const T>(p_table, span);
  const T* s0 = resolve<const T>(s0_table, span);
  double sums[2] = {0.0, 0.0};
  for (int64_t i = span.begin + threadIdx.x; i < span.end; i += blockDim.x) {
    const float gi = to_f(g[i]);
    sums[1] += math::nonfinite(gi);
    const double v = msam_moment<ADAM>(gi, ADAM ? 0.0f : to_f(p[i]), to_f(s0[i]), a, b);
    sums[0] += v * v;
  }
  block_sums(sums);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = sums[0];
    partials[row_stride + blockIdx.x] = sums[1];
  }
}

struct MsamScalars {
  float a, b, lr;                  // the moment's (a, b); SGD's lr
  float beta2, one_minus_beta2, eps, decay;  // AdamW
  double beta1_64, beta2_64, lr_64;          // AdamW's bias corrections, in double
};

template <typename T, bool ADAM>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    msam_apply_kernel(const int64_t* p_table, const int64_t* g_table, const int64_t* w_table,
                      const int64_t* s0_table, const int64_t* s1_table, const int64_t* chunks, const float* steps,
                      const double* status, const double* scales, int group, MsamScalars h) {
  if (status[1] > 0) return;  // a skipped step stores nothing
  const Span span = span_of(chunks);
  T* p = resolve<T>(p_table, span);
  const T* g = resolve<const T>(g_table, span);
  T* w = resolve<T>(w_table, span);
  T* s0 = resolve<T>(s0_table, span);
  T* s1 = resolve<T>(s1_table, span);
  const float count = steps[span.count];
  const float c = static_cast<float>(scales[group]);
  float step_size = 0.0f, bc2_sqrt = 1.0f;
  if constexpr (ADAM) {
    const double t = static_cast<double>(count) + 1.0;
    step_size = static_cast<float>(h.lr_64 / (1.0 - pow(h.beta1_64, t)));
    bc2_sqrt = static_cast<float>(sqrt(1.0 - pow(h.beta2_64, t)));
  }
  for (int64_t i = span.begin + threadIdx.x; i < span.end; i += blockDim.x) {
    const float gi = to_f(g[i]);
    const float pi = to_f(p[i]);
    const float vi = msam_moment<ADAM>(gi, pi, to_f(s0[i]), h.a, h.b);
    const float wi = count > 0.0f ? to_f(w[i]) : pi;  // no stored w yet: the parameter is w
    float w_new;
    if constexpr (ADAM) {
      const float si = h.beta2 * to_f(s1[i]) + h.one_minus_beta2 * (gi * gi);
      w_new = (wi - step_size * (vi / (sqrtf(si) / bc2_sqrt + h.eps))) * h.decay;
      s1[i] = from_f<T>(si);
    } else {
      w_new = wi - h.lr * vi;
    }
    const T w_stored = from_f<T>(w_new);
    const T v_stored = from_f<T>(vi);
    w[i] = w_stored;
    s0[i] = v_stored;
    p[i] = from_f<T>(to_f(w_stored) - c * to_f(v_stored));
  }
}

// p <- w (PERTURB false) or p <- w - c v (PERTURB true), where a w is stored.
template <typename T, bool PERTURB>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    msam_move_kernel(const int64_t* p_table, const int64_t* w_table, const int64_t* s0_table, const int64_t* chunks,
                     const float* steps, const double* scales, int group) {
  const Span span = span_of(chunks);
  if (!(steps[span.count] > 0.0f)) return;
  T* p = resolve<T>(p_table, span);
  const T* w = resolve<const T>(w_table, span);
  const T* s0 = resolve<const T>(s0_table, span);
  const float c = PERTURB ? static_cast<float>(scales[group]) : 0.0f;
  for (int64_t i = span.begin + threadIdx.x; i < span.end; i += blockDim.x) {
    p[i] = PERTURB ? from_f<T>(to_f(w[i]) - c * to_f(s0[i])) : w[i];
  }
}

void check_msam_vector(const at::Tensor& t, const char* name, at::ScalarType dtype, const Launch& launch) {
  TORCH_CHECK(t.device() == launch.device && t.scalar_type() == dtype && t.dim() == 1 && t.is_contiguous(),
              "sam_fused: MSAM's ", name, " must be a contiguous ", dtype, " vector on ", launch.device);
}

void msam_stats(const at::Tensor& grad, const at::Tensor& param, const at::Tensor& s0, const at::Tensor& runs,
                const at::Tensor& like, const at::Tensor& partials, bool adam, double a, double b) {
  const Launch launch = read_launch(grad, like, runs, "grad");
  const int64_t* g = table_of(launch, grad, "grad");
  const int64_t* p = table_of(launch, param, "param");
  const int64_t* v = table_of(launch, s0, "s0");
  check_partials(partials, 2, launch.rows, launch.device);
  dispatch_dtype<false>(launch.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_bool(adam, [&](auto is_adam) {
      run(launch, msam_stats_kernel<T, decltype(is_adam)::value>, g, p, v, launch.chunks, static_cast<float>(a),
          static_cast<float>(b), partials.data_ptr<double>(), partials.stride(0));
    });
  });
}

// scalars: SGD (mu, wd, lr); AdamW (b1, 1 - b1, b2, 1 - b2, eps, lr, 1 - lr wd), as the CPU library's.
void msam_apply(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& s0,
                const OptionalTensor& s1, const at::Tensor& steps, const at::Tensor& runs, const at::Tensor& like,
                const at::Tensor& status, const at::Tensor& scales, int64_t group, bool adam,
                c10::ArrayRef<double> scalars) {
  const Launch launch = read_launch(param, like, runs, "param");
  const int64_t* p = table_of(launch, param, "param");
  const int64_t* state1 = table_of(launch, s1, "s1", p);
  TORCH_CHECK(s1.has_value() == adam, "sam_fused: msam_apply needs s1 exactly for AdamW");
  TORCH_CHECK(scalars.size() == (adam ? 7u : 3u), "sam_fused: msam_apply takes ", adam ? 7 : 3, " scalars");
  check_msam_vector(steps, "steps", at::kFloat, launch);
  check_msam_vector(status, "status", at::kDouble, launch);
  check_msam_vector(scales, "scales", at::kDouble, launch);
  TORCH_CHECK(0 <= group && group < scales.numel(), "sam_fused: group ", group, " has no scale");
  MsamScalars h{};
  if (adam) {
    h = {static_cast<float>(scalars[0]), static_cast<float>(scalars[1]), 0.0f,
         static_cast<float>(scalars[2]), static_cast<float>(scalars[3]), static_cast<float>(scalars[4]),
         static_cast<float>(scalars[6]), scalars[0], scalars[2], scalars[5]};
  } else {
    h.a = static_cast<float>(scalars[0]);
    h.b = static_cast<float>(scalars[1]);
    h.lr = static_cast<float>(scalars[2]);
  }
  const int64_t* g = table_of(launch, grad, "grad");
  const int64_t* w = table_of(launch, weight, "weight");
  const int64_t* v = table_of(launch, s0, "s0");
  dispatch_dtype<false>(launch.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_bool(adam, [&](auto is_adam) {
      run(launch, msam_apply_kernel<T, decltype(is_adam)::value>, p, g, w, v, state1, launch.chunks,
          steps.data_ptr<float>(), status.data_ptr<double>(), scales.data_ptr<double>(), static_cast<int>(group),
          h);
    });
  });
}

void msam_move(const at::Tensor& param, const at::Tensor& weight, const OptionalTensor& s0, const at::Tensor& steps,
               const at::Tensor& runs, const at::Tensor& like, const at::Tensor& scales, int64_t group) {
  const Launch launch = read_launch(param, like, runs, "param");
  const int64_t* p = table_of(launch, param, "param");
  const int64_t* w = table_of(launch, weight, "weight");
  const int64_t* v = table_of(launch, s0, "s0", w);
  check_msam_vector(steps, "steps", at::kFloat, launch);
  check_msam_vector(scales, "scales", at::kDouble, launch);
  TORCH_CHECK(0 <= group && group < scales.numel(), "sam_fused: group ", group, " has no scale");
  dispatch_dtype<false>(launch.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_bool(s0.has_value(), [&](auto perturb) {
      run(launch, msam_move_kernel<T, decltype(perturb)::value>, p, w, v, launch.chunks, steps.data_ptr<float>(),
          scales.data_ptr<double>(), static_cast<int>(group));
    });
  });
}
