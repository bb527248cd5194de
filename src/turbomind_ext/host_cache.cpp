#include "host_cache.h"

#include <unordered_set>

#include "block_key.h"
#include "cpu_copy_engine.h"
#include "errors.h"
#include "xxh64.h"

namespace hostcache {

namespace {

std::unique_ptr<HostArena> make_arena(const HostCacheOptions& o, const RegionTable& regions) {
  std::unique_ptr<Pinner> pinner;
  if (o.cuda) {
    const DeviceInfo info = device_info();
    HC_REQUIRE(info.gpu_usable, "the cache regions are CUDA memory but no GPU is usable: ", info.reason,
               "; use CPU tensors (device='cpu') on this machine");
    if (o.pin_mode != PinMode::kOff) pinner = make_cuda_pinner(o.device);
  }
  ArenaOptions a;
  a.capacity_bytes = o.capacity_bytes;
  a.reserve_bytes = o.reserve_bytes;
  a.slot_bytes = regions.slot_bytes();
  a.chunk_bytes = o.pin_chunk_bytes;
  a.pin_mode = o.pin_mode;
  a.capacity_setting = o.capacity_setting;
  return std::make_unique<HostArena>(a, std::move(pinner));
}

const char* pin_mode_name(PinMode m) {
  switch (m) {
    case PinMode::kOff: return "off";
    case PinMode::kLazy: return "lazy";
    case PinMode::kEager: return "eager";
  }
  return "?";
}

}  // namespace

HostCache::HostCache(const HostCacheOptions& o, std::vector<Region> regions, uint64_t num_device_blocks)
    : options_(o),
      regions_(std::move(regions), num_device_blocks),
      arena_(make_arena(o, regions_)),
      index_(arena_->num_slots(), o.block_tokens) {
  if (o.cuda) engine_ = make_cuda_copy_engine(regions_, *arena_, o.device, o.copy_path);
  else engine_ = std::make_unique<CpuCopyEngine>(regions_, *arena_, o.cpu_workers);
  if (o.checksum) {
    checksums_.assign(arena_->num_slots(), 0);
    scratch_.resize(regions_.slot_bytes());
  }
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

uint8_t* HostCache::slot_data(uint32_t slot) const {
  HC_REQUIRE(slot < arena_->num_slots(), "slot ", slot, " is outside the pool of ", arena_->num_slots(), " slots");
  return arena_->slot(slot);
}

std::vector<uint64_t> HostCache::block_keys(uint64_t parent, uint64_t ns, const int32_t* tokens, size_t n) const {
  const uint32_t bt = index_.block_tokens();
  std::vector<uint64_t> keys(n / bt);
  for (size_t i = 0; i < keys.size(); ++i) keys[i] = parent = chain_key(parent, ns, tokens + i * bt, bt);
  return keys;
}

std::vector<MatchStep> HostCache::match(uint64_t parent, uint64_t ns, const int32_t* tokens, size_t n, bool pin) {
  std::lock_guard<std::mutex> lock(mu_);
  reap_locked();
  std::vector<MatchStep> out;
  const size_t hit = index_.match(parent, ns, tokens, n, pin, &out);
  const size_t queried = n / index_.block_tokens();
  counters_.match_queries++;
  counters_.query_blocks += queried;
  counters_.hit_blocks += hit;
  counters_.miss_blocks += queried - hit;
  return out;
}

void HostCache::release(const uint32_t* slots, size_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < n; ++i) {
    HC_REQUIRE(slots[i] < index_.capacity() && index_.pins(slots[i]) > 0, "release of slot ", slots[i],
               " that no match pinned");
  }
  for (size_t i = 0; i < n; ++i) index_.unpin(slots[i]);
}

OffloadResult HostCache::offload(const uint64_t* parents, const uint64_t* namespaces, const int32_t* tokens,
                                 const int32_t* device_blocks, size_t n, uintptr_t after_stream) {
  for (size_t i = 0; i < n; ++i) regions_.check_block(device_blocks[i]);
  std::lock_guard<std::mutex> lock(mu_);
  reap_locked();
  OffloadResult r;
  r.keys.resize(n);
  r.slots.assign(n, -1);
  std::vector<BlockCopy> copies;
  const uint32_t bt = index_.block_tokens();
  for (size_t i = 0; i < n; ++i) {
    const InsertResult ins = index_.insert(parents[i], namespaces[i], tokens + i * bt);
    r.keys[i] = ins.key;
    switch (ins.status) {
      case InsertStatus::kCreated:
        arena_->prepare(ins.slot);
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
  counters_.offload_existing += r.existing;
  counters_.offload_dropped += r.dropped;
  r.transfer = submit(Direction::kOffload, std::move(copies), after_stream, false);
  return r;
}

std::shared_ptr<TransferRecord> HostCache::restore(const uint32_t* slots, const int32_t* device_blocks, size_t n,
                                                   uintptr_t after_stream, bool release_match_pins) {
  std::unordered_set<int32_t> seen;
  for (size_t i = 0; i < n; ++i) {
    regions_.check_block(device_blocks[i]);
    HC_REQUIRE(seen.insert(device_blocks[i]).second, "device block ", device_blocks[i],
               " appears twice among the restore destinations; give each slot its own block");
  }
  std::lock_guard<std::mutex> lock(mu_);
  reap_locked();
  for (size_t i = 0; i < n; ++i) {
    HC_REQUIRE(slots[i] < index_.capacity() && index_.is_ready(slots[i]), "slot ", slots[i],
               " holds no ready block; restore only slots returned by match()");
    HC_REQUIRE(!release_match_pins || index_.pins(slots[i]) > 0, "slot ", slots[i],
               " is not pinned by a match; match with pin=True before handing its pins to restore");
  }
  std::vector<BlockCopy> copies(n);
  for (size_t i = 0; i < n; ++i) {
    index_.pin(slots[i]);
    arena_->prepare(slots[i]);
    copies[i] = {slots[i], static_cast<uint32_t>(device_blocks[i])};
  }
  return submit(Direction::kRestore, std::move(copies), after_stream, release_match_pins);
}

void HostCache::order_after_prior_use(const std::vector<BlockCopy>& copies) {
  if (engine_->ordered()) return;
  for (const BlockCopy& c : copies) {
    auto it = last_use_.find(c.block);
    if (it == last_use_.end()) continue;
    if (auto prior = it->second.lock()) prior->wait();
  }
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
  order_after_prior_use(t->copies);
  try {
    t->engine = engine_->submit(dir, t->copies, after_stream);
  } catch (const std::exception& e) {
    // Nothing was queued: settle now so the slots are released at once.
    t->error = e.what();
    settle(*t);
    return t;
  }
  for (const BlockCopy& c : t->copies) last_use_[c.block] = t->engine;
  if (dir == Direction::kOffload) counters_.offload_transfers++;
  else counters_.restore_transfers++;
  in_flight_.push_back(t);
  return t;
}

uint64_t HostCache::slot_checksum(uint32_t slot) const { return xxh64(arena_->slot(slot), regions_.slot_bytes(), 0); }

uint64_t HostCache::block_checksum(uint32_t block) {
  engine_->read_block(block, scratch_.data());
  return xxh64(scratch_.data(), scratch_.size(), 0);
}

void HostCache::settle(TransferRecord& t) {
  if (t.finished) return;
  if (t.engine && t.error.empty()) t.error = t.engine->error();
  if (t.error.empty() && t.injected_failure) t.error = "injected transfer failure (test hook)";
  t.ok = t.error.empty();
  const uint64_t bytes = t.copies.size() * regions_.slot_bytes();
  const bool offload = t.direction == Direction::kOffload;
  if (offload) {
    for (const BlockCopy& c : t.copies) {
      if (t.ok) {
        if (options_.checksum) checksums_[c.slot] = slot_checksum(c.slot);
        index_.commit(c.slot);
      } else {
        index_.discard(c.slot);
        index_.unpin(c.slot);
      }
    }
  } else {
    for (const BlockCopy& c : t.copies) {
      if (t.ok && options_.checksum && block_checksum(c.block) != checksums_[c.slot]) {
        counters_.checksum_failures++;
        if (t.ok) t.error = concat("checksum mismatch restoring slot ", c.slot, " into device block ", c.block);
        index_.discard(c.slot);
      }
      index_.unpin(c.slot);
      if (t.release_match_pins) index_.unpin(c.slot);
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
  s.slots_total = index_.capacity();
  s.slots_used = index_.used();
  s.slots_free = s.slots_total - s.slots_used;
  s.slot_bytes = regions_.slot_bytes();
  s.slot_stride = arena_->slot_stride();
  s.pool_bytes = arena_->mapped_bytes();
  s.evictions = index_.evictions();
  s.collisions = index_.collisions();
  s.transfers_in_flight = static_cast<uint32_t>(in_flight_.size());
  s.pinned = arena_->pinning() && arena_->pin_error().empty();
  s.pinned_bytes = arena_->pinned_bytes();
  s.pin_mode = arena_->pinning() ? pin_mode_name(arena_->pin_mode()) : "off";
  s.pin_error = arena_->pin_error();
  s.copy_engine = engine_->name();
  return s;
}

void HostCache::inject_failures(uint32_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  failures_to_inject_ = n;
}

void HostCache::check_invariants() {
  std::lock_guard<std::mutex> lock(mu_);
  index_.check_invariants();
  // Every pin belongs to a transfer in flight or to a match the caller holds;
  // transfers' pins are counted here, so pins >= transfer pins per slot.
  std::unordered_map<uint32_t, uint32_t> transfer_pins;
  for (auto& t : in_flight_)
    for (const BlockCopy& c : t->copies) transfer_pins[c.slot] += 1 + (t->release_match_pins ? 1 : 0);
  for (const auto& [slot, pins] : transfer_pins)
    if (index_.pins(slot) < pins) throw std::logic_error("a slot in flight has fewer pins than its transfers hold");
}

}  // namespace hostcache
