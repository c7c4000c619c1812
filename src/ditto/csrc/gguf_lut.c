/* ditto gguf_lut: a T-MAC-style lookup-table linear on GGUF Q4_0 / Q4_1 weight blocks, bit-identical
   to the multiply-add kernels (wrapped by ditto/numerics/kernels/gguf_lut.py).

   The numerical contract is numerics/kernels/gguf_reference.py:
   * activations are quantised per block of 32 (A32): amax = max|x|, dx = amax / 127,
     q = rint(x * (127 / amax)) (one fp32 division, one multiply, half to even, NaN -> 0, clamp
     [-127, 127]), sx = sum(q);
   * each weight block meets its activation block in an EXACT integer sum
     isum = sum(n * q) over the block's 32 nibbles n in [0, 15] (Q4_0: isum - 8 * sx);
   * each output element is ONE fp32 chain over the row's blocks in order from +0.0f:
       acc = acc + (d * dx) * (float)isum      [Q4_1: then acc = acc + (m * dx) * (float)sx]
     then y = acc (+ bias), every operation a separate IEEE multiply or add (no FMA: the library is
     built with -ffp-contract=off and says so to GCC/clang below as well).

   How the integer sum is found (T-MAC, arXiv:2407.00088, made exact).  A nibble is 4 bits,
   n = sum_j 2^j n_j, so sum(n * q) = sum_j 2^j sum_g T_g[p_gj]: for each group g of 4 consecutive
   activations, a table T_g of the 16 partial sums sum_e bit_e(p) * q_e is built once per activation
   row, and each weight row then looks up, per group and bit plane j, the entry indexed by the 4-bit
   pattern p_gj of its 4 weights' bit j.  T-MAC rounds the tables to int8, which is lossy; here every
   entry stays exact: |T| <= 4 * 127 needs 10 bits, so each activation is split q = 16 * qh + ql
   (ql = q & 15 in [0, 15], qh = q >> 4 in [-8, 7]) and each group gets two int8 tables, L (of ql,
   entries in [0, 60]) and H (of qh, in [-32, 28]).  Looked-up bytes of up to 4 groups are added as
   bytes first (L sums stay in [0, 240]: u8, H sums in [-128, 112]: s8), then vpdpbusd multiplies
   them by the plane weights 2^j (L) and 16 * 2^j (H) and sums each row's 4 planes into an int32
   lane: every step is an exact integer operation, so isum is the reference's, whatever the order.

   Three kernels, chosen per call:
   * portable C (any CPU): the same tables (int16, unsplit) and lookups, one scalar at a time;
   * AVX-512 on the file's own rows (needs F/BW/VL/DQ, VBMI, VNNI, GFNI): the 16 qs bytes of 4 rows'
     block b sit in the 4 lanes of a zmm; one gf2p8affineqb transposes each 8 x 8 bit matrix
     (8 bytes of qs), which turns a row's nibbles into bit planes: byte 8w + k of a lane holds bit
     (k % 4) of 8 consecutive values, a 4-bit pattern of one group in each nibble.  A nibble plus its
     4-group "slot" (bits 4-5) indexes a 64-entry table (4 groups x 16 patterns) with vpermb; the 8
     groups of a block are 2 tables (low / high nibbles) x 2 parts (L / H) = 4 zmm per activation
     block, built once per call and shared by all N rows.  vpdpbusd leaves 4 slot sums per row; a
     4 x 4 transpose-add gives 16 rows' isums in the 16 lanes, and the fp32 chain runs lane-wise.
   * AVX-512 on a repacked bit-plane layout (ditto_lut_repack; T-MAC's own layout, the file's bytes
     rearranged, same size): per tile of 16 rows and block, 4 x 64 index bytes, byte 4r + j of zmm z
     holding row r's plane-j patterns of two groups (one per nibble), then the 16 rows' fp16 d (and
     m).  One gf2p8affineqb per nibble makes the vpermb index (nibble | slot << 4) and every lookup's
     dword is one row: no bit transpose, no reduction, no gather.  (vpshufb on 64-byte registers
     with each group's 16-entry table broadcast to the 4 lanes gives the same sums; on Zen 4 it was
     ~35% slower at M = 32: vpshufb and vpermb both issue one zmm per cycle there, and the 16
     broadcast table loads per tile and block cost more than 4 zmm tables.)
   The tables are built once per call for every activation row (amortised over all N rows).
   OpenMP splits 16-row output tiles (and 32-row activation chunks); a tile's element chains run in
   one thread, block after block, so the thread count, M and the row's position change no bit. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#define LUT_X86 1
#include <immintrin.h>
#endif

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
/* the vector helpers are static inline inside target functions: no call passes a vector across an
   ABI boundary, so gcc's note about the AVX-512 argument ABI does not apply */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

enum { KIND_Q4_0 = 0, KIND_Q4_1 = 1 };
enum { ISA_AUTO = 0, ISA_PORTABLE = 1, ISA_AVX512 = 2 };
enum { LAYOUT_FILE = 0, LAYOUT_PACKED = 1 };

