// What the operating system can give us, read before committing to a pool size.
#pragma once

#include <cstdint>
#include <string>

namespace hostcache {

// RAM this process can take without being swapped or killed for memory,
// and which limit said so: the smaller of MemAvailable (/proc/meminfo) and,
// for the cgroups this process is in (v2 memory.max, v1
// memory.limit_in_bytes, every ancestor up to the mount, found through
// <proc_root>/self/mountinfo or else under cgroup_root), the limit minus
// what the cgroup uses less its inactive page cache (reclaimable before the
// limit bites). The roots are parameters so that tests can feed fake files.
struct RamBudget {
  uint64_t bytes = 0;
  std::string source;  // e.g. "MemAvailable" or "cgroup v2 memory.max of /sys/fs/cgroup/x (...)"
};
RamBudget ram_budget(const std::string& proc_root = "/proc", const std::string& cgroup_root = "/sys/fs/cgroup");

// ram_budget().bytes.
uint64_t available_ram_bytes();
uint64_t total_ram_bytes();
uint64_t page_size_bytes();


}  // namespace hostcache
