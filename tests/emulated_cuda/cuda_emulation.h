// Test infrastructure: just enough of CUDA to run csrc/sam_fused_cuda.cu on the CPU.
//
// CI has no GPU, yet the CUDA backend's kernels should be checked against the reference
// like every other backend. Compiled with SAM_FUSED_CUDA_EMULATION, the .cu file includes
// this header instead of the CUDA runtime, and its host code and kernels become plain C++
// (tests/emulated_cuda/sam_fused_cuda_emulated.cpp, loaded by tests/emulated_cuda_backend.py).
//
// How a launch runs: blocks one after another; within a block, one fiber (an execution
// context with its own stack) per CUDA thread, all on the calling OS thread. A fiber runs until it
// finishes or reaches a barrier (__syncthreads, or a warp shuffle, which is a barrier of its
// 32 lanes); when every live thread of the block (or of the warp) waits there, they all go
// on. Threads therefore interleave only at barriers, in a fixed order, so a run is
// deterministic; a barrier reached by only part of its group is reported as an error
// instead of hanging, and a shuffle that reads an exited lane is an error too.
//
// The order: thread 0 first in even blocks, last in odd ones. A missing __syncthreads then
// shows whichever side of it thread 0 is on: where the others write shared memory and thread
// 0 reads it (a block sum), thread 0 reads too early in an even block; where thread 0 writes
// and the others read (a value computed once per block), they read too early in an odd one,
// and see what the block before left there.
//
// Alignment: the kernels' pack loads and stores go through vector_load and vector_store,
// which report a misaligned access as an error, as the device faults on it
// (cudaErrorMisalignedAddress), and copy bytewise (an aligned host load would crash).
//
// What this does not model: the rest of the memory system (coalescing, caches), real
// concurrency between blocks, and the device's float behaviour where it differs from the
// host's (nvcc contracts a*b+c into FMAs; here -ffp-contract=off). Those stay for the GPU.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one at a time on one OS thread, so a function-local static is exactly one
// block's shared memory (one per template instantiation, as in CUDA).
#define __shared__ static

namespace sam_fused_emulation {

// The SM count the host code sees: 1 keeps grids small, so that the grid-stride loops
// take several turns at test sizes.
constexpr int kMultiprocessors = 1;
constexpr int kWarpSize = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kFiberStack = 256 * 1024;

// ------------------------------------------------------------------ execution contexts
// Switching between fibers is most of the emulation's cost. glibc's swapcontext also saves
// the signal mask (a system call per switch); on x86-64 Linux a switch is instead a few
// instructions: push the callee-saved registers and the SSE/x87 control words (the System V
// ABI's callee-saved state), swap stack pointers, pop. Elsewhere ucontext does it.
#if defined(__x86_64__) && defined(__linux__) && !defined(SAM_FUSED_EMULATION_UCONTEXT)
struct Context {
  void* sp = nullptr;
};
extern "C" void sam_fused_emulation_switch(void** save_sp, void* load_sp);
asm(R"(
  .pushsection .text
  .globl sam_fused_emulation_switch
  .type sam_fused_emulation_switch, @function
sam_fused_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size sam_fused_emulation_switch, .-sam_fused_emulation_switch
  .popsection
)");

inline void switch_context(Context& from, const Context& to) { sam_fused_emulation_switch(&from.sp, to.sp); }

// A fresh stack laid out as the switch leaves one: control words, six registers, then the
// address it returns to (entry), 16-byte aligned as if entry had been called.
inline void start_context(Context& c, void* stack, size_t size, void (*entry)()) {
  auto top = (reinterpret_cast<uintptr_t>(stack) + size) & ~static_cast<uintptr_t>(15);
  auto* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                     // entry's own return address: it never returns
  *--sp = reinterpret_cast<uint64_t>(entry);    // popped by the switch's ret
  for (int r = 0; r < 6; ++r) *--sp = 0;         // rbp, rbx, r12-r15
  *--sp = 0x1F80ull | (0x037Full << 32);         // MXCSR and x87 control word: their defaults
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};

inline void switch_context(Context& from, const Context& to) { swapcontext(&from.uc, &to.uc); }

inline void start_context(Context& c, void* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;  // entry never returns
  makecontext(&c.uc, entry, 0);
}
#endif

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

enum class Wait { kRunning, kBlock, kWarp };

struct Fiber {
  Context context;
  Dim3 thread;
  Wait wait = Wait::kRunning;
  bool done = false;
  unsigned shuffles = 0;  // shuffles taken so far: picks the offer buffer
};

// An mmap'ed stack with an inaccessible page below it: an overflow faults instead of
// silently overwriting the next fiber's frames.
class Stack {
 public:
  Stack() {
    page_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, kFiberStack + page_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "CUDA emulation: cannot map a fiber stack");
    mprotect(p, page_, PROT_NONE);
    base_ = static_cast<char*>(p);
  }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  ~Stack() { munmap(base_, kFiberStack + page_); }
  void* top_region() const { return base_ + page_; }

