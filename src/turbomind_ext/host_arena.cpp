#include "host_arena.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <numeric>

#include "errors.h"
#include "memory_info.h"

namespace hostcache {

namespace {
uint64_t round_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }
}  // namespace

uint64_t slot_stride_for(uint64_t slot_bytes) { return round_up(slot_bytes, kSlotAlign); }

HostArena::HostArena(const ArenaOptions& o, std::unique_ptr<Pinner> pinner)
    : pinner_(std::move(pinner)), pin_mode_(o.pin_mode), slot_bytes_(o.slot_bytes) {
  HC_REQUIRE(o.slot_bytes > 0, "slot size must be positive");
  slot_stride_ = slot_stride_for(o.slot_bytes);
  const uint64_t slots = o.capacity_bytes / slot_stride_;
  HC_REQUIRE(slots >= 1, "host pool of ", format_bytes(o.capacity_bytes), " (", o.capacity_bytes,
             " bytes) holds no block of ", format_bytes(slot_stride_), "; raise ", o.capacity_setting);
  HC_REQUIRE(slots <= 0x7fffffffull, "host pool of ", slots, " slots is too many; raise the block size or lower ",
             o.capacity_setting);
  num_slots_ = static_cast<uint32_t>(slots);

  const uint64_t page = page_size_bytes();
  mapped_bytes_ = round_up(static_cast<uint64_t>(num_slots_) * slot_stride_, page);
  const RamBudget budget = ram_budget();
  const uint64_t avail = budget.bytes;
  if (mapped_bytes_ + o.reserve_bytes > avail) {
    throw ConfigError(concat("host pool of ", format_bytes(mapped_bytes_), " does not fit: ",
                             format_bytes(avail), " of RAM is available (", budget.source, ") and ",
                             format_bytes(o.reserve_bytes),
                             " is kept in reserve, leaving ",
                             format_bytes(avail > o.reserve_bytes ? avail - o.reserve_bytes : 0),
                             "; lower ", o.capacity_setting, " (or the reserve)"));
  }

  // Chunks are whole slots and whole pages, so registrations never share a page.
  const uint64_t q = page / std::gcd(slot_stride_, page);
  uint64_t chunk_slots = std::max<uint64_t>(1, o.chunk_bytes / slot_stride_);
  chunk_slots = std::max(q, chunk_slots / q * q);
  chunk_slots_ = static_cast<uint32_t>(chunk_slots);

  int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
  if (pin_mode_ == PinMode::kEager) flags |= MAP_POPULATE;
  void* p = mmap(nullptr, mapped_bytes_, PROT_READ | PROT_WRITE, flags, -1, 0);
  if (p == MAP_FAILED)
    throw SystemError(concat("mmap of ", format_bytes(mapped_bytes_), " for the host pool failed: ", std::strerror(errno),
                             "; lower ", o.capacity_setting));
  base_ = static_cast<uint8_t*>(p);
#ifdef MADV_HUGEPAGE
  // Huge pages cut TLB misses on copies and make registration faster.
  madvise(base_, mapped_bytes_, MADV_HUGEPAGE);
#endif
  const uint32_t chunks = (num_slots_ + chunk_slots_ - 1) / chunk_slots_;
  chunk_base_.resize(chunks);
  for (uint32_t c = 0; c < chunks; ++c) chunk_base_[c] = base_ + chunk_offset(c);
  if (pinning()) {
    chunk_state_.assign(chunks, kUnpinned);
    if (pin_mode_ == PinMode::kEager)
      for (uint32_t c = 0; c < chunks && pin_chunk(c); ++c) {
      }
  }
}

HostArena::~HostArena() {
  for (uint32_t c = 0; c < chunk_state_.size(); ++c)
    if (chunk_state_[c] == kRegistered) pinner_->unpin(chunk_base_[c], chunk_len(c));
  if (base_) munmap(base_, mapped_bytes_);
}  // allocations_ go next, through pinner_, which outlives them

bool HostArena::pin_chunk(uint32_t c) {
  if (chunk_state_[c] != kUnpinned) return true;
  if (!pin_error_.empty()) return false;  // one failure is enough; do not retry on every copy
  const uint64_t len = chunk_len(c);
  if (register_error_.empty()) {
    try {
      pinner_->pin(chunk_base_[c], len);
      chunk_state_[c] = kRegistered;
      pinned_bytes_ += len;
      return true;
    } catch (const std::exception& e) {
      register_error_ = e.what();  // refused once, refused for good: allocate from here on
    }
  }
  return allocate_chunk(c, len);
}

bool HostArena::allocate_chunk(uint32_t c, uint64_t len) {
  std::unique_ptr<uint8_t, Release> mem;
  try {
    mem = std::unique_ptr<uint8_t, Release>(static_cast<uint8_t*>(pinner_->allocate(len)), Release{pinner_.get()});
    allocations_.reserve(allocations_.size() + 1);
  } catch (const std::exception& e) {
    pin_error_ = concat(register_error_, "; a pinned allocation instead failed too: ", e.what(),
                        "; the pool runs unpinned from here on");
    return false;
  }
  // Nothing should live in the chunk yet (its first prepare), but a slot
  // written through slot_view before any copy must keep its bytes.
  std::memcpy(mem.get(), chunk_base_[c], len);
#ifdef MADV_DONTNEED
  madvise(chunk_base_[c], len, MADV_DONTNEED);  // give back what MAP_POPULATE or the copy touched
#endif
  chunk_base_[c] = mem.get();
  allocations_.push_back(std::move(mem));
  chunk_state_[c] = kAllocated;
  pinned_bytes_ += len;
  return true;
}

bool HostArena::prepare(uint32_t i) {
  if (!pinning()) return false;
  return pin_chunk(i / chunk_slots_);
}

std::vector<std::pair<uint8_t*, uint64_t>> HostArena::ranges() {
  std::vector<std::pair<uint8_t*, uint64_t>> out;
  out.reserve(chunk_base_.size());
  for (uint32_t c = 0; c < chunk_base_.size(); ++c) {
    prepare(c * chunk_slots_);
    out.emplace_back(chunk_base_[c], chunk_len(c));
  }
  return out;
}

std::string HostArena::pin_method() const {
  if (!pinning()) return "off";
  bool reg = false, alloc = false;
  for (uint8_t s : chunk_state_) {
    reg |= s == kRegistered;
    alloc |= s == kAllocated;
  }
  if (reg && alloc) return "register+allocate";
  if (reg) return "register";
  if (alloc) return "allocate";
  return "none";
}

}  // namespace hostcache
