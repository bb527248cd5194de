// The CUDA copy engine: every transfer is one batched operation on one of
// its two copy streams, tracked by one event.
//
// Two streams: restores on one, saves on the other, so a restore the next
// forward waits for never queues behind saves of blocks the forward in flight
// is still computing. Copies that share a slot or a block with an earlier
// transfer on the other stream wait for its event (SlotStore names them), so
// per slot and per block they still take effect in submission order.
// HOSTCACHE_COPY_STREAMS=1 puts both on one stream (to measure the gain).
//
// Kernel path: one gather/scatter launch per transfer. The work is cut into
// 2 KiB units (one warp, 4 x 16 B per lane); a unit is (copy entry, region,
// offset), found through a per-slot table uploaded once, so regions of very
// different sizes (K/V rows next to their scales) balance across warps. A few
// CTAs are enough to keep PCIe busy (each warp keeps 2 KiB in flight) and
// leave the SMs to the forward; HOSTCACHE_KERNEL_CTAS overrides the count.
//
// Memcpy path: cudaMemcpyBatchAsync with every piece in one call, or one
// cudaMemcpyAsync per piece where the driver refuses batches. It is also the
// fallback of the kernel path when a slot is not pinned and mapped, no copy
// list is free, or the list upload or launch fails (nothing of the copy ran
// then); name() counts such transfers so the fallback is never silent.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_helpers.h"
#include "cuda_support.h"
#include "errors.h"

namespace hostcache {

namespace {

constexpr uint32_t kWarp = 32;
constexpr uint32_t kVecPerLane = 4;  // independent 16 B loads in flight per lane
constexpr uint32_t kUnitBytes = kWarp * kVecPerLane * 16;
constexpr uint32_t kThreads = 512;
constexpr uint32_t kWarpsPerCta = kThreads / kWarp;
constexpr int kDefaultCtas = 16;
constexpr size_t kMinStagingEntries = 4096;
// Made at start: allocating pinned or device memory later, mid-serving, may
// serialise the device's streams (the forward included) while it runs.
constexpr size_t kInitialStagingBuffers = 4;
constexpr size_t kMaxStagingBuffers = 64;
constexpr uint64_t kUnreachable = ~0ull;

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

// ---- RAII handles. Destructors ignore errors: they run during teardown,
// possibly after a sticky error or when the runtime is unloading.

struct DeviceFree {
  void operator()(void* p) const noexcept {
    if (cudaFree(p) != cudaSuccess) cudaGetLastError();
  }
};
struct PinnedFree {
  void operator()(void* p) const noexcept {
    if (cudaFreeHost(p) != cudaSuccess) cudaGetLastError();
  }
};
struct StreamDestroy {
  void operator()(cudaStream_t s) const noexcept {
    if (cudaStreamDestroy(s) != cudaSuccess) cudaGetLastError();
  }
};
struct EventDestroy {
  void operator()(cudaEvent_t e) const noexcept {
    if (cudaEventDestroy(e) != cudaSuccess) cudaGetLastError();
  }
};
using DeviceMem = std::unique_ptr<void, DeviceFree>;
using PinnedMem = std::unique_ptr<void, PinnedFree>;
using Stream = std::unique_ptr<CUstream_st, StreamDestroy>;
using Event = std::unique_ptr<CUevent_st, EventDestroy>;

void check(cudaError_t e, const std::string& what) {
  if (e == cudaSuccess) return;
  cudaGetLastError();
  throw SystemError(concat(what, " failed: ", cuda::error_text(e)));
}

DeviceMem device_alloc(size_t bytes, const char* what) {
  void* p = nullptr;
  check(cudaMalloc(&p, bytes), concat("allocating ", format_bytes(bytes), " of device memory for ", what));
  return DeviceMem(p);
}

PinnedMem pinned_alloc(size_t bytes, const char* what) {
  void* p = nullptr;
  check(cudaHostAlloc(&p, bytes, cudaHostAllocDefault),
        concat("allocating ", format_bytes(bytes), " of pinned host memory for ", what));
  return PinnedMem(p);
}

Event make_event() {
  cudaEvent_t e = nullptr;
  check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "creating a CUDA event");
  return Event(e);
}

// Completion events, recycled: creating one per transfer costs a driver call.
// Shared with the transfers, which may outlive the engine.
class EventPool {
 public:
  explicit EventPool(int device) : device_(device) {}
  ~EventPool() {
    cuda::ScopedDevice guard(device_);
    free_.clear();
  }
  Event acquire() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!free_.empty()) {
        Event e = std::move(free_.back());
        free_.pop_back();
        return e;
      }
    }
    return make_event();
  }
  // A re-recorded event is safe to hand out again: cudaStreamWaitEvent and
  // queries act on the record made last, and every earlier waiter already
  // captured its own.
  void release(Event e) noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    try {
      free_.push_back(std::move(e));
    } catch (...) {  // out of memory: let the handle destroy the event
    }
  }

 private:
  int device_;
  std::mutex mu_;
  std::vector<Event> free_;
};