#define QK 32       /* values per block (and per activation block) */
#define TILE 16     /* output rows per work item (one zmm of fp32 lanes) */
#define MC 32       /* activation rows per work item */
#define TABLE 256   /* table bytes per (activation row, block), every layout */
#define PIDX 256    /* packed layout: index bytes per (tile, block) */
#define ROWS_PER_THREAD 8 /* with at least this many activation rows per thread, threads split rows */

static inline long block_bytes(int kind) { return kind == KIND_Q4_0 ? 18 : 20; }
static inline long qs_offset(int kind) { return kind == KIND_Q4_0 ? 2 : 4; }
/* packed layout: bytes per (tile, block): indices, then 16 fp16 d (and 16 fp16 m for Q4_1) */
static inline long packed_block_bytes(int kind) { return PIDX + (kind == KIND_Q4_0 ? 32 : 64); }

/* ------------------------------------------------------------------------------------------- */
/* scalar helpers                                                                               */
/* ------------------------------------------------------------------------------------------- */

static float half_to_float(uint16_t h) { /* IEEE binary16 -> binary32, exact */
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 31u, m = h & 1023u, u;
  if (e == 0 && m == 0) {
    u = sign;
  } else if (e == 0) { /* subnormal: shift the mantissa up to its leading one */
    e = 113;
    while (!(m & 1024u)) {
      m <<= 1;
      e--;
    }
    u = sign | (e << 23) | ((m & 1023u) << 13);
  } else if (e == 31) {
    u = sign | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0u); /* inf, or a quiet NaN */
  } else {
    u = sign | ((e + 112) << 23) | (m << 13);
  }
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t load_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline int32_t load_i32(const uint8_t *p) {
  int32_t v;
  memcpy(&v, p, 4);
  return v;
}

/* one activation block of 32 -> q, *dx, *sx (the contract's A32, NaN -> q = 0 and dx = NaN) */
static void quantize_block(const float *x, int8_t *q, float *dx, int32_t *sx) {
  float amax = 0.0f;
  int nan = 0;
  for (int i = 0; i < QK; i++) {
    const float a = fabsf(x[i]);
    amax = a > amax ? a : amax;
    nan |= x[i] != x[i];
  }
  if (nan) amax = NAN;
  *dx = amax / 127.0f;
  const float scale = amax > 0.0f ? 127.0f / amax : 0.0f;
  int32_t s = 0;
  for (int i = 0; i < QK; i++) {
    float r = rintf(x[i] * scale);
    if (r != r) r = 0.0f;
    r = r < -127.0f ? -127.0f : (r > 127.0f ? 127.0f : r);
    q[i] = (int8_t)(int)r;
    s += q[i];
  }
  *sx = s;
}

/* portable tables: int16 T[g][p] = sum_e bit_e(p) * q[4g + e], 8 groups x 16 patterns */
static void build_table_portable(const int8_t *q, int16_t *t) {
  for (int g = 0; g < 8; g++) {
    int16_t *tg = t + 16 * g;
    tg[0] = 0;
    for (int p = 1; p < 16; p++) { /* T[p] = T[p without its lowest bit] + q[that bit] */
      const int e = __builtin_ctz((unsigned)p);
      tg[p] = (int16_t)(tg[p & (p - 1)] + q[4 * g + e]);
    }
  }
}

/* the integer block sum of one weight block's 16 qs bytes through the tables: sum(n * q) */
static inline int32_t lut_isum_portable(const uint8_t *qs, const int16_t *t) {
  int32_t s = 0;
  for (int g = 0; g < 8; g++) {
    int v[4];
    for (int e = 0; e < 4; e++) { /* value 4g + e: low nibbles hold values 0..15, high 16..31 */
      const int i = 4 * g + e;
      v[e] = i < 16 ? qs[i] & 15 : qs[i - 16] >> 4;
    }
    for (int j = 0; j < 4; j++) {
      const int p = ((v[0] >> j) & 1) | (((v[1] >> j) & 1) << 1) | (((v[2] >> j) & 1) << 2) | (((v[3] >> j) & 1) << 3);
      s += (int32_t)t[16 * g + p] * (1 << j);
    }
  }
  return s;
}

/* The group that slot s (0..3) of the AVX-512 tables holds: table A (low nibbles) GROUP_OF_SLOT[0][s],
   table B (high nibbles) GROUP_OF_SLOT[1][s]; the packed layout's index zmm z holds the patterns of
   groups GROUP_OF_SLOT[0][z] (low nibbles) and GROUP_OF_SLOT[1][z] (high nibbles), nibble bit t being
   element 3 - t of the group, as the file layout's bit transpose leaves them. */
