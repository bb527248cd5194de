// Cache regions: how the engine's KV blocks lie in device memory.
//
// A region is one tensor that holds part of every block (a layer's K, V or
// their scale/zero rows): block b of region r occupies
//   [base_r + b * stride_r, base_r + b * stride_r + bytes_r).
// A host slot holds every region's bytes of one block back to back, in
// registration order, so a block is one contiguous host chunk.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace hostcache {

struct Region {
  uint64_t base = 0;    // address of block 0 (device or host pointer)
  uint64_t stride = 0;  // bytes from one block to the next
  uint64_t bytes = 0;   // bytes of one block in this region
};

class RegionTable {
 public:
  // Throws ConfigError for empty tables, zero sizes, stride < bytes, and
  // regions whose blocks overlap each other.
  RegionTable(std::vector<Region> regions, uint64_t num_blocks);

  size_t size() const { return regions_.size(); }
  const Region& operator[](size_t i) const { return regions_[i]; }
  const std::vector<Region>& regions() const { return regions_; }
  uint64_t num_blocks() const { return num_blocks_; }
  // Bytes of one block over all regions: the payload of a host slot.
  uint64_t slot_bytes() const { return slot_bytes_; }
  // Where region i's bytes start inside a slot.
  uint64_t slot_offset(size_t i) const { return offsets_[i]; }
  uint64_t block_address(size_t region, uint64_t block) const {
    return regions_[region].base + block * regions_[region].stride;
  }
  // Throws ConfigError naming the block when it is outside the pool.
  void check_block(int64_t block) const;

 private:
  std::vector<Region> regions_;
  std::vector<uint64_t> offsets_;
  uint64_t num_blocks_;
  uint64_t slot_bytes_ = 0;
};

}  // namespace hostcache
