#include "regions.h"

#include <algorithm>

#include "errors.h"

namespace hostcache {

namespace {

uint64_t footprint_end(const Region& r, uint64_t num_blocks) {
  return r.base + (num_blocks - 1) * r.stride + r.bytes;
}

// Blocks of a and b overlap. Regions with one stride may interleave (a
// block-first pool registers one region per layer at offsets inside the same
// stride), so for equal strides compare the offsets modulo the stride; for
// different strides fall back to the whole footprints, which is conservative.
bool blocks_overlap(const Region& a, const Region& b, uint64_t num_blocks) {
  const uint64_t a_end = footprint_end(a, num_blocks), b_end = footprint_end(b, num_blocks);
  if (a_end <= b.base || b_end <= a.base) return false;
  if (a.stride != b.stride) return true;
  const uint64_t s = a.stride;
  const Region& first = a.base <= b.base ? a : b;
  const Region& second = a.base <= b.base ? b : a;
  const uint64_t d = (second.base - first.base) % s;  // second's start inside first's stride
  // first's bytes cover [0, first.bytes) (may wrap past s only if bytes > s,
  // which validation forbids); second covers [d, d + second.bytes) mod s.
  return d < first.bytes || d + second.bytes > s;
}

}  // namespace

RegionTable::RegionTable(std::vector<Region> regions, uint64_t num_blocks)
    : regions_(std::move(regions)), num_blocks_(num_blocks) {
  HC_REQUIRE(!regions_.empty(), "no cache regions given: register at least one (base, stride, bytes) region");
  HC_REQUIRE(num_blocks_ > 0, "num_blocks must be positive (the number of blocks in the device pool)");
  offsets_.reserve(regions_.size());
  for (size_t i = 0; i < regions_.size(); ++i) {
    const Region& r = regions_[i];
    HC_REQUIRE(r.base != 0, "region ", i, " has a null base pointer");
    HC_REQUIRE(r.bytes > 0, "region ", i, " has zero bytes per block; every region must hold part of each block");
    HC_REQUIRE(r.stride >= r.bytes, "region ", i, " has stride ", r.stride, " smaller than its bytes per block ", r.bytes,
               ": blocks would overlap; pass the distance between consecutive blocks as the stride");
    offsets_.push_back(slot_bytes_);
    slot_bytes_ += r.bytes;
  }
  for (size_t i = 0; i < regions_.size(); ++i)
    for (size_t j = i + 1; j < regions_.size(); ++j)
      HC_REQUIRE(!blocks_overlap(regions_[i], regions_[j], num_blocks_), "regions ", i, " and ", j,
                 " overlap in device memory; each byte of a block must belong to exactly one region");
}

void RegionTable::check_block(int64_t block) const {
  HC_REQUIRE(block >= 0 && static_cast<uint64_t>(block) < num_blocks_, "device block ", block,
             " is outside the registered pool of ", num_blocks_, " blocks");
}

}  // namespace hostcache
