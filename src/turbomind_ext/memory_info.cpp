#include "memory_info.h"

#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <vector>

#include "errors.h"

namespace hostcache {

namespace {

std::optional<std::string> read_text(const std::string& path) {
  std::ifstream f(path);
  if (!f) return std::nullopt;
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

// "name value" lines (memory.stat) or "Name: value kB" (meminfo): the value.
std::optional<uint64_t> field(const std::string& text, const std::string& name, bool colon) {
  std::istringstream in(text);
  std::string line;
  const std::string key = colon ? name + ":" : name;
  while (std::getline(in, line)) {
    if (line.compare(0, key.size(), key) == 0 && line.size() > key.size() && (line[key.size()] == ' ' ||
                                                                              line[key.size()] == '\t')) {
      unsigned long long v = 0;
      if (std::sscanf(line.c_str() + key.size(), "%llu", &v) == 1) return static_cast<uint64_t>(v);
    }
  }
  return std::nullopt;
}

// A number file ("max", or v1's near-2^63 "unlimited", give nothing).
std::optional<uint64_t> number_file(const std::string& path) {
  const auto text = read_text(path);
  if (!text) return std::nullopt;
  unsigned long long v = 0;
  if (std::sscanf(text->c_str(), "%llu", &v) != 1 || v >= (1ull << 60)) return std::nullopt;
  return static_cast<uint64_t>(v);
}

uint64_t meminfo_bytes(const std::string& proc_root, const char* name) {
  const auto text = read_text(proc_root + "/meminfo");
  if (!text) return 0;
  return field(*text, name, true).value_or(0) * 1024;
}

// The cgroup paths of this process: (v2 path or "", v1 memory path or "").
std::pair<std::string, std::string> own_cgroups(const std::string& proc_root) {
  std::string v2, v1;
  const auto text = read_text(proc_root + "/self/cgroup");
  if (!text) return {v2, v1};
  std::istringstream in(*text);
  std::string line;
  while (std::getline(in, line)) {
    const auto a = line.find(':'), b = line.find(':', a == std::string::npos ? 0 : a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
    if (controllers.empty() && line.compare(0, a, "0") == 0) v2 = path;
    std::istringstream names(controllers);
    std::string c;
    while (std::getline(names, c, ','))
      if (c == "memory") v1 = path;
  }
  return {v2, v1};
}

// Where a cgroup hierarchy is mounted: `point` shows the cgroup `root` (a
// container without a cgroup namespace sees its own cgroup as the root).
struct Mount {
  std::string point, root;
};

// mountinfo writes a space, tab, newline or backslash in a path as \ooo.
std::string unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size() && s[i + 1] >= '0' && s[i + 1] <= '3' &&
        s[i + 2] >= '0' && s[i + 2] <= '7' && s[i + 3] >= '0' && s[i + 3] <= '7') {
      out += static_cast<char>((s[i + 1] - '0') * 64 + (s[i + 2] - '0') * 8 + (s[i + 3] - '0'));
      i += 3;
    } else {
      out += s[i];
    }
  }
  return out;
}

// Every cgroup2 mount and every mount of the v1 memory controller, from
// mountinfo ("id parent major:minor root point options [tags] - type source super-options").
std::pair<std::vector<Mount>, std::vector<Mount>> cgroup_mounts(const std::string& proc_root) {
  std::vector<Mount> v2, v1;
  const auto text = read_text(proc_root + "/self/mountinfo");
  if (!text) return {v2, v1};
  std::istringstream in(*text);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream f(line);
    std::vector<std::string> w;
    for (std::string x; f >> x;) w.push_back(x);
    size_t dash = 0;
    while (dash < w.size() && w[dash] != "-") ++dash;
    if (w.size() < 5 || dash + 2 > w.size()) continue;
    const std::string& type = w[dash + 1];
    const Mount m{unescape(w[4]), unescape(w[3])};
    if (type == "cgroup2") v2.push_back(m);
    if (type == "cgroup" && dash + 3 < w.size()) {
      std::istringstream opts(w[dash + 3]);
      for (std::string o; std::getline(opts, o, ',');)
        if (o == "memory") v1.push_back(m);
    }
  }
  return {v2, v1};
}