 private:
  char* base_ = nullptr;
  size_t page_ = 0;
};

// The state of the launch in progress on this OS thread.
struct Machine {
  Dim3 block_idx, block_dim, grid_dim;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<Stack>> stacks;
  Fiber* current = nullptr;
  Context scheduler;
  std::function<void()> body;
  std::string error;                          // the first misuse seen inside a fiber
  unsigned char offers[2][kMaxThreadsPerBlock][8];  // what each thread offers to a shuffle
};

inline Machine& machine() {
  thread_local Machine m;
  return m;
}

inline const Dim3& current_thread() { return machine().current->thread; }

// Kernel launches and device copies so far in this process: what a test counts to check
// that an operation takes one launch (torch.ops.sam_fused_cuda_emulated.emulated_launches).
inline int64_t& launches() {
  static int64_t count = 0;
  return count;
}

// A vector access of `bytes` at p: the device requires it aligned to its size.
inline void check_aligned(const void* p, size_t bytes) {
  Machine& m = machine();
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0 && m.error.empty()) {
    m.error = "a misaligned " + std::to_string(bytes) + "-byte access by thread " + std::to_string(m.current->thread.x) +
              " (the device faults: cudaErrorMisalignedAddress)";
  }
}

template <typename V>
V vector_load(const void* p) {
  check_aligned(p, sizeof(V));
  V out;
  std::memcpy(&out, p, sizeof(V));
  return out;
}

template <typename V>
void vector_store(void* p, const V& value) {
  check_aligned(p, sizeof(V));
  std::memcpy(p, &value, sizeof(V));
}

// Suspends the running fiber until its group (block or warp) has all arrived.
inline void wait_at(Wait scope) {
  Machine& m = machine();
  Fiber* self = m.current;
  self->wait = scope;
  switch_context(self->context, m.scheduler);
}

[[noreturn]] inline void fiber_main() {
  Machine& m = machine();
  m.body();
  Fiber* self = m.current;
  self->done = true;
  switch_context(self->context, m.scheduler);  // never resumed
  __builtin_unreachable();
}

// Releases the threads that may go on; false when the live threads wait at barriers
// that can never all be reached (a divergent __syncthreads or shuffle).
inline bool release_waiters(Machine& m) {
  bool all_at_block = true;
  for (const Fiber& f : m.fibers) all_at_block = all_at_block && (f.done || f.wait == Wait::kBlock);
  if (all_at_block) {
    for (Fiber& f : m.fibers) f.wait = Wait::kRunning;
    return true;
  }
  bool released = false;
  for (size_t first = 0; first < m.fibers.size(); first += kWarpSize) {
    const size_t last = std::min(m.fibers.size(), first + kWarpSize);
    bool all_at_warp = true, any_live = false;
    for (size_t t = first; t < last; ++t) {
      const Fiber& f = m.fibers[t];
      any_live = any_live || !f.done;
      all_at_warp = all_at_warp && (f.done || f.wait == Wait::kWarp);
    }
    if (any_live && all_at_warp) {
      for (size_t t = first; t < last; ++t) m.fibers[t].wait = Wait::kRunning;
      released = true;
    }
  }
  return released;
}

inline void run_block(Machine& m) {
  const unsigned threads = m.block_dim.x;
  while (m.stacks.size() < threads) m.stacks.push_back(std::make_unique<Stack>());
  m.fibers.assign(threads, Fiber{});
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = m.fibers[t];
    f.thread.x = t;
    start_context(f.context, m.stacks[t]->top_region(), kFiberStack, fiber_main);
  }
  const bool descending = m.block_idx.x % 2 == 1;  // see the header comment
  for (;;) {
    for (unsigned k = 0; k < threads; ++k) {
      Fiber& f = m.fibers[descending ? threads - 1 - k : k];
      if (f.done || f.wait != Wait::kRunning) continue;
      m.current = &f;
      switch_context(m.scheduler, f.context);  // until it finishes or waits
    }
    m.current = nullptr;
    bool live = false;
    for (const Fiber& f : m.fibers) live = live || !f.done;
    if (!live) return;
    TORCH_CHECK(release_waiters(m), "CUDA emulation: block ", m.block_idx.x,
                " deadlocks: its threads wait at different barriers (a __syncthreads or a warp "
                "shuffle inside divergent code)");
  }
}

