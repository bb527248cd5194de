// SlotStore: host slots plus the transport that fills and empties them,
// addressed by slot id, with no index. HostCache puts its prefix index on
// top; an engine whose scheduler keeps the index elsewhere (LMDeploy's
// scheduler process) uses a SlotStore per rank to execute its copy plans.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "copy_engine.h"
#include "cuda_support.h"
#include "host_arena.h"
#include "regions.h"

namespace hostcache {

struct SlotStoreOptions {
  uint64_t capacity_bytes = 0;
  uint64_t reserve_bytes = 2ull << 30;
  bool cuda = false;  // regions are CUDA device memory
  int device = 0;
  PinMode pin_mode = PinMode::kLazy;
  CopyPath copy_path = CopyPath::kKernel;
  unsigned cpu_workers = 2;
  uint64_t pin_chunk_bytes = 256ull << 20;
  std::string capacity_setting = "capacity_bytes";
};

// The store's own figures (HostCache adds its index counters).
struct StoreStats {
  uint32_t slots_total = 0;
  uint64_t slot_bytes = 0, slot_stride = 0, pool_bytes = 0;
  bool pinned = false;
  uint64_t pinned_bytes = 0;
  std::string pin_mode, pin_error, copy_engine;
  std::string pin_method, register_error;  // see HostArena::pin_method
};

class SlotStore {
 public:
  SlotStore(const SlotStoreOptions& options, std::vector<Region> regions, uint64_t num_device_blocks);
  // Waits for every transfer it started: no copy may outlive the arena.
  ~SlotStore();
  SlotStore(const SlotStore&) = delete;
  SlotStore& operator=(const SlotStore&) = delete;

  const RegionTable& regions() const { return regions_; }
  uint32_t num_slots() const { return arena_->num_slots(); }
  uint64_t slot_bytes() const { return regions_.slot_bytes(); }
  uint8_t* slot_data(uint32_t slot) const;
  // ConfigError naming the first slot or block outside the pools.
  void check_copies(const std::vector<BlockCopy>& copies) const;

  // Starts one batched copy. Slots are pinned on first use (lazy pinning).
  // Copies take effect in submission order per slot and per device block:
  // a copy is ordered after the previous transfer on each of its slots and
  // blocks (the CUDA engine by events between its streams, the CPU engine by
  // waiting). Throws only before anything is queued.
  std::shared_ptr<Transfer> submit(Direction dir, const std::vector<BlockCopy>& copies, uintptr_t after_stream);

  // HostArena::ranges: the pool's memory, to register with a store.
  std::vector<std::pair<uint8_t*, uint64_t>> memory_ranges();
  uint64_t slot_checksum(uint32_t slot) const;
  // Reads the device block back (synchronously) and hashes it like a slot.
  uint64_t block_checksum(uint32_t block);
  StoreStats stats() const;

 private:
  RegionTable regions_;
  std::unique_ptr<HostArena> arena_;
  std::unique_ptr<CopyEngine> engine_;
  mutable std::mutex mu_;
  // The last transfer on each device block and slot. Weak: a finished
  // transfer may go; an unfinished one is held by unfinished_.
  std::vector<std::weak_ptr<Transfer>> last_block_use_, last_slot_use_;
  std::vector<std::shared_ptr<Transfer>> unfinished_;  // held until done: the destructor waits for them
  std::vector<uint8_t> scratch_;
};

}  // namespace hostcache