bool shows(const std::string& root, const std::string& path) {
  if (root == "/" || root.empty()) return true;
  return path.compare(0, root.size(), root) == 0 && (path.size() == root.size() || path[root.size()] == '/');
}

// The directory of cgroup `path` under the mount whose root shows it most
// closely (the longest root that prefixes it), or nothing: a process whose
// cgroup no mount shows has no files of it to read.
std::optional<std::pair<std::string, std::string>> locate(const std::vector<Mount>& mounts, const std::string& path) {
  const Mount* best = nullptr;
  for (const auto& m : mounts)
    if (shows(m.root, path) && (!best || m.root.size() > best->root.size())) best = &m;
  if (!best) return std::nullopt;
  const std::string rel = (best->root == "/" || best->root.empty()) ? path : path.substr(best->root.size());
  return std::make_pair(best->point, rel);
}

// dir, then each parent down to (and including) root.
std::vector<std::string> up_to(const std::string& root, std::string path) {
  std::vector<std::string> dirs;
  while (!path.empty() && path.back() == '/') path.pop_back();
  for (;;) {
    dirs.push_back(root + path);
    if (path.empty()) break;
    const auto cut = path.rfind('/');
    path = cut == std::string::npos ? std::string() : path.substr(0, cut);
  }
  return dirs;
}

void consider(RamBudget& best, const std::string& dir, const char* version, const char* limit_file,
              const char* usage_file, const char* inactive_name) {
  const auto limit = number_file(dir + "/" + limit_file);
  if (!limit) return;
  const uint64_t usage = number_file(dir + "/" + usage_file).value_or(0);
  const auto stat = read_text(dir + "/memory.stat");
  const uint64_t inactive = stat ? field(*stat, inactive_name, false).value_or(0) : 0;
  const uint64_t used = usage > inactive ? usage - inactive : 0;
  const uint64_t left = *limit > used ? *limit - used : 0;
  if (left < best.bytes) {
    best.bytes = left;
    best.source = concat("the cgroup ", version, " limit of ", dir, " (", limit_file, " ", format_bytes(*limit),
                         ", ", format_bytes(used), " in use besides inactive page cache)");
  }
}

}  // namespace

RamBudget ram_budget(const std::string& proc_root, const std::string& cgroup_root) {
  RamBudget best;
  best.bytes = meminfo_bytes(proc_root, "MemAvailable");
  best.source = "MemAvailable in " + proc_root + "/meminfo";
  if (best.bytes == 0 && proc_root == "/proc") {
    best.bytes = static_cast<uint64_t>(sysconf(_SC_AVPHYS_PAGES)) * page_size_bytes();
    best.source = "free physical pages (no /proc/meminfo)";
  }
  const auto [v2, v1] = own_cgroups(proc_root);
  // Mounts from mountinfo; without any, the usual places under cgroup_root.
  auto [m2, m1] = cgroup_mounts(proc_root);
  if (m2.empty() && m1.empty()) {
    m2.push_back(Mount{cgroup_root, "/"});
    m1.push_back(Mount{cgroup_root + "/memory", "/"});
  }
  if (!v2.empty())
    if (const auto at = locate(m2, v2))
      for (const auto& dir : up_to(at->first, at->second))
        consider(best, dir, "v2", "memory.max", "memory.current", "inactive_file");
  if (!v1.empty())
    if (const auto at = locate(m1, v1))
      for (const auto& dir : up_to(at->first, at->second))
        consider(best, dir, "v1", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file");
  return best;
}

uint64_t page_size_bytes() { return static_cast<uint64_t>(sysconf(_SC_PAGESIZE)); }

uint64_t available_ram_bytes() { return ram_budget().bytes; }

uint64_t total_ram_bytes() {
  const uint64_t v = meminfo_bytes("/proc", "MemTotal");
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
