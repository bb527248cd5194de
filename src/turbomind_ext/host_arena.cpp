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
  const uint64_t avail = available_ram_bytes();
  if (mapped_bytes_ + o.reserve_bytes > avail) {
    throw ConfigError(concat("host pool of ", format_bytes(mapped_bytes_), " does not fit: ",
                             format_bytes(avail), " of RAM is available and ", format_bytes(o.reserve_bytes),
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
  if (pinning()) {
    chunk_pinned_.assign((num_slots_ + chunk_slots_ - 1) / chunk_slots_, 0);
    if (pin_mode_ == PinMode::kEager)
      for (uint32_t c = 0; c < chunk_pinned_.size() && pin_chunk(c); ++c) {
      }
  }
}

HostArena::~HostArena() {
  for (uint32_t c = 0; c < chunk_pinned_.size(); ++c) {
    if (!chunk_pinned_[c]) continue;
    const uint64_t off = static_cast<uint64_t>(c) * chunk_slots_ * slot_stride_;
    pinner_->unpin(base_ + off, std::min<uint64_t>(static_cast<uint64_t>(chunk_slots_) * slot_stride_, mapped_bytes_ - off));
  }
  if (base_) munmap(base_, mapped_bytes_);
}

bool HostArena::pin_chunk(uint32_t c) {
  if (chunk_pinned_[c]) return true;
  if (!pin_error_.empty()) return false;  // one failure is enough; do not retry on every copy
  const uint64_t off = static_cast<uint64_t>(c) * chunk_slots_ * slot_stride_;
  const uint64_t len = std::min<uint64_t>(static_cast<uint64_t>(chunk_slots_) * slot_stride_, mapped_bytes_ - off);
  try {
    pinner_->pin(base_ + off, len);
  } catch (const std::exception& e) {
    pin_error_ = e.what();
    return false;
  }
  chunk_pinned_[c] = 1;
  pinned_bytes_ += len;
  return true;
}

bool HostArena::prepare(uint32_t i) {
  if (!pinning()) return false;
  return pin_chunk(i / chunk_slots_);
}

}  // namespace hostcache