class CudaTransfer final : public Transfer {
 public:
  // Without an event the transfer is finished already (nothing to copy).
  CudaTransfer(std::shared_ptr<EventPool> pool, Event ev, int device, cudaStream_t stream)
      : pool_(std::move(pool)), ev_(std::move(ev)), device_(device), stream_(stream), finished_(!ev_) {}
  ~CudaTransfer() override {
    if (ev_) pool_->release(std::move(ev_));
  }

  cudaEvent_t event() const { return ev_.get(); }
  cudaStream_t stream() const { return stream_; }  // the engine's stream it was queued on
  // An enqueue error: reported once the event (which covers whatever part
  // was queued) completes.
  void set_error(std::string error) {
    std::lock_guard<std::mutex> lock(mu_);
    error_ = std::move(error);
  }
  // The event could not be recorded and the stream was drained instead.
  void fail_now(std::string error) {
    std::lock_guard<std::mutex> lock(mu_);
    error_ = std::move(error);
    finished_ = true;
  }

  bool done() override {
    if (is_finished()) return true;
    cuda::ScopedDevice guard(device_);
    const cudaError_t e = cudaEventQuery(ev_.get());
    if (e == cudaErrorNotReady) return false;
    finish(e);
    return true;
  }
  void wait() override {
    if (is_finished()) return;
    cuda::ScopedDevice guard(device_);
    finish(cudaEventSynchronize(ev_.get()));
  }
  std::string error() override {
    std::lock_guard<std::mutex> lock(mu_);
    return error_;
  }
  void make_stream_wait(uintptr_t stream) override {
    if (is_finished()) return;  // nothing left to wait for
    cuda::ScopedDevice guard(device_);
    const cudaError_t e = cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(stream), ev_.get(), 0);
    if (e != cudaSuccess) {
      cudaGetLastError();
      // Throwing is the only safe answer: the stream would read blocks still being copied.
      throw SystemError(concat("making stream ", hex(stream), " wait for a host-cache copy failed: ",
                               cuda::error_text(e)));
    }
  }

 private:
  bool is_finished() {
    std::lock_guard<std::mutex> lock(mu_);
    return finished_;
  }
  void finish(cudaError_t e) {
    if (e != cudaSuccess) cudaGetLastError();
    std::lock_guard<std::mutex> lock(mu_);
    if (finished_) return;
    finished_ = true;
    if (e != cudaSuccess && error_.empty()) error_ = concat("CUDA copy failed: ", cuda::error_text(e));
  }

  std::shared_ptr<EventPool> pool_;
  Event ev_;
  int device_;
  cudaStream_t stream_;
  std::mutex mu_;
  std::string error_;  // may be set at submit; the transfer still runs to its event
  bool finished_;
};

// ---- The kernel ----

struct DevRegion {
  uint64_t base, stride, bytes, slot_offset;
  uint32_t first_unit;  // index of the region's first unit within a slot
  uint32_t pad;
};

// One copy of a transfer: the slot's device-visible address and the block.
struct Entry {
  uint64_t host;
  uint64_t block;
};

struct KernelArgs {
  const DevRegion* regions;
  const uint32_t* unit_region;  // unit within a slot -> region
  const Entry* entries;
  uint64_t total_units;
  uint32_t units_per_slot;
};

