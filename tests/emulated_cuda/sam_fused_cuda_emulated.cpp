// The CUDA backend's source, compiled as host C++ against tests/emulated_cuda/cuda_emulation.h:
// the same host code and kernels, registered as torch.ops.sam_fused_cuda_emulated so that
// it never collides with the real extension on a GPU machine.
#define SAM_FUSED_CUDA_EMULATION 1
#define SAM_FUSED_CUDA_OPS sam_fused_cuda_emulated
#include "sam_fused_cuda.cu"

// The emulation's own count (tests only): kernel launches and device copies so far.
TORCH_LIBRARY_FRAGMENT(sam_fused_cuda_emulated, m) {
  m.def("emulated_launches() -> int", [] { return ::sam_fused_emulation::launches(); });
}
