// Device discovery and host-memory pinning for the CUDA build.
#include <cuda_runtime_api.h>

#include "cuda_helpers.h"
#include "cuda_support.h"
#include "errors.h"

namespace hostcache {

namespace {

// 13000 -> "13.0"
std::string cuda_version(int v) { return concat(v / 1000, ".", (v % 1000) / 10); }

class CudaPinner : public Pinner {
 public:
  explicit CudaPinner(int device) : device_(device) {}

  void pin(void* ptr, uint64_t bytes) override {
    // The device matters only for which context takes the registration;
    // Portable makes it valid in every context, Mapped gives the kernel path
    // its device address.
    cuda::ScopedDevice guard(device_);
    if (!guard.ok())
      throw SystemError(concat("pinning ", format_bytes(bytes), " of the host pool failed: cannot select CUDA device ",
                               device_, ": ", cuda::error_text(guard.status())));
    const cudaError_t e = cudaHostRegister(ptr, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped);
    if (e != cudaSuccess) {
      cudaGetLastError();  // not sticky: clear it so later calls do not report it
      throw SystemError(concat("pinning ", format_bytes(bytes), " of the host pool with cudaHostRegister failed: ",
                               cuda::error_text(e),
                               "; check free RAM, the locked-memory limit (ulimit -l) and the container's "
                               "memory limit"));
    }
  }

  void* allocate(uint64_t bytes) override {
    cuda::ScopedDevice guard(device_);
    if (!guard.ok())
      throw SystemError(concat("allocating ", format_bytes(bytes), " of pinned memory failed: cannot select CUDA device ",
                               device_, ": ", cuda::error_text(guard.status())));
    void* p = nullptr;
    const cudaError_t e = cudaHostAlloc(&p, bytes, cudaHostAllocPortable | cudaHostAllocMapped);
    if (e != cudaSuccess || p == nullptr) {
      cudaGetLastError();
      throw SystemError(concat("cudaHostAlloc of ", format_bytes(bytes), " failed: ", cuda::error_text(e)));
    }
    return p;
  }

  void release(void* ptr) noexcept override {
    cuda::ScopedDevice guard(device_);
    if (cudaFreeHost(ptr) != cudaSuccess) cudaGetLastError();
  }

  void unpin(void* ptr, uint64_t) noexcept override {
    cuda::ScopedDevice guard(device_);
    if (cudaHostUnregister(ptr) != cudaSuccess) cudaGetLastError();
  }

 private:
  int device_;
};

}  // namespace

DeviceInfo device_info() {
  DeviceInfo info;
  info.cuda_compiled = true;
  if (cudaRuntimeGetVersion(&info.runtime_version) != cudaSuccess) {
    cudaGetLastError();
    info.runtime_version = 0;
  }
  int driver = 0;
  if (cudaDriverGetVersion(&driver) == cudaSuccess) info.driver_version = driver;  // 0 without a driver
  else cudaGetLastError();

  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    std::string why;
    if (info.driver_version == 0)
      why = "; no NVIDIA driver was found on this machine";
    else if (info.driver_version < info.runtime_version)
      why = concat("; the NVIDIA driver supports CUDA ", cuda_version(info.driver_version),
                   " but this module was built with CUDA ", cuda_version(info.runtime_version),
                   ": upgrade the driver or rebuild with an older toolkit");
    info.reason = concat("no usable CUDA device: cudaGetDeviceCount failed with ", cuda::error_text(e), why);
    return info;
  }
  if (count <= 0) {
    info.reason = "no usable CUDA device: the driver reports no GPU (check CUDA_VISIBLE_DEVICES)";
    return info;
  }
  info.device_count = count;
  info.gpu_usable = true;
  return info;
}

std::unique_ptr<Pinner> make_cuda_pinner(int device) {
  const DeviceInfo info = device_info();
  if (!info.gpu_usable) throw ConfigError(concat("cannot pin host memory for CUDA: ", info.reason));
  HC_REQUIRE(device >= 0 && device < info.device_count, "CUDA device ", device, " does not exist: this machine has ",
             info.device_count, " visible CUDA device(s), numbered 0 to ", info.device_count - 1);
  return std::make_unique<CudaPinner>(device);
}

}  // namespace hostcache