static const int GROUP_OF_SLOT[2][4] = {{1, 5, 3, 7}, {0, 4, 2, 6}};
static const uint8_t REV4[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

/* the same sum from the packed layout: row r's patterns in the (tile, block)'s index bytes */
static inline int32_t lut_isum_packed_portable(const uint8_t *idx, int r, const int16_t *t) {
  int32_t s = 0;
  for (int z = 0; z < 4; z++)
    for (int j = 0; j < 4; j++) {
      const uint8_t byte = idx[64 * z + 4 * r + j];
      s += ((int32_t)t[16 * GROUP_OF_SLOT[0][z] + REV4[byte & 15]] + (int32_t)t[16 * GROUP_OF_SLOT[1][z] + REV4[byte >> 4]]) *
           (1 << j);
    }
  return s;
}

/* ------------------------------------------------------------------------------------------- */
/* the job                                                                                      */
/* ------------------------------------------------------------------------------------------- */

typedef struct {
  const uint8_t *w;    /* file rows (N, rb) or packed tiles */
  const uint8_t *tab;  /* tables of activation rows mt0.. : (rows, nb, TABLE) */
  const float *dx;     /* (rows, nb) */
  const int32_t *sx;   /* (rows, nb) */
  const float *bias;   /* (N,) or NULL */
  float *y;            /* (M, N), row stride ldy */
  long M, N, rb, nb, ldy;
  long mt0;            /* the first activation row that tab, dx and sx hold */
  int kind, layout;
} Job;

/* one d (and m) pair of row n, block b, from either layout */
static inline void scales_of(const Job *jb, long n, long b, float *d, float *m) {
  if (jb->layout == LAYOUT_FILE) {
    const uint8_t *blk = jb->w + n * jb->rb + b * block_bytes(jb->kind);
    *d = half_to_float(load_u16(blk));
    *m = jb->kind == KIND_Q4_1 ? half_to_float(load_u16(blk + 2)) : 0.0f;
  } else {
    const uint8_t *pb = jb->w + ((n / TILE) * jb->nb + b) * packed_block_bytes(jb->kind) + PIDX;
    *d = half_to_float(load_u16(pb + 2 * (n % TILE)));
    *m = jb->kind == KIND_Q4_1 ? half_to_float(load_u16(pb + 32 + 2 * (n % TILE))) : 0.0f;
  }
}

/* rows [n0, n1) x activation rows [m0, m1), the contract's chain written out */
static void tile_portable(const Job *jb, long n0, long n1, long m0, long m1) {
  const long nb = jb->nb, bs = block_bytes(jb->kind), qo = qs_offset(jb->kind);
  for (long n = n0; n < n1; n++)
    for (long m = m0; m < m1; m++) {
      float acc = 0.0f;
      for (long b = 0; b < nb; b++) {
        const int16_t *t = (const int16_t *)(jb->tab + ((m - jb->mt0) * nb + b) * TABLE);
        int32_t isum;
        if (jb->layout == LAYOUT_FILE)
          isum = lut_isum_portable(jb->w + n * jb->rb + b * bs + qo, t);
        else
          isum = lut_isum_packed_portable(jb->w + ((n / TILE) * nb + b) * packed_block_bytes(jb->kind),
                                          (int)(n % TILE), t);
        const int32_t sx = jb->sx[(m - jb->mt0) * nb + b];
        if (jb->kind == KIND_Q4_0) isum -= 8 * sx;
        float d, mm;
        scales_of(jb, n, b, &d, &mm);
        const float dx = jb->dx[(m - jb->mt0) * nb + b];
        acc = acc + (d * dx) * (float)isum;
        if (jb->kind == KIND_Q4_1) acc = acc + (mm * dx) * (float)sx;
      }
      if (jb->bias) acc = acc + jb->bias[n];
      jb->y[m * jb->ldy + n] = acc;
    }
}

/* ------------------------------------------------------------------------------------------- */
/* AVX-512 (F/BW/VL/DQ + VBMI + VNNI + GFNI)                                                    */
/* ------------------------------------------------------------------------------------------- */

#ifdef LUT_X86
#define LUT_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vnni,gfni"
#define LUT_FN static __attribute__((target(LUT_TARGET)))
#define LUT_INLINE static inline __attribute__((target(LUT_TARGET), always_inline))

static int cpu_has_avx512(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("gfni");
}

/* The file-layout tables.  After the bit transpose (see tile_file_body) lane byte 8w + 4h + j
   (w = qs qword, h = 0 for values 0..15 / 1 for 16..31, j = plane) holds in its low nibble the
   pattern of values 8w + 4 .. 8w + 7 (+ 16h), i.e. group 2w + 1 + 4h, and in its high nibble that of
   group 2w + 4h; nibble bit t is element 3 - t of the group (gf2p8affineqb reverses the order).
   Slot s = 2w + h (bits 4-5 of the index) picks the group: low nibbles index table A = groups
   {1, 5, 3, 7}, high nibbles table B = {0, 4, 2, 6}.  Entry (s, p) of a table holds
   sum_t bit_t(p) * a[4 g(s) + 3 - t] for a = ql (part L) or qh (part H). */

/* activation block q (32 int8) -> 4 zmm tables A_L, A_H, B_L, B_H (256 bytes at t) */
LUT_INLINE void build_table_avx512(const int8_t *q, uint8_t *t) {
  const __m256i v = _mm256_loadu_si256((const __m256i *)q);
  const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi8(15));
  const __m256i hi = _mm256_sub_epi8(
      _mm256_and_si256(_mm256_srli_epi16(_mm256_xor_si256(v, _mm256_set1_epi8((char)0x80)), 4), _mm256_set1_epi8(15)),
      _mm256_set1_epi8(8));
  const __m512i a = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); /* bytes 0..31 ql, 32..63 qh */
  /* bit t of a pattern is set in the 16-bit mask 0xAAAA, 0xCCCC, 0xF0F0, 0xFF00 (t = 0..3) */
  static const uint64_t BIT[4] = {0xAAAAAAAAAAAAAAAAull, 0xCCCCCCCCCCCCCCCCull, 0xF0F0F0F0F0F0F0F0ull,
                                  0xFF00FF00FF00FF00ull};
  /* table 2 * tb + part (A_L, A_H, B_L, B_H): slot s reads a[4 * GROUP_OF_SLOT[tb][s] + 32 * part + e] */
