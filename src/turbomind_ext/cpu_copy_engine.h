// Copy engine for memory the CPU can address: worker threads and memcpy.
// Used for CPU tensors (tests, the CPU replay) and by the CPU-only build.
#pragma once

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "copy_engine.h"
#include "host_arena.h"
#include "regions.h"

namespace hostcache {

class CpuCopyEngine : public CopyEngine {
 public:
  // workers == 0 copies synchronously inside submit().
  CpuCopyEngine(const RegionTable& regions, const HostArena& arena, unsigned workers, uint64_t task_bytes = 4u << 20);
  ~CpuCopyEngine() override;

  std::shared_ptr<Transfer> submit(Direction dir, std::vector<BlockCopy> copies, uintptr_t after_stream,
                                   const std::vector<std::shared_ptr<Transfer>>& after) override;
  void read_block(uint32_t block, uint8_t* dst) override;
  std::string name() const override;

 private:
  struct Piece {
    uint8_t* dst;
    const uint8_t* src;
    uint64_t bytes;
  };
  struct Job;
  struct Task {
    std::shared_ptr<Job> job;
    size_t begin, end;  // pieces
  };
  void worker_loop();

  const RegionTable& regions_;
  const HostArena& arena_;
  uint64_t task_bytes_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> queue_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace hostcache
