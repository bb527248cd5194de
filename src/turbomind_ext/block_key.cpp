#include "block_key.h"

#include <cstring>
#include <vector>

#include "xxh64.h"

namespace hostcache {

namespace {
uint64_t hash_with_prefix(uint8_t* buf, uint64_t ns, const int32_t* tokens, size_t token_bytes, uint64_t parent) {
  std::memcpy(buf, &ns, sizeof ns);
  std::memcpy(buf + sizeof ns, tokens, token_bytes);
  return xxh64(buf, sizeof ns + token_bytes, parent);
}
}  // namespace

uint64_t chain_key(uint64_t parent, uint64_t ns, const int32_t* tokens, size_t n) {
  // LMDeploy's blocks are 64 tokens; the stack covers anything up to 512.
  constexpr size_t kStackTokens = 512;
  const size_t token_bytes = n * sizeof(int32_t);
  uint64_t k;
  if (n <= kStackTokens) {
    uint8_t buf[sizeof(uint64_t) + kStackTokens * sizeof(int32_t)];
    k = hash_with_prefix(buf, ns, tokens, token_bytes, parent);
  } else {
    std::vector<uint8_t> buf(sizeof(uint64_t) + token_bytes);
    k = hash_with_prefix(buf.data(), ns, tokens, token_bytes, parent);
  }
  return k == kRootKey ? 1 : k;
}

std::vector<uint64_t> block_chain_keys(uint64_t parent, uint64_t ns, const int32_t* tokens, size_t n,
                                       uint32_t block_tokens) {
  std::vector<uint64_t> keys(block_tokens ? n / block_tokens : 0);
  for (size_t i = 0; i < keys.size(); ++i) keys[i] = parent = chain_key(parent, ns, tokens + i * block_tokens, block_tokens);
  return keys;
}

}  // namespace hostcache
