// The forward's scratch buffers (gathered rows, activation, and the gate_up output when the
// backward does not keep it), kept between calls.
//
// Why: past ~32 MB glibc serves each allocation with a fresh mmap, which the kernel
// zero-fills page by page on first touch and unmaps on free; at T = 2048 on the Qwen3 layer
// shape (~140 MB of scratch) that was 6-10% of the forward (484 against 437-455 ms with the
// pages kept). One buffer is kept, the largest a call has asked for: a model's MoE layers run
// one after another and share it. Concurrent calls each take their own. release_workspace()
// (tpmoe.cpu.release_workspace) hands it back to the system.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <mutex>
#include <utility>

#include "experts_cpu.h"

namespace tpmoe {
namespace cpu {
namespace {

std::mutex& workspace_mutex() {
  static std::mutex mutex;
  return mutex;
}

at::Tensor& cached_workspace() {
  static at::Tensor cached;
  return cached;
}

}  // namespace

at::Tensor take_workspace(int64_t bytes) {
  {
    std::lock_guard<std::mutex> lock(workspace_mutex());
    at::Tensor& cached = cached_workspace();
    if (cached.defined() && cached.numel() >= bytes) return std::exchange(cached, at::Tensor());
  }
  return at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
}

void return_workspace(at::Tensor workspace) {
  std::lock_guard<std::mutex> lock(workspace_mutex());
  at::Tensor& cached = cached_workspace();
  if (!cached.defined() || workspace.numel() > cached.numel()) cached = std::move(workspace);
}

int64_t release_workspace() {
  at::Tensor released;
  {
    std::lock_guard<std::mutex> lock(workspace_mutex());
    released = std::exchange(cached_workspace(), at::Tensor());
  }
  return released.defined() ? released.numel() : 0;
}

at::Tensor workspace_view(const at::Tensor& workspace, int64_t offset_bytes, int64_t rows, int64_t cols,
                          at::ScalarType dtype) {
  const int64_t bytes = rows * cols * static_cast<int64_t>(c10::elementSize(dtype));
  return workspace.narrow(0, offset_bytes, bytes).view(dtype).view({rows, cols});
}

}  // namespace cpu
}  // namespace tpmoe