#define X16(v) v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v
  static const uint8_t SLOT_BASE[4][64] __attribute__((aligned(64))) = {
      {X16(4), X16(20), X16(12), X16(28)},
      {X16(36), X16(52), X16(44), X16(60)},
      {X16(0), X16(16), X16(8), X16(24)},
      {X16(32), X16(48), X16(40), X16(56)}};
#undef X16
  for (int t4 = 0; t4 < 4; t4++) {
    const __m512i b = _mm512_load_si512(SLOT_BASE[t4]);
    __m512i acc = _mm512_setzero_si512();
    for (int e = 0; e < 4; e++) /* element e of the group is bit 3 - e of the pattern */
      acc = _mm512_add_epi8(acc, _mm512_maskz_permutexvar_epi8(BIT[3 - e], _mm512_add_epi8(b, _mm512_set1_epi8((char)e)), a));
    _mm512_storeu_si512(t + 64 * t4, acc);
  }
}

/* quantize_block, 16 lanes at a time: the same operations (max of |x| is exact in any order; one
   division for dx and one for the scale, a multiply, round half to even, NaN -> 0, clamp) */
LUT_INLINE void quantize_block_avx512(const float *x, int8_t *q, float *dx, int32_t *sx) {
  const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x0, x0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(x1, x1, _CMP_UNORD_Q);
  float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
  if (nan) amax = NAN;
  *dx = amax / 127.0f;
  const __m512 scale = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  __m512 r0 = _mm512_roundscale_ps(_mm512_mul_ps(x0, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r1 = _mm512_roundscale_ps(_mm512_mul_ps(x1, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  r0 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(r0, r0, _CMP_ORD_Q), r0); /* NaN (inf * 0) -> 0 */
  r1 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(r1, r1, _CMP_ORD_Q), r1);
  const __m512i i0 = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r0, lo), hi));
  const __m512i i1 = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r1, lo), hi));
  _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(i0));
  _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtepi32_epi8(i1));
  *sx = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
}

/* the fp32 chain of 16 rows for one block and activation row, lane-wise: each lane the scalar chain */
LUT_INLINE __m512 chain16(__m512 acc, __m512i isum, __m512 d, __m512 m, float dx, int32_t sx, int kind) {
  const __m512 vdx = _mm512_set1_ps(dx);
  if (kind == KIND_Q4_0) isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(8 * sx));
  acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_mul_ps(d, vdx), _mm512_cvtepi32_ps(isum)));
  if (kind == KIND_Q4_1) acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_mul_ps(m, vdx), _mm512_set1_ps((float)sx)));
  return acc;
}

LUT_INLINE void store16(const Job *jb, long n0, int nr, long m0, int mr, const __m512 *acc) {
  const __mmask16 k = (__mmask16)((1u << nr) - 1u);
  const __m512 bias = jb->bias ? _mm512_maskz_loadu_ps(k, jb->bias + n0) : _mm512_setzero_ps();
  for (int i = 0; i < mr; i++) {
    const __m512 v = jb->bias ? _mm512_add_ps(acc[i], bias) : acc[i];
    _mm512_mask_storeu_ps(jb->y + (m0 + i) * jb->ldy + n0, k, v);
  }
}

/* the 16 rows' integer sums of one block from row-major index vectors: ilo[z] / ihi[z] hold slot z of
   tables A / B (index nibble | z << 4) for 16 rows x 4 planes, one row per dword */
LUT_INLINE __m512i lookup_rows16(const __m512i *ilo, const __m512i *ihi, const uint8_t *tp) {
  const __m512i wl = _mm512_set1_epi32(0x08040201), wh = _mm512_set1_epi32((int)0x80402010u);
  const __m512i al = _mm512_load_si512(tp), ah = _mm512_load_si512(tp + 64);
  const __m512i bl = _mm512_load_si512(tp + 128), bh = _mm512_load_si512(tp + 192);
  __m512i s[2];
  for (int hf = 0; hf < 2; hf++) { /* 4 groups at a time: L in [0, 240] (u8), H in [-128, 112] (s8) */
    const int z = 2 * hf;
    const __m512i l = _mm512_add_epi8(
        _mm512_add_epi8(_mm512_permutexvar_epi8(ilo[z], al), _mm512_permutexvar_epi8(ihi[z], bl)),
        _mm512_add_epi8(_mm512_permutexvar_epi8(ilo[z + 1], al), _mm512_permutexvar_epi8(ihi[z + 1], bl)));
    const __m512i h = _mm512_add_epi8(
        _mm512_add_epi8(_mm512_permutexvar_epi8(ilo[z], ah), _mm512_permutexvar_epi8(ihi[z], bh)),
        _mm512_add_epi8(_mm512_permutexvar_epi8(ilo[z + 1], ah), _mm512_permutexvar_epi8(ihi[z + 1], bh)));
    s[hf] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), l, wl), wh, h);
  }
  return _mm512_add_epi32(s[0], s[1]);
}

