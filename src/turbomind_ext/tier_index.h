// TierIndex: the tier's policy over its prefix index, kept by both users of
// the core: the single-process HostCache (host_cache.h) and LMDeploy's
// scheduler side (lmdeploy_patch/scheduler_tier.py), which holds the index
// while each rank holds a SlotStore.
//
// A save reserves a slot (pending: not matchable, pinned), and is settled by
// saved(): committed (ready, matchable) or, when it failed, discarded. A
// restore pins its slots (begin_restore) until restored() settles it; a slot
// whose restored bytes were found wrong is discarded. A match may pin what it
// found, for a restore that takes the pins over or for release().
//
// Who settles when: HostCache settles a transfer when its copy completed.
// The scheduler side settles at the moment it plans the copy: every rank runs
// the copies of one slot and one block in submission order (SlotStore), so a
// restore planned after a save reads the saved bytes, and a save planned
// after a restore waits for it. The rules are these; only the moment differs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "prefix_index.h"

namespace hostcache {

struct TierCounters {
  uint64_t match_queries = 0, query_blocks = 0, hit_blocks = 0, miss_blocks = 0;
  uint64_t saves_existing = 0, saves_dropped = 0, discarded = 0;
};

class TierIndex {
 public:
  TierIndex(uint32_t num_slots, uint32_t block_tokens) : index_(num_slots, block_tokens) {}

  uint32_t block_tokens() const { return index_.block_tokens(); }
  uint32_t capacity() const { return index_.capacity(); }
  uint32_t used() const { return index_.used(); }
  uint64_t evictions() const { return index_.evictions(); }
  uint64_t collisions() const { return index_.collisions(); }
  // Slots out of range are refused (ConfigError) by every method taking one.
  uint32_t pins(uint32_t slot) const;
  bool is_ready(uint32_t slot) const;
  const TierCounters& counters() const { return counters_; }

  // Longest ready prefix continuing from parent over the full blocks of
  // tokens[0, n); with pin, each slot found stays pinned for its restore.
  std::vector<MatchStep> match(uint64_t parent, uint64_t ns, const int32_t* tokens, size_t n, bool pin);
  // Drops the pins of matched slots no restore took over. Validated first.
  void release(const uint32_t* slots, size_t n);
  // Forgets matched slots whose bytes were found wrong before any restore
  // took them over (a checksum that no longer matches), and drops their
  // match pins. Validated first, like release().
  void drop(const uint32_t* slots, size_t n);

  // A save's slot for one block under parent: kCreated (pending and pinned
  // until saved()), kExists/kPending (already stored or being stored),
  // kFull/kCollision (dropped: nothing to copy).
  InsertResult reserve(uint64_t parent, uint64_t ns, const int32_t* block_tokens);
  // Settles a reserved save; refused (nothing changed) for a slot no save holds.
  void saved(uint32_t slot, bool ok);

  // Validates every slot (ready; pinned by a match when holds_match_pins),
  // then pins each for its restore. Throws ConfigError before pinning any.
  void begin_restore(const uint32_t* slots, size_t n, bool holds_match_pins);
  // Settles restores begun with begin_restore; every slot is validated
  // (enough pins held) before any changes.
  void restored(const uint32_t* slots, size_t n, bool intact, bool release_match_pins);

  void check_invariants() const { index_.check_invariants(); }

 private:
  void check_slot(uint32_t slot) const;

  PrefixIndex index_;
  TierCounters counters_;
};

}  // namespace hostcache
