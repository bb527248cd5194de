// What the operating system can give us, read before committing to a pool size.
#pragma once

#include <cstdint>

namespace hostcache {

// MemAvailable from /proc/meminfo (what can be allocated without swapping),
// falling back to free physical pages where /proc is absent.
uint64_t available_ram_bytes();
uint64_t total_ram_bytes();
uint64_t page_size_bytes();

}  // namespace hostcache
