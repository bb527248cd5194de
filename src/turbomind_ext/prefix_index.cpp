#include "prefix_index.h"

#include <cstring>
#include <stdexcept>

#include "block_key.h"
#include "errors.h"

namespace hostcache {

PrefixIndex::PrefixIndex(uint32_t num_slots, uint32_t block_tokens) : block_tokens_(block_tokens) {
  HC_REQUIRE(num_slots > 0, "the prefix index needs at least one slot");
  HC_REQUIRE(block_tokens > 0, "block_tokens must be positive (tokens per KV block, 64 in LMDeploy)");
  key_.assign(num_slots, 0);
  parent_.assign(num_slots, 0);
  ns_.assign(num_slots, 0);
  stamp_.assign(num_slots, 0);
  pins_.assign(num_slots, 0);
  children_.assign(num_slots, 0);
  state_.assign(num_slots, kFree);
  in_lru_.assign(num_slots, 0);
  tokens_.assign(static_cast<size_t>(num_slots) * block_tokens, 0);
  free_.reserve(num_slots);
  for (uint32_t s = num_slots; s-- > 0;) free_.push_back(s);  // lowest slot first
  by_key_.reserve(num_slots * 2);
}

void PrefixIndex::refresh(uint32_t s) {
  const bool want = evictable(s);
  if (want == static_cast<bool>(in_lru_[s])) return;
  if (want) lru_.emplace(stamp_[s], s);
  else lru_.erase({stamp_[s], s});
  in_lru_[s] = want;
}

void PrefixIndex::touch(uint32_t s) {
  if (in_lru_[s]) {
    lru_.erase({stamp_[s], s});
    stamp_[s] = ++clock_;
    lru_.emplace(stamp_[s], s);
  } else {
    stamp_[s] = ++clock_;
  }
}

int64_t PrefixIndex::find(uint64_t key) const {
  auto it = by_key_.find(key);
  return it == by_key_.end() ? -1 : static_cast<int64_t>(it->second);
}

size_t PrefixIndex::match(uint64_t parent, uint64_t ns, const int32_t* tokens, size_t n_tokens, bool pin,
                          std::vector<MatchStep>* out) {
  const size_t blocks = n_tokens / block_tokens_;
  const size_t bytes = sizeof(int32_t) * block_tokens_;
  size_t matched = 0;
  for (; matched < blocks; ++matched) {
    const int32_t* t = tokens + matched * block_tokens_;
    const uint64_t key = chain_key(parent, ns, t, block_tokens_);
    auto it = by_key_.find(key);
    if (it == by_key_.end()) break;
    const uint32_t s = it->second;
    if (state_[s] != kReady || parent_[s] != parent || ns_[s] != ns || std::memcmp(tokens_of(s), t, bytes) != 0)
      break;
    touch(s);
    if (pin) {
      ++pins_[s];
      refresh(s);
    }
    if (out) out->push_back({key, s});
    parent = key;
  }
  return matched;
}

void PrefixIndex::link_child(uint64_t parent) {
  auto it = by_key_.find(parent);
  if (it != by_key_.end()) {
    ++children_[it->second];
    refresh(it->second);
  } else {
    ++orphans_[parent];
  }
}

void PrefixIndex::unlink_child(uint64_t parent) {
  auto it = by_key_.find(parent);
  if (it != by_key_.end()) {
    --children_[it->second];
    refresh(it->second);
    return;
  }
  auto o = orphans_.find(parent);
  if (--o->second == 0) orphans_.erase(o);
}

InsertResult PrefixIndex::insert(uint64_t parent, uint64_t ns, const int32_t* block_tokens) {
  const uint64_t key = chain_key(parent, ns, block_tokens, block_tokens_);
  auto it = by_key_.find(key);
  if (it != by_key_.end()) {
    const uint32_t s = it->second;
    if (parent_[s] != parent || ns_[s] != ns ||
        std::memcmp(tokens_of(s), block_tokens, sizeof(int32_t) * block_tokens_) != 0) {
      ++collisions_;
      return {InsertStatus::kCollision, key, 0};
    }
    if (state_[s] == kPending) return {InsertStatus::kPending, key, s};
    touch(s);
    return {InsertStatus::kExists, key, s};
  }
  // Hold the parent while making room so a chain is never cut above the
  // block being added.
  auto p = by_key_.find(parent);
  const int64_t parent_slot = p == by_key_.end() ? -1 : static_cast<int64_t>(p->second);
  if (parent_slot >= 0) pin(static_cast<uint32_t>(parent_slot));
  const bool room = !free_.empty() || evict_one();
  if (parent_slot >= 0) unpin(static_cast<uint32_t>(parent_slot));
  if (!room) return {InsertStatus::kFull, key, 0};

  const uint32_t s = free_.back();
  free_.pop_back();
  key_[s] = key;
  parent_[s] = parent;
  ns_[s] = ns;
  pins_[s] = 1;
  state_[s] = kPending;
  std::memcpy(&tokens_[static_cast<size_t>(s) * block_tokens_], block_tokens, sizeof(int32_t) * block_tokens_);
  auto o = orphans_.find(key);
  if (o != orphans_.end()) {
    children_[s] = o->second;
    orphans_.erase(o);
  } else {
    children_[s] = 0;
  }
  link_child(parent);
  by_key_.emplace(key, s);
  stamp_[s] = ++clock_;
  refresh(s);
  return {InsertStatus::kCreated, key, s};
}

void PrefixIndex::commit(uint32_t s) {
  if (state_[s] != kPending || pins_[s] == 0) throw std::logic_error("commit of a slot that is not being offloaded");
  state_[s] = kReady;
  --pins_[s];
  refresh(s);
}

void PrefixIndex::pin(uint32_t s) {
  if (state_[s] == kFree) throw std::logic_error("pin of a free slot");
  ++pins_[s];
  refresh(s);
}

void PrefixIndex::unpin(uint32_t s) {
  if (pins_[s] == 0) throw std::logic_error("unpin of a slot that is not pinned");
  --pins_[s];
  if (state_[s] == kDiscarded) {
    if (pins_[s] == 0) free_slot(s);
    return;
  }
  refresh(s);
}

void PrefixIndex::remove_live(uint32_t s) {
  if (in_lru_[s]) {
    lru_.erase({stamp_[s], s});
    in_lru_[s] = 0;
  }
  by_key_.erase(key_[s]);
  unlink_child(parent_[s]);
  if (children_[s] > 0) orphans_[key_[s]] += children_[s];
  children_[s] = 0;
}

void PrefixIndex::free_slot(uint32_t s) {
  state_[s] = kFree;
  free_.push_back(s);
}

void PrefixIndex::discard(uint32_t s) {
  if (state_[s] != kPending && state_[s] != kReady) return;
  remove_live(s);
  if (pins_[s] == 0) free_slot(s);
  else state_[s] = kDiscarded;
}

bool PrefixIndex::evict_one() {
  if (lru_.empty()) return false;
  const uint32_t s = lru_.begin()->second;
  remove_live(s);
  free_slot(s);
  ++evictions_;
  return true;
}

void PrefixIndex::check_invariants() const {
  auto fail = [](const std::string& what) { throw std::logic_error("prefix index invariant broken: " + what); };
  const uint32_t n = capacity();
  std::vector<uint8_t> is_free(n, 0);
  for (uint32_t s : free_) {
    if (s >= n || is_free[s]) fail("free list holds an invalid or repeated slot");
    if (state_[s] != kFree) fail("a slot on the free list is not free");
    is_free[s] = 1;
  }
  std::unordered_map<uint64_t, uint32_t> kids;
  size_t live = 0;
  for (uint32_t s = 0; s < n; ++s) {
    if (state_[s] == kFree) {
      if (!is_free[s]) fail("a free slot is missing from the free list");
      continue;
    }
    if (state_[s] == kDiscarded) {
      if (pins_[s] == 0) fail("a discarded slot without pins was not freed");
      if (in_lru_[s]) fail("a discarded slot is evictable");
      continue;
    }
    ++live;
    auto it = by_key_.find(key_[s]);
    if (it == by_key_.end() || it->second != s) fail("a live slot is missing from the key map");
    if (state_[s] == kPending && pins_[s] == 0) fail("a pending slot is not pinned by its offload");
    ++kids[parent_[s]];
  }
  if (live != by_key_.size()) fail("the key map holds entries that are not live");
  size_t evictable_count = 0;
  for (uint32_t s = 0; s < n; ++s) {
    if (state_[s] != kPending && state_[s] != kReady) continue;
    auto k = kids.find(key_[s]);
    const uint32_t expect = k == kids.end() ? 0 : k->second;
    if (children_[s] != expect) fail("a child count is wrong");
    if (k != kids.end()) kids.erase(k);
    const bool want = evictable(s);
    if (want != static_cast<bool>(in_lru_[s])) fail("the LRU set disagrees with evictability");
    if (want) {
      ++evictable_count;
      if (!lru_.count({stamp_[s], s})) fail("an evictable slot is in the LRU set under a stale stamp");
    }
  }
  if (evictable_count != lru_.size()) fail("the LRU set holds stale entries");
  if (kids.size() != orphans_.size()) fail("orphan counts disagree with live entries");
  for (const auto& [key, count] : kids) {
    auto o = orphans_.find(key);
    if (o == orphans_.end() || o->second != count) fail("an orphan count is wrong");
  }
}

}  // namespace hostcache