// One warp copies up to kUnitBytes. All loads are issued before any store so
// each lane has kVecPerLane requests in flight: what hides PCIe latency when
// the source is mapped host memory. Stores to host memory are posted writes.
template <bool kToHost>
__device__ __forceinline__ void copy_unit(uint8_t* dst, const uint8_t* src, uint32_t len, uint32_t lane) {
  uint32_t vec_bytes = 0;
  if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15) == 0) {
    const uint32_t nvec = len / 16;
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint4* d = reinterpret_cast<uint4*>(dst);
    uint4 v[kVecPerLane];
#pragma unroll
    for (uint32_t i = 0; i < kVecPerLane; ++i) {
      const uint32_t j = lane + i * kWarp;
      v[i] = j < nvec ? __ldcs(s + j) : make_uint4(0, 0, 0, 0);  // read once: evict first
    }
#pragma unroll
    for (uint32_t i = 0; i < kVecPerLane; ++i) {
      const uint32_t j = lane + i * kWarp;
      if (j < nvec) {
        if (kToHost) __stcs(d + j, v[i]);
        else d[j] = v[i];  // restored blocks are read by the next forward: keep them cacheable
      }
    }
    vec_bytes = nvec * 16;
  }
  // Misaligned pieces and tails: correct but slow; regions are normally 16 B aligned.
  for (uint32_t b = vec_bytes + lane; b < len; b += kWarp) dst[b] = src[b];
}

