// Prefix index: block key -> host slot, with the block's parent key,
// namespace and exact token ids.
//
// Invariants (check_invariants() verifies them all):
//  - One entry per slot; a live entry is in the key map, a free slot is not.
//  - A match returns only ready entries whose parent key, namespace and token
//    ids equal the request's; a hash alone never decides reuse.
//  - Only leaves (no live child) that are ready and unpinned are evictable,
//    least recently used first. The clock is a counter, never wall time.
//  - A parent need not be present (its block may live only on the GPU):
//    children of absent keys are counted in orphans_ so that a parent
//    inserted later starts with the right child count.
// Not thread-safe: HostCache serialises access.
#pragma once

#include <cstddef>
#include <cstdint>
#include <set>
#include <unordered_map>
#include <utility>
#include <vector>

namespace hostcache {

struct MatchStep {
  uint64_t key;
  uint32_t slot;
};

enum class InsertStatus : uint8_t {
  kCreated,    // new pending entry, pinned once for the offload that fills it
  kExists,     // same block already ready: nothing to copy
  kPending,    // same block being offloaded by another transfer
  kCollision,  // key taken by different tokens: not stored
  kFull,       // every slot pinned or an inner node: not stored
};

struct InsertResult {
  InsertStatus status;
  uint64_t key;
  uint32_t slot;  // valid for kCreated, kExists, kPending
};

class PrefixIndex {
 public:
  PrefixIndex(uint32_t num_slots, uint32_t block_tokens);

  uint32_t block_tokens() const { return block_tokens_; }
  uint32_t capacity() const { return static_cast<uint32_t>(state_.size()); }
  uint32_t used() const { return capacity() - static_cast<uint32_t>(free_.size()); }
  uint64_t evictions() const { return evictions_; }
  uint64_t collisions() const { return collisions_; }

  // Longest run of ready entries that continues from `parent` over the full
  // blocks of tokens[0, n_tokens). Touches the path; pins it when `pin`.
  size_t match(uint64_t parent, uint64_t ns, const int32_t* tokens, size_t n_tokens, bool pin,
               std::vector<MatchStep>* out);

  // Inserts one block under `parent`, evicting LRU leaves for room.
  InsertResult insert(uint64_t parent, uint64_t ns, const int32_t* block_tokens);
  // The offload filling a created entry finished: ready, and its pin dropped.
  void commit(uint32_t slot);
  // Forgets an entry at once (failed or corrupt copy); its slot is freed
  // when the last pin on it is dropped.
  void discard(uint32_t slot);
  void pin(uint32_t slot);
  void unpin(uint32_t slot);
  // Evicts the least recently used evictable leaf; false when there is none.
  bool evict_one();

  bool is_ready(uint32_t slot) const { return state_[slot] == kReady; }
  uint32_t pins(uint32_t slot) const { return pins_[slot]; }
  uint64_t key_of(uint32_t slot) const { return key_[slot]; }
  // Slot of a live entry, or -1.
  int64_t find(uint64_t key) const;
  // Throws std::logic_error describing the first broken invariant.
  void check_invariants() const;

 private:
  enum State : uint8_t { kFree, kPending, kReady, kDiscarded };

  bool evictable(uint32_t s) const { return state_[s] == kReady && pins_[s] == 0 && children_[s] == 0; }
  void refresh(uint32_t s);
  void touch(uint32_t s);
  void link_child(uint64_t parent);
  void unlink_child(uint64_t parent);
  void remove_live(uint32_t s);  // out of the map and the tree
  void free_slot(uint32_t s);
  const int32_t* tokens_of(uint32_t s) const { return &tokens_[static_cast<size_t>(s) * block_tokens_]; }

  uint32_t block_tokens_;
  std::vector<uint64_t> key_, parent_, ns_, stamp_;
  std::vector<uint32_t> pins_, children_;
  std::vector<State> state_;
  std::vector<uint8_t> in_lru_;
  std::vector<int32_t> tokens_;
  std::vector<uint32_t> free_;
  std::unordered_map<uint64_t, uint32_t> by_key_;
  std::unordered_map<uint64_t, uint32_t> orphans_;  // absent key -> live children
  std::set<std::pair<uint64_t, uint32_t>> lru_;     // (stamp, slot) of evictable entries
  uint64_t clock_ = 0;
  uint64_t evictions_ = 0;
  uint64_t collisions_ = 0;
};

}  // namespace hostcache