/* 4 x 4 dword transpose within each lane: x[r] lane L dword s -> y[s] lane L dword r */
LUT_INLINE void transpose4(const __m512i *x, __m512i *y) {
  const __m512i t0 = _mm512_unpacklo_epi32(x[0], x[1]), t1 = _mm512_unpackhi_epi32(x[0], x[1]);
  const __m512i t2 = _mm512_unpacklo_epi32(x[2], x[3]), t3 = _mm512_unpackhi_epi32(x[2], x[3]);
  y[0] = _mm512_unpacklo_epi64(t0, t2);
  y[1] = _mm512_unpackhi_epi64(t0, t2);
  y[2] = _mm512_unpacklo_epi64(t1, t3);
  y[3] = _mm512_unpackhi_epi64(t1, t3);
}

/* file layout: output rows [n0, n0 + nr) (nr <= 16) x activation rows [m0, m0 + mr) (mr <= MC) */
LUT_INLINE void tile_file_body(const Job *jb, long n0, int nr, long m0, int mr) {
  const int kind = jb->kind;
  const long nb = jb->nb, rb = jb->rb, bs = block_bytes(kind), qo = qs_offset(kind);
  /* row-quad r holds rows r, 4 + r, 8 + r, 12 + r in its lanes 0..3 (tail rows repeat the last) */
  const uint8_t *row[TILE];
  for (int i = 0; i < TILE; i++) {
    const long n = n0 + (i < nr ? i : nr - 1);
    row[i] = jb->w + n * rb;
  }
  const __m512i transpose = _mm512_set1_epi64(0x8040201008040201ll); /* byte k = 1 << k */
  const __m512i nib = _mm512_set1_epi8(15);
  const __m512i slot = _mm512_set_epi32(0x30303030, 0x20202020, 0x10101010, 0, 0x30303030, 0x20202020, 0x10101010, 0,
                                        0x30303030, 0x20202020, 0x10101010, 0, 0x30303030, 0x20202020, 0x10101010, 0);
  const __m512i wl = _mm512_set1_epi32(0x08040201), wh = _mm512_set1_epi32((int)0x80402010u);
  __attribute__((aligned(64))) __m512 acc[MC];
  for (int i = 0; i < mr; i++) acc[i] = _mm512_setzero_ps();
  for (long b = 0; b < nb; b++) {
    __m512i ilo[4], ihi[4], head[4];
    for (int r = 0; r < 4; r++) {
      const long o = b * bs;
      __m512i t = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(row[r] + o + qo)));
      t = _mm512_inserti32x4(t, _mm_loadu_si128((const __m128i *)(row[4 + r] + o + qo)), 1);
      t = _mm512_inserti32x4(t, _mm_loadu_si128((const __m128i *)(row[8 + r] + o + qo)), 2);
      t = _mm512_inserti32x4(t, _mm_loadu_si128((const __m128i *)(row[12 + r] + o + qo)), 3);
      /* the block's first 4 bytes (d, and m for Q4_1) of the same 4 rows, in dword 0 of each lane */
      __m512i h = _mm512_castsi128_si512(_mm_cvtsi32_si128(load_i32(row[r] + o)));
      h = _mm512_inserti32x4(h, _mm_cvtsi32_si128(load_i32(row[4 + r] + o)), 1);
      h = _mm512_inserti32x4(h, _mm_cvtsi32_si128(load_i32(row[8 + r] + o)), 2);
      head[r] = _mm512_inserti32x4(h, _mm_cvtsi32_si128(load_i32(row[12 + r] + o)), 3);
      t = _mm512_gf2p8affine_epi64_epi8(transpose, t, 0); /* byte k of a qword: bit k of its 8 bytes */
      ilo[r] = _mm512_ternarylogic_epi32(t, nib, slot, 0xEA); /* (t & 15) | slot */
      ihi[r] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(t, 4), nib, slot, 0xEA);
    }
    /* dword 4L + r = dword 0 of lane L of head[r] = row 4L + r */
    const __m512i dm = _mm512_unpacklo_epi64(_mm512_unpacklo_epi32(head[0], head[1]), _mm512_unpacklo_epi32(head[2], head[3]));
    const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm));
    const __m512 m = kind == KIND_Q4_1 ? _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dm, 16)))
                                       : _mm512_setzero_ps();
    if (mr > 1) {
      /* several activation rows: transpose the indices once to one row per dword (slot z in vector
         z, as in the packed layout), then every row's lookups need no reduction */
      __m512i rlo[4], rhi[4];
      transpose4(ilo, rlo);
      transpose4(ihi, rhi);
      for (int i = 0; i < mr; i++) {
        const long mi = m0 + i;
        const __m512i isum = lookup_rows16(rlo, rhi, jb->tab + ((mi - jb->mt0) * nb + b) * TABLE);
        acc[i] = chain16(acc[i], isum, d, m, jb->dx[(mi - jb->mt0) * nb + b], jb->sx[(mi - jb->mt0) * nb + b], kind);
      }
      continue;
    }
    /* one activation row: look up in the transposed order and reduce the 4 slot sums instead */
    const uint8_t *tp = jb->tab + ((m0 - jb->mt0) * nb + b) * TABLE;
    const __m512i al = _mm512_load_si512(tp), ah = _mm512_load_si512(tp + 64);
    const __m512i bl = _mm512_load_si512(tp + 128), bh = _mm512_load_si512(tp + 192);
    __m512i s[4];
    for (int r = 0; r < 4; r++) {
      /* L of 2 groups in [0, 120] (u8), H of 2 groups in [-64, 56] (s8): one vpdpbusd each */
      const __m512i l = _mm512_add_epi8(_mm512_permutexvar_epi8(ilo[r], al), _mm512_permutexvar_epi8(ihi[r], bl));
      const __m512i h = _mm512_add_epi8(_mm512_permutexvar_epi8(ilo[r], ah), _mm512_permutexvar_epi8(ihi[r], bh));
      s[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), l, wl), wh, h);
    }
    /* lane L of s[r] holds row 4L + r's 4 slot sums: add them so dword 4L + r = row 4L + r */
    const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(s[0], s[1]), _mm512_unpackhi_epi32(s[0], s[1]));
    const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(s[2], s[3]), _mm512_unpackhi_epi32(s[2], s[3]));
    const __m512i isum = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
    acc[0] = chain16(acc[0], isum, d, m, jb->dx[(m0 - jb->mt0) * nb + b], jb->sx[(m0 - jb->mt0) * nb + b], kind);
  }
  store16(jb, n0, nr, m0, mr, acc);
}