template <bool kOffload>
__global__ void __launch_bounds__(kThreads) copy_blocks_kernel(const KernelArgs a) {
  const uint32_t lane = threadIdx.x % kWarp;
  const uint64_t first = (static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const uint64_t step = static_cast<uint64_t>(gridDim.x) * blockDim.x / kWarp;
  for (uint64_t u = first; u < a.total_units; u += step) {
    const uint64_t e = u / a.units_per_slot;
    const uint32_t k = static_cast<uint32_t>(u - e * a.units_per_slot);
    const DevRegion& r = a.regions[a.unit_region[k]];
    const Entry ent = a.entries[e];
    const uint64_t off = static_cast<uint64_t>(k - r.first_unit) * kUnitBytes;
    const uint64_t left = r.bytes - off;
    const uint32_t len = left < kUnitBytes ? static_cast<uint32_t>(left) : kUnitBytes;
    auto* dev = reinterpret_cast<uint8_t*>(r.base + ent.block * r.stride + off);
    auto* host = reinterpret_cast<uint8_t*>(ent.host + r.slot_offset + off);
    if (kOffload) copy_unit<true>(host, dev, len, lane);
    else copy_unit<false>(dev, host, len, lane);
  }
}

// ---- The engine ----

// A pinned copy list and its device twin, uploaded and read by the kernel on
// one stream. Both may be rewritten once last_use (recorded after the kernel)
// completes: the next user may be on the other stream.
struct Staging {
  PinnedMem host;
  DeviceMem dev;
  size_t capacity = 0;  // entries
  Event last_use;
  bool used = false;
  bool poisoned = false;  // its event could not be recorded: never reuse
};

class CudaCopyEngine final : public CopyEngine {
 public:
  CudaCopyEngine(const RegionTable& regions, HostArena& arena, int device, CopyPath path);
  ~CudaCopyEngine() override;

  std::shared_ptr<Transfer> submit(Direction dir, std::vector<BlockCopy> copies, uintptr_t after_stream,
                                   const std::vector<std::shared_ptr<Transfer>>& after) override;
  void read_block(uint32_t block, uint8_t* dst) override;
  // The path the transfers actually took: a kernel engine that copied some
  // transfers with memcpy, or a memcpy engine whose batches were refused,
  // says so and why (stats()["copy_engine"]).
  std::string name() const override {
    std::lock_guard<std::mutex> lock(mu_);
    if (path_ == CopyPath::kKernel) {
      if (fallback_transfers_ == 0) return "cuda-kernel";
      return concat("cuda-kernel (", fallback_transfers_, " of ", transfers_, " transfers by memcpy, last because ",
                    fallback_reason_, ")");
    }
    return batch_off_reason_.empty() ? "cuda-memcpy-batch" : concat("cuda-memcpy (", batch_off_reason_, ")");
  }

 private:
  void init();
  void release() noexcept;
  void check_region_memory(size_t i, uint64_t addr, const char* which) const;
  void upload_tables();
  std::unique_ptr<Staging> make_staging(size_t entries) const;
  Staging* acquire_staging(size_t entries);
  uint64_t slot_device_address(uint32_t slot);
  cudaStream_t stream_for(Direction dir) const {
    return dir == Direction::kRestore && restore_stream_ ? restore_stream_.get() : stream_.get();
  }
  void order_after(cudaStream_t s, const std::vector<std::shared_ptr<Transfer>>& after);
  std::string enqueue_kernel(Direction dir, cudaStream_t s, const std::vector<Entry>& entries, Staging& st);
  std::string enqueue_memcpy(Direction dir, cudaStream_t s, const std::vector<BlockCopy>& copies);
  void note_fallback(std::string why);

  const RegionTable& regions_;
  HostArena& arena_;
  const int device_;
  const CopyPath path_;
  int max_ctas_ = kDefaultCtas;
  uint32_t units_per_slot_ = 0;

  mutable std::mutex mu_;  // submit: staging pool, slot cache, dependency event, path notes
  std::string batch_off_reason_;  // non-empty: copy piece by piece, never batch again
  uint64_t transfers_ = 0;           // submitted with something to copy
  uint64_t fallback_transfers_ = 0;  // of those, kernel engine only: copied by memcpy
  std::string fallback_reason_;      // why the last one was
  Stream stream_;          // saves, and restores too with HOSTCACHE_COPY_STREAMS=1
  Stream restore_stream_;  // restores; null with HOSTCACHE_COPY_STREAMS=1
  Event dep_event_;
  std::shared_ptr<EventPool> events_;
  DeviceMem dev_regions_;
  DeviceMem dev_unit_region_;
  std::vector<std::unique_ptr<Staging>> staging_;
  std::vector<uint64_t> slot_dev_;  // slot -> device-visible address; 0 = not looked up
};

CudaCopyEngine::CudaCopyEngine(const RegionTable& regions, HostArena& arena, int device, CopyPath path)
    : regions_(regions), arena_(arena), device_(device), path_(path) {
  const DeviceInfo info = device_info();
  if (!info.gpu_usable) throw ConfigError(concat("cannot copy GPU memory: ", info.reason));
  HC_REQUIRE(device >= 0 && device < info.device_count, "CUDA device ", device, " does not exist: this machine has ",
             info.device_count, " visible CUDA device(s), numbered 0 to ", info.device_count - 1);
  HC_REQUIRE(arena.slot_bytes() >= regions.slot_bytes(), "host slots of ", arena.slot_bytes(),
             " bytes cannot hold a block of ", regions.slot_bytes(), " bytes");
  cuda::ScopedDevice guard(device_);
  check(guard.status(), concat("selecting CUDA device ", device_));
  try {
    init();
  } catch (...) {
    release();  // under the guard, before members go
    throw;
  }
}

void CudaCopyEngine::init() {
  for (size_t i = 0; i < regions_.size(); ++i) {
    check_region_memory(i, regions_[i].base, "first block");
    check_region_memory(i, regions_.block_address(i, regions_.num_blocks() - 1) + regions_[i].bytes - 1, "last block");
  }

  // TurboMind reports cudaMemcpyBatchAsync crashing on sm_100 (Blackwell):
  // copy piece by piece there, as it does.
  int major = 0;
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device_), "querying the compute capability");
  if (major >= 10) batch_off_reason_ = "batched copies are off on compute capability 10 and later";

  if (path_ == CopyPath::kKernel) {
    // A build without code for this GPU would fail every launch (and every
    // transfer with it): refuse at start, saying what to change.
    cudaFuncAttributes fa{};
    cudaError_t e = cudaFuncGetAttributes(&fa, copy_blocks_kernel<true>);
    if (e == cudaSuccess) e = cudaFuncGetAttributes(&fa, copy_blocks_kernel<false>);
    if (e != cudaSuccess) {
      cudaGetLastError();
      int minor = 0;
      if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device_) != cudaSuccess) cudaGetLastError();
      throw ConfigError(concat("the copy kernel cannot run on CUDA device ", device_, " (compute capability ", major, ".",
                               minor, "): ", cuda::error_text(e),
                               "; use copy_path='memcpy', or rebuild with CMAKE_CUDA_ARCHITECTURES including ", major,
                               minor));
    }
  }

  if (const char* env = std::getenv("HOSTCACHE_KERNEL_CTAS")) {
    const long v = std::strtol(env, nullptr, 10);
    HC_REQUIRE(v >= 1 && v <= 65535, "HOSTCACHE_KERNEL_CTAS=", env, " must be a number of CTAs from 1 to 65535");
    max_ctas_ = static_cast<int>(v);
  }

  // Highest priority: a restore holds a request back, so its kernel should
  // get SMs as soon as the forward's CTAs retire. The grid is small.
  int least = 0, greatest = 0;
  check(cudaDeviceGetStreamPriorityRange(&least, &greatest), "querying stream priorities");
  int streams = 2;
  if (const char* env = std::getenv("HOSTCACHE_COPY_STREAMS")) {
    const std::string v(env);
    HC_REQUIRE(v == "1" || v == "2", "HOSTCACHE_COPY_STREAMS=", v,
               " must be 1 (saves and restores on one stream) or 2 (the default)");
    streams = v == "1" ? 1 : 2;
  }
  cudaStream_t s = nullptr;
  check(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, greatest), "creating the copy stream");
  stream_.reset(s);
  if (streams == 2) {
    s = nullptr;
    check(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, greatest), "creating the restore stream");
    restore_stream_.reset(s);
  }
  dep_event_ = make_event();
  events_ = std::make_shared<EventPool>(device_);

  if (path_ == CopyPath::kKernel) {
    upload_tables();
    for (size_t i = 0; i < kInitialStagingBuffers; ++i) staging_.push_back(make_staging(kMinStagingEntries));
    slot_dev_.assign(arena_.num_slots(), 0);
  }
}

