#include "cpu_copy_engine.h"

#include <atomic>
#include <cstring>

#include "errors.h"

namespace hostcache {

// The pieces of one transfer and how many tasks are still running.
struct CpuCopyEngine::Job : Transfer {
  std::vector<Piece> pieces;
  std::atomic<size_t> tasks_left{0};
  std::mutex mu;
  std::condition_variable cv;

  bool done() override { return tasks_left.load(std::memory_order_acquire) == 0; }
  void wait() override {
    if (done()) return;
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [this] { return done(); });
  }
  std::string error() override { return {}; }
  void make_stream_wait(uintptr_t) override {
    throw ConfigError("make_stream_wait needs a CUDA transfer; this cache copies CPU memory");
  }
  void finish_task() {
    if (tasks_left.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lock(mu);  // pairs with wait(): no lost wake-up
      cv.notify_all();
    }
  }
};

CpuCopyEngine::CpuCopyEngine(const RegionTable& regions, const HostArena& arena, unsigned workers,
                             uint64_t task_bytes)
    : regions_(regions), arena_(arena), task_bytes_(task_bytes) {
  workers_.reserve(workers);
  for (unsigned i = 0; i < workers; ++i) workers_.emplace_back([this] { worker_loop(); });
}

CpuCopyEngine::~CpuCopyEngine() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

std::string CpuCopyEngine::name() const {
  return workers_.empty() ? "cpu-memcpy-sync" : concat("cpu-memcpy-", workers_.size(), "-threads");
}

void CpuCopyEngine::worker_loop() {
  for (;;) {
    Task task;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      // Drain the queue before stopping so no transfer is left half done.
      if (queue_.empty()) return;
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    for (size_t i = task.begin; i < task.end; ++i) {
      const Piece& p = task.job->pieces[i];
      std::memcpy(p.dst, p.src, p.bytes);
    }
    task.job->finish_task();
  }
}

std::shared_ptr<Transfer> CpuCopyEngine::submit(Direction dir, std::vector<BlockCopy> copies, uintptr_t,
                                                const std::vector<std::shared_ptr<Transfer>>& after) {
  // Workers take tasks in any order: an earlier copy of the same slot or
  // block must be finished before this one is queued.
  for (const auto& prior : after) prior->wait();
  auto job = std::make_shared<Job>();
  job->pieces.reserve(copies.size() * regions_.size());
  // Block-major order: each slot is written or read front to back.
  for (const BlockCopy& c : copies) {
    uint8_t* slot = arena_.slot(c.slot);
    for (size_t r = 0; r < regions_.size(); ++r) {
      auto* dev = reinterpret_cast<uint8_t*>(regions_.block_address(r, c.block));
      uint8_t* host = slot + regions_.slot_offset(r);
      const uint64_t n = regions_[r].bytes;
      if (dir == Direction::kOffload) job->pieces.push_back({host, dev, n});
      else job->pieces.push_back({dev, host, n});
    }
  }
  if (workers_.empty() || job->pieces.empty()) {
    for (const Piece& p : job->pieces) std::memcpy(p.dst, p.src, p.bytes);
    return job;
  }
  // Tasks of about task_bytes_, at least one per worker when there is enough work.
  uint64_t total = 0;
  for (const Piece& p : job->pieces) total += p.bytes;
  const uint64_t target = std::max<uint64_t>(1, std::min<uint64_t>(task_bytes_, total / workers_.size()));
  std::vector<Task> tasks;
  size_t begin = 0;
  uint64_t acc = 0;
  for (size_t i = 0; i < job->pieces.size(); ++i) {
    acc += job->pieces[i].bytes;
    if (acc >= target || i + 1 == job->pieces.size()) {
      tasks.push_back({job, begin, i + 1});
      begin = i + 1;
      acc = 0;
    }
  }
  job->tasks_left.store(tasks.size(), std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& t : tasks) queue_.push_back(std::move(t));
  }
  cv_.notify_all();
  return job;
}

void CpuCopyEngine::read_block(uint32_t block, uint8_t* dst) {
  for (size_t r = 0; r < regions_.size(); ++r)
    std::memcpy(dst + regions_.slot_offset(r), reinterpret_cast<const uint8_t*>(regions_.block_address(r, block)),
                regions_[r].bytes);
}

}  // namespace hostcache