/* the single-row case (a decode step) compiled apart, its accumulator in a register */
LUT_FN void tile_file_avx512(const Job *jb, long n0, int nr, long m0, int mr) {
  if (mr == 1)
    tile_file_body(jb, n0, nr, m0, 1);
  else
    tile_file_body(jb, n0, nr, m0, mr);
}

/* packed layout: tile n0 / 16 (rows [n0, n0 + nr)) x activation rows [m0, m0 + mr).  Index zmm z holds
   16 rows x 4 planes of group GROUP_OF_SLOT[0][z] (low nibbles, table A slot z) and GROUP_OF_SLOT[1][z]
   (high nibbles, table B slot z), so every dword of a lookup is one row: no reduction. */
LUT_INLINE void tile_packed_body(const Job *jb, long n0, int nr, long m0, int mr) {
  const int kind = jb->kind;
  const long nb = jb->nb, pbs = packed_block_bytes(kind);
  const uint8_t *tile = jb->w + (n0 / TILE) * nb * pbs;
  /* gf2p8affineqb: result bit i = parity(matrix byte 7 - i & x) */
  const __m512i keep_lo = _mm512_set1_epi64(0x0102040800000000ll), move_hi = _mm512_set1_epi64(0x1020408000000000ll);
  __attribute__((aligned(64))) __m512 acc[MC];
  for (int i = 0; i < mr; i++) acc[i] = _mm512_setzero_ps();
  for (long b = 0; b < nb; b++) {
    const uint8_t *pb = tile + b * pbs;
    /* index = nibble | slot << 4 in one gf2p8affineqb each: a bit-matrix that keeps the low (or moves
       the high) nibble to bits 0-3, and the slot as the XOR constant */
    __m512i ilo[4], ihi[4];
#define LUT_IDX(z)                                                                  \
  do {                                                                              \
    const __m512i t = _mm512_loadu_si512(pb + 64 * (z));                            \
    ilo[z] = _mm512_gf2p8affine_epi64_epi8(t, keep_lo, 16 * (z));                   \
    ihi[z] = _mm512_gf2p8affine_epi64_epi8(t, move_hi, 16 * (z));                   \
  } while (0)
    LUT_IDX(0);
    LUT_IDX(1);
    LUT_IDX(2);
    LUT_IDX(3);
#undef LUT_IDX
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(pb + PIDX)));
    const __m512 m = kind == KIND_Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(pb + PIDX + 32)))
                                       : _mm512_setzero_ps();
    for (int i = 0; i < mr; i++) {
      const long mi = m0 + i;
      const uint8_t *tp = jb->tab + ((mi - jb->mt0) * nb + b) * TABLE;
      acc[i] = chain16(acc[i], lookup_rows16(ilo, ihi, tp), d, m, jb->dx[(mi - jb->mt0) * nb + b], jb->sx[(mi - jb->mt0) * nb + b], kind);
    }
  }
  store16(jb, n0, nr, m0, mr, acc);
}

/* the single-row case (a decode step) compiled apart, its accumulator in a register */
LUT_FN void tile_packed_avx512(const Job *jb, long n0, int nr, long m0, int mr) {
  if (mr == 1)
    tile_packed_body(jb, n0, nr, m0, 1);
  else
    tile_packed_body(jb, n0, nr, m0, mr);
}

/* quantise one activation block and build its tables */
LUT_FN void block_tables_avx512(const float *x, uint8_t *t, float *dx, int32_t *sx) {
  int8_t q[QK];
  quantize_block_avx512(x, q, dx, sx);
  build_table_avx512(q, t);
}

LUT_FN void quantize_row_avx512(const float *x, long nb, int8_t *q, float *dx, int32_t *sx) {
  for (long b = 0; b < nb; b++) quantize_block_avx512(x + b * QK, q + b * QK, dx + b, sx + b);
}
#else
static int cpu_has_avx512(void) { return 0; }
#endif

