// Block keys: a 64-bit chained hash of (parent key, namespace, the block's
// token ids). Equal prefixes give equal keys in every process (unlike
// Python's salted hash()), so a key can name a block across engine restarts
// and ranks. A key only finds a candidate; PrefixIndex confirms the tokens.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace hostcache {

// The parent of a sequence's first block. chain_key never returns it.
constexpr uint64_t kRootKey = 0;

// XXH64 over [namespace as 8 little-endian bytes | tokens as int32 LE],
// seeded with the parent key; 0 is remapped to 1 to keep the root unique.
uint64_t chain_key(uint64_t parent, uint64_t ns, const int32_t* tokens, size_t n);

// The keys of the full blocks of tokens[0, n), each chained on the one before.
std::vector<uint64_t> block_chain_keys(uint64_t parent, uint64_t ns, const int32_t* tokens, size_t n,
                                       uint32_t block_tokens);

}  // namespace hostcache