CudaCopyEngine::~CudaCopyEngine() {
  cuda::ScopedDevice guard(device_);
  release();
}

// Frees every device resource while the caller holds a device guard, rather
// than later in member destruction with whatever device is current.
void CudaCopyEngine::release() noexcept {
  if (stream_ && cudaStreamSynchronize(stream_.get()) != cudaSuccess) cudaGetLastError();
  if (restore_stream_ && cudaStreamSynchronize(restore_stream_.get()) != cudaSuccess) cudaGetLastError();
  staging_.clear();
  dev_unit_region_.reset();
  dev_regions_.reset();
  dep_event_.reset();
  restore_stream_.reset();
  stream_.reset();
}

void CudaCopyEngine::check_region_memory(size_t i, uint64_t addr, const char* which) const {
  cudaPointerAttributes a{};
  const cudaError_t e = cudaPointerGetAttributes(&a, reinterpret_cast<const void*>(addr));
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw ConfigError(concat("region ", i, ": cannot query the memory of its ", which, " at ", hex(addr), ": ",
                             cuda::error_text(e)));
  }
  if (a.type != cudaMemoryTypeDevice && a.type != cudaMemoryTypeManaged)
    throw ConfigError(concat("region ", i, " is not device memory (its ", which, " at ", hex(addr), " is ",
                             a.type == cudaMemoryTypeHost ? "pinned host memory" : "ordinary host memory",
                             "); register CUDA tensors here, or use device='cpu' for CPU tensors"));
  if (a.device != device_)
    throw ConfigError(concat("region ", i, " lives on CUDA device ", a.device, " but the cache was created for device ",
                             device_, "; create it with device=", a.device));
}

void CudaCopyEngine::upload_tables() {
  std::vector<DevRegion> table;
  std::vector<uint32_t> unit_region;
  uint64_t units = 0;
  for (size_t i = 0; i < regions_.size(); ++i) {
    const Region& r = regions_[i];
    table.push_back({r.base, r.stride, r.bytes, regions_.slot_offset(i), static_cast<uint32_t>(units), 0});
    const uint64_t n = (r.bytes + kUnitBytes - 1) / kUnitBytes;
    units += n;
    HC_REQUIRE(units <= (1ull << 31), "a block of ", format_bytes(regions_.slot_bytes()),
               " is too large for the copy kernel; use copy_path='memcpy'");
    unit_region.insert(unit_region.end(), n, static_cast<uint32_t>(i));
  }
  units_per_slot_ = static_cast<uint32_t>(units);
  const size_t table_bytes = table.size() * sizeof(DevRegion);
  const size_t unit_bytes = unit_region.size() * sizeof(uint32_t);
  dev_regions_ = device_alloc(table_bytes, "the region table");
  dev_unit_region_ = device_alloc(unit_bytes, "the copy-unit table");
  // Async on the copy stream, then wait: a plain cudaMemcpy would use the
  // legacy stream and serialise with the engine's other work.
  check(cudaMemcpyAsync(dev_regions_.get(), table.data(), table_bytes, cudaMemcpyHostToDevice, stream_.get()),
        "uploading the region table");
  check(cudaMemcpyAsync(dev_unit_region_.get(), unit_region.data(), unit_bytes, cudaMemcpyHostToDevice, stream_.get()),
        "uploading the copy-unit table");
  check(cudaStreamSynchronize(stream_.get()), "uploading the region tables");
}