template <typename... Params>
class Launch {
 public:
  Launch(unsigned grid, unsigned block, void (*kernel)(Params...)) : grid_(grid), block_(block), kernel_(kernel) {}

  // Converts the arguments to the kernel's parameter types, as a real launch does.
  template <typename... Args>
  void operator()(Args&&... args) const {
    TORCH_CHECK(grid_ >= 1 && block_ >= 1 && block_ <= kMaxThreadsPerBlock,
                "CUDA emulation: invalid launch configuration <<<", grid_, ", ", block_, ">>>");
    std::tuple<Params...> bound(std::forward<Args>(args)...);
    Machine& m = machine();
    ++launches();
    TORCH_CHECK(!m.body, "CUDA emulation: a kernel launched another kernel");
    m.body = [&] { std::apply(kernel_, bound); };
    m.grid_dim.x = grid_;
    m.block_dim.x = block_;
    m.error.clear();
    struct Reset {
      Machine& m;
      ~Reset() { m.body = nullptr; }
    } reset{m};
    for (unsigned b = 0; b < grid_; ++b) {
      m.block_idx.x = b;
      run_block(m);
      TORCH_CHECK(m.error.empty(), "CUDA emulation: block ", b, ": ", m.error);
    }
  }

 private:
  unsigned grid_, block_;
  void (*kernel_)(Params...);
};

template <typename Stream, typename... Params>
Launch<Params...> launcher(int64_t grid, int64_t block, const Stream&, void (*kernel)(Params...)) {
  TORCH_CHECK(grid >= 0 && grid <= UINT32_MAX, "CUDA emulation: grid of ", grid, " blocks");
  return Launch<Params...>(static_cast<unsigned>(grid), static_cast<unsigned>(block), kernel);
}

// Lane l receives the value of lane source(l) of its warp, or keeps its own when that lane
// is outside the warp. One barrier: every lane offers its value, then reads. The offers
// alternate between two buffers, so a lane that runs on to its next shuffle cannot
// overwrite a value that a slower lane has yet to read (it would have to pass the next
// barrier first, which waits for that lane).
template <typename V, typename Source>
V shuffle(unsigned mask, V value, const Source& source) {
  static_assert(sizeof(V) <= 8 && std::is_trivially_copyable_v<V>, "a shuffle moves up to 8 bytes");
  Machine& m = machine();
  Fiber* self = m.current;
  const unsigned tid = self->thread.x;
  const unsigned lane = tid % kWarpSize;
  if (mask != 0xffffffffu && m.error.empty()) m.error = "only full-warp shuffles are emulated";
  auto& offers = m.offers[self->shuffles++ % 2];
  std::memcpy(offers[tid], &value, sizeof(V));
  wait_at(Wait::kWarp);
  V out = value;
  const unsigned from = source(lane);
  if (from < kWarpSize) {
    const unsigned other = tid - lane + from;
    // a lane that offered to this shuffle may have run on and exited since (threads resume
    // in either order); one that exited before it never offered
    if (other >= m.fibers.size() || m.fibers[other].shuffles < self->shuffles) {
      if (m.error.empty()) m.error = "a shuffle read lane " + std::to_string(from) + ", which has exited";
    } else {
      std::memcpy(&out, offers[other], sizeof(V));
    }
  }
  return out;
}

}  // namespace sam_fused_emulation

#define threadIdx (::sam_fused_emulation::current_thread())
#define blockIdx (::sam_fused_emulation::machine().block_idx)
#define blockDim (::sam_fused_emulation::machine().block_dim)
#define gridDim (::sam_fused_emulation::machine().grid_dim)

inline void __syncthreads() { ::sam_fused_emulation::wait_at(::sam_fused_emulation::Wait::kBlock); }

template <typename V>
V __shfl_down_sync(unsigned mask, V value, unsigned delta) {
  return ::sam_fused_emulation::shuffle(mask, value, [delta](unsigned lane) { return lane + delta; });
}

template <typename V>
V __shfl_xor_sync(unsigned mask, V value, unsigned lane_mask) {
  return ::sam_fused_emulation::shuffle(mask, value, [lane_mask](unsigned lane) { return lane ^ lane_mask; });
}

// ------------------------------------------------------------------ the runtime the host code calls
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
enum cudaMemcpyKind { cudaMemcpyDeviceToDevice };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount };

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(const at::Device&) {}
};
struct CUDAStream {};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace c10::cuda

inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind,
                                   const c10::cuda::CUDAStream&) {
  ++::sam_fused_emulation::launches();
  if (bytes > 0) std::memcpy(dst, src, bytes);
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = ::sam_fused_emulation::kMultiprocessors;
  return cudaSuccess;
}

#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "CUDA emulation: ", #expr, " failed")
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
