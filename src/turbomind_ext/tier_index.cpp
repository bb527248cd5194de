#include "tier_index.h"

#include "errors.h"

namespace hostcache {

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

InsertResult TierIndex::reserve(uint64_t parent, uint64_t ns, const int32_t* block_tokens) {
  const InsertResult r = index_.insert(parent, ns, block_tokens);
  if (r.status == InsertStatus::kExists || r.status == InsertStatus::kPending) counters_.saves_existing++;
  if (r.status == InsertStatus::kFull || r.status == InsertStatus::kCollision) counters_.saves_dropped++;
  return r;
}

void TierIndex::saved(uint32_t slot, bool ok) {
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

void TierIndex::restored(uint32_t slot, bool intact, bool release_match_pin) {
  if (!intact) {
    index_.discard(slot);
    counters_.discarded++;
  }
  index_.unpin(slot);
  if (release_match_pin) index_.unpin(slot);
}

}  // namespace hostcache
