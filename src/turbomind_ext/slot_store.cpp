#include "slot_store.h"

#include <algorithm>

#include "cpu_copy_engine.h"
#include "errors.h"
#include "xxh64.h"

namespace hostcache {

namespace {

std::unique_ptr<HostArena> make_arena(const SlotStoreOptions& o, const RegionTable& regions) {
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

SlotStore::SlotStore(const SlotStoreOptions& o, std::vector<Region> regions, uint64_t num_device_blocks)
    : regions_(std::move(regions), num_device_blocks), arena_(make_arena(o, regions_)) {
  last_block_use_.resize(regions_.num_blocks());
  last_slot_use_.resize(arena_->num_slots());
  if (o.cuda) engine_ = make_cuda_copy_engine(regions_, *arena_, o.device, o.copy_path);
  else engine_ = std::make_unique<CpuCopyEngine>(regions_, *arena_, o.cpu_workers);
}

SlotStore::~SlotStore() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& t : unfinished_) t->wait();
}

uint8_t* SlotStore::slot_data(uint32_t slot) const {
  HC_REQUIRE(slot < arena_->num_slots(), "slot ", slot, " is outside the pool of ", arena_->num_slots(), " slots");
  // Pinned first: a chunk moved to a pinned allocation later would leave the
  // pointer handed out here on the old, released range.
  std::lock_guard<std::mutex> lock(mu_);
  arena_->prepare(slot);
  return arena_->slot(slot);
}

void SlotStore::check_copies(const std::vector<BlockCopy>& copies) const {
  for (const BlockCopy& c : copies) {
    HC_REQUIRE(c.slot < arena_->num_slots(), "slot ", c.slot, " is outside the pool of ", arena_->num_slots(),
               " slots");
    regions_.check_block(c.block);
  }
}

std::shared_ptr<Transfer> SlotStore::submit(Direction dir, const std::vector<BlockCopy>& copies,
                                            uintptr_t after_stream) {
  std::lock_guard<std::mutex> lock(mu_);  // the arena's lazy pinning is not thread-safe on its own
  check_copies(copies);
  for (const BlockCopy& c : copies) arena_->prepare(c.slot);
  // The last transfer on each slot and block, each once; a finished one needs no order.
  std::vector<std::shared_ptr<Transfer>> after;
  auto note_prior = [&after](const std::weak_ptr<Transfer>& last) {
    std::shared_ptr<Transfer> prior = last.lock();
    if (!prior) return;
    for (const auto& a : after)
      if (a == prior) return;
    after.push_back(std::move(prior));
  };
  for (const BlockCopy& c : copies) {
    note_prior(last_block_use_[c.block]);
    note_prior(last_slot_use_[c.slot]);
  }
  auto finished = [](const std::shared_ptr<Transfer>& x) { return x->done(); };
  after.erase(std::remove_if(after.begin(), after.end(), finished), after.end());
  // Nothing may allocate (and so throw) once the copy is queued: a running
  // transfer must be held in unfinished_, which is what lets an expired
  // last-use entry mean "finished" and the destructor wait for every copy.
  unfinished_.erase(std::remove_if(unfinished_.begin(), unfinished_.end(), finished), unfinished_.end());
  unfinished_.reserve(unfinished_.size() + 1);
  std::shared_ptr<Transfer> t = engine_->submit(dir, copies, after_stream, after);
  unfinished_.push_back(t);
  for (const BlockCopy& c : copies) {
    last_block_use_[c.block] = t;
    last_slot_use_[c.slot] = t;
  }
  return t;
}

std::vector<std::pair<uint8_t*, uint64_t>> SlotStore::memory_ranges() {
  std::lock_guard<std::mutex> lock(mu_);  // the arena's lazy pinning is not thread-safe on its own
  return arena_->ranges();
}

uint64_t SlotStore::slot_checksum(uint32_t slot) const {
  std::lock_guard<std::mutex> lock(mu_);  // submit may be moving the slot's chunk (HostArena::prepare)
  return xxh64(arena_->slot(slot), regions_.slot_bytes(), 0);
}

uint64_t SlotStore::block_checksum(uint32_t block) {
  std::lock_guard<std::mutex> lock(mu_);
  scratch_.resize(regions_.slot_bytes());
  engine_->read_block(block, scratch_.data());
  return xxh64(scratch_.data(), scratch_.size(), 0);
}

StoreStats SlotStore::stats() const {
  std::lock_guard<std::mutex> lock(mu_);  // submit may be pinning a chunk
  StoreStats s;
  s.slots_total = arena_->num_slots();
  s.slot_bytes = regions_.slot_bytes();
  s.slot_stride = arena_->slot_stride();
  s.pool_bytes = arena_->mapped_bytes();
  s.pinned = arena_->pinning() && arena_->pin_error().empty();
  s.pinned_bytes = arena_->pinned_bytes();
  s.pin_mode = arena_->pinning() ? pin_mode_name(arena_->pin_mode()) : "off";
  s.pin_error = arena_->pin_error();
  s.pin_method = arena_->pin_method();
  s.register_error = arena_->register_error();
  s.copy_engine = engine_->name();
  return s;
}

}  // namespace hostcache
