/* ditto bf16_linear: y = x @ w^T (+ bias) for bf16 x (M, K) and bf16 w (N, K), fp32 accumulation,
   bf16 output, every element's reduction order fixed by this code (batch-invariant by construction).

   The contract (numerics/kernels/bf16_linear.py, `reference_linear`, states it in torch) is what one
   AVX512_BF16 `vdpbf16ps` lane does, step after step (Intel's definition; measured identical on AMD
   Zen 4, tests/test_bf16_kernel.py checks it on every CPU that has the instruction):
   * bf16 subnormal inputs count as zero (DAZ); K is zero-padded to an even Kp;
   * acc = +0.0f; for each pair (k, k+1), k = 0, 2, ..., Kp-2:
       acc = FTZ(fma(x[k+1], w[k+1], acc));  acc = FTZ(fma(x[k], w[k], acc))
     (the odd element first; bf16 x bf16 products are exact in fp32, each step rounds once to
     nearest even; FTZ: a result below FLT_MIN in magnitude becomes a zero of its sign);
   * with a bias: acc = FTZ(acc + DAZ(bias[n]));  y = acc rounded to bf16 (nearest even; NaN 0x7fc0).

   Four instruction-set paths live in this one library, chosen at run time (the best one, the
   caller's choice, or $DITTO_BF16_ISA); all give the same bits:
   * avx512_bf16: vdpbf16ps itself, 6 rows x 64 columns per register tile;
   * avx512: two vfmadd per pair on widened halves, with MXCSR's FTZ and DAZ bits set (4 x 64 tile);
   * avx2: the same on 8-lane vectors (4 rows x 16 columns at a time);
   * portable: scalar fmaf with explicit flushes.
   The weight is packed once into panels of 64 columns: panel p holds, for each pair j, the 64
   columns' (w[2j], w[2j+1]) side by side ((Kp/2, 64, 2) bf16, what vdpbf16ps reads), with its
   subnormals already flushed.  OpenMP splits (row block, panel) items over threads; tiling and
   threading only decide who computes an element, never its order.  The file is compiled for the
   baseline ISA with -ffp-contract=off; the vector paths use per-function targets. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#define BF_X86 1
#include <immintrin.h>
#endif
#if defined(__GNUC__) && !defined(__clang__)
/* vector helpers are static inline inside target regions: no vector crosses an ABI boundary */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define NR 64 /* columns per packed panel (bf16_linear._NR) */
#define MR_MAX 6
enum { ISA_AUTO = 0, ISA_PORTABLE = 1, ISA_AVX2 = 2, ISA_AVX512 = 3, ISA_AVX512BF16 = 4 };

/* a tile: mr rows of x (stride ldx, bf16 pairs), one panel w (K2 pairs x NR columns), nc <= NR
   valid columns, bias (NR fp32, or NULL) -> y (mr rows of stride ldy, nc bf16 each) */
typedef void (*TileFn)(int mr, const uint16_t *x, long ldx, const uint16_t *w, long K2, const float *bias,
                       uint16_t *y, long ldy, int nc);