/* ------------------------------------------------------------------------------------------- */
/* entry points                                                                                 */
/* ------------------------------------------------------------------------------------------- */

/* 1 when the AVX-512 kernels can run on this CPU (and were compiled in) */
int ditto_lut_has_avx512(void) { return cpu_has_avx512(); }

static int resolve_isa(int isa) {
  if (isa == ISA_AUTO) return cpu_has_avx512() ? ISA_AVX512 : ISA_PORTABLE;
  if (isa == ISA_PORTABLE) return isa;
  if (isa == ISA_AVX512) return cpu_has_avx512() ? isa : -1;
  return -1;
}

/* x (M, K) fp32 rows of stride ldx -> q (M, K) int8, dx (M, K/32), sx (M, K/32) with the kernel of `isa`;
   -1 on bad arguments */
int ditto_lut_quantize(int isa, const float *x, long M, long K, long ldx, int8_t *q, float *dx, int32_t *sx) {
  isa = resolve_isa(isa);
  if (isa < 0 || M < 0 || K < 0 || K % QK) return -1;
  const long nb = K / QK;
#pragma omp parallel for schedule(static) if (M >= 4)
  for (long m = 0; m < M; m++) {
#ifdef LUT_X86
    if (isa == ISA_AVX512) {
      quantize_row_avx512(x + m * ldx, nb, q + m * K, dx + m * nb, sx + m * nb);
      continue;
    }
#endif
    for (long b = 0; b < nb; b++) quantize_block(x + m * ldx + b * QK, q + m * K + b * QK, dx + m * nb + b, sx + m * nb + b);
  }
  return 0;
}

/* file rows (N, rb) -> the packed layout (ceil(N/16) tiles x nb blocks x packed_block_bytes; rows past N
   are zero: d = m = 0); -1 on bad arguments */
int ditto_lut_repack(int kind, const uint8_t *w, long N, long rb, uint8_t *out) {
  if ((kind != KIND_Q4_0 && kind != KIND_Q4_1) || N < 0 || rb % block_bytes(kind)) return -1;
  const long bs = block_bytes(kind), qo = qs_offset(kind), nb = rb / bs, pbs = packed_block_bytes(kind);
  const long ntiles = (N + TILE - 1) / TILE;
#pragma omp parallel for schedule(static)
  for (long t = 0; t < ntiles; t++)
    for (long b = 0; b < nb; b++) {
      uint8_t *pb = out + (t * nb + b) * pbs;
      memset(pb, 0, (size_t)pbs);
      for (int r = 0; r < TILE && t * TILE + r < N; r++) {
        const uint8_t *blk = w + (t * TILE + r) * rb + b * bs;
        int v[QK];
        for (int i = 0; i < 16; i++) {
          v[i] = blk[qo + i] & 15;
          v[i + 16] = blk[qo + i] >> 4;
        }
        for (int z = 0; z < 4; z++)
          for (int j = 0; j < 4; j++) {
            int lo = 0, hi = 0;
            for (int e = 0; e < 4; e++) { /* element e is nibble bit 3 - e */
              lo |= ((v[4 * GROUP_OF_SLOT[0][z] + e] >> j) & 1) << (3 - e);
              hi |= ((v[4 * GROUP_OF_SLOT[1][z] + e] >> j) & 1) << (3 - e);
            }
            pb[64 * z + 4 * r + j] = (uint8_t)(lo | (hi << 4));
          }
        memcpy(pb + PIDX + 2 * r, blk, 2);
        if (kind == KIND_Q4_1) memcpy(pb + PIDX + 32 + 2 * r, blk + 2, 2);
      }
    }
  return 0;
}

/* quantise one activation block (32 inputs at x) and build its tables (TABLE bytes at t) */
static void block_tables(int isa, const float *x, uint8_t *t, float *dx, int32_t *sx) {
#ifdef LUT_X86
  if (isa == ISA_AVX512) {
    block_tables_avx512(x, t, dx, sx);
    return;
  }
#endif
  (void)isa;
  int8_t q[QK];
  quantize_block(x, q, dx, sx);
  build_table_portable(q, (int16_t *)t);
}

/* the first step of ditto_lut_linear alone (for benchmarks): x (M, K) -> tables (M, K/32, 256 bytes),
   dx, sx (M, K/32); -1 on bad arguments */
int ditto_lut_tables(int isa, const float *x, long M, long K, long ldx, uint8_t *tab, float *dx, int32_t *sx) {
  isa = resolve_isa(isa);
  if (isa < 0 || M < 0 || K < 0 || K % QK) return -1;
  const long nb = K / QK;
#pragma omp parallel for schedule(static)
  for (long mb = 0; mb < M * nb; mb++) block_tables(isa, x + (mb / nb) * ldx + (mb % nb) * QK, tab + mb * TABLE, dx + mb, sx + mb);
  return 0;
}

/* bytes of the packed layout of N rows of K inputs */
long ditto_lut_packed_bytes(int kind, long N, long K) {
  if ((kind != KIND_Q4_0 && kind != KIND_Q4_1) || N < 0 || K < 0 || K % QK) return -1;
  return (N + TILE - 1) / TILE * (K / QK) * packed_block_bytes(kind);
}

