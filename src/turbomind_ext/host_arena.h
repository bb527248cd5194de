// The host pool's memory: one page-aligned arena cut into fixed-size slots.
//
// Pinning goes through a Pinner (the CUDA build registers memory with the
// driver), chunk by chunk: registering one giant range takes seconds and can
// fail as a whole, while chunks let a pool pin lazily as slots come into use.
// Chunks hold whole slots, so no slot straddles two registrations.
//
// Pinning never sinks the pool. When registration is refused (some sandboxes
// refuse cudaHostRegister of mmap'd memory yet grant cudaHostAlloc), every
// chunk not yet pinned moves into its own pinned allocation; when that is
// refused too, the pool runs unpinned (slower copies) and pin_error() says why.
// A chunk moves only on its first prepare(), before any of its slots is used,
// so no copy ever sees a slot change address.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace hostcache {

enum class PinMode { kOff, kLazy, kEager };

// 256-byte slot alignment keeps every slot start 16-byte aligned for vector
// copies and matches the alignment of LMDeploy's packed block rows.
inline constexpr uint64_t kSlotAlign = 256;
// Bytes one slot of `slot_bytes` payload takes in the arena.
uint64_t slot_stride_for(uint64_t slot_bytes);

// Makes host memory DMA-able by the device: by registering a range, or by
// allocating pinned memory. pin and allocate throw SystemError.
class Pinner {
 public:
  virtual ~Pinner() = default;
  virtual void pin(void* ptr, uint64_t bytes) = 0;
  virtual void unpin(void* ptr, uint64_t bytes) noexcept = 0;
  virtual void* allocate(uint64_t bytes) = 0;
  virtual void release(void* ptr) noexcept = 0;
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
  uint8_t* slot(uint32_t i) const {
    return chunk_base_[i / chunk_slots_] + static_cast<uint64_t>(i % chunk_slots_) * slot_stride_;
  }

  // Pins the chunk holding slot i if the pool pins lazily. Returns whether
  // the slot is pinned; a failure is kept in pin_error(), never thrown, since
  // unpinned memory still works (slower) for the memcpy and CPU paths.
  bool prepare(uint32_t i);
  // Where the pool's memory lies, chunk by chunk, once every chunk is
  // prepared (a chunk moves only on its first prepare): ranges that stay
  // put, to register with a store that reads and writes slots directly.
  std::vector<std::pair<uint8_t*, uint64_t>> ranges();
  bool is_pinned(uint32_t i) const { return !chunk_state_.empty() && chunk_state_[i / chunk_slots_] != kUnpinned; }
  uint64_t pinned_bytes() const { return pinned_bytes_; }
  bool pinning() const { return pinner_ != nullptr && pin_mode_ != PinMode::kOff; }
  PinMode pin_mode() const { return pin_mode_; }
  // Why the pool (from some chunk on) is not pinned; empty while it is.
  const std::string& pin_error() const { return pin_error_; }
  // Why chunks moved to pinned allocations; empty while registration works.
  const std::string& register_error() const { return register_error_; }
  // "off", "register", "allocate", "register+allocate" or "none" (nothing pinned yet).
  std::string pin_method() const;

 private:
  enum ChunkState : uint8_t { kUnpinned, kRegistered, kAllocated };
  struct Release {
    Pinner* pinner;
    void operator()(uint8_t* p) const noexcept { pinner->release(p); }
  };

  bool pin_chunk(uint32_t chunk);
  bool allocate_chunk(uint32_t chunk, uint64_t len);
  uint64_t chunk_offset(uint32_t c) const { return static_cast<uint64_t>(c) * chunk_slots_ * slot_stride_; }
  uint64_t chunk_len(uint32_t c) const {
    return std::min<uint64_t>(static_cast<uint64_t>(chunk_slots_) * slot_stride_, mapped_bytes_ - chunk_offset(c));
  }

  std::unique_ptr<Pinner> pinner_;  // declared first: allocations below are released through it
  PinMode pin_mode_;
  uint64_t slot_bytes_;
  uint64_t slot_stride_;
  uint32_t num_slots_;
  uint32_t chunk_slots_;
  uint8_t* base_ = nullptr;
  uint64_t mapped_bytes_ = 0;
  std::vector<uint8_t*> chunk_base_;  // where each chunk's slots live
  std::vector<uint8_t> chunk_state_;  // ChunkState per chunk, empty when not pinning
  std::vector<std::unique_ptr<uint8_t, Release>> allocations_;
  uint64_t pinned_bytes_ = 0;
  std::string pin_error_;
  std::string register_error_;
};

}  // namespace hostcache
