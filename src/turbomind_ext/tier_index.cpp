#include "tier_index.h"

#include <unordered_map>

#include "errors.h"

namespace hostcache {

void TierIndex::check_slot(uint32_t slot) const {
  HC_REQUIRE(slot < index_.capacity(), "slot ", slot, " is out of range: the index has ", index_.capacity(), " slots");
}

uint32_t TierIndex::pins(uint32_t slot) const {
  check_slot(slot);
  return index_.pins(slot);
}

bool TierIndex::is_ready(uint32_t slot) const {
  check_slot(slot);
  return index_.is_ready(slot);
}

std::vector<MatchStep> TierIndex::match(uint64_t parent, uint64_t ns, const int32_t* tokens, size_t n, bool pin) {
  std::vector<MatchStep> out;
  const size_t hit = index_.match(parent, ns, tokens, n, pin, &out);
  const size_t queried = n / index_.block_tokens();
  counters_.match_queries++;
  counters_.query_blocks += queried;
  counters_.hit_blocks += hit;
  counters_.miss_blocks += queried - hit;
  return out;
}

void TierIndex::release(const uint32_t* slots, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    HC_REQUIRE(slots[i] < index_.capacity() && index_.pins(slots[i]) > 0, "release of slot ", slots[i],
               " that no match pinned");
  }
  for (size_t i = 0; i < n; ++i) index_.unpin(slots[i]);
}

void TierIndex::drop(const uint32_t* slots, size_t n) {
  std::unordered_map<uint32_t, uint32_t> need;
  for (size_t i = 0; i < n; ++i) {
    HC_REQUIRE(slots[i] < index_.capacity(), "drop of slot ", slots[i], " outside the index of ", index_.capacity(),
               " slots");
    HC_REQUIRE(index_.pins(slots[i]) > need[slots[i]]++, "drop of slot ", slots[i], " that no match pinned");
  }
  for (size_t i = 0; i < n; ++i) {
    index_.discard(slots[i]);
    counters_.discarded++;
    index_.unpin(slots[i]);
  }
}

InsertResult TierIndex::reserve(uint64_t parent, uint64_t ns, const int32_t* block_tokens) {
  const InsertResult r = index_.insert(parent, ns, block_tokens);
  if (r.status == InsertStatus::kExists || r.status == InsertStatus::kPending) counters_.saves_existing++;
  if (r.status == InsertStatus::kFull || r.status == InsertStatus::kCollision) counters_.saves_dropped++;
  return r;
}

void TierIndex::saved(uint32_t slot, bool ok) {
  check_slot(slot);
  HC_REQUIRE(!index_.is_ready(slot) && index_.pins(slot) > 0, "slot ", slot,
             " holds no reserved save; settle only slots reserve() created");
  if (ok) {
    index_.commit(slot);
    return;
  }
  index_.discard(slot);
  index_.unpin(slot);
  counters_.discarded++;
}

void TierIndex::begin_restore(const uint32_t* slots, size_t n, bool holds_match_pins) {
  for (size_t i = 0; i < n; ++i) {
    HC_REQUIRE(slots[i] < index_.capacity() && index_.is_ready(slots[i]), "slot ", slots[i],
               " holds no ready block; restore only slots returned by match()");
    HC_REQUIRE(!holds_match_pins || index_.pins(slots[i]) > 0, "slot ", slots[i],
               " is not pinned by a match; match with pin=True before handing its pins to restore");
  }
  for (size_t i = 0; i < n; ++i) index_.pin(slots[i]);
}

void TierIndex::restored(const uint32_t* slots, size_t n, bool intact, bool release_match_pins) {
  const uint32_t held = release_match_pins ? 2 : 1;
  std::unordered_map<uint32_t, uint32_t> need;
  for (size_t i = 0; i < n; ++i) {
    check_slot(slots[i]);
    need[slots[i]] += held;
  }
  for (const auto& [slot, pins] : need)
    HC_REQUIRE(index_.pins(slot) >= pins, "slot ", slot, " holds ", index_.pins(slot), " pins but settling its ",
               "restores needs ", pins, "; settle only restores begun with begin_restore");
  for (size_t i = 0; i < n; ++i) {
    if (!intact) {
      index_.discard(slots[i]);
      counters_.discarded++;
    }
    index_.unpin(slots[i]);
    if (release_match_pins) index_.unpin(slots[i]);
  }
}

}  // namespace hostcache
