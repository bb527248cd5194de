// Exceptions of the core. pybind11 turns std::invalid_argument into ValueError
// and std::runtime_error into RuntimeError, so every message here reaches the
// Python user unchanged: it must say what was wrong and what to change.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace hostcache {

// Bad configuration or arguments from the caller.
class ConfigError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A failure of the machine (allocation, pinning, a device call).
class SystemError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

std::string format_bytes(unsigned long long bytes);

}  // namespace hostcache

#define HC_REQUIRE(cond, ...)                                   \
  do {                                                          \
    if (!(cond)) throw ::hostcache::ConfigError(::hostcache::concat(__VA_ARGS__)); \
  } while (0)