static inline float bits_f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float ftz(float v) { return fabsf(v) < 1.17549435e-38f ? copysignf(0.f, v) : v; }
static inline uint16_t to_bf16(float v) { /* round to nearest even, as torch's float -> bfloat16 */
  const uint32_t u = f_bits(v);
  if (v != v) return 0x7fc0;
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static void store_row(const float *acc, uint16_t *y, int nc) {
  for (int c = 0; c < nc; c++) y[c] = to_bf16(acc[c]);
}

/* ------------------------------------------------------------------------------------------- */
/* portable C                                                                                   */
/* ------------------------------------------------------------------------------------------- */

static void tile_portable(int mr, const uint16_t *x, long ldx, const uint16_t *w, long K2, const float *bias,
                          uint16_t *y, long ldy, int nc) {
  float acc[MR_MAX][NR];
  memset(acc, 0, sizeof(acc)); /* +0.0f */
  for (long j = 0; j < K2; j++) {
    const uint16_t *wj = w + j * NR * 2;
    for (int i = 0; i < mr; i++) {
      const float a0 = ftz(bits_f((uint32_t)x[i * ldx + 2 * j] << 16));
      const float a1 = ftz(bits_f((uint32_t)x[i * ldx + 2 * j + 1] << 16));
      for (int c = 0; c < nc; c++) { /* packed weights carry no subnormals */
        const float t = ftz(fmaf(a1, bits_f((uint32_t)wj[2 * c + 1] << 16), acc[i][c]));
        acc[i][c] = ftz(fmaf(a0, bits_f((uint32_t)wj[2 * c] << 16), t));
      }
    }
  }
  for (int i = 0; i < mr; i++) {
    if (bias)
      for (int c = 0; c < nc; c++) acc[i][c] = ftz(acc[i][c] + ftz(bias[c]));
    store_row(acc[i], y + i * ldy, nc);
  }
}

#ifdef BF_X86
/* ------------------------------------------------------------------------------------------- */
/* x86 vector paths                                                                             */
/* ------------------------------------------------------------------------------------------- */

static inline uint32_t pair_at(const uint16_t *p) { uint32_t u; memcpy(&u, p, 4); return u; }

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,fma")
#define BODY_512(MR)                                                                              \
  __m512 acc[MR][4];                                                                              \
  for (int i = 0; i < MR; i++)                                                                    \
    for (int q = 0; q < 4; q++) acc[i][q] = _mm512_setzero_ps();

/* bias (FTZ/DAZ from MXCSR) and bf16 rounding of one row of 4 vectors */
static inline __attribute__((always_inline)) void store_512(__m512 *acc, const float *bias, uint16_t *y, int nc) {
  float tmp[NR];
  for (int q = 0; q < 4; q++) {
    __m512 v = acc[q];
    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + 16 * q));
    _mm512_storeu_ps(tmp + 16 * q, v);
  }
  store_row(tmp, y, nc);
}

static inline __attribute__((always_inline)) void tile_bf16_mr(const int mr, const uint16_t *x, long ldx,
                                                               const uint16_t *w, long K2, const float *bias,
                                                               uint16_t *y, long ldy, int nc) {
  BODY_512(MR_MAX)
  for (long j = 0; j < K2; j++) {
    const uint16_t *wj = w + j * NR * 2;
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wj), w1 = (__m512bh)_mm512_loadu_si512(wj + 32);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(wj + 64), w3 = (__m512bh)_mm512_loadu_si512(wj + 96);
    for (int i = 0; i < mr; i++) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32((int)pair_at(x + i * ldx + 2 * j));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, w0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, w1);
      acc[i][2] = _mm512_dpbf16_ps(acc[i][2], a, w2);
      acc[i][3] = _mm512_dpbf16_ps(acc[i][3], a, w3);
    }
  }
  for (int i = 0; i < mr; i++) store_512(acc[i], bias, y + i * ldy, nc);
}

/* one vdpbf16ps step emulated: odd halves, then even halves, two FMAs (MXCSR: FTZ, DAZ) */
static inline __attribute__((always_inline)) void tile_avx512_mr(const int mr, const uint16_t *x, long ldx,
                                                                 const uint16_t *w, long K2, const float *bias,
                                                                 uint16_t *y, long ldy, int nc) {
  BODY_512(4)
  const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
  for (long j = 0; j < K2; j++) {
    const uint16_t *wj = w + j * NR * 2;
    __m512 wo[4], we[4];
    for (int q = 0; q < 4; q++) {
      const __m512i raw = _mm512_loadu_si512(wj + 32 * q);
      wo[q] = _mm512_castsi512_ps(_mm512_and_si512(raw, hi));
      we[q] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
    }
    for (int i = 0; i < mr; i++) {
      const uint32_t p = pair_at(x + i * ldx + 2 * j);
      const __m512 ao = _mm512_set1_ps(bits_f(p & 0xffff0000u)), ae = _mm512_set1_ps(bits_f(p << 16));
      for (int q = 0; q < 4; q++) acc[i][q] = _mm512_fmadd_ps(ae, we[q], _mm512_fmadd_ps(ao, wo[q], acc[i][q]));
    }
  }
  for (int i = 0; i < mr; i++) store_512(acc[i], bias, y + i * ldy, nc);
}

