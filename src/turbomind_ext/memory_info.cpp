#include "memory_info.h"

#include <unistd.h>

#include <cstdio>
#include <cstring>

#include "errors.h"

namespace hostcache {

namespace {
uint64_t meminfo_field(const char* name) {
  std::FILE* f = std::fopen("/proc/meminfo", "r");
  if (!f) return 0;
  char line[256];
  uint64_t kib = 0;
  const size_t n = std::strlen(name);
  while (std::fgets(line, sizeof line, f)) {
    if (std::strncmp(line, name, n) == 0 && line[n] == ':') {
      std::sscanf(line + n + 1, "%lu", reinterpret_cast<unsigned long*>(&kib));
      break;
    }
  }
  std::fclose(f);
  return kib * 1024;
}
}  // namespace

uint64_t page_size_bytes() { return static_cast<uint64_t>(sysconf(_SC_PAGESIZE)); }

uint64_t available_ram_bytes() {
  const uint64_t v = meminfo_field("MemAvailable");
  return v ? v : static_cast<uint64_t>(sysconf(_SC_AVPHYS_PAGES)) * page_size_bytes();
}

uint64_t total_ram_bytes() {
  const uint64_t v = meminfo_field("MemTotal");
  return v ? v : static_cast<uint64_t>(sysconf(_SC_PHYS_PAGES)) * page_size_bytes();
}

std::string format_bytes(unsigned long long bytes) {
  char buf[64];
  const double gib = static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0);
  if (gib >= 1.0) std::snprintf(buf, sizeof buf, "%.2f GiB", gib);
  else std::snprintf(buf, sizeof buf, "%.2f MiB", static_cast<double>(bytes) / (1024.0 * 1024.0));
  return buf;
}

}  // namespace hostcache
