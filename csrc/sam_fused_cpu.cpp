// The C++ CPU library of sam_fused: registers the operations of sam_fused_cpu.h as
// torch.ops.sam_fused_cpu.* and makes the library a Python module (sam_fused._C_cpu).
//
// The operations: sam_fused_cpu_ascent.cpp (first-pass statistics, perturbation, copies) and
// sam_fused_cpu_descent.cpp (second-pass statistics, the fused update, update counts); their
// element math is sam_fused_math.h's, shared with the CUDA library; the host helpers Python
// calls per pass are sam_fused_host.cpp's.

#include <Python.h>
#include <torch/library.h>

#include "sam_fused_cpu.h"

namespace sam_fused {
namespace cpu {

// [ABI version, elements per stats slot, most slots per tensor]
std::vector<int64_t> constants() { return {kAbiVersion, kCpuStatsChunk, kCpuMaxSlots}; }

// "family:NAME=number" of every ascent rule, descent rule and base this library runs
std::vector<std::string> functors() { return describe_functors(); }

}  // namespace cpu
}  // namespace sam_fused

SAM_FUSED_REGISTER_OPS(sam_fused_cpu, sam_fused::cpu)
extern PyMethodDef sam_fused_host_methods[];  // sam_fused_host.cpp
SAM_FUSED_PYTHON_MODULE_WITH_METHODS("sam_fused C++ CPU backend (operations in torch.ops.sam_fused_cpu)",
                                     sam_fused_host_methods)