std::unique_ptr<Staging> CudaCopyEngine::make_staging(size_t entries) const {
  size_t cap = kMinStagingEntries;
  while (cap < entries) cap *= 2;
  auto st = std::make_unique<Staging>();
  st->host = pinned_alloc(cap * sizeof(Entry), "a copy list");
  st->dev = device_alloc(cap * sizeof(Entry), "a copy list");
  st->capacity = cap;
  st->last_use = make_event();
  return st;
}

// A free staging buffer large enough, or a new one; nullptr sends the
// transfer down the memcpy path rather than failing it.
Staging* CudaCopyEngine::acquire_staging(size_t entries) {
  for (auto& st : staging_) {
    if (st->poisoned || st->capacity < entries) continue;
    if (st->used) {
      const cudaError_t e = cudaEventQuery(st->last_use.get());
      if (e == cudaErrorNotReady) continue;
      if (e != cudaSuccess) {
        cudaGetLastError();
        continue;
      }
    }
    return st.get();
  }
  if (staging_.size() >= kMaxStagingBuffers) return nullptr;
  try {
    staging_.push_back(make_staging(entries));
  } catch (const std::exception&) {
    return nullptr;
  }
  return staging_.back().get();
}

// Chunks are registered separately, so each slot's device address is asked
// for (and kept: registrations last as long as the arena). With UVA it is the
// host address; the query also proves the slot is registered and mapped.
uint64_t CudaCopyEngine::slot_device_address(uint32_t slot) {
  uint64_t& cached = slot_dev_[slot];
  if (cached == 0) {
    void* p = nullptr;
    if (cudaHostGetDevicePointer(&p, arena_.slot(slot), 0) == cudaSuccess && p != nullptr) {
      cached = reinterpret_cast<uint64_t>(p);
    } else {
      cudaGetLastError();
      cached = kUnreachable;
    }
  }
  return cached == kUnreachable ? 0 : cached;
}