/* a tile function per register-tile height: mr is a constant inside each instance */
#define TILE_CASE(BODY, R) case R: BODY(R, x, ldx, w, K2, bias, y, ldy, nc); break;
#define TILE_VARIANTS4(NAME, BODY)                                                                 \
  static void NAME(int mr, const uint16_t *x, long ldx, const uint16_t *w, long K2, const float *bias,   \
                   uint16_t *y, long ldy, int nc) {                                                \
    switch (mr) { TILE_CASE(BODY, 4) TILE_CASE(BODY, 3) TILE_CASE(BODY, 2) default: BODY(1, x, ldx, w, K2, bias, y, ldy, nc); } \
  }
#define TILE_VARIANTS6(NAME, BODY)                                                                 \
  static void NAME(int mr, const uint16_t *x, long ldx, const uint16_t *w, long K2, const float *bias,   \
                   uint16_t *y, long ldy, int nc) {                                                \
    switch (mr) {                                                                                  \
      TILE_CASE(BODY, 6) TILE_CASE(BODY, 5) TILE_CASE(BODY, 4) TILE_CASE(BODY, 3) TILE_CASE(BODY, 2)  \
      default: BODY(1, x, ldx, w, K2, bias, y, ldy, nc);                                           \
    }                                                                                              \
  }
TILE_VARIANTS6(tile_bf16, tile_bf16_mr)
TILE_VARIANTS4(tile_avx512, tile_avx512_mr)
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
/* 8-lane emulation: 16 columns (two vectors) of the panel at a time, all rows of the tile */
static inline __attribute__((always_inline)) void tile_avx2_mr(const int mr, const uint16_t *x, long ldx,
                                                               const uint16_t *w, long K2, const float *bias,
                                                               uint16_t *y, long ldy, int nc) {
  const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
  float out[4][NR];
  for (int g = 0; g < NR / 16 && 16 * g < nc; g++) {
    __m256 acc[4][2];
    for (int i = 0; i < 4; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (long j = 0; j < K2; j++) {
      const uint16_t *wj = w + j * NR * 2 + 32 * g;
      const __m256i r0 = _mm256_loadu_si256((const __m256i *)wj), r1 = _mm256_loadu_si256((const __m256i *)(wj + 16));
      const __m256 wo0 = _mm256_castsi256_ps(_mm256_and_si256(r0, hi)), we0 = _mm256_castsi256_ps(_mm256_slli_epi32(r0, 16));
      const __m256 wo1 = _mm256_castsi256_ps(_mm256_and_si256(r1, hi)), we1 = _mm256_castsi256_ps(_mm256_slli_epi32(r1, 16));
      for (int i = 0; i < mr; i++) {
        const uint32_t p = pair_at(x + i * ldx + 2 * j);
        const __m256 ao = _mm256_set1_ps(bits_f(p & 0xffff0000u)), ae = _mm256_set1_ps(bits_f(p << 16));
        acc[i][0] = _mm256_fmadd_ps(ae, we0, _mm256_fmadd_ps(ao, wo0, acc[i][0]));
        acc[i][1] = _mm256_fmadd_ps(ae, we1, _mm256_fmadd_ps(ao, wo1, acc[i][1]));
      }
    }
    for (int i = 0; i < mr; i++)
      for (int h = 0; h < 2; h++) {
        __m256 v = acc[i][h];
        if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + 16 * g + 8 * h));
        _mm256_storeu_ps(out[i] + 16 * g + 8 * h, v);
      }
  }
  for (int i = 0; i < mr; i++) store_row(out[i], y + i * ldy, nc);
}
TILE_VARIANTS4(tile_avx2, tile_avx2_mr)
#pragma GCC pop_options

/* MXCSR with FTZ (bit 15) and DAZ (bit 6) set for the emulating paths (and the bias add); the
   tile runs behind an indirect call, so no floating-point operation moves across the change */
static unsigned enter_ftz_daz(int isa) {
  if (isa == ISA_PORTABLE) return 0;
  const unsigned saved = _mm_getcsr();
  _mm_setcsr(saved | 0x8040u);
  return saved;
}
static void leave_ftz_daz(int isa, unsigned saved) {
  if (isa != ISA_PORTABLE) _mm_setcsr(saved);
}
#else
static unsigned enter_ftz_daz(int isa) { (void)isa; return 0; }
static void leave_ftz_daz(int isa, unsigned saved) { (void)isa; (void)saved; }
#endif

