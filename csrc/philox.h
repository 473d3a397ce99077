// Philox 4x32-10 and the dropout stream contract shared by every backend, so that the
// CPU and CUDA paths (and the Python reference) drop exactly the same scores.
//
// The score (b, h, i, j) -- sequence b, query head h, query row i and key column j within
// that sequence -- is kept iff  philox(counter, key)[j & 3] >= threshold(p), with
//   counter = (j >> 2, i, b * heads_q + h, uint32(offset))
//   key     = (uint32(seed), uint32(seed >> 32) ^ uint32(offset >> 32))
//   threshold(p) = min(uint32(p * 2^32), 2^32 - 1); kept values are scaled by 1 / (1 - p).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FLASH_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FLASH_HOST_DEVICE inline
#endif

namespace flash {

struct Philox4 {
  uint32_t x, y, z, w;
};

FLASH_HOST_DEVICE void mul_hi_lo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

FLASH_HOST_DEVICE Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mul_hi_lo(kM0, c.x, hi0, lo0);
    mul_hi_lo(kM1, c.z, hi1, lo1);
    c = Philox4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += kW0;
    k1 += kW1;
  }
  return c;
}

FLASH_HOST_DEVICE uint32_t dropout_threshold(float p) {
  const double t = static_cast<double>(p) * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

// The four random words for columns (j & ~3) .. (j | 3) of row i.
FLASH_HOST_DEVICE Philox4 dropout_randoms(uint64_t seed, uint64_t offset, int64_t bh, int64_t i, int64_t j) {
  const Philox4 counter{static_cast<uint32_t>(j >> 2), static_cast<uint32_t>(i), static_cast<uint32_t>(bh),
                        static_cast<uint32_t>(offset)};
  return philox4x32_10(counter, static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32) ^ static_cast<uint32_t>(offset >> 32));
}

FLASH_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t offset, int64_t bh, int64_t i, int64_t j, uint32_t threshold) {
  const Philox4 r = dropout_randoms(seed, offset, bh, i, j);
  const uint32_t word = (j & 3) == 0 ? r.x : (j & 3) == 1 ? r.y : (j & 3) == 2 ? r.z : r.w;
  return word >= threshold;
}

}  // namespace flash