std::shared_ptr<Transfer> CudaCopyEngine::submit(Direction dir, std::vector<BlockCopy> copies, uintptr_t after_stream,
                                                 const std::vector<std::shared_ptr<Transfer>>& after) {
  std::lock_guard<std::mutex> lock(mu_);  // SlotStore::submit checked every slot and block
  const cudaStream_t stream = stream_for(dir);
  if (copies.empty()) return std::make_shared<CudaTransfer>(events_, Event(), device_, stream);

  // Everything that can throw happens before a copy is enqueued (the stream
  // waits and the copy-list upload below touch no slot and no block).
  cuda::ScopedDevice guard(device_);
  check(guard.status(), concat("selecting CUDA device ", device_));
  auto transfer = std::make_shared<CudaTransfer>(events_, events_->acquire(), device_, stream);

  bool use_kernel = path_ == CopyPath::kKernel;
  std::string why_not;  // kernel engine: why this transfer goes by memcpy
  std::vector<Entry> entries;
  if (use_kernel) entries.reserve(copies.size());
  for (const BlockCopy& c : copies) {
    const bool pinned = arena_.prepare(c.slot);  // pins lazily, for both paths
    if (!use_kernel) continue;
    const uint64_t addr = pinned ? slot_device_address(c.slot) : 0;
    if (addr == 0) {  // pageable: only the copy engines can reach it
      use_kernel = false;
      if (pinned) why_not = "a slot has no device mapping";
      else if (!arena_.pinning()) why_not = "the pool is not pinned (pin='off')";
      else if (!arena_.pin_error().empty()) why_not = "pinning failed (see pin_error)";
      else why_not = "a slot is not pinned";
    } else {
      entries.push_back({addr, c.block});
    }
  }
  Staging* st = use_kernel ? acquire_staging(entries.size()) : nullptr;
  if (use_kernel && st == nullptr) {
    use_kernel = false;
    why_not = "no copy list was free";
  }

  if (after_stream != 0) {
    cudaError_t e = cudaEventRecord(dep_event_.get(), reinterpret_cast<cudaStream_t>(after_stream));
    if (e == cudaSuccess) e = cudaStreamWaitEvent(stream, dep_event_.get(), 0);
    check(e, concat("ordering the copy after stream ", hex(after_stream)));
  }
  order_after(stream, after);

  ++transfers_;
  std::string error;
  if (use_kernel) {
    // A failed upload or launch ran none of the copy: do it by memcpy instead.
    std::string failed = enqueue_kernel(dir, stream, entries, *st);
    if (!failed.empty()) {
      use_kernel = false;
      note_fallback(std::move(failed));
    }
  } else if (path_ == CopyPath::kKernel) {
    note_fallback(std::move(why_not));
  }
  // From here on nothing throws once a piece is queued: a failure is
  // reported through the transfer, whose event covers whatever was queued.
  if (!use_kernel) error = enqueue_memcpy(dir, stream, copies);
  const cudaError_t e = cudaEventRecord(transfer->event(), stream);
  if (e != cudaSuccess) {
    cudaGetLastError();
    // Untrackable: drain the stream so no copy still touches the slots or blocks.
    const cudaError_t s = cudaStreamSynchronize(stream);
    if (s != cudaSuccess) cudaGetLastError();
    transfer->fail_now(concat(
        error, error.empty() ? "" : "; ", "recording the copy's completion event failed: ", cuda::error_text(e),
        s == cudaSuccess ? std::string() : concat("; draining the copy stream failed: ", cuda::error_text(s))));
  } else if (!error.empty()) {
    transfer->set_error(std::move(error));
  }
  return transfer;
}

// Earlier transfers on the same slots or blocks: on this stream they are
// ahead already; on the other stream the copy waits for their events.
void CudaCopyEngine::order_after(cudaStream_t s, const std::vector<std::shared_ptr<Transfer>>& after) {
  for (const auto& prior : after) {
    auto* t = dynamic_cast<CudaTransfer*>(prior.get());
    if (t == nullptr) {  // not this engine's: nothing to order on, so wait for it
      prior->wait();
      continue;
    }
    if (t->stream() == s || t->done()) continue;
    check(cudaStreamWaitEvent(s, t->event(), 0), "ordering the copy after an earlier copy of the same slot or block");
  }
}

void CudaCopyEngine::note_fallback(std::string why) {
  ++fallback_transfers_;
  fallback_reason_ = std::move(why);
}

std::string CudaCopyEngine::enqueue_kernel(Direction dir, cudaStream_t s, const std::vector<Entry>& entries,
                                           Staging& st) {
  const size_t bytes = entries.size() * sizeof(Entry);
  std::memcpy(st.host.get(), entries.data(), bytes);
  cudaError_t e = cudaMemcpyAsync(st.dev.get(), st.host.get(), bytes, cudaMemcpyHostToDevice, s);
  if (e != cudaSuccess) {
    cudaGetLastError();
    st.poisoned = true;  // the upload may be half queued: do not rewrite its source
    return concat("uploading the copy list failed: ", cuda::error_text(e));
  }
  KernelArgs args{static_cast<const DevRegion*>(dev_regions_.get()),
                  static_cast<const uint32_t*>(dev_unit_region_.get()), static_cast<const Entry*>(st.dev.get()),
                  static_cast<uint64_t>(entries.size()) * units_per_slot_, units_per_slot_};
  std::string failed;
  if (args.total_units != 0) {  // an empty grid is a launch error, not a no-op
    const uint64_t ctas = std::min<uint64_t>(max_ctas_, (args.total_units + kWarpsPerCta - 1) / kWarpsPerCta);
    cudaGetLastError();  // drop a stale error so the check below is about this launch
    if (dir == Direction::kOffload)
      copy_blocks_kernel<true><<<static_cast<unsigned>(ctas), kThreads, 0, s>>>(args);
    else
      copy_blocks_kernel<false><<<static_cast<unsigned>(ctas), kThreads, 0, s>>>(args);
    e = cudaGetLastError();
    if (e != cudaSuccess) failed = concat("launching the copy kernel failed: ", cuda::error_text(e));
  }
  // After the kernel, whether or not it launched: the upload is queued either way.
  if (cudaEventRecord(st.last_use.get(), s) == cudaSuccess) {
    st.used = true;
  } else {
    cudaGetLastError();
    st.poisoned = true;
  }
  return failed;
}