/* ------------------------------------------------------------------------------------------- */
/* dispatch                                                                                     */
/* ------------------------------------------------------------------------------------------- */

int ditto_bf16_isa_supported(int isa) {
#ifdef BF_X86
  __builtin_cpu_init();
  const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512vl");
  switch (isa) {
    case ISA_PORTABLE: return 1;
    case ISA_AVX2: return avx2;
    case ISA_AVX512: return avx512;
    case ISA_AVX512BF16: return avx512 && __builtin_cpu_supports("avx512bf16");
    default: return 0;
  }
#else
  return isa == ISA_PORTABLE;
#endif
}

int ditto_bf16_best_isa(void) {
  for (int isa = ISA_AVX512BF16; isa > ISA_PORTABLE; isa--)
    if (ditto_bf16_isa_supported(isa)) return isa;
  return ISA_PORTABLE;
}

/* ISA_AUTO: $DITTO_BF16_ISA (avx512_bf16 | avx512 | avx2 | portable) when set, else the best path;
   -3 when the variable names no path this CPU runs, -1 for an unsupported explicit code */
static int resolve_isa(int isa) {
  if (isa != ISA_AUTO) return ditto_bf16_isa_supported(isa) ? isa : -1;
  const char *e = getenv("DITTO_BF16_ISA");
  if (!e || !*e) return ditto_bf16_best_isa();
  if (!strcmp(e, "avx512_bf16")) isa = ISA_AVX512BF16;
  else if (!strcmp(e, "avx512")) isa = ISA_AVX512;
  else if (!strcmp(e, "avx2")) isa = ISA_AVX2;
  else if (!strcmp(e, "portable")) isa = ISA_PORTABLE;
  else return -3;
  return ditto_bf16_isa_supported(isa) ? isa : -3;
}

static void tile_info(int isa, TileFn *fn, int *mr) {
#ifdef BF_X86
  if (isa == ISA_AVX512BF16) { *fn = tile_bf16; *mr = 6; return; }
  if (isa == ISA_AVX512) { *fn = tile_avx512; *mr = 4; return; }
  if (isa == ISA_AVX2) { *fn = tile_avx2; *mr = 4; return; }
#endif
  *fn = tile_portable;
  *mr = MR_MAX;
}

/* x (M, 2*K2) bf16 rows of stride ldx (K already padded to even), wp: ceil(N/64) packed panels,
   bias: NULL or ceil(N/64)*64 fp32, y (M, N) bf16 rows of stride ldy; mc rows per work item.
   Returns 0, -1 (bad arguments / ISA not supported) or -3 ($DITTO_BF16_ISA names no path here). */
int ditto_bf16_linear(const uint16_t *x, long M, long K2, long ldx, const uint16_t *wp, long N, const float *bias,
                      uint16_t *y, long ldy, long mc, int isa) {
  isa = resolve_isa(isa);
  if (isa < 0) return isa;
  if (M < 0 || K2 < 0 || N < 0 || mc < 1 || ldx < 2 * K2 || ldy < N) return -1;
  TileFn fn;
  int mr;
  tile_info(isa, &fn, &mr);
  const long np = (N + NR - 1) / NR, nmb = (M + mc - 1) / mc;
#pragma omp parallel if (np * nmb > 1 && M * N * K2 >= 65536)
  {
    const unsigned saved = enter_ftz_daz(isa);
#pragma omp for collapse(2) schedule(static)
    for (long mb = 0; mb < nmb; mb++)
      for (long p = 0; p < np; p++) {
        const long m0 = mb * mc, m1 = m0 + mc < M ? m0 + mc : M;
        const int nc = (int)(N - p * NR < NR ? N - p * NR : NR);
        const uint16_t *w = wp + p * K2 * NR * 2;
        const float *b = bias ? bias + p * NR : 0;
        for (long m = m0; m < m1; m += mr) {
          const int rows = (int)(m1 - m < mr ? m1 - m : mr);
          fn(rows, x + m * ldx, ldx, w, K2, b, y + m * ldy + p * NR, ldy, nc);
        }
      }
    leave_ftz_daz(isa, saved);
  }
  return 0;
}
