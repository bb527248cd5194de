// The host pool's memory: one page-aligned arena cut into fixed-size slots.
//
// Pinning goes through a Pinner (the CUDA build registers memory with the
// driver), chunk by chunk: registering one giant range takes seconds and can
// fail as a whole, while chunks let a pool pin lazily as slots come into use.
// Chunks hold whole slots, so no slot straddles two registrations.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace hostcache {

enum class PinMode { kOff, kLazy, kEager };

// 256-byte slot alignment keeps every slot start 16-byte aligned for vector
// copies and matches the alignment of LMDeploy's packed block rows.
inline constexpr uint64_t kSlotAlign = 256;
// Bytes one slot of `slot_bytes` payload takes in the arena.
uint64_t slot_stride_for(uint64_t slot_bytes);

// Makes a host range DMA-able by the device. pin throws SystemError.
class Pinner {
 public:
  virtual ~Pinner() = default;
  virtual void pin(void* ptr, uint64_t bytes) = 0;
  virtual void unpin(void* ptr, uint64_t bytes) noexcept = 0;
};

struct ArenaOptions {
  uint64_t capacity_bytes = 0;   // the most the pool may take
  uint64_t reserve_bytes = 0;    // RAM left to the rest of the machine
  uint64_t slot_bytes = 0;       // payload of one slot
  uint64_t chunk_bytes = 256ull << 20;
  PinMode pin_mode = PinMode::kLazy;
  std::string capacity_setting = "capacity_bytes";  // named in errors
};

class HostArena {
 public:
  // Throws ConfigError when the pool holds no slot or does not fit in
  // available RAM minus the reserve; SystemError when mapping fails.
  HostArena(const ArenaOptions& options, std::unique_ptr<Pinner> pinner);
  ~HostArena();
  HostArena(const HostArena&) = delete;
  HostArena& operator=(const HostArena&) = delete;

  uint32_t num_slots() const { return num_slots_; }
  uint64_t slot_stride() const { return slot_stride_; }
  uint64_t slot_bytes() const { return slot_bytes_; }
  uint64_t mapped_bytes() const { return mapped_bytes_; }
  uint8_t* slot(uint32_t i) const { return base_ + static_cast<uint64_t>(i) * slot_stride_; }
  bool contains(const void* p) const {
    auto* b = static_cast<const uint8_t*>(p);
    return b >= base_ && b < base_ + mapped_bytes_;
  }

  // Pins the chunk holding slot i if the pool pins lazily. Returns whether
  // the slot is pinned; a failure is kept in pin_error(), never thrown, since
  // unpinned memory still works (slower) for the memcpy and CPU paths.
  bool prepare(uint32_t i);
  bool is_pinned(uint32_t i) const { return !chunk_pinned_.empty() && chunk_pinned_[i / chunk_slots_]; }
  uint64_t pinned_bytes() const { return pinned_bytes_; }
  bool pinning() const { return pinner_ != nullptr && pin_mode_ != PinMode::kOff; }
  PinMode pin_mode() const { return pin_mode_; }
  const std::string& pin_error() const { return pin_error_; }

 private:
  bool pin_chunk(uint32_t chunk);

  std::unique_ptr<Pinner> pinner_;
  PinMode pin_mode_;
  uint64_t slot_bytes_;
  uint64_t slot_stride_;
  uint32_t num_slots_;
  uint32_t chunk_slots_;
  uint8_t* base_ = nullptr;
  uint64_t mapped_bytes_ = 0;
  std::vector<uint8_t> chunk_pinned_;
  uint64_t pinned_bytes_ = 0;
  std::string pin_error_;
};

}  // namespace hostcache
