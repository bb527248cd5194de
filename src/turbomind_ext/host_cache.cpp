#include "host_cache.h"

#include <unordered_set>

#include "block_key.h"
#include "errors.h"

namespace hostcache {

HostCache::HostCache(const HostCacheOptions& o, std::vector<Region> regions, uint64_t num_device_blocks)
    : options_(o), store_(o, std::move(regions), num_device_blocks), tier_(store_.num_slots(), o.block_tokens) {
  if (o.checksum) checksums_.assign(store_.num_slots(), 0);
}

HostCache::~HostCache() {
  // Every copy must land before the arena and the engine go away.
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& t : in_flight_) {
    t->engine->wait();
    settle(*t);
  }
  in_flight_.clear();
}

std::vector<uint64_t> HostCache::block_keys(uint64_t parent, uint64_t ns, const int32_t* tokens, size_t n) const {
  return block_chain_keys(parent, ns, tokens, n, tier_.block_tokens());
}

std::vector<MatchStep> HostCache::match(uint64_t parent, uint64_t ns, const int32_t* tokens, size_t n, bool pin) {
  std::lock_guard<std::mutex> lock(mu_);
  reap_locked();
  return tier_.match(parent, ns, tokens, n, pin);
}

void HostCache::release(const uint32_t* slots, size_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  tier_.release(slots, n);
}

OffloadResult HostCache::offload(const uint64_t* parents, const uint64_t* namespaces, const int32_t* tokens,
                                 const int32_t* device_blocks, size_t n, uintptr_t after_stream) {
  for (size_t i = 0; i < n; ++i) store_.regions().check_block(device_blocks[i]);
  std::lock_guard<std::mutex> lock(mu_);
  reap_locked();
  OffloadResult r;
  r.keys.resize(n);
  r.slots.assign(n, -1);
  std::vector<BlockCopy> copies;
  const uint32_t bt = tier_.block_tokens();
  for (size_t i = 0; i < n; ++i) {
    const InsertResult ins = tier_.reserve(parents[i], namespaces[i], tokens + i * bt);
    r.keys[i] = ins.key;
    switch (ins.status) {
      case InsertStatus::kCreated:
        copies.push_back({ins.slot, static_cast<uint32_t>(device_blocks[i])});
        r.slots[i] = ins.slot;
        r.created++;
        break;
      case InsertStatus::kExists:
      case InsertStatus::kPending:
        r.slots[i] = ins.slot;
        r.existing++;
        break;
      case InsertStatus::kCollision:
      case InsertStatus::kFull:
        r.dropped++;
        break;
    }
  }
  r.transfer = submit(Direction::kOffload, std::move(copies), after_stream, false);
  return r;
}

std::shared_ptr<TransferRecord> HostCache::restore(const uint32_t* slots, const int32_t* device_blocks, size_t n,
                                                   uintptr_t after_stream, bool release_match_pins) {
  std::unordered_set<int32_t> seen;
  for (size_t i = 0; i < n; ++i) {
    store_.regions().check_block(device_blocks[i]);
    HC_REQUIRE(seen.insert(device_blocks[i]).second, "device block ", device_blocks[i],
               " appears twice among the restore destinations; give each slot its own block");
  }
  std::lock_guard<std::mutex> lock(mu_);
  reap_locked();
  tier_.begin_restore(slots, n, release_match_pins);
  std::vector<BlockCopy> copies(n);
  for (size_t i = 0; i < n; ++i) copies[i] = {slots[i], static_cast<uint32_t>(device_blocks[i])};
  return submit(Direction::kRestore, std::move(copies), after_stream, release_match_pins);
}

std::shared_ptr<TransferRecord> HostCache::submit(Direction dir, std::vector<BlockCopy> copies, uintptr_t after_stream,
                                                  bool release_match_pins) {
  auto t = std::make_shared<TransferRecord>();
  t->id = next_id_++;
  t->direction = dir;
  t->release_match_pins = release_match_pins;
  t->started = std::chrono::steady_clock::now();
  if (failures_to_inject_ > 0 && !copies.empty()) {
    --failures_to_inject_;
    t->injected_failure = true;
  }
  t->copies = std::move(copies);
  if (t->copies.empty()) {
    t->finished = t->ok = true;
    return t;
  }
  try {
    t->engine = store_.submit(dir, t->copies, after_stream);
  } catch (const std::exception& e) {
    // Nothing was queued: settle now so the slots are released at once.
    t->error = e.what();
    settle(*t);
    return t;
  }
  if (dir == Direction::kOffload) counters_.offload_transfers++;
  else counters_.restore_transfers++;
  in_flight_.push_back(t);
  return t;
}

