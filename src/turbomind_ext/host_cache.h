// HostCache: the tier in one process. It owns a SlotStore (host arena and
// copy engine) and the tier's policy over the prefix index (TierIndex, the
// one LMDeploy's scheduler side keeps too), decides which slots a transfer
// uses, and settles the index when the transfer completes:
//  - an offloaded slot becomes matchable only after its copy completed (C1);
//  - every slot a queued or running transfer touches is pinned (C2);
//  - a transfer on a device block or slot is ordered after the previous
//    transfer on it (C3 inside the tier; SlotStore does it);
//  - checksum mode proves restored bytes equal offloaded bytes (C4);
//  - a failed copy discards or unpins its slots and reports ok=false, so
//    the caller recomputes; no slot is leaked (C6).
// Completed transfers are settled ("reaped") by the thread that next polls,
// waits or calls any method, so the index is only touched under one mutex.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "copy_engine.h"
#include "cuda_support.h"
#include "host_arena.h"
#include "prefix_index.h"
#include "regions.h"
#include "slot_store.h"
#include "tier_index.h"

namespace hostcache {

struct HostCacheOptions : SlotStoreOptions {
  uint32_t block_tokens = 64;
  bool checksum = false;
};

struct TransferRecord {
  uint64_t id = 0;
  Direction direction = Direction::kOffload;
  std::vector<BlockCopy> copies;
  bool release_match_pins = false;  // restore: also drop the pins of the match
  std::shared_ptr<Transfer> engine;  // dropped once settled
  bool injected_failure = false;
  std::chrono::steady_clock::time_point started;
  // Set when settled:
  bool finished = false;
  bool ok = false;
  std::string error;
  double seconds = 0;  // submit to settle, an upper bound on the copy time
};

struct OffloadResult {
  std::shared_ptr<TransferRecord> transfer;
  std::vector<uint64_t> keys;  // one per item
  std::vector<int64_t> slots;  // one per item, -1 when not stored
  uint32_t created = 0, existing = 0, dropped = 0;
};

// The store's figures (slots, pinning, engine) plus the index's and the transfers'.
struct Stats : StoreStats {
  uint32_t slots_used = 0, slots_free = 0;
  uint64_t match_queries = 0, query_blocks = 0, hit_blocks = 0, miss_blocks = 0;
  uint64_t evictions = 0, collisions = 0;
  uint64_t offload_transfers = 0, restore_transfers = 0;
  uint64_t blocks_offloaded = 0, blocks_restored = 0, bytes_offloaded = 0, bytes_restored = 0;
  uint64_t offload_existing = 0, offload_dropped = 0;
  uint64_t transfers_failed = 0, checksum_failures = 0;
  uint32_t transfers_in_flight = 0;
  double restore_seconds = 0, offload_seconds = 0;
};

class HostCache {
 public:
  HostCache(const HostCacheOptions& options, std::vector<Region> regions, uint64_t num_device_blocks);
  ~HostCache();
  HostCache(const HostCache&) = delete;
  HostCache& operator=(const HostCache&) = delete;

  uint32_t block_tokens() const { return tier_.block_tokens(); }
  uint64_t slot_bytes() const { return store_.slot_bytes(); }
  uint32_t num_slots() const { return store_.num_slots(); }
  // A slot's bytes (tests and debugging: what host memory holds).
  uint8_t* slot_data(uint32_t slot) const { return store_.slot_data(slot); }

  // Keys of the full blocks of tokens[0, n), chained from parent.
  std::vector<uint64_t> block_keys(uint64_t parent, uint64_t ns, const int32_t* tokens, size_t n) const;
  // Longest ready prefix in host memory continuing from parent. With pin,
  // the slots stay pinned until release() or a restore that takes them over.
  std::vector<MatchStep> match(uint64_t parent, uint64_t ns, const int32_t* tokens, size_t n, bool pin);
  void release(const uint32_t* slots, size_t n);

  // Saves items (parents[i], namespaces[i], tokens[i*block_tokens ..],
  // device_blocks[i]) into host slots, skipping blocks already stored.
  OffloadResult offload(const uint64_t* parents, const uint64_t* namespaces, const int32_t* tokens,
                        const int32_t* device_blocks, size_t n, uintptr_t after_stream);
  // Copies ready slots into device blocks.
  std::shared_ptr<TransferRecord> restore(const uint32_t* slots, const int32_t* device_blocks, size_t n,
                                          uintptr_t after_stream, bool release_match_pins);

  bool poll(TransferRecord& t);
  void wait(TransferRecord& t);
  void make_stream_wait(TransferRecord& t, uintptr_t stream);
  size_t reap();
  void wait_all();

  Stats stats();
  void inject_failures(uint32_t n);
  void check_invariants();

 private:
  std::shared_ptr<TransferRecord> submit(Direction dir, std::vector<BlockCopy> copies, uintptr_t after_stream,
                                         bool release_match_pins);
  void settle(TransferRecord& t);  // mu_ held; never throws
  bool restored_intact(const BlockCopy& c);
  size_t reap_locked();

  HostCacheOptions options_;
  SlotStore store_;
  TierIndex tier_;
  std::mutex mu_;
  std::vector<std::shared_ptr<TransferRecord>> in_flight_;
  std::vector<uint64_t> checksums_;
  uint64_t next_id_ = 1;
  uint32_t failures_to_inject_ = 0;
  Stats counters_;
};

}  // namespace hostcache