std::string CudaCopyEngine::enqueue_memcpy(Direction dir, cudaStream_t s, const std::vector<BlockCopy>& copies) {
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;
  const size_t most = copies.size() * regions_.size();
  dsts.reserve(most);
  srcs.reserve(most);
  sizes.reserve(most);
  // Block-major, merging pieces contiguous on both sides (regions that sit
  // next to each other in one block-first tensor become one copy).
  for (const BlockCopy& c : copies) {
    uint8_t* slot = arena_.slot(c.slot);
    for (size_t r = 0; r < regions_.size(); ++r) {
      auto* dev = reinterpret_cast<uint8_t*>(regions_.block_address(r, c.block));
      uint8_t* host = slot + regions_.slot_offset(r);
      uint8_t* dst = dir == Direction::kOffload ? host : dev;
      const uint8_t* src = dir == Direction::kOffload ? dev : host;
      const size_t n = regions_[r].bytes;
      if (!sizes.empty() && static_cast<uint8_t*>(dsts.back()) + sizes.back() == dst &&
          static_cast<const uint8_t*>(srcs.back()) + sizes.back() == src) {
        sizes.back() += n;
        continue;
      }
      dsts.push_back(dst);
      srcs.push_back(src);
      sizes.push_back(n);
    }
  }

  std::string batch_note;
  if (batch_off_reason_.empty()) {
    // One attribute for every piece. Stream order: the source is written by
    // work queued before (the forward, via after_stream). Location hints stay
    // zero: they apply only to managed or unregistered memory, and a zeroed
    // hint is what TurboMind's own batch copies pass.
    cudaMemcpyAttributes attr{};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
    size_t attr_index = 0;
    const cudaError_t e =
        cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), sizes.size(), &attr, &attr_index, 1, s);
    if (e == cudaSuccess) return {};
    cudaGetLastError();
    // Retry copy by copy now (copying a piece twice is harmless) and never
    // batch again: an argument the driver refuses once it refuses every
    // time, and retrying would cost a failed call per transfer unseen.
    batch_off_reason_ = concat("cudaMemcpyBatchAsync failed: ", cuda::error_text(e));
    batch_note = concat(" (after ", batch_off_reason_, ")");
  }
  for (size_t i = 0; i < sizes.size(); ++i) {
    const cudaError_t e = cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], cudaMemcpyDefault, s);
    if (e != cudaSuccess) {
      cudaGetLastError();
      return concat("cudaMemcpyAsync of piece ", i, " of ", sizes.size(), " (", format_bytes(sizes[i]),
                    ") failed: ", cuda::error_text(e), batch_note);
    }
  }
  return {};
}

void CudaCopyEngine::read_block(uint32_t block, uint8_t* dst) {
  regions_.check_block(block);
  cuda::ScopedDevice guard(device_);
  check(guard.status(), concat("selecting CUDA device ", device_));
  // On the restore stream: only restores write device blocks, so it sees
  // every one queued before it, without waiting for saves.
  const cudaStream_t stream = stream_for(Direction::kRestore);
  cudaError_t e = cudaSuccess;
  for (size_t r = 0; r < regions_.size() && e == cudaSuccess; ++r)
    e = cudaMemcpyAsync(dst + regions_.slot_offset(r), reinterpret_cast<const void*>(regions_.block_address(r, block)),
                        regions_[r].bytes, cudaMemcpyDeviceToHost, stream);
  // Drain even after a failure: dst belongs to the caller once we return.
  const cudaError_t s = cudaStreamSynchronize(stream);
  check(e, concat("reading device block ", block));
  check(s, concat("reading device block ", block));
}

}  // namespace

std::unique_ptr<CopyEngine> make_cuda_copy_engine(const RegionTable& regions, HostArena& arena, int device,
                                                  CopyPath path) {
  return std::make_unique<CudaCopyEngine>(regions, arena, device, path);
}

}  // namespace hostcache