/* tables, dx and sx for `rows` (activation row, block) pairs; nonzero when out of memory */
static int alloc_tables(long rows, uint8_t **tab, float **dx, int32_t **sx) {
  *tab = aligned_alloc(64, (size_t)rows * TABLE);
  *dx = malloc(sizeof(float) * (size_t)rows);
  *sx = malloc(sizeof(int32_t) * (size_t)rows);
  if (*tab && *dx && *sx) return 0;
  free(*tab);
  free(*dx);
  free(*sx);
  *tab = NULL;
  *dx = NULL;
  *sx = NULL;
  return 1;
}

static void free_tables(uint8_t *tab, float *dx, int32_t *sx) {
  free(tab);
  free(dx);
  free(sx);
}

/* y (M, N) (row stride ldy) = the contract's linear of x (M, K) (row stride ldx) with N weight rows:
   layout 0, the file's rows of rb bytes; layout 1, ditto_lut_repack's tiles.  Returns 0, -1 (bad
   arguments / ISA not supported) or -2 (out of memory). */
int ditto_lut_linear(int kind, int layout, int isa, const float *x, long M, long K, long ldx, const uint8_t *w,
                     long N, long rb, const float *bias, float *y, long ldy) {
  isa = resolve_isa(isa);
  if (isa < 0 || (kind != KIND_Q4_0 && kind != KIND_Q4_1) || (layout != LAYOUT_FILE && layout != LAYOUT_PACKED))
    return -1;
  if (M < 0 || N < 0 || K < 0 || K % QK || (layout == LAYOUT_FILE && rb != K / QK * block_bytes(kind)))
    return -1;
  if (M == 0 || N == 0) return 0;
  const long nb = K / QK;
  if (nb == 0) { /* an empty chain: +0.0f (+ bias) */
    for (long m = 0; m < M; m++)
      for (long n = 0; n < N; n++) y[m * ldy + n] = bias ? 0.0f + bias[n] : 0.0f;
    return 0;
  }
  const long ntiles = (N + TILE - 1) / TILE;
  int failed = 0;
  /* Every thread builds the tables of the activation rows it uses, in its own buffer: tables written
     by one core and read by the other cost more (cache-line transfers) than building them twice.
     Enough rows: each thread takes its own rows (all output tiles), so no table is built twice.
     Few rows (a decode step): the threads split the output tiles and each builds every row's tables
     (M * nb * 256 bytes: well under a microsecond a row).  Neither choice changes an element's chain. */
#pragma omp parallel reduction(| : failed)
  {
#ifdef _OPENMP
    const long nt = omp_get_num_threads(), t = omp_get_thread_num();
#else
    const long nt = 1, t = 0;
#endif
    const int split_rows = M >= ROWS_PER_THREAD * nt;
    const long r0 = split_rows ? M * t / nt : 0, r1 = split_rows ? M * (t + 1) / nt : M;
    const long j0 = split_rows ? 0 : ntiles * t / nt, j1 = split_rows ? ntiles : ntiles * (t + 1) / nt;
    uint8_t *tab;
    float *dx;
    int32_t *sx;
    if (r1 > r0 && j1 > j0) {
      if (alloc_tables((r1 - r0) * nb, &tab, &dx, &sx)) {
        failed = 1;
      } else {
        for (long mb = 0; mb < (r1 - r0) * nb; mb++)
          block_tables(isa, x + (r0 + mb / nb) * ldx + (mb % nb) * QK, tab + mb * TABLE, dx + mb, sx + mb);
        const Job jb = {w, tab, dx, sx, bias, y, M, N, rb, nb, ldy, r0, kind, layout};
        for (long m0 = r0; m0 < r1; m0 += MC)
          for (long tile = j0; tile < j1; tile++) {
            const long n0 = tile * TILE;
            const int nr = (int)(N - n0 < TILE ? N - n0 : TILE), mr = (int)(r1 - m0 < MC ? r1 - m0 : MC);
#ifdef LUT_X86
            if (isa == ISA_AVX512) {
              if (layout == LAYOUT_FILE)
                tile_file_avx512(&jb, n0, nr, m0, mr);
              else
                tile_packed_avx512(&jb, n0, nr, m0, mr);
              continue;
            }
#endif
            tile_portable(&jb, n0, n0 + nr, m0, m0 + mr);
          }
        free_tables(tab, dx, sx);
      }
    }
  }
  return failed ? -2 : 0;
}

/* ditto_lut_linear with its arguments in one int64 array (one ctypes conversion instead of 13, at
   some 0.25 us apiece, on the single-stream decode path): kind, layout, isa, x, M, K, ldx, w, N, rb,
   bias (0: none), y, ldy */
int ditto_lut_linear_packed(const int64_t *a) {
  return ditto_lut_linear((int)a[0], (int)a[1], (int)a[2], (const float *)(intptr_t)a[3], (long)a[4], (long)a[5],
                          (long)a[6], (const uint8_t *)(intptr_t)a[7], (long)a[8], (long)a[9],
                          (const float *)(intptr_t)a[10], (float *)(intptr_t)a[11], (long)a[12]);
}
