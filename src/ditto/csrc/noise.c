/* ditto sampling noise: the SplitMix64 bits of every vocab id in one pass (wrapped by
   ditto/numerics/kernels/noise_c.py; the torch definition is ditto.sampling.noise_bits). */
#include <stdint.h>

static inline uint64_t mix(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

/* the hash of vocab id i (0-based; the torch definition's ids are 1-based) */
static inline uint64_t hash_id(uint64_t key, int64_t i) { return mix((uint64_t)(i + 1) * 0x9E3779B97F4A7C15ULL + key); }

void ditto_noise_bits(uint64_t key, int64_t n, uint64_t *out) {
  for (int64_t i = 0; i < n; i++) out[i] = hash_id(key, i);
}

/* ids i (ascending) with bits(i) >>> 11 >= m_min; returns how many were written to out (size n). */
int64_t ditto_noise_select(uint64_t key, int64_t n, uint64_t m_min, int64_t *out) {
  int64_t c = 0;
  for (int64_t i = 0; i < n; i++) {
    if ((hash_id(key, i) >> 11) >= m_min) out[c++] = i;
  }
  return c;
}
