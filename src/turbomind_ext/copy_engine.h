// Transport: moves whole blocks between the device regions and host slots.
// Policy (what to copy, when, which slots) lives in HostCache; an engine only
// copies what it is told and reports completion.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace hostcache {

enum class Direction : uint8_t {
  kOffload,  // device block -> host slot
  kRestore,  // host slot -> device block
};

struct BlockCopy {
  uint32_t slot;
  uint32_t block;
};

// One batched asynchronous copy.
class Transfer {
 public:
  virtual ~Transfer() = default;
  // Non-blocking completion check.
  virtual bool done() = 0;
  // Blocks until done. Safe to call from several threads.
  virtual void wait() = 0;
  // After done(): empty when every byte arrived, else what went wrong.
  virtual std::string error() = 0;
  // Makes work queued later on `stream` wait for this transfer (CUDA only).
  virtual void make_stream_wait(uintptr_t stream) = 0;
};

class CopyEngine {
 public:
  virtual ~CopyEngine() = default;
  // Starts copying every block of `copies` across all regions. The caller
  // (SlotStore) has checked every slot and block against the pools.
  // - `after_stream` (CUDA, 0 = none) is a stream whose queued work must
  //   finish before the copy reads or writes: the forward that fills an
  //   offloaded block, or the last reader of a block a restore overwrites.
  // - `after` are the earlier transfers that use one of the same slots or
  //   blocks (SlotStore tracks them); the copy must not start before they
  //   finish. The CPU engine waits for them; the CUDA engine orders its
  //   streams on their events, so the host never blocks.
  virtual std::shared_ptr<Transfer> submit(Direction dir, std::vector<BlockCopy> copies, uintptr_t after_stream,
                                           const std::vector<std::shared_ptr<Transfer>>& after) = 0;
  // Copies one device block's bytes, region after region, into `dst`
  // (slot_bytes long), synchronously. Used by checksum verification.
  virtual void read_block(uint32_t block, uint8_t* dst) = 0;
  virtual std::string name() const = 0;
};

}  // namespace hostcache
