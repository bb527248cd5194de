// What this build and machine offer on the device side. The CUDA build
// implements these in cuda_*.cpp/.cu; the CPU-only build in cuda_absent.cpp,
// where the factories throw a ConfigError that says how to get a CUDA build.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "copy_engine.h"
#include "host_arena.h"
#include "regions.h"

namespace hostcache {

enum class CopyPath : uint8_t {
  kKernel,  // one gather/scatter kernel per transfer over mapped pinned memory
  kMemcpy,  // cudaMemcpyBatchAsync (one call per transfer), or cudaMemcpyAsync per piece
};

struct DeviceInfo {
  bool cuda_compiled = false;  // the module was built with nvcc
  bool gpu_usable = false;     // a driver and at least one device answered
  int device_count = 0;
  int runtime_version = 0;     // CUDA runtime linked in (e.g. 13000), 0 without
  int driver_version = 0;      // driver's CUDA version, 0 when no driver
  std::string reason;          // why no GPU is usable, empty when one is
};

DeviceInfo device_info();

// Registers host ranges with cudaHostRegister (portable, mapped).
std::unique_ptr<Pinner> make_cuda_pinner(int device);

// A copy engine over two dedicated CUDA copy streams (restores, saves) on `device`. Host slots
// must come from `arena`; a slot in an unpinned chunk forces the memcpy path
// for that transfer (the kernel cannot read pageable memory).
std::unique_ptr<CopyEngine> make_cuda_copy_engine(const RegionTable& regions, HostArena& arena, int device,
                                                  CopyPath path);

}  // namespace hostcache
