// The CPU-only build: no CUDA toolkit was found when the module was compiled.
#include "cuda_support.h"
#include "errors.h"

namespace hostcache {

namespace {
constexpr const char* kRebuild =
    "this lmdeploy_hostcache was built without CUDA (nvcc was not found at build time); "
    "reinstall with the CUDA toolkit on PATH to copy GPU memory";
}

DeviceInfo device_info() {
  DeviceInfo info;
  info.reason = kRebuild;
  return info;
}

std::unique_ptr<Pinner> make_cuda_pinner(int) { throw ConfigError(kRebuild); }

std::unique_ptr<CopyEngine> make_cuda_copy_engine(const RegionTable&, HostArena&, int, CopyPath) {
  throw ConfigError(kRebuild);
}

}  // namespace hostcache