bool HostCache::restored_intact(const BlockCopy& c) {
  // Reading the block back can fail (a device error); settle must not throw
  // halfway, so an unreadable block counts as a mismatch.
  try {
    return store_.block_checksum(c.block) == checksums_[c.slot];
  } catch (const std::exception&) {
    return false;
  }
}

void HostCache::settle(TransferRecord& t) {
  if (t.finished) return;
  if (t.engine && t.error.empty()) t.error = t.engine->error();
  if (t.error.empty() && t.injected_failure) t.error = "injected transfer failure (test hook)";
  t.ok = t.error.empty();
  const uint64_t bytes = t.copies.size() * store_.slot_bytes();
  const bool offload = t.direction == Direction::kOffload;
  if (offload) {
    for (const BlockCopy& c : t.copies) {
      if (t.ok && options_.checksum) checksums_[c.slot] = store_.slot_checksum(c.slot);
      tier_.saved(c.slot, t.ok);
    }
  } else {
    for (const BlockCopy& c : t.copies) {
      const bool intact = !(t.ok && options_.checksum && !restored_intact(c));
      if (!intact) {
        counters_.checksum_failures++;
        if (t.error.empty()) t.error = concat("checksum mismatch restoring slot ", c.slot, " into device block ", c.block);
      }
      tier_.restored(&c.slot, 1, intact, t.release_match_pins);
    }
    t.ok = t.error.empty();
  }
  t.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t.started).count();
  if (t.ok) {
    (offload ? counters_.blocks_offloaded : counters_.blocks_restored) += t.copies.size();
    (offload ? counters_.bytes_offloaded : counters_.bytes_restored) += bytes;
    (offload ? counters_.offload_seconds : counters_.restore_seconds) += t.seconds;
  } else {
    counters_.transfers_failed++;
  }
  t.engine.reset();
  t.finished = true;
}

size_t HostCache::reap() {
  std::lock_guard<std::mutex> lock(mu_);
  return reap_locked();
}

size_t HostCache::reap_locked() {
  size_t n = 0;
  for (size_t i = 0; i < in_flight_.size();) {
    TransferRecord& t = *in_flight_[i];
    if (t.engine->done()) {
      settle(t);
      in_flight_[i] = std::move(in_flight_.back());
      in_flight_.pop_back();
      ++n;
    } else {
      ++i;
    }
  }
  return n;
}

bool HostCache::poll(TransferRecord& t) {
  std::lock_guard<std::mutex> lock(mu_);
  reap_locked();
  return t.finished;
}

void HostCache::wait(TransferRecord& t) {
  std::shared_ptr<Transfer> engine;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (t.finished) return;
    engine = t.engine;
  }
  engine->wait();  // without the lock: other threads keep using the cache
  std::lock_guard<std::mutex> lock(mu_);
  reap_locked();
}

void HostCache::make_stream_wait(TransferRecord& t, uintptr_t stream) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!t.finished) t.engine->make_stream_wait(stream);
}

void HostCache::wait_all() {
  std::vector<std::shared_ptr<Transfer>> engines;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& t : in_flight_) engines.push_back(t->engine);
  }
  for (auto& e : engines) e->wait();
  std::lock_guard<std::mutex> lock(mu_);
  reap_locked();
}

Stats HostCache::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  reap_locked();
  Stats s = counters_;
  static_cast<StoreStats&>(s) = store_.stats();
  const TierCounters& tc = tier_.counters();
  s.match_queries = tc.match_queries;
  s.query_blocks = tc.query_blocks;
  s.hit_blocks = tc.hit_blocks;
  s.miss_blocks = tc.miss_blocks;
  s.offload_existing = tc.saves_existing;
  s.offload_dropped = tc.saves_dropped;
  s.slots_used = tier_.used();
  s.slots_free = s.slots_total - s.slots_used;
  s.evictions = tier_.evictions();
  s.collisions = tier_.collisions();
  s.transfers_in_flight = static_cast<uint32_t>(in_flight_.size());
  return s;
}

void HostCache::inject_failures(uint32_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  failures_to_inject_ = n;
}

void HostCache::check_invariants() {
  std::lock_guard<std::mutex> lock(mu_);
  tier_.check_invariants();
  // Every pin belongs to a transfer in flight or to a match the caller holds;
  // transfers' pins are counted here, so pins >= transfer pins per slot.
  std::unordered_map<uint32_t, uint32_t> transfer_pins;
  for (auto& t : in_flight_)
    for (const BlockCopy& c : t->copies) transfer_pins[c.slot] += 1 + (t->release_match_pins ? 1 : 0);
  for (const auto& [slot, pins] : transfer_pins)
    if (tier_.pins(slot) < pins) throw std::logic_error("a slot in flight has fewer pins than its transfers hold");
}

}  // namespace hostcache
