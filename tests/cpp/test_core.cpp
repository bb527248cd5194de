// C++ tests of the core, run under ASan+UBSan and TSan in CI: index
// invariants under random operations, exact round trips through the CPU copy
// engine, and several threads sharing one HostCache.
#include <atomic>
#include <cstdlib>
#include <string>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "block_key.h"
#include "errors.h"
#include "host_arena.h"
#include "host_cache.h"
#include "prefix_index.h"

using namespace hostcache;

namespace {

int g_failures = 0;
#define CHECK(cond)                                                        \
  do {                                                                     \
    if (!(cond)) {                                                         \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                        \
    }                                                                      \
  } while (0)

constexpr uint32_t kBT = 16;

// A fake device pool: `layers` regions, each a contiguous run of blocks.
struct FakePool {
  uint32_t layers, blocks;
  uint64_t bytes_per_layer_block;
  std::vector<uint8_t> mem;
  FakePool(uint32_t l, uint32_t b, uint64_t bytes) : layers(l), blocks(b), bytes_per_layer_block(bytes), mem(l * b * bytes) {}
  std::vector<Region> regions() {
    std::vector<Region> r;
    for (uint32_t l = 0; l < layers; ++l)
      r.push_back({reinterpret_cast<uint64_t>(mem.data() + l * blocks * bytes_per_layer_block), bytes_per_layer_block,
                   bytes_per_layer_block});
    return r;
  }
  uint8_t* at(uint32_t layer, uint32_t block) { return mem.data() + (layer * blocks + block) * bytes_per_layer_block; }
  // Bytes derived from (tag, layer, position): what a forward of that block writes.
  void fill(uint32_t block, uint64_t tag) {
    for (uint32_t l = 0; l < layers; ++l)
      for (uint64_t i = 0; i < bytes_per_layer_block; ++i) at(l, block)[i] = static_cast<uint8_t>((tag * 31 + l * 7 + i) ^ (tag >> 8));
  }
  bool holds(uint32_t block, uint64_t tag) {
    for (uint32_t l = 0; l < layers; ++l)
      for (uint64_t i = 0; i < bytes_per_layer_block; ++i)
        if (at(l, block)[i] != static_cast<uint8_t>((tag * 31 + l * 7 + i) ^ (tag >> 8))) return false;
    return true;
  }
};

void test_index_random() {
  std::mt19937_64 rng(42);
  for (int round = 0; round < 20; ++round) {
    PrefixIndex ix(1 + rng() % 32, 4);
    std::vector<std::vector<int32_t>> docs(6, std::vector<int32_t>(32));
    for (auto& d : docs)
      for (auto& t : d) t = static_cast<int32_t>(rng() % 3);
    std::vector<uint32_t> pinned;
    for (int step = 0; step < 3000; ++step) {
      const auto& d = docs[rng() % docs.size()];
      switch (rng() % 6) {
        case 0:
        case 1: {
          const size_t i = rng() % 8;
          uint64_t parent = kRootKey;
          for (size_t j = 0; j < i; ++j) parent = chain_key(parent, 0, d.data() + 4 * j, 4);
          const InsertResult r = ix.insert(parent, 0, d.data() + 4 * i);
          if (r.status == InsertStatus::kCreated) {
            if (rng() % 5 == 0) {
              ix.discard(r.slot);
              ix.unpin(r.slot);
            } else {
              ix.commit(r.slot);
            }
          }
          break;
        }
        case 2: {
          std::vector<MatchStep> out;
          ix.match(kRootKey, 0, d.data(), d.size(), rng() % 3 == 0, &out);
          for (auto& s : out)
            if (ix.pins(s.slot) > 0) pinned.push_back(s.slot);
          break;
        }
        case 3:
          if (!pinned.empty()) {
            const size_t k = rng() % pinned.size();
            if (ix.pins(pinned[k]) > 0) ix.unpin(pinned[k]);
            pinned.erase(pinned.begin() + static_cast<long>(k));
          }
          break;
        case 4: ix.evict_one(); break;
        case 5: break;
      }
      if (step % 50 == 0) {
        try {
          ix.check_invariants();
        } catch (const std::exception& e) {
          std::fprintf(stderr, "round %d step %d: %s\n", round, step, e.what());
          ++g_failures;
          return;
        }
      }
    }
  }
}

HostCacheOptions cpu_options(uint64_t slot_bytes, uint32_t slots, unsigned workers, bool checksum) {
  HostCacheOptions o;
  o.capacity_bytes = ((slot_bytes + 255) / 256 * 256) * slots;
  o.reserve_bytes = 0;
  o.block_tokens = kBT;
  o.cpu_workers = workers;
  o.checksum = checksum;
  return o;
}

void test_round_trip() {
  FakePool pool(3, 32, 4096);
  HostCache cache(cpu_options(3 * 4096, 24, 2, true), pool.regions(), pool.blocks);
  std::vector<int32_t> toks(8 * kBT);
  for (size_t i = 0; i < toks.size(); ++i) toks[i] = static_cast<int32_t>(i * 7 + 1);
  std::vector<int32_t> blocks = {5, 9, 2, 31, 0, 17, 8, 3};
  for (size_t i = 0; i < blocks.size(); ++i) pool.fill(blocks[i], 100 + i);
  const auto keys = cache.block_keys(kRootKey, 0, toks.data(), toks.size());
  std::vector<uint64_t> parents(blocks.size()), nss(blocks.size(), 0);
  for (size_t i = 0; i < blocks.size(); ++i) parents[i] = i ? keys[i - 1] : kRootKey;
  auto off = cache.offload(parents.data(), nss.data(), toks.data(), blocks.data(), blocks.size(), 0);
  CHECK(off.created == blocks.size());
  cache.wait(*off.transfer);
  CHECK(off.transfer->ok);
  for (auto b : blocks) pool.fill(static_cast<uint32_t>(b), 9999);
  auto m = cache.match(kRootKey, 0, toks.data(), toks.size(), true);
  CHECK(m.size() == blocks.size());
  std::vector<uint32_t> slots;
  for (auto& s : m) slots.push_back(s.slot);
  std::vector<int32_t> dst = {10, 11, 12, 13, 14, 15, 16, 18};
  auto t = cache.restore(slots.data(), dst.data(), slots.size(), 0, true);
  cache.wait(*t);
  CHECK(t->ok);
  for (size_t i = 0; i < dst.size(); ++i) CHECK(pool.holds(static_cast<uint32_t>(dst[i]), 100 + i));
  const Stats s = cache.stats();
  CHECK(s.bytes_restored == s.bytes_offloaded);
  CHECK(s.checksum_failures == 0);
  cache.check_invariants();
}

// Threads offload, match and restore disjoint prompts into disjoint blocks of
// one pool at the same time, through one cache: TSan watches the locking.
void test_threads() {
  constexpr int kThreads = 4, kIters = 60;
  FakePool pool(2, 8 * kThreads, 2048);
  HostCache cache(cpu_options(2 * 2048, 64, 2, true), pool.regions(), pool.blocks);
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int th = 0; th < kThreads; ++th) {
    threads.emplace_back([&, th] {
      std::mt19937 rng(th);
      const int32_t src = 8 * th, dst = 8 * th + 4;
      for (int it = 0; it < kIters; ++it) {
        std::vector<int32_t> toks(2 * kBT);
        for (auto& x : toks) x = static_cast<int32_t>(rng() % 50000);
        const uint64_t tag = static_cast<uint64_t>(th) * 100000 + static_cast<uint64_t>(it) * 2;
        pool.fill(static_cast<uint32_t>(src), tag);
        pool.fill(static_cast<uint32_t>(src + 1), tag + 1);
        const auto keys = cache.block_keys(kRootKey, 0, toks.data(), toks.size());
        uint64_t parents[2] = {kRootKey, keys[0]}, nss[2] = {0, 0};
        int32_t blocks[2] = {src, src + 1};
        auto off = cache.offload(parents, nss, toks.data(), blocks, 2, 0);
        cache.wait(*off.transfer);
        auto m = cache.match(kRootKey, 0, toks.data(), toks.size(), true);
        if (m.empty()) continue;  // evicted by another thread: a miss, never wrong data
        std::vector<uint32_t> slots;
        std::vector<int32_t> dsts;
        for (size_t i = 0; i < m.size(); ++i) {
          slots.push_back(m[i].slot);
          dsts.push_back(dst + static_cast<int32_t>(i));
        }
        auto t = cache.restore(slots.data(), dsts.data(), slots.size(), 0, true);
        cache.wait(*t);
        if (!t->ok) { ++bad; continue; }
        for (size_t i = 0; i < m.size(); ++i)
          if (!pool.holds(static_cast<uint32_t>(dst + i), tag + i)) ++bad;
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(bad.load() == 0);
  const Stats s = cache.stats();
  CHECK(s.transfers_in_flight == 0);
  CHECK(s.checksum_failures == 0);
  cache.check_invariants();
}

void test_failures_release_everything() {
  FakePool pool(2, 16, 1024);
  HostCache cache(cpu_options(2048, 8, 2, false), pool.regions(), pool.blocks);
  std::vector<int32_t> toks(3 * kBT, 7);
  const auto keys = cache.block_keys(kRootKey, 0, toks.data(), toks.size());
  uint64_t parents[3] = {kRootKey, keys[0], keys[1]}, nss[3] = {0, 0, 0};
  int32_t blocks[3] = {0, 1, 2};
  cache.inject_failures(1);
  auto off = cache.offload(parents, nss, toks.data(), blocks, 3, 0);
  cache.wait(*off.transfer);
  CHECK(!off.transfer->ok);
  CHECK(cache.stats().slots_used == 0);
  CHECK(cache.match(kRootKey, 0, toks.data(), toks.size(), false).empty());
  cache.check_invariants();
  bool threw = false;
  try {
    int32_t bad_block = 16;
    cache.offload(parents, nss, toks.data(), &bad_block, 1, 0);
  } catch (const ConfigError&) {
    threw = true;
  }
  CHECK(threw);
}

void test_destroy_with_transfers_in_flight() {
  FakePool pool(4, 64, 16384);
  std::vector<std::shared_ptr<TransferRecord>> records;
  {
    HostCache cache(cpu_options(4 * 16384, 64, 2, false), pool.regions(), pool.blocks);
    for (int i = 0; i < 32; ++i) {
      std::vector<int32_t> toks(kBT, i);
      uint64_t parent = kRootKey, ns = 0;
      int32_t block = i;
      records.push_back(cache.offload(&parent, &ns, toks.data(), &block, 1, 0).transfer);
    }
  }
  for (auto& r : records) CHECK(r->finished && r->ok);
}

// A Pinner that refuses registration after `register_ok` calls and allocation
// after `allocate_ok`, allocating from the heap; counts outlive the arena.
struct PinCounts {
  int pins = 0, unpins = 0, allocations = 0, releases = 0;
};
class ScriptedPinner : public Pinner {
 public:
  ScriptedPinner(PinCounts& n, int register_ok, int allocate_ok) : n_(n), register_ok_(register_ok), allocate_ok_(allocate_ok) {}
  void pin(void*, uint64_t) override {
    if (n_.pins >= register_ok_) throw SystemError("cudaHostRegister refused (scripted)");
    ++n_.pins;
  }
  void unpin(void*, uint64_t) noexcept override { ++n_.unpins; }
  void* allocate(uint64_t bytes) override {
    if (n_.allocations >= allocate_ok_) throw SystemError("cudaHostAlloc refused (scripted)");
    ++n_.allocations;
    return std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);
  }
  void release(void* p) noexcept override {
    ++n_.releases;
    std::free(p);
  }

 private:
  PinCounts& n_;
  int register_ok_, allocate_ok_;
};

uint8_t pattern(uint32_t slot, uint64_t i) { return static_cast<uint8_t>(slot * 13 + i * 7 + 1); }

// Every slot keeps its own bytes whichever way its chunk was pinned.
bool slots_hold_patterns(const HostArena& a) {
  for (uint32_t s = 0; s < a.num_slots(); ++s)
    for (uint64_t i = 0; i < a.slot_bytes(); ++i)
      if (a.slot(s)[i] != pattern(s, i)) return false;
  return true;
}

void write_patterns(HostArena& a) {
  for (uint32_t s = 0; s < a.num_slots(); ++s)
    for (uint64_t i = 0; i < a.slot_bytes(); ++i) a.slot(s)[i] = pattern(s, i);
}

void test_arena_pin_fallback() {
  ArenaOptions o;
  o.slot_bytes = 1000;                 // stride 1024: 4 slots per page
  o.capacity_bytes = 64 * 1024;        // 64 slots
  o.chunk_bytes = 16 * 1024;           // 4 chunks of 16 slots
  {  // registration works: one method, nothing allocated
    PinCounts n;
    {
      o.pin_mode = PinMode::kEager;
      HostArena a(o, std::make_unique<ScriptedPinner>(n, 100, 100));
      CHECK(a.pin_method() == "register" && a.register_error().empty() && a.pin_error().empty());
      CHECK(a.pinned_bytes() == a.mapped_bytes() && n.pins == 4 && n.allocations == 0);
    }
    CHECK(n.unpins == 4);
  }
  {  // refused after the first chunk: the rest move to pinned allocations
    PinCounts n;
    {
      o.pin_mode = PinMode::kEager;
      HostArena a(o, std::make_unique<ScriptedPinner>(n, 1, 100));
      CHECK(a.pin_method() == "register+allocate" && a.pin_error().empty());
      CHECK(a.register_error().find("refused") != std::string::npos);
      CHECK(a.pinned_bytes() == a.mapped_bytes() && n.allocations == 3);
      for (uint32_t s = 0; s < a.num_slots(); ++s) CHECK(a.is_pinned(s));
      write_patterns(a);
      CHECK(slots_hold_patterns(a));
    }
    CHECK(n.unpins == 1 && n.releases == 3);
  }
  {  // lazy: bytes written before a chunk's first prepare survive its move
    PinCounts n;
    {
      o.pin_mode = PinMode::kLazy;
      HostArena a(o, std::make_unique<ScriptedPinner>(n, 0, 100));
      CHECK(a.pin_method() == "none");
      write_patterns(a);
      uint8_t* before = a.slot(40);
      CHECK(a.prepare(40));
      CHECK(a.slot(40) != before && a.is_pinned(40) && !a.is_pinned(0));
      CHECK(a.pin_method() == "allocate" && n.allocations == 1);
      CHECK(slots_hold_patterns(a));
    }
    CHECK(n.releases == 1 && n.unpins == 0);
  }
  {  // both refused: unpinned, usable, and the error says both
    PinCounts n;
    {
      o.pin_mode = PinMode::kEager;
      HostArena a(o, std::make_unique<ScriptedPinner>(n, 0, 0));
      CHECK(!a.prepare(0) && !a.is_pinned(0) && a.pinned_bytes() == 0);
      CHECK(a.pin_error().find("cudaHostRegister refused") != std::string::npos);
      CHECK(a.pin_error().find("cudaHostAlloc refused") != std::string::npos);
      CHECK(a.pin_error().find("unpinned") != std::string::npos);
      write_patterns(a);
      CHECK(slots_hold_patterns(a));
    }
    CHECK(n.releases == 0 && n.unpins == 0);
  }
}

}  // namespace

int main() {
  test_index_random();
  test_round_trip();
  test_threads();
  test_failures_release_everything();
  test_destroy_with_transfers_in_flight();
  test_arena_pin_fallback();
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all core tests passed\n");
  return 0;
}
