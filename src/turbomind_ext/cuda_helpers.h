// Internals shared by the CUDA build's two files (cuda_device.cpp and
// cuda_copy_engine.cu): error text and a device guard. The public API is in
// cuda_support.h.
#pragma once

#include <cuda.h>  // CUcontext / CUresult types only; libcuda is never linked
#include <cuda_runtime_api.h>

#include <mutex>
#include <string>

#include "errors.h"

namespace hostcache {
namespace cuda {

// "out of memory (cudaErrorMemoryAllocation)": the sentence and the name to search for.
inline std::string error_text(cudaError_t e) {
  return concat(cudaGetErrorString(e), " (", cudaGetErrorName(e), ")");
}

// Whether the calling thread has a CUDA context current. Needed because
// cudaSetDevice(d) creates device d's primary context, so restoring a thread
// that never used CUDA to its default device 0 would cost every rank of a
// multi-GPU server a context (hundreds of MiB) on GPU 0.
inline bool thread_has_context() {
  using CtxGetCurrent = CUresult(CUDAAPI*)(CUcontext*);
  static CtxGetCurrent fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuCtxGetCurrent", &p, 4000, cudaEnableDefault, &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<CtxGetCurrent>(p);
    else
      cudaGetLastError();
  });
  if (fn == nullptr) return true;  // unknown: restore, the caller's device matters more than a context
  CUcontext ctx = nullptr;
  return fn(&ctx) == CUDA_SUCCESS && ctx != nullptr;
}

// Makes `device` current for a scope and puts the caller's device back after,
// so calls from torch threads (whose current device torch reads back) are not
// disturbed. Never throws: check ok().
class ScopedDevice {
 public:
  explicit ScopedDevice(int device) noexcept {
    int cur = -1;
    if (cudaGetDevice(&cur) != cudaSuccess) {
      cudaGetLastError();
      cur = -1;
    } else if (cur == device) {
      return;
    }
    const bool restore = cur >= 0 && thread_has_context();
    status_ = cudaSetDevice(device);
    if (status_ != cudaSuccess) cudaGetLastError();
    else if (restore) prev_ = cur;
  }
  ~ScopedDevice() {
    if (prev_ >= 0 && cudaSetDevice(prev_) != cudaSuccess) cudaGetLastError();
  }
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;

  bool ok() const { return status_ == cudaSuccess; }
  cudaError_t status() const { return status_; }

 private:
  int prev_ = -1;
  cudaError_t status_ = cudaSuccess;
};

}  // namespace cuda
}  // namespace hostcache
