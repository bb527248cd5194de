// Python bindings of the core (module lmdeploy_hostcache._core). Pointers
// cross as integers and token ids as numpy int32 arrays: the core links no
// torch, and the Python layer turns tensors into (pointer, stride, bytes).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "block_key.h"
#include "errors.h"
#include "host_arena.h"
#include "host_cache.h"
#include "memory_info.h"
#include "prefix_index.h"
#include "tier_index.h"

namespace py = pybind11;
using namespace hostcache;

namespace {

using Tokens = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using U64s = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;
using U32s = py::array_t<uint32_t, py::array::c_style | py::array::forcecast>;
using I32s = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

const char* status_name(InsertStatus s) {
  switch (s) {
    case InsertStatus::kCreated: return "created";
    case InsertStatus::kExists: return "exists";
    case InsertStatus::kPending: return "pending";
    case InsertStatus::kCollision: return "collision";
    case InsertStatus::kFull: return "full";
  }
  return "?";
}

py::dict device_info_dict() {
  const DeviceInfo d = device_info();
  py::dict out;
  out["cuda_compiled"] = d.cuda_compiled;
  out["gpu_usable"] = d.gpu_usable;
  out["device_count"] = d.device_count;
  out["runtime_version"] = d.runtime_version;
  out["driver_version"] = d.driver_version;
  out["reason"] = d.reason;
  return out;
}

template <typename T>
py::array_t<T> to_array(const std::vector<T>& v) {
  py::array_t<T> a(v.size());
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

#define HC_FIELD(name) d[#name] = s.name
py::dict store_stats_dict(const StoreStats& s) {
  py::dict d;
  HC_FIELD(slots_total); HC_FIELD(slot_bytes); HC_FIELD(slot_stride); HC_FIELD(pool_bytes);
  HC_FIELD(pinned); HC_FIELD(pinned_bytes); HC_FIELD(pin_mode); HC_FIELD(pin_error); HC_FIELD(copy_engine);
  HC_FIELD(pin_method); HC_FIELD(register_error);
  return d;
}

py::dict stats_dict(const Stats& s) {
  py::dict d = store_stats_dict(s);
  HC_FIELD(slots_used); HC_FIELD(slots_free);
  HC_FIELD(match_queries); HC_FIELD(query_blocks); HC_FIELD(hit_blocks); HC_FIELD(miss_blocks);
  HC_FIELD(evictions); HC_FIELD(collisions);
  HC_FIELD(offload_transfers); HC_FIELD(restore_transfers);
  HC_FIELD(blocks_offloaded); HC_FIELD(blocks_restored); HC_FIELD(bytes_offloaded); HC_FIELD(bytes_restored);
  HC_FIELD(offload_existing); HC_FIELD(offload_dropped);
  HC_FIELD(transfers_failed); HC_FIELD(checksum_failures); HC_FIELD(transfers_in_flight);
  HC_FIELD(restore_seconds); HC_FIELD(offload_seconds);
  return d;
}
#undef HC_FIELD

using RegionTuples = std::vector<std::tuple<uint64_t, uint64_t, uint64_t>>;

std::vector<Region> to_regions(const RegionTuples& regions) {
  std::vector<Region> rs;
  for (auto& [base, stride, bytes] : regions) rs.push_back({base, stride, bytes});
  return rs;
}

void require_1d(const py::array& a, const char* what) {
  if (a.ndim() != 1) throw ConfigError(hostcache::concat(what, " must be a 1-D array, got ", a.ndim(), " dimensions"));
}

// A match's steps as (keys, slots) arrays.
py::tuple steps_arrays(const std::vector<MatchStep>& steps) {
  py::array_t<uint64_t> keys(steps.size());
  py::array_t<uint32_t> slots(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    keys.mutable_data()[i] = steps[i].key;
    slots.mutable_data()[i] = steps[i].slot;
  }
  return py::make_tuple(keys, slots);
}

}  // namespace

// The bare index: tests, benchmarks, and its reference-model test.
void bind_prefix_index(py::module_& m) {
  py::class_<PrefixIndex>(m, "PrefixIndex", "The bare prefix index (for tests and benchmarks).")
      .def(py::init<uint32_t, uint32_t>(), py::arg("num_slots"), py::arg("block_tokens"))
      .def_property_readonly("capacity", &PrefixIndex::capacity)
      .def_property_readonly("used", &PrefixIndex::used)
      .def_property_readonly("evictions", &PrefixIndex::evictions)
      .def(
          "match",
          [](PrefixIndex& ix, uint64_t parent, uint64_t ns, Tokens tokens, bool pin) {
            require_1d(tokens, "tokens");
            std::vector<MatchStep> out;
            ix.match(parent, ns, tokens.data(), static_cast<size_t>(tokens.size()), pin, &out);
            py::list l;
            for (auto& s : out) l.append(py::make_tuple(s.key, s.slot));
            return l;
          },
          py::arg("parent"), py::arg("namespace"), py::arg("tokens"), py::arg("pin") = false)
      .def(
          "match_count",
          [](PrefixIndex& ix, uint64_t parent, uint64_t ns, Tokens tokens) {
            return ix.match(parent, ns, tokens.data(), static_cast<size_t>(tokens.size()), false, nullptr);
          },
          py::arg("parent"), py::arg("namespace"), py::arg("tokens"))
      .def(
          "insert",
          [](PrefixIndex& ix, uint64_t parent, uint64_t ns, Tokens tokens) {
            if (tokens.size() != ix.block_tokens())
              throw ConfigError(hostcache::concat("insert takes one block of ", ix.block_tokens(), " tokens, got ", tokens.size()));
            const InsertResult r = ix.insert(parent, ns, tokens.data());
            return py::make_tuple(status_name(r.status), r.key, r.slot);
          },
          py::arg("parent"), py::arg("namespace"), py::arg("tokens"))
      .def(
          "insert_chain",
          [](PrefixIndex& ix, uint64_t parent, uint64_t ns, Tokens tokens) {
            // Inserts and commits every full block: the index work of an
            // offload without its copy (benchmarks, tests).
            require_1d(tokens, "tokens");
            const size_t bt = ix.block_tokens(), blocks = static_cast<size_t>(tokens.size()) / bt;
            size_t created = 0;
            for (size_t i = 0; i < blocks; ++i) {
              const InsertResult r = ix.insert(parent, ns, tokens.data() + i * bt);
              if (r.status == InsertStatus::kCreated) {
                ix.commit(r.slot);
                ++created;
              }
              parent = r.key;
            }
            return created;
          },
          py::arg("parent"), py::arg("namespace"), py::arg("tokens"))
      .def("commit", &PrefixIndex::commit)
      .def("discard", &PrefixIndex::discard)
      .def("pin", &PrefixIndex::pin)
      .def("unpin", &PrefixIndex::unpin)
      .def("evict_one", &PrefixIndex::evict_one)
      .def(
          "evict",
          [](PrefixIndex& ix, size_t n) {
            size_t done = 0;
            while (done < n && ix.evict_one()) ++done;
            return done;
          },
          py::arg("n"))
      .def("find", &PrefixIndex::find)
      .def("is_ready", &PrefixIndex::is_ready)
      .def("pins", &PrefixIndex::pins)
      .def("key_of", &PrefixIndex::key_of)
      .def("check_invariants", &PrefixIndex::check_invariants);

}

// The tier's rules over the index (tier_index.h).
void bind_tier_index(py::module_& m) {
  py::class_<TierIndex>(m, "TierIndex",
                        "The tier's policy over its prefix index (tier_index.h): what LMDeploy's scheduler side keeps.")
      .def(py::init<uint32_t, uint32_t>(), py::arg("num_slots"), py::arg("block_tokens"))
      .def_property_readonly("capacity", &TierIndex::capacity)
      .def_property_readonly("used", &TierIndex::used)
      .def_property_readonly("evictions", &TierIndex::evictions)
      .def(
          "match",
          [](TierIndex& ix, uint64_t parent, uint64_t ns, Tokens tokens, bool pin) {
            // (keys, slots) arrays: this runs at every admission of LMDeploy's scheduler.
            require_1d(tokens, "tokens");
            return steps_arrays(ix.match(parent, ns, tokens.data(), static_cast<size_t>(tokens.size()), pin));
          },
          py::arg("parent"), py::arg("namespace"), py::arg("tokens"), py::arg("pin") = false)
      .def(
          "release",
          [](TierIndex& ix, U32s slots) {
            require_1d(slots, "slots");
            ix.release(slots.data(), static_cast<size_t>(slots.size()));
          },
          py::arg("slots"))
      .def(
          "drop",
          [](TierIndex& ix, U32s slots) {
            require_1d(slots, "slots");
            ix.drop(slots.data(), static_cast<size_t>(slots.size()));
          },
          py::arg("slots"))
      .def(
          "reserve",
          [](TierIndex& ix, uint64_t parent, uint64_t ns, Tokens tokens) {
            if (tokens.size() != ix.block_tokens())
              throw ConfigError(hostcache::concat("reserve takes one block of ", ix.block_tokens(), " tokens, got ",
                                                  tokens.size()));
            const InsertResult r = ix.reserve(parent, ns, tokens.data());
            return py::make_tuple(status_name(r.status), r.key, r.slot);
          },
          py::arg("parent"), py::arg("namespace"), py::arg("tokens"))
      .def("saved", &TierIndex::saved, py::arg("slot"), py::arg("ok"))
      .def(
          "begin_restore",
          [](TierIndex& ix, U32s slots, bool holds_match_pins) {
            require_1d(slots, "slots");
            ix.begin_restore(slots.data(), static_cast<size_t>(slots.size()), holds_match_pins);
          },
          py::arg("slots"), py::arg("holds_match_pins"))
      .def(
          "restored",
          [](TierIndex& ix, U32s slots, bool intact, bool release_match_pins) {
            require_1d(slots, "slots");
            ix.restored(slots.data(), static_cast<size_t>(slots.size()), intact, release_match_pins);
          },
          py::arg("slots"), py::arg("intact"), py::arg("release_match_pins"))
      .def("pins", &TierIndex::pins)
      .def("is_ready", &TierIndex::is_ready)
      .def("check_invariants", &TierIndex::check_invariants)
      .def("counters", [](const TierIndex& ix) {
        const TierCounters& c = ix.counters();
        py::dict d;
        d["match_queries"] = c.match_queries;
        d["query_blocks"] = c.query_blocks;
        d["hit_blocks"] = c.hit_blocks;
        d["miss_blocks"] = c.miss_blocks;
        d["saves_existing"] = c.saves_existing;
        d["saves_dropped"] = c.saves_dropped;
        d["discarded"] = c.discarded;
        return d;
      });

}

// Options, transfers and the SlotStore (what each LMDeploy rank holds).
void bind_slot_store(py::module_& m) {
  py::enum_<PinMode>(m, "PinMode").value("off", PinMode::kOff).value("lazy", PinMode::kLazy).value("eager", PinMode::kEager);
  py::enum_<CopyPath>(m, "CopyPath").value("kernel", CopyPath::kKernel).value("memcpy", CopyPath::kMemcpy);

  py::class_<SlotStoreOptions>(m, "StoreOptions")
      .def(py::init<>())
      .def_readwrite("capacity_bytes", &SlotStoreOptions::capacity_bytes)
      .def_readwrite("reserve_bytes", &SlotStoreOptions::reserve_bytes)
      .def_readwrite("cuda", &SlotStoreOptions::cuda)
      .def_readwrite("device", &SlotStoreOptions::device)
      .def_readwrite("pin_mode", &SlotStoreOptions::pin_mode)
      .def_readwrite("copy_path", &SlotStoreOptions::copy_path)
      .def_readwrite("cpu_workers", &SlotStoreOptions::cpu_workers)
      .def_readwrite("pin_chunk_bytes", &SlotStoreOptions::pin_chunk_bytes)
      .def_readwrite("capacity_setting", &SlotStoreOptions::capacity_setting);

  py::class_<HostCacheOptions, SlotStoreOptions>(m, "Options")
      .def(py::init<>())
      .def_readwrite("block_tokens", &HostCacheOptions::block_tokens)
      .def_readwrite("checksum", &HostCacheOptions::checksum);

  py::class_<Transfer, std::shared_ptr<Transfer>>(m, "EngineTransfer", "One batched copy of a SlotStore.")
      .def("done", &Transfer::done)
      .def("wait", &Transfer::wait, py::call_guard<py::gil_scoped_release>())
      .def("error", &Transfer::error)
      .def("make_stream_wait", &Transfer::make_stream_wait, py::arg("stream"));

  py::class_<SlotStore>(m, "SlotStore", "Host slots and their copy engine, addressed by slot id (no index).")
      .def(py::init([](const SlotStoreOptions& o, const RegionTuples& regions,
                       uint64_t num_device_blocks) {
             return std::make_unique<SlotStore>(o, to_regions(regions), num_device_blocks);
           }),
           py::arg("options"), py::arg("regions"), py::arg("num_device_blocks"))
      .def_property_readonly("num_slots", &SlotStore::num_slots)
      .def_property_readonly("slot_bytes", &SlotStore::slot_bytes)
      .def(
          "submit",
          [](SlotStore& st, const std::string& direction, U32s slots, I32s blocks, uintptr_t after_stream) {
            require_1d(slots, "slots");
            require_1d(blocks, "device_blocks");
            if (slots.size() != blocks.size())
              throw ConfigError(hostcache::concat("got ", slots.size(), " slots but ", blocks.size(),
                                                  " device blocks; pass one device block per slot"));
            if (direction != "offload" && direction != "restore")
              throw ConfigError(hostcache::concat("direction must be 'offload' or 'restore', got '", direction, "'"));
            std::vector<BlockCopy> copies(static_cast<size_t>(slots.size()));
            for (size_t i = 0; i < copies.size(); ++i) {
              if (blocks.data()[i] < 0)
                throw ConfigError(hostcache::concat("device block ", blocks.data()[i], " is negative"));
              copies[i] = {slots.data()[i], static_cast<uint32_t>(blocks.data()[i])};
            }
            st.check_copies(copies);
            return st.submit(direction == "offload" ? Direction::kOffload : Direction::kRestore, copies, after_stream);
          },
          py::arg("direction"), py::arg("slots"), py::arg("device_blocks"), py::arg("after_stream") = 0)
      .def(
          "slot_view",
          [](SlotStore& st, uint32_t slot) {
            return py::memoryview::from_memory(st.slot_data(slot), static_cast<py::ssize_t>(st.slot_bytes()), false);
          },
          py::arg("slot"), py::keep_alive<0, 1>())
      .def("memory_ranges",
           [](SlotStore& st) {
             py::list out;
             for (const auto& [ptr, bytes] : st.memory_ranges())
               out.append(py::make_tuple(reinterpret_cast<uintptr_t>(ptr), bytes));
             return out;
           })
      .def("slot_checksum", &SlotStore::slot_checksum)
      .def("block_checksum", &SlotStore::block_checksum)
      .def("stats", [](const SlotStore& st) { return store_stats_dict(st.stats()); });

}

// The whole tier in one process.
void bind_host_cache(py::module_& m) {
  py::class_<TransferRecord, std::shared_ptr<TransferRecord>>(m, "TransferRecord")
      .def_readonly("id", &TransferRecord::id)
      .def_property_readonly("direction",
                             [](const TransferRecord& t) { return t.direction == Direction::kOffload ? "offload" : "restore"; })
      .def_readonly("finished", &TransferRecord::finished)
      .def_readonly("ok", &TransferRecord::ok)
      .def_readonly("error", &TransferRecord::error)
      .def_readonly("seconds", &TransferRecord::seconds)
      .def_property_readonly("num_blocks", [](const TransferRecord& t) { return t.copies.size(); })
      .def_property_readonly("slots", [](const TransferRecord& t) {
        std::vector<uint32_t> v;
        for (auto& c : t.copies) v.push_back(c.slot);
        return to_array(v);
      })
      .def_property_readonly("blocks", [](const TransferRecord& t) {
        std::vector<uint32_t> v;
        for (auto& c : t.copies) v.push_back(c.block);
        return to_array(v);
      });

  py::class_<HostCache>(m, "HostCache")
      .def(py::init([](const HostCacheOptions& o, const RegionTuples& regions,
                       uint64_t num_device_blocks) {
             return std::make_unique<HostCache>(o, to_regions(regions), num_device_blocks);
           }),
           py::arg("options"), py::arg("regions"), py::arg("num_device_blocks"))
      .def_property_readonly("block_tokens", &HostCache::block_tokens)
      .def_property_readonly("slot_bytes", &HostCache::slot_bytes)
      .def_property_readonly("num_slots", &HostCache::num_slots)
      .def(
          "block_keys",
          [](const HostCache& c, uint64_t parent, uint64_t ns, Tokens tokens) {
            require_1d(tokens, "tokens");
            return to_array(c.block_keys(parent, ns, tokens.data(), static_cast<size_t>(tokens.size())));
          },
          py::arg("parent"), py::arg("namespace"), py::arg("tokens"))
      .def(
          "match",
          [](HostCache& c, uint64_t parent, uint64_t ns, Tokens tokens, bool pin) {
            require_1d(tokens, "tokens");
            return steps_arrays(c.match(parent, ns, tokens.data(), static_cast<size_t>(tokens.size()), pin));
          },
          py::arg("parent"), py::arg("namespace"), py::arg("tokens"), py::arg("pin") = false)
      .def(
          "release",
          [](HostCache& c, U32s slots) {
            require_1d(slots, "slots");
            c.release(slots.data(), static_cast<size_t>(slots.size()));
          },
          py::arg("slots"))
      .def(
          "offload",
          [](HostCache& c, U64s parents, U64s namespaces, Tokens tokens, I32s blocks, uintptr_t after_stream) {
            const size_t n = static_cast<size_t>(blocks.size());
            require_1d(blocks, "device_blocks");
            if (static_cast<size_t>(parents.size()) != n || static_cast<size_t>(namespaces.size()) != n)
              throw ConfigError(hostcache::concat("offload got ", n, " device blocks but ", parents.size(), " parents and ",
                                       namespaces.size(), " namespaces; pass one of each per block"));
            if (tokens.ndim() != 2 || static_cast<size_t>(tokens.shape(0)) != n ||
                static_cast<size_t>(tokens.shape(1)) != c.block_tokens())
              throw ConfigError(hostcache::concat("offload tokens must have shape (", n, ", ", c.block_tokens(),
                                       "): one row of block_tokens ids per device block"));
            OffloadResult r = c.offload(parents.data(), namespaces.data(), tokens.data(), blocks.data(), n, after_stream);
            return py::make_tuple(r.transfer, to_array(r.keys), to_array(r.slots), r.created, r.existing, r.dropped);
          },
          py::arg("parents"), py::arg("namespaces"), py::arg("tokens"), py::arg("device_blocks"),
          py::arg("after_stream") = 0)
      .def(
          "restore",
          [](HostCache& c, U32s slots, I32s blocks, uintptr_t after_stream, bool release_match_pins) {
            require_1d(slots, "slots");
            require_1d(blocks, "device_blocks");
            if (slots.size() != blocks.size())
              throw ConfigError(hostcache::concat("restore got ", slots.size(), " slots but ", blocks.size(),
                                       " device blocks; pass one destination block per slot"));
            return c.restore(slots.data(), blocks.data(), static_cast<size_t>(slots.size()), after_stream,
                             release_match_pins);
          },
          py::arg("slots"), py::arg("device_blocks"), py::arg("after_stream") = 0,
          py::arg("release_match_pins") = false)
      .def(
          "slot_view",
          [](HostCache& c, uint32_t slot) {
            return py::memoryview::from_memory(c.slot_data(slot), static_cast<py::ssize_t>(c.slot_bytes()), false);
          },
          py::arg("slot"), py::keep_alive<0, 1>())
      .def("poll", &HostCache::poll)
      .def("wait", &HostCache::wait, py::call_guard<py::gil_scoped_release>())
      .def("make_stream_wait", &HostCache::make_stream_wait)
      .def("reap", &HostCache::reap)
      .def("wait_all", &HostCache::wait_all, py::call_guard<py::gil_scoped_release>())
      .def("stats", [](HostCache& c) { return stats_dict(c.stats()); })
      .def("inject_failures", &HostCache::inject_failures)
      .def("check_invariants", &HostCache::check_invariants);
}

PYBIND11_MODULE(_core, m) {
  m.doc() = "lmdeploy-hostcache core: host block pool, prefix index and copy engine";
  m.def("device_info", &device_info_dict, "Whether this build has CUDA and whether a GPU is usable.");
  m.attr("ROOT_KEY") = kRootKey;
  m.def("slot_stride", &slot_stride_for, py::arg("block_bytes"),
        "Bytes one host slot of a block of `block_bytes` takes (the arena's alignment).");
  m.def("available_ram_bytes", &available_ram_bytes,
        "What the pool is checked against: the smaller of MemAvailable and this process's cgroup limits "
        "less their use (ram_budget).");
  m.def(
      "ram_budget",
      [](const std::string& proc_root, const std::string& cgroup_root) {
        const RamBudget b = ram_budget(proc_root, cgroup_root);
        return py::make_tuple(b.bytes, b.source);
      },
      py::arg("proc_root") = "/proc", py::arg("cgroup_root") = "/sys/fs/cgroup",
      "(bytes, which limit applied): RAM this process can take (memory_info.h).");
  m.def("total_ram_bytes", &total_ram_bytes);
  m.def(
      "chain_key",
      [](uint64_t parent, uint64_t ns, Tokens tokens) {
        require_1d(tokens, "tokens");
        return chain_key(parent, ns, tokens.data(), static_cast<size_t>(tokens.size()));
      },
      py::arg("parent"), py::arg("namespace"), py::arg("tokens"));
  m.def(
      "block_keys",
      [](uint64_t parent, uint64_t ns, Tokens tokens, uint32_t block_tokens) {
        require_1d(tokens, "tokens");
        HC_REQUIRE(block_tokens > 0, "block_tokens must be positive");
        return to_array(block_chain_keys(parent, ns, tokens.data(), static_cast<size_t>(tokens.size()), block_tokens));
      },
      py::arg("parent"), py::arg("namespace"), py::arg("tokens"), py::arg("block_tokens"),
      "Keys of the full blocks of tokens, chained from parent (a partial last block has none).");

  bind_prefix_index(m);
  bind_tier_index(m);
  bind_slot_store(m);
  bind_host_cache(m);
}
