/* ditto_int.h: torch's int64 semantics in C, shared by the integer mode's kernels.

   The kernels must give exactly what the torch reference (ditto/numerics/kernels/integer_ops.py)
   gives on int64 tensors, so every operation below spells out torch's rules: wrapping add / sub /
   mul (arithmetic mod 2^64), an arithmetic >> whose count outside [0, 63] acts as 63, a << whose
   count outside [0, 63] gives 0, the round term (1 << e) >> 1 read from a table, and clamp as
   min(max(x, lo), hi). All branch-free, so the row loops that use them vectorise. */
#ifndef DITTO_INT_H
#define DITTO_INT_H

#include <stdint.h>

typedef int64_t i64;
typedef uint64_t u64;

static inline i64 wadd(i64 a, i64 b) { return (i64)((u64)a + (u64)b); }
static inline i64 wsub(i64 a, i64 b) { return (i64)((u64)a - (u64)b); }
static inline i64 wmul(i64 a, i64 b) { return (i64)((u64)a * (u64)b); }
static inline i64 tabs(i64 a) { return a < 0 ? (i64)(0 - (u64)a) : a; }
static inline i64 tshr(i64 a, i64 s) { const u64 u = (u64)s; return a >> (u > 63 ? 63 : u); }
static inline i64 tshl(i64 a, i64 s) { const u64 u = (u64)s; return u > 63 ? 0 : (i64)((u64)a << u); }
static inline i64 tmax(i64 a, i64 b) { return a > b ? a : b; }
static inline i64 tmin(i64 a, i64 b) { return a < b ? a : b; }
static inline i64 tclamp(i64 x, i64 lo, i64 hi) { return tmin(tmax(x, lo), hi); }  /* torch clamp */

/* integer_ops._round_term(e) = (1 << e) >> 1 in torch int64: RT[e] = 2^(e-1) for 1 <= e <= 62,
   RT[63] = -2^62 (1 << 63 wraps to INT64_MIN), RT[0] = 0, and RT[64] = 0 stands for any e outside
   [0, 63] (the << gives 0). */
#define DITTO_P4(k) (1LL << (k)), (1LL << ((k) + 1)), (1LL << ((k) + 2)), (1LL << ((k) + 3))
static const i64 RT[65] = {
    0,            DITTO_P4(0),  DITTO_P4(4),  DITTO_P4(8),  DITTO_P4(12), DITTO_P4(16),
    DITTO_P4(20), DITTO_P4(24), DITTO_P4(28), DITTO_P4(32), DITTO_P4(36), DITTO_P4(40),
    DITTO_P4(44), DITTO_P4(48), DITTO_P4(52), DITTO_P4(56), 1LL << 60,    1LL << 61,
    -(1LL << 62), 0};
#undef DITTO_P4
static inline i64 round_term(i64 e) { const u64 u = (u64)e; return RT[u > 64 ? 64 : u]; }
/* integer_ops.rshift_round: (x + ((1 << e) >> 1)) >> e, round-half-up of x / 2^e */
static inline i64 rshift_round(i64 x, i64 e) { return tshr(wadd(x, round_term(e)), e); }
/* integer_ops.bit_length: the number of powers 2^0..2^62 that are <= x */
static inline i64 bitlen(i64 x) { return x > 0 ? 64 - __builtin_clzll((u64)x) : 0; }

#define LOG2E_Q30 1549082005LL /* log2(e) in Q30 */
#define Q30_ONE (1LL << 30)
#define LIM31 2147483647LL /* 2^31 - 1 */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
/* 16 vectors of int32 partial sums -> one vector whose lane r is the sum of part[r]'s 16 lanes
   (integer adds: the order cannot change the result) */
static inline __m512i hsum16_epi32(const __m512i part[16]) {
  __m512i s2[8], s4[4], s8[2];
  for (int i = 0; i < 8; i++)
    s2[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(part[2 * i], part[2 * i + 1]),
                             _mm512_unpackhi_epi32(part[2 * i], part[2 * i + 1]));
  for (int i = 0; i < 4; i++)
    s4[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(s2[2 * i], s2[2 * i + 1]),
                             _mm512_unpackhi_epi64(s2[2 * i], s2[2 * i + 1]));
  for (int i = 0; i < 2; i++)
    s8[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(s4[2 * i], s4[2 * i + 1], 0x88),
                             _mm512_shuffle_i32x4(s4[2 * i], s4[2 * i + 1], 0xDD));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(s8[0], s8[1], 0x88), _mm512_shuffle_i32x4(s8[0], s8[1], 0xDD));
}
#endif

#endif /* DITTO_INT_H */
