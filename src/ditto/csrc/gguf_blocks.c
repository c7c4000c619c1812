/* ditto gguf_blocks: a linear layer computed directly on a GGUF file's weight blocks.

   The numerical contract is numerics/kernels/gguf_reference.py (bit for bit):
   * activations are quantised per block of 32 (A32: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0) or 256 (A256:
     Q4_K Q5_K Q6_K) inputs: amax = max|x|, dx = amax / 127, q = rint(x * (127 / amax)) (one fp32
     division, one multiply, half to even, NaN -> 0, clamp [-127, 127]), plus sum(q) per 16 inputs;
   * each weight block meets its activation block in exact integers (any order);
   * each output element is ONE fp32 chain over the row's blocks in order from +0.0f:
       A32:  acc = acc + (d * dx) * (float)isum      [Q4_1/Q5_1: acc = acc + (m * dx) * (float)sx]
       A256: acc = acc + (d * dx) * (float)A         [Q4_K/Q5_K: acc = acc - (dmin * dx) * (float)B]
     then y = acc (+ bias), every operation a separate IEEE multiply or add (no FMA: this file must
     be compiled with -ffp-contract=off, and says so to GCC/clang below as well).

   Weights are the file's rows, decoded in registers (never repacked in memory).  Three
   instruction-set paths live in this one library, chosen at run time (the best one, the caller's
   choice, or $DITTO_GGUF_ISA): portable C, AVX2 (maddubs) and AVX-512 (F/BW/VL, with VNNI vpdpbusd
   where the CPU has it; the file is compiled for the baseline ISA, the vector code through target
   pragmas).  The vector paths compute L = 8 or 16 output rows at once, one per lane: the same
   window of bytes of every row of a tile is loaded (AVX-512: 32-byte byte-masked loads, which never
   touch the masked bytes, so a window may start before a block to bring its fp16 scale along) and
   transposed (4x4 dwords per 128-bit lane), so that lane r of a vector holds 4 consecutive values
   of row r; vpdpbusd against the activation's matching 4 bytes (broadcast) accumulates each row's
   integer block sum in its own lane, without horizontal reductions, and the fp32 chain runs
   lane-wise, each lane exactly the scalar chain.  One activation row decodes block by block with
   its accumulator in a register; a batch decodes its work item (two tiles) once into per-thread
   scratch and runs 4 activation rows at a time over it, each broadcast feeding both tiles.  While
   a tile is decoded, the next one (a contiguous run of rows) is prefetched.  OpenMP splits work
   items over output-row tiles (and activation-row chunks when there are few tiles), and is not
   used at all for a few microseconds of work; tiling only decides who computes an element. */
#ifndef GG_TEMPLATE

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#define GG_X86 1
#include <immintrin.h>
#endif

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
/* the vector helpers are static inline inside target regions: no call passes a vector across an
   ABI boundary, so gcc's note about the AVX-512 / AVX argument ABI does not apply */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define GG_INLINE static inline __attribute__((always_inline))

enum { Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, NKINDS };
enum { ISA_AUTO = 0, ISA_PORTABLE = 1, ISA_AVX2 = 2, ISA_AVX512 = 3, ISA_AVX512VNNI = 4 };

static const int KPER[NKINDS] = {32, 32, 32, 32, 32, 256, 256, 256};     /* values per block */
static const int KSIZE[NKINDS] = {18, 20, 22, 24, 34, 144, 176, 210};    /* bytes per block */
static const int KAUX[NKINDS] = {1, 1, 1, 1, 1, 4, 4, 8};                /* aux ints per block */
#define MC_MAX 256 /* activation rows per work item (cache blocking: they stay in L2 across tiles) */

/* One GEMM: quantised activations (M rows), weights (N rows of rb bytes), output. */
typedef struct {
  const int8_t *q;    /* M x K */
  const float *dx;    /* M x nb: activation block scales */
  const int32_t *sums;/* M x K/16: sum(q) per 16 inputs */
  const int32_t *aux; /* M x nb*KAUX: sx (A32), or int16 pairs of sub-block sums (A256) */
  const float *sxf;   /* M x nb: (float)sx (A32) */
  const uint8_t *w;
  const float *bias;
  float *y;
  long M, K, N, rb, ldy, nb, naux, mcs, nmc, pf_lines;
  int kind;
} Job;

/* ------------------------------------------------------------------------------------------- */
/* portable C                                                                                   */
/* ------------------------------------------------------------------------------------------- */

static float h2f(uint16_t h) { /* IEEE half -> float, exact */
  uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 31u, m = h & 1023u, u;
  if (e == 0) {
    if (m == 0) {
      u = s;
    } else { /* subnormal: normalise */
      e = 113;
      while (!(m & 1024u)) { m <<= 1; e--; }
      u = s | (e << 23) | ((m & 1023u) << 13);
    }
  } else if (e == 31) {
    u = s | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0u);
  } else {
    u = s | ((e + 112) << 23) | (m << 13);
  }
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static inline uint16_t ld16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline int32_t ld32(const void *p) { int32_t v; memcpy(&v, p, 4); return v; }
static inline int32_t pair16(int32_t lo, int32_t hi) {
  return (int32_t)((uint32_t)(uint16_t)lo | ((uint32_t)(uint16_t)hi << 16));
}

typedef struct { int8_t v[256]; int sc[16], mn[8]; float d, m; } PBlock;

/* one weight block -> the integers each weight multiplies and its scales (gguf_reference.decode);
   every value fits an int8 (Q8_0 [-128, 127], Q4 [-8, 15], Q5 [-16, 31], Q6_K [-32, 31]) */
GG_INLINE void decode_portable(const int kind, const uint8_t *b, PBlock *o) {
  o->d = h2f(ld16(b));
  switch (kind) {
    case Q8_0:
      for (int j = 0; j < 32; j++) o->v[j] = (int8_t)b[2 + j];
      break;
    case Q4_0:
      for (int j = 0; j < 16; j++) {
        o->v[j] = (int8_t)((b[2 + j] & 15) - 8);
        o->v[j + 16] = (int8_t)((b[2 + j] >> 4) - 8);
      }
      break;
    case Q4_1:
      o->m = h2f(ld16(b + 2));
      for (int j = 0; j < 16; j++) {
        o->v[j] = (int8_t)(b[4 + j] & 15);
        o->v[j + 16] = (int8_t)(b[4 + j] >> 4);
      }
      break;
    case Q5_0:
    case Q5_1: {
      const int off = kind == Q5_0 ? 2 : 4, sub = kind == Q5_0 ? 16 : 0;
      if (kind == Q5_1) o->m = h2f(ld16(b + 2));
      const uint32_t qh = (uint32_t)ld32(b + off);
      for (int j = 0; j < 16; j++) {
        o->v[j] = (int8_t)(((b[off + 4 + j] & 15) | (int)(((qh >> j) & 1u) << 4)) - sub);
        o->v[j + 16] = (int8_t)(((b[off + 4 + j] >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4)) - sub);
      }
      break;
    }
    case Q4_K:
    case Q5_K: {
      o->m = h2f(ld16(b + 2)); /* dmin */
      const uint8_t *s = b + 4;
      for (int j = 0; j < 4; j++) {
        o->sc[j] = s[j] & 63;
        o->mn[j] = s[4 + j] & 63;
        o->sc[4 + j] = (s[8 + j] & 15) | ((s[j] >> 2) & 48);
        o->mn[4 + j] = (s[8 + j] >> 4) | ((s[4 + j] >> 2) & 48);
      }
      const uint8_t *qs = b + (kind == Q4_K ? 16 : 48), *qh = b + 16;
      for (int i = 0; i < 4; i++)
        for (int l = 0; l < 32; l++) {
          int lo = qs[32 * i + l] & 15, hi = qs[32 * i + l] >> 4;
          if (kind == Q5_K) { lo |= ((qh[l] >> (2 * i)) & 1) << 4; hi |= ((qh[l] >> (2 * i + 1)) & 1) << 4; }
          o->v[64 * i + l] = (int8_t)lo;
          o->v[64 * i + 32 + l] = (int8_t)hi;
        }
      break;
    }
    case Q6_K: {
      o->d = h2f(ld16(b + 208));
      for (int j = 0; j < 16; j++) o->sc[j] = (int8_t)b[192 + j];
      for (int h = 0; h < 2; h++) {
        const uint8_t *ql = b + 64 * h, *qh = b + 128 + 32 * h;
        for (int l = 0; l < 32; l++) {
          int8_t *v = o->v + 128 * h + l;
          v[0] = (int8_t)(((ql[l] & 15) | (((qh[l] >> 0) & 3) << 4)) - 32);
          v[32] = (int8_t)(((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32);
          v[64] = (int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
          v[96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
      }
      break;
    }
    default:
      break;
  }
}

GG_INLINE int dot_portable(const int8_t *v, const int8_t *q, const int n) {
  int s = 0;
  for (int j = 0; j < n; j++) s += v[j] * q[j];
  return s;
}

/* rows [n0, n1) x activation rows [m0, m1): the contract's chain, written out */
GG_INLINE void tile_portable_k(const int kind, const Job *jb, long n0, long n1, long m0, long m1) {
  const int per = KPER[kind], size = KSIZE[kind];
  PBlock blk;
  for (long n = n0; n < n1; n++) {
    const uint8_t *row = jb->w + n * jb->rb;
    for (long m = m0; m < m1; m++) jb->y[m * jb->ldy + n] = 0.0f;
    for (long b = 0; b < jb->nb; b++) {
      decode_portable(kind, row + b * size, &blk);
      for (long m = m0; m < m1; m++) {
        const int8_t *q = jb->q + m * jb->K + b * per;
        const float dx = jb->dx[m * jb->nb + b];
        const int32_t *s16 = jb->sums + m * (jb->K / 16) + b * (per / 16);
        float acc = jb->y[m * jb->ldy + n];
        if (per == 32) {
          const int isum = dot_portable(blk.v, q, 32);
          acc = acc + (blk.d * dx) * (float)isum;
          if (kind == Q4_1 || kind == Q5_1) acc = acc + (blk.m * dx) * (float)(s16[0] + s16[1]);
        } else if (kind == Q6_K) {
          int a = 0;
          for (int j = 0; j < 16; j++) a += blk.sc[j] * dot_portable(blk.v + 16 * j, q + 16 * j, 16);
          acc = acc + (blk.d * dx) * (float)a;
        } else {
          int a = 0, bm = 0;
          for (int j = 0; j < 8; j++) {
            a += blk.sc[j] * dot_portable(blk.v + 32 * j, q + 32 * j, 32);
            bm += blk.mn[j] * (s16[2 * j] + s16[2 * j + 1]);
          }
          acc = acc + (blk.d * dx) * (float)a;
          acc = acc - (blk.m * dx) * (float)bm;
        }
        jb->y[m * jb->ldy + n] = acc;
      }
    }
    if (jb->bias)
      for (long m = m0; m < m1; m++) jb->y[m * jb->ldy + n] = jb->y[m * jb->ldy + n] + jb->bias[n];
  }
}

typedef void (*PortableFn)(const Job *, long, long, long, long);
#define GG_PTILE(KIND) \
  static void tile_portable_##KIND(const Job *j, long n0, long n1, long m0, long m1) { tile_portable_k(KIND, j, n0, n1, m0, m1); }
GG_PTILE(Q4_0)
GG_PTILE(Q4_1)
GG_PTILE(Q5_0)
GG_PTILE(Q5_1)
GG_PTILE(Q8_0)
GG_PTILE(Q4_K)
GG_PTILE(Q5_K)
GG_PTILE(Q6_K)
#undef GG_PTILE
static const PortableFn PORTABLE[NKINDS] = {tile_portable_Q4_0, tile_portable_Q4_1, tile_portable_Q5_0,
                                           tile_portable_Q5_1, tile_portable_Q8_0, tile_portable_Q4_K,
                                           tile_portable_Q5_K, tile_portable_Q6_K};

static void quant_row_portable(const float *x, long K, int block, int8_t *q, float *dx, int32_t *sums) {
  for (long b = 0; b < K / block; b++) {
    const float *xb = x + b * block;
    float amax = 0.0f;
    int nan = 0;
    for (int i = 0; i < block; i++) {
      const float a = fabsf(xb[i]);
      if (a > amax) amax = a;
      if (xb[i] != xb[i]) nan = 1;
    }
    if (nan) amax = NAN;
    dx[b] = amax / 127.0f;
    const float s = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int i = 0; i < block; i++) {
      float r = rintf(xb[i] * s);
      if (r != r) r = 0.0f;
      r = r < -127.0f ? -127.0f : (r > 127.0f ? 127.0f : r);
      q[b * block + i] = (int8_t)(int)r;
    }
  }
  for (long j = 0; j < K / 16; j++) {
    int32_t s = 0;
    for (int i = 0; i < 16; i++) s += q[16 * j + i];
    sums[j] = s;
  }
}

/* ------------------------------------------------------------------------------------------- */
/* vector paths: the template below, instantiated for AVX-512 + VNNI, AVX-512 and AVX2           */
/* ------------------------------------------------------------------------------------------- */

typedef void (*TileFn)(const Job *, long, long, long, char *);
typedef long (*DecBytesFn)(int);
typedef void (*QuantFn)(const float *, long, int, int8_t *, float *, int32_t *);

#ifdef GG_X86
#define GG_TEMPLATE 4
#include "gguf_blocks.c"
#undef GG_TEMPLATE
#define GG_TEMPLATE 3
#include "gguf_blocks.c"
#undef GG_TEMPLATE
#define GG_TEMPLATE 2
#include "gguf_blocks.c"
#undef GG_TEMPLATE
#endif

/* ------------------------------------------------------------------------------------------- */
/* dispatch                                                                                     */
/* ------------------------------------------------------------------------------------------- */

int ditto_gguf_isa_supported(int isa) {
#ifdef GG_X86
  __builtin_cpu_init();
  const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  const int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512vl");
  switch (isa) {
    case ISA_PORTABLE: return 1;
    case ISA_AVX2: return avx2;
    case ISA_AVX512: return avx512;
    case ISA_AVX512VNNI: return avx512 && __builtin_cpu_supports("avx512vnni");
    default: return 0;
  }
#else
  return isa == ISA_PORTABLE;
#endif
}

int ditto_gguf_best_isa(void) {
  for (int isa = ISA_AVX512VNNI; isa > ISA_PORTABLE; isa--)
    if (ditto_gguf_isa_supported(isa)) return isa;
  return ISA_PORTABLE;
}

/* ISA_AUTO: $DITTO_GGUF_ISA (avx512 | avx512_novnni | avx2 | portable) when set, else the best
   path; -3 when the variable names no path this CPU runs, -1 for an unsupported explicit code */
static int resolve_isa(int isa) {
  if (isa == ISA_AUTO) {
    const char *e = getenv("DITTO_GGUF_ISA");
    if (!e || !*e) return ditto_gguf_best_isa();
    if (!strcmp(e, "avx512")) isa = ditto_gguf_isa_supported(ISA_AVX512VNNI) ? ISA_AVX512VNNI : ISA_AVX512;
    else if (!strcmp(e, "avx512_novnni")) isa = ISA_AVX512;
    else if (!strcmp(e, "avx2")) isa = ISA_AVX2;
    else if (!strcmp(e, "portable")) isa = ISA_PORTABLE;
    else return -3;
    return ditto_gguf_isa_supported(isa) ? isa : -3;
  }
  return ditto_gguf_isa_supported(isa) ? isa : -1;
}

static QuantFn quant_fn(int isa) {
  switch (isa) {
#ifdef GG_X86
    case ISA_AVX512VNNI:
    case ISA_AVX512: return quant_row_v3;
    case ISA_AVX2: return quant_row_v2;
#endif
    default: return quant_row_portable;
  }
}

/* x (M, K) fp32 rows of stride ldx -> q (M, K) int8, dx (M, K/block), sums (M, K/16).
   isa: ISA_* (0: $DITTO_GGUF_ISA, else the best path).  Returns 0, -1 (bad arguments / ISA not
   supported) or -3 ($DITTO_GGUF_ISA names no path this CPU runs). */
int ditto_gguf_quantize(const float *x, long M, long K, long ldx, int block, int isa, int8_t *q, float *dx,
                        int32_t *sums) {
  isa = resolve_isa(isa);
  if (isa < 0) return isa;
  if ((block != 32 && block != 256) || K % block || M < 0) return -1;
  const QuantFn f = quant_fn(isa);
  const long nb = K / block;
#pragma omp parallel for schedule(static) if (M >= 4)
  for (long m = 0; m < M; m++) f(x + m * ldx, K, block, q + m * K, dx + m * nb, sums + m * (K / 16));
  return 0;
}

static TileFn tile_fn(int isa, int kind) {
#ifdef GG_X86
  static const TileFn v4[NKINDS] = {tile_q4_0_v4, tile_q4_1_v4, tile_q5_0_v4, tile_q5_1_v4,
                                    tile_q8_0_v4, tile_q4_k_v4, tile_q5_k_v4, tile_q6_k_v4};
  static const TileFn v3[NKINDS] = {tile_q4_0_v3, tile_q4_1_v3, tile_q5_0_v3, tile_q5_1_v3,
                                    tile_q8_0_v3, tile_q4_k_v3, tile_q5_k_v3, tile_q6_k_v3};
  static const TileFn v2[NKINDS] = {tile_q4_0_v2, tile_q4_1_v2, tile_q5_0_v2, tile_q5_1_v2,
                                    tile_q8_0_v2, tile_q4_k_v2, tile_q5_k_v2, tile_q6_k_v2};
  if (isa == ISA_AVX512VNNI) return v4[kind];
  if (isa == ISA_AVX512) return v3[kind];
  if (isa == ISA_AVX2) return v2[kind];
#else
  (void)kind;
#endif
  (void)isa;
  return 0;
}

static DecBytesFn dec_bytes_fn(int isa) {
#ifdef GG_X86
  if (isa == ISA_AVX512VNNI) return dec_bytes_v4;
  if (isa == ISA_AVX512) return dec_bytes_v3;
  return dec_bytes_v2;
#else
  (void)isa;
  return 0;
#endif
}

static long max_threads(void) {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

/* the vector paths read the activation sums of a row as sx and (float)sx per block (A32), or
   as int16 pairs of sub-block sums (A256: per 32 for Q4_K/Q5_K, per 16 for Q6_K) */
static void make_aux(int kind, long K, const int32_t *s, int32_t *a, float *sxf) {
  const long nb = K / KPER[kind];
  for (long b = 0; b < nb; b++) {
    if (KPER[kind] == 32) {
      a[b] = s[2 * b] + s[2 * b + 1];
      sxf[b] = (float)a[b];
    } else if (kind == Q6_K) {
      for (int p = 0; p < 8; p++) a[8 * b + p] = pair16(s[16 * b + 2 * p], s[16 * b + 2 * p + 1]);
    } else {
      for (int p = 0; p < 4; p++) {
        const int32_t *t = s + 16 * b + 4 * p; /* sub-blocks 2p and 2p + 1 of 32 */
        a[4 * b + p] = pair16(t[0] + t[1], t[2] + t[3]);
      }
    }
  }
}

/* activation buffers of one call, carved from one allocation (the stack for small calls) */
typedef struct { int8_t *q; float *dx, *sxf; int32_t *sums, *aux; } Acts;
static size_t acts_bytes(int kind, long M, long K) {
  const long nb = K / KPER[kind];
  return (size_t)(M * K + 64) + (size_t)(M * (2 * nb + K / 16 + nb * KAUX[kind])) * 4 + 4 * 64;
}
static Acts acts_carve(int kind, long M, long K, char *buf) {
  const long nb = K / KPER[kind];
  Acts a;
  size_t o = 0;
#define GG_CARVE(FIELD, TYPE, COUNT) a.FIELD = (TYPE *)(buf + o), o += ((size_t)(COUNT) * sizeof(TYPE) + 63) / 64 * 64
  GG_CARVE(q, int8_t, M * K);
  GG_CARVE(dx, float, M * nb);
  GG_CARVE(sxf, float, M * nb);
  GG_CARVE(sums, int32_t, M * (K / 16));
  GG_CARVE(aux, int32_t, M * nb * KAUX[kind]);
#undef GG_CARVE
  return a;
}

/* the GEMM proper, on validated arguments */
static int gemm(int kind, int isa, const Acts *a, long M, long K, const uint8_t *w, long N, long rb,
                const float *bias, float *y, long ldy) {
  if (M == 0 || N == 0) return 0;
  Job jb;
  memset(&jb, 0, sizeof(jb));
  jb.kind = kind;
  jb.q = a->q, jb.dx = a->dx, jb.sums = a->sums, jb.aux = a->aux, jb.sxf = a->sxf;
  jb.w = w, jb.bias = bias, jb.y = y;
  jb.M = M, jb.K = K, jb.N = N, jb.rb = rb, jb.ldy = ldy, jb.nb = K / KPER[kind];
  jb.naux = jb.nb * KAUX[kind];
  const TileFn tf = tile_fn(isa, kind);
  const long lanes = isa == ISA_AVX2 ? 8 : 16; /* output rows per vector (portable: 16 as well) */
  jb.pf_lines = (lanes * rb + 64 * jb.nb - 1) / (64 * jb.nb);
  const long rows = tf && M > 1 ? 2 * lanes : lanes; /* output rows per work item */
  const long ntiles = (N + rows - 1) / rows, nt = max_threads();
  long mcs = M < MC_MAX ? M : MC_MAX;
  if (ntiles < nt && M > 4) { /* few tiles: split the activation rows too */
    const long per = (nt + ntiles - 1) / ntiles;
    const long want = ((M + per - 1) / per + 3) / 4 * 4;
    if (want < mcs) mcs = want;
  }
  jb.mcs = mcs;
  jb.nmc = (M + mcs - 1) / mcs;
  const long items = ntiles * jb.nmc;
  /* a work item of several rows decodes its tile once into scratch (nb decoded blocks) */
  const size_t scratch_bytes = tf && M > 1 ? (size_t)(2 * jb.nb * dec_bytes_fn(isa)(kind)) : 0;
  /* threads only above ~15 us of work, estimated at ~16 ns per decoded block of 16 rows x 32
     values plus ~4 ns per activation row (a fork/join costs several us on a VM, and a thread
     descheduled by another process stalls the whole call): the thread count never changes a bit */
  const long est_ns = (N + 15) / 16 * jb.nb * (KPER[kind] / 32) * (16 + 4 * M);
  const int parallel = items > 1 && est_ns >= 15000;
  int failed = 0;
#pragma omp parallel if (parallel)
  {
    char *scratch = scratch_bytes ? (char *)aligned_alloc(64, (scratch_bytes + 63) / 64 * 64) : 0;
    if (scratch_bytes && !scratch) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (long it = 0; it < items; it++) { /* activation-chunk major: a chunk stays in cache across tiles */
      const long t = it % ntiles, m0 = (it / ntiles) * mcs, m1 = m0 + mcs < M ? m0 + mcs : M;
      if (tf) {
        if (!scratch_bytes || scratch) tf(&jb, t * rows, m0, m1, scratch);
      } else {
        PORTABLE[kind](&jb, t * rows, t * rows + rows < N ? t * rows + rows : N, m0, m1);
      }
    }
    free(scratch);
  }
  return failed ? -2 : 0;
}

static int check_gemm(int kind, long M, long K, long N, long rb, long ldy) {
  return kind >= 0 && kind < NKINDS && M >= 0 && N >= 0 && K > 0 && K % KPER[kind] == 0 &&
         rb == K / KPER[kind] * KSIZE[kind] && ldy >= N;
}

#define GG_STACK_BYTES 65536 /* activation buffers up to this size live on the stack */

/* y (M, N) (row stride ldy) = the contract's linear of pre-quantised activations (q, dx, sums as
   ditto_gguf_quantize writes them) with N weight rows of `rb` bytes.  Returns 0, -1 (bad
   arguments / ISA not supported), -2 (out of memory) or -3 (bad $DITTO_GGUF_ISA). */
int ditto_gguf_gemm(int kind, int isa, const int8_t *q, const float *dx, const int32_t *sums, long M, long K,
                    const uint8_t *w, long N, long rb, const float *bias, float *y, long ldy) {
  isa = resolve_isa(isa);
  if (isa < 0) return isa;
  if (!check_gemm(kind, M, K, N, rb, ldy)) return -1;
  const size_t need = acts_bytes(kind, M, K);
  char stack[GG_STACK_BYTES] __attribute__((aligned(64)));
  char *buf = need <= sizeof(stack) ? stack : (char *)aligned_alloc(64, (need + 63) / 64 * 64);
  if (!buf) return -2;
  Acts a = acts_carve(kind, M, K, buf);
  a.q = (int8_t *)q, a.dx = (float *)dx, a.sums = (int32_t *)sums; /* the caller's; aux and sxf are ours */
  for (long m = 0; m < M; m++)
    make_aux(kind, K, sums + m * (K / 16), a.aux + m * (K / KPER[kind]) * KAUX[kind], a.sxf + m * (K / KPER[kind]));
  const int rc = gemm(kind, isa, &a, M, K, w, N, rb, bias, y, ldy);
  if (buf != stack) free(buf);
  return rc;
}

/* y = linear(x) under the contract: quantise x (M, K) (row stride ldx) and run the GEMM. */
int ditto_gguf_linear(int kind, int isa, const float *x, long M, long K, long ldx, const uint8_t *w, long N,
                      long rb, const float *bias, float *y, long ldy) {
  isa = resolve_isa(isa);
  if (isa < 0) return isa;
  if (!check_gemm(kind, M, K, N, rb, ldy) || ldx < K) return -1;
  const size_t need = acts_bytes(kind, M, K);
  char stack[GG_STACK_BYTES] __attribute__((aligned(64)));
  char *buf = need <= sizeof(stack) ? stack : (char *)aligned_alloc(64, (need + 63) / 64 * 64);
  if (!buf) return -2;
  const Acts a = acts_carve(kind, M, K, buf);
  const QuantFn f = quant_fn(isa);
  const int block = KPER[kind];
  const long nb = K / block;
#pragma omp parallel for schedule(static) if (M >= 4)
  for (long m = 0; m < M; m++) {
    f(x + m * ldx, K, block, a.q + m * K, a.dx + m * nb, a.sums + m * (K / 16));
    make_aux(kind, K, a.sums + m * (K / 16), a.aux + m * nb * KAUX[kind], a.sxf + m * nb);
  }
  const int rc = gemm(kind, isa, &a, M, K, w, N, rb, bias, y, ldy);
  if (buf != stack) free(buf);
  return rc;
}

/* Decode nblocks blocks of a 32-value format (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0) to float32, exactly as the
   gguf package's numpy decoders do (and so ditto's loader did before): q is the block's unsigned
   number, w = d * (q - 8) (Q4_0), d * (q - 16) (Q5_0), (d * q) + m (Q4_1, Q5_1: two roundings, no
   FMA), d * q (Q8_0, q signed).  Blocks are independent: the thread split changes nothing.
   Returns 0, or -1 for a kind this function does not decode. */
int ditto_gguf_dequantize(int kind, const uint8_t *w, long nblocks, float *out) {
  if (kind < Q4_0 || kind > Q8_0 || nblocks < 0) return -1;
  const long size = KSIZE[kind];
#pragma omp parallel for schedule(static) if (nblocks > 4096)
  for (long b = 0; b < nblocks; b++) {
    const uint8_t *p = w + b * size;
    float *o = out + b * 32;
    const float d = h2f(ld16(p));
    if (kind == Q8_0) {
      for (int j = 0; j < 32; j++) o[j] = (float)(int8_t)p[2 + j] * d;
      continue;
    }
    const int has_m = kind == Q4_1 || kind == Q5_1, five = kind == Q5_0 || kind == Q5_1;
    const float m = has_m ? h2f(ld16(p + 2)) : 0.0f;
    const uint32_t qh = five ? (uint32_t)ld32(p + (has_m ? 4 : 2)) : 0u;
    const uint8_t *qs = p + size - 16;
    const int offset = has_m ? 0 : (five ? 16 : 8);
    for (int j = 0; j < 16; j++) {
      const int lo = (qs[j] & 15) | (int)(((qh >> j) & 1u) << 4);
      const int hi = (qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4);
      if (has_m) {
        const float a = d * (float)lo, c = d * (float)hi;
        o[j] = a + m;
        o[j + 16] = c + m;
      } else {
        o[j] = d * (float)(lo - offset);
        o[j + 16] = d * (float)(hi - offset);
      }
    }
  }
  return 0;
}

/* ditto_gguf_linear with its arguments in one array (a ctypes call converts each argument
   separately, at some 0.25 us apiece): kind, isa, x, M, K, ldx, w, N, rb, bias, y, ldy */
int ditto_gguf_linear_packed(const int64_t *a) {
  return ditto_gguf_linear((int)a[0], (int)a[1], (const float *)(intptr_t)a[2], (long)a[3], (long)a[4], (long)a[5],
                           (const uint8_t *)(intptr_t)a[6], (long)a[7], (long)a[8], (const float *)(intptr_t)a[9],
                           (float *)(intptr_t)a[10], (long)a[11]);
}

/* 1 when this build keeps a*b+c as two roundings (no FMA contraction), as the contract requires,
   in scalar code and in every vector path this CPU runs: a small Q4_1 and Q4_K linear (one row and
   a batch) must give the portable path's bits, which an FMA in any chain would change */
int ditto_gguf_selftest(void) {
  volatile float a = 1.0f + 0x1p-13f, b = 1.0f - 0x1p-13f, c = -1.0f;
  const float r = a * b + c; /* fused: -2^-26; rounded product: 1.0f, so 0 */
  if (r != 0.0f) return 0;
  enum { N = 24, K = 256, M = 5 };
  static const int kinds[2] = {Q4_1, Q4_K};
  uint8_t w[N * K / 256 * 176];
  float x[M * K], y0[M * N], y1[M * N];
  uint32_t st = 12345u;
  for (int i = 0; i < M * K; i++) {
    st = st * 1664525u + 1013904223u;
    x[i] = (float)(int32_t)st * 0x1p-31f * (float)(1 + i % 7);
  }
  for (int k = 0; k < 2; k++) {
    const int kind = kinds[k], size = KSIZE[kind], nb = K / KPER[kind];
    const long rb = (long)nb * size;
    for (long i = 0; i < N * rb; i++) {
      st = st * 1664525u + 1013904223u;
      w[i] = (uint8_t)(st >> 24);
    }
    for (long blk = 0; blk < (long)N * nb; blk++) { /* finite fp16 scales near 0.01 */
      w[blk * size + 1] = (uint8_t)(0x20 | (w[blk * size + 1] & 0x83));
      w[blk * size + 3] = (uint8_t)(0x20 | (w[blk * size + 3] & 0x83));
    }
    for (int m = 1; m <= M; m += M - 1) {
      if (ditto_gguf_linear(kind, ISA_PORTABLE, x, m, K, K, w, N, rb, 0, y0, N)) return 0;
      for (int isa = ISA_AVX2; isa <= ISA_AVX512VNNI; isa++) {
        if (!ditto_gguf_isa_supported(isa)) continue;
        if (ditto_gguf_linear(kind, isa, x, m, K, K, w, N, rb, 0, y1, N)) return 0;
        if (memcmp(y0, y1, sizeof(float) * (size_t)(m * N))) return 0;
      }
    }
  }
  return 1;
}

#else /* ============================ GG_TEMPLATE: one vector instruction set ==================== */

#if GG_TEMPLATE == 4
#define FN(x) x##_v4
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")
#endif
#elif GG_TEMPLATE == 3
#define FN(x) x##_v3
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx2,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,f16c")
#endif
#else
#define FN(x) x##_v2
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#endif
#endif

#if GG_TEMPLATE >= 3 /* ------------------------------------------------ 16 lanes (AVX-512) */
#define L 16
#define VI __m512i
#define VF __m512
#define VSET1(x) _mm512_set1_epi32(x)
#define VZERO() _mm512_setzero_si512()
#define VADD(a, b) _mm512_add_epi32(a, b)
#define VSUB(a, b) _mm512_sub_epi32(a, b)
#define VAND(a, b) _mm512_and_si512(a, b)
#define VOR(a, b) _mm512_or_si512(a, b)
#define VSRL(a, n) _mm512_srli_epi32(a, n)
#define VSLL(a, n) _mm512_slli_epi32(a, n)
#define VSRA(a, n) _mm512_srai_epi32(a, n)
#define VMUL(a, b) _mm512_mullo_epi32(a, b)
#define VANDOR(a, b, c) _mm512_ternarylogic_epi32(a, b, c, 0xEA) /* (a & b) | c */
#define FCVT(a) _mm512_cvtepi32_ps(a)
#define FMUL(a, b) _mm512_mul_ps(a, b)
#define FADD(a, b) _mm512_add_ps(a, b)
#define FSUB(a, b) _mm512_sub_ps(a, b)
#define FSET1(x) _mm512_set1_ps(x)
#define FZERO() _mm512_setzero_ps()
GG_INLINE VF FN(half_lo)(VI v) { return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v)); }
GG_INLINE VI FN(gath)(const uint8_t *base, VI idx) { return _mm512_i32gather_epi32(idx, (const void *)base, 1); }
GG_INLINE VI FN(bq)(const int8_t *q) { return _mm512_set1_epi32(ld32(q)); }
#if GG_TEMPLATE == 4
/* sum over 4 bytes of u8 w times s8 q, added to each dword lane */
GG_INLINE VI FN(dot)(VI acc, VI w, VI bq) { return _mm512_dpbusd_epi32(acc, w, bq); }
GG_INLINE VI FN(dotw)(VI acc, VI a, int32_t b) { return _mm512_dpwssd_epi32(acc, a, _mm512_set1_epi32(b)); }
/* Q8_0's signed weights: w ^ 0x80 = w + 128 as u8, and the sum loses 128 * sx afterwards */
#define Q8_BIAS 128
GG_INLINE VI FN(q8w)(VI t) { return _mm512_xor_si512(t, VSET1((int)0x80808080u)); }
GG_INLINE VI FN(dotq8)(VI acc, VI w, VI bq) { return FN(dot)(acc, w, bq); }
#else
GG_INLINE VI FN(dot)(VI acc, VI w, VI bq) {
  const VI p = _mm512_maddubs_epi16(w, bq); /* no saturation: w <= 63, |q| <= 127 */
  return VADD(acc, _mm512_madd_epi16(p, _mm512_set1_epi16(1)));
}
GG_INLINE VI FN(dotw)(VI acc, VI a, int32_t b) { return VADD(acc, _mm512_madd_epi16(a, _mm512_set1_epi32(b))); }
#define Q8_BIAS 0
GG_INLINE VI FN(q8w)(VI t) { return t; }
GG_INLINE VI FN(dotq8)(VI acc, VI w, VI b) { /* |w| times q with w's sign: no saturation */
  const VI aw = _mm512_abs_epi8(w);
  const VI sq = _mm512_mask_sub_epi8(b, _mm512_movepi8_mask(w), _mm512_setzero_si512(), b);
  return VADD(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(aw, sq), _mm512_set1_epi16(1)));
}
#endif
GG_INLINE VI FN(row_index)(long nv, long rb) {
  const VI r = _mm512_min_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                VSET1((int)nv - 1));
  return VMUL(r, VSET1((int)rb));
}
GG_INLINE void FN(store)(float *y, VF v, long nv) {
  _mm512_mask_storeu_ps(y, (__mmask16)((1u << nv) - 1u), v);
}
GG_INLINE VF FN(loadf)(const float *p, long nv) { return _mm512_maskz_loadu_ps((__mmask16)((1u << nv) - 1u), p); }

#else /* ---------------------------------------------------------------------- 8 lanes (AVX2) */
#define L 8
#define VI __m256i
#define VF __m256
#define VSET1(x) _mm256_set1_epi32(x)
#define VZERO() _mm256_setzero_si256()
#define VADD(a, b) _mm256_add_epi32(a, b)
#define VSUB(a, b) _mm256_sub_epi32(a, b)
#define VAND(a, b) _mm256_and_si256(a, b)
#define VOR(a, b) _mm256_or_si256(a, b)
#define VSRL(a, n) _mm256_srli_epi32(a, n)
#define VSLL(a, n) _mm256_slli_epi32(a, n)
#define VSRA(a, n) _mm256_srai_epi32(a, n)
#define VMUL(a, b) _mm256_mullo_epi32(a, b)
#define VANDOR(a, b, c) _mm256_or_si256(_mm256_and_si256(a, b), c)
#define FCVT(a) _mm256_cvtepi32_ps(a)
#define FMUL(a, b) _mm256_mul_ps(a, b)
#define FADD(a, b) _mm256_add_ps(a, b)
#define FSUB(a, b) _mm256_sub_ps(a, b)
#define FSET1(x) _mm256_set1_ps(x)
#define FZERO() _mm256_setzero_ps()
GG_INLINE VF FN(half_lo)(VI v) {
  const VI p = _mm256_packus_epi32(_mm256_and_si256(v, VSET1(0xFFFF)), _mm256_setzero_si256());
  return _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(p, 0x08)));
}
GG_INLINE VI FN(gath)(const uint8_t *base, VI idx) { return _mm256_i32gather_epi32((const int *)base, idx, 1); }
GG_INLINE VI FN(bq)(const int8_t *q) { return _mm256_set1_epi32(ld32(q)); }
GG_INLINE VI FN(dot)(VI acc, VI w, VI bq) {
  const VI p = _mm256_maddubs_epi16(w, bq); /* no saturation: w <= 63, |q| <= 127 */
  return VADD(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
GG_INLINE VI FN(dotw)(VI acc, VI a, int32_t b) { return VADD(acc, _mm256_madd_epi16(a, _mm256_set1_epi32(b))); }
#define Q8_BIAS 0
GG_INLINE VI FN(q8w)(VI t) { return t; }
GG_INLINE VI FN(dotq8)(VI acc, VI w, VI bq) {
  const VI p = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(bq, w));
  return VADD(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
GG_INLINE VI FN(row_index)(long nv, long rb) {
  const VI r = _mm256_min_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), VSET1((int)nv - 1));
  return VMUL(r, VSET1((int)rb));
}
GG_INLINE VI FN(lanemask)(long nv) {
  return _mm256_cmpgt_epi32(VSET1((int)nv), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
GG_INLINE void FN(store)(float *y, VF v, long nv) { _mm256_maskstore_ps(y, FN(lanemask)(nv), v); }
GG_INLINE VF FN(loadf)(const float *p, long nv) { return _mm256_maskload_ps(p, FN(lanemask)(nv)); }
#endif

#define M4 VSET1(0x0F0F0F0F)

/* 4x4 dwords within each 128-bit lane: z[a] lane c = row 4c + a -> o[k] lane 4c + a = its dword k */
GG_INLINE void FN(t44)(const VI *z, VI *o, int nk) {
#if L == 16
  const VI t0 = _mm512_unpacklo_epi32(z[0], z[1]), t1 = _mm512_unpackhi_epi32(z[0], z[1]);
  const VI t2 = _mm512_unpacklo_epi32(z[2], z[3]), t3 = _mm512_unpackhi_epi32(z[2], z[3]);
  const VI r[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2), _mm512_unpacklo_epi64(t1, t3),
                   _mm512_unpackhi_epi64(t1, t3)};
#else
  const VI t0 = _mm256_unpacklo_epi32(z[0], z[1]), t1 = _mm256_unpackhi_epi32(z[0], z[1]);
  const VI t2 = _mm256_unpacklo_epi32(z[2], z[3]), t3 = _mm256_unpackhi_epi32(z[2], z[3]);
  const VI r[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2), _mm256_unpacklo_epi64(t1, t3),
                   _mm256_unpackhi_epi64(t1, t3)};
#endif
  for (int k = 0; k < nk; k++) o[k] = r[k];
}

/* the 16 bytes at p[r] + off of each row r, transposed: o[k] lane r = dword k of row r (k < nk) */
GG_INLINE void FN(tr4)(const uint8_t *const *p, long off, int nk, VI *o) {
  VI z[4];
  for (int a = 0; a < 4; a++) {
#if L == 16
    VI v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(p[a] + off)));
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p[4 + a] + off)), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p[8 + a] + off)), 2);
    z[a] = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p[12 + a] + off)), 3);
#else
    z[a] = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(p[a] + off))),
                                   _mm_loadu_si128((const __m128i *)(p[4 + a] + off)), 1);
#endif
  }
  FN(t44)(z, o, nk);
}

#if L == 16
/* bytes [lo, hi) of the 32 at p[r] + off of each row r, transposed: o[k] lane r = dword k of row r
   (k < nk); bytes outside [lo, hi) read as 0 and are never touched (masked loads do not fault), so
   a window may start before a block or end past it, e.g. to bring a block's fp16 scale along */
GG_INLINE void FN(tr8)(const uint8_t *const *p, long off, int lo, int hi, int nk, VI *o) {
  const __mmask32 mk = (__mmask32)((hi == 32 ? 0xFFFFFFFFu : (1u << hi) - 1u) & ~((1u << lo) - 1u));
  VI z0[4], z1[4];
  for (int a = 0; a < 4; a++) {
    __m256i y[4];
    for (int c = 0; c < 4; c++) {
      const uint8_t *src = p[4 * c + a] + off;
      y[c] = lo == 0 && hi == 32 ? _mm256_loadu_si256((const __m256i *)src) : _mm256_maskz_loadu_epi8(mk, src);
    }
    const VI u = _mm512_inserti64x4(_mm512_castsi256_si512(y[0]), y[1], 1); /* rows a, 4 + a */
    const VI v = _mm512_inserti64x4(_mm512_castsi256_si512(y[2]), y[3], 1); /* rows 8 + a, 12 + a */
    z0[a] = _mm512_shuffle_i64x2(u, v, 0x88);                                /* their first 16 bytes */
    z1[a] = _mm512_shuffle_i64x2(u, v, 0xDD);                                /* their last 16 */
  }
  FN(t44)(z0, o, nk < 4 ? nk : 4);
  if (nk > 4) FN(t44)(z1, o + 4, nk - 4);
}
#endif

/* decoded weight blocks of one tile (lane r = row r); w[i] multiplies activation bytes 4i..4i+3 */
typedef struct { VI w[8]; VF d, m; } FN(D32);
typedef struct { VI w[64]; VI sc[8]; VI mn2[4]; VF d, dmin; } FN(DK);
typedef struct { VI w[64]; VI sc[16]; VI sc2[8]; VF d; } FN(D6);

static long FN(dec_bytes)(int kind) {
  return KPER[kind] == 32 ? (long)sizeof(FN(D32)) : kind == Q6_K ? (long)sizeof(FN(D6)) : (long)sizeof(FN(DK));
}

/* w | Q5's fifth bits of group g: bit 4g + i of qh to bit 4 of byte i (i < 4) */
GG_INLINE VI FN(q5hi)(VI w, VI qh, int g) {
#if L == 16 /* byte g / 2 of qh into all 4 bytes, test each byte's own bit, add 16 where it is set */
  const VI at = _mm512_add_epi32(_mm512_set_epi32(12, 8, 4, 0, 12, 8, 4, 0, 12, 8, 4, 0, 12, 8, 4, 0), VSET1(g / 2));
  const VI rep = _mm512_shuffle_epi8(qh, VMUL(at, VSET1(0x01010101)));
  const __mmask64 k = _mm512_test_epi8_mask(rep, VSET1((int)(0x08040201u << (4 * (g & 1)))));
  return _mm512_mask_add_epi8(w, k, w, _mm512_set1_epi8(16));
#else /* (bits 4g..4g+3) * (2^4 + 2^11 + 2^18 + 2^25): disjoint shifts, no carries */
  return VANDOR(VMUL(VAND(VSRL(qh, 4 * g), VSET1(15)), VSET1(0x02040810)), VSET1(0x10101010), w);
#endif
}

GG_INLINE void FN(decode32)(const int kind, const uint8_t *const *p, VI idx, long boff, FN(D32) *o) {
  VI t[8], qh = VZERO(), dm;
  const VI *qs = t;
#if L == 16
  (void)idx;
  switch (kind) { /* one 32-byte window per row brings the scales along (no gathers) */
    case Q4_0: FN(tr8)(p, boff - 2, 2, 20, 5, t); dm = VSRL(t[0], 16); qs = t + 1; break;
    case Q4_1: FN(tr8)(p, boff, 0, 20, 5, t); dm = t[0]; qs = t + 1; break;
    case Q5_0: FN(tr8)(p, boff - 2, 2, 24, 6, t); dm = VSRL(t[0], 16); qh = t[1]; qs = t + 2; break;
    case Q5_1: FN(tr8)(p, boff, 0, 24, 6, t); dm = t[0]; qh = t[1]; qs = t + 2; break;
    default: FN(tr8)(p, boff + 2, 0, 32, 8, t); dm = FN(gath)(p[0] + boff, idx); break; /* Q8_0 */
  }
#else
  dm = FN(gath)(p[0] + boff, idx);
  switch (kind) {
    case Q4_0: FN(tr4)(p, boff + 2, 4, t); break;
    case Q4_1: FN(tr4)(p, boff + 4, 4, t); break;
    case Q5_0: FN(tr4)(p, boff + 6, 4, t); qh = FN(gath)(p[0] + boff + 2, idx); break;
    case Q5_1: FN(tr4)(p, boff + 8, 4, t); qh = FN(gath)(p[0] + boff + 4, idx); break;
    default: FN(tr4)(p, boff + 2, 4, t); FN(tr4)(p, boff + 18, 4, t + 4); break; /* Q8_0 */
  }
#endif
  o->d = FN(half_lo)(dm);
  if (kind == Q4_1 || kind == Q5_1) o->m = FN(half_lo)(VSRL(dm, 16));
  if (kind == Q8_0) {
    for (int g = 0; g < 8; g++) o->w[g] = FN(q8w)(t[g]);
    return;
  }
  for (int g = 0; g < 4; g++) {
    o->w[g] = VAND(qs[g], M4);
    o->w[g + 4] = VAND(VSRL(qs[g], 4), M4);
  }
  if (kind == Q5_0 || kind == Q5_1)
    for (int g = 0; g < 8; g++) o->w[g] = FN(q5hi)(o->w[g], qh, g);
}

/* R activation rows (q: their blocks, already offset) against T tiles' decoded A32 block:
   acc[4 * t + r]; each activation broadcast serves the T tiles */
GG_INLINE void FN(compute32)(const int kind, const int R, const int T, const FN(D32) *const *o,
                             const int8_t *const *q, const float *dx, const int32_t *sx, const float *sxf, VF *acc) {
  VI s[2][4];
  for (int t = 0; t < T; t++)
    for (int r = 0; r < R; r++) s[t][r] = VZERO();
  for (int g = 0; g < 8; g++) {
    VI w[2];
    for (int t = 0; t < T; t++) w[t] = o[t]->w[g];
    for (int r = 0; r < R; r++) {
      const VI bq = FN(bq)(q[r] + 4 * g);
      for (int t = 0; t < T; t++)
        s[t][r] = kind == Q8_0 ? FN(dotq8)(s[t][r], w[t], bq) : FN(dot)(s[t][r], w[t], bq);
    }
  }
  const int corr = kind == Q4_0 ? 8 : kind == Q5_0 ? 16 : kind == Q8_0 ? Q8_BIAS : 0;
  for (int r = 0; r < R; r++) {
    const VF fdx = FSET1(dx[r]);
    for (int t = 0; t < T; t++) {
      VI si = s[t][r];
      if (corr) si = VSUB(si, VSET1(corr * sx[r]));
      VF a = FADD(acc[4 * t + r], FMUL(FMUL(o[t]->d, fdx), FCVT(si)));
      if (kind == Q4_1 || kind == Q5_1) a = FADD(a, FMUL(FMUL(o[t]->m, fdx), FSET1(sxf[r])));
      acc[4 * t + r] = a;
    }
  }
}

GG_INLINE VI FN(byte)(VI v, int k) { return VAND(VSRL(v, 8 * k), VSET1(0xFF)); }
GG_INLINE VI FN(bytepair)(VI v, int k) { /* bytes k, k + 1 as an int16 pair */
  const VI x = VSRL(v, 8 * k);
  return VOR(VAND(x, VSET1(0xFF)), VAND(VSLL(x, 8), VSET1(0xFF0000)));
}

GG_INLINE void FN(decodek)(const int kind, const uint8_t *const *p, long boff, FN(DK) *o) {
  VI h[4], qs[32], qh[8];
#if L == 16
  VI t[8];
  FN(tr8)(p, boff, 0, 32, 8, t); /* d | dmin, the 12 scale bytes, then 16 bytes of qh (Q5_K) or qs */
  for (int k = 0; k < 4; k++) h[k] = t[k];
  if (kind == Q4_K) {
    for (int k = 0; k < 4; k++) qs[k] = t[4 + k];
    for (int c = 0; c < 3; c++) FN(tr8)(p, boff + 32 + 32 * c, 0, 32, 8, qs + 4 + 8 * c);
    FN(tr4)(p, boff + 128, 4, qs + 28);
  } else {
    for (int k = 0; k < 4; k++) qh[k] = t[4 + k];
    FN(tr8)(p, boff + 32, 0, 32, 8, t);
    for (int k = 0; k < 4; k++) { qh[4 + k] = t[k]; qs[k] = t[4 + k]; }
    for (int c = 0; c < 3; c++) FN(tr8)(p, boff + 64 + 32 * c, 0, 32, 8, qs + 4 + 8 * c);
    FN(tr4)(p, boff + 160, 4, qs + 28);
  }
#else
  FN(tr4)(p, boff, 4, h);
  const long qoff = kind == Q4_K ? 16 : 48;
  for (int c = 0; c < 8; c++) FN(tr4)(p, boff + qoff + 16 * c, 4, qs + 4 * c);
  if (kind == Q5_K) {
    FN(tr4)(p, boff + 16, 4, qh);
    FN(tr4)(p, boff + 32, 4, qh + 4);
  }
#endif
  o->d = FN(half_lo)(h[0]);
  o->dmin = FN(half_lo)(VSRL(h[0], 16));
  const VI lo = h[1], hi = h[2], mix = h[3];
  const VI sc0 = VAND(lo, VSET1(0x3F3F3F3F));
  const VI sc1 = VOR(VAND(mix, M4), VAND(VSRL(lo, 2), VSET1(0x30303030)));
  const VI mn0 = VAND(hi, VSET1(0x3F3F3F3F));
  const VI mn1 = VOR(VAND(VSRL(mix, 4), M4), VAND(VSRL(hi, 2), VSET1(0x30303030)));
  for (int k = 0; k < 4; k++) {
    o->sc[k] = FN(byte)(sc0, k);
    o->sc[4 + k] = FN(byte)(sc1, k);
  }
  o->mn2[0] = FN(bytepair)(mn0, 0);
  o->mn2[1] = FN(bytepair)(mn0, 2);
  o->mn2[2] = FN(bytepair)(mn1, 0);
  o->mn2[3] = FN(bytepair)(mn1, 2);
  for (int i = 0; i < 4; i++)
    for (int g = 0; g < 8; g++) {
      const VI v = qs[8 * i + g];
      VI a = VAND(v, M4), b = VAND(VSRL(v, 4), M4); /* sub-blocks 2i and 2i + 1 */
      if (kind == Q5_K) { /* bit j of qh byte l is the fifth bit of sub-block j's value l */
        const int j = 2 * i;
        const VI x = qh[g];
        const VI xa = j < 4 ? VSLL(x, 4 - j) : j == 4 ? x : VSRL(x, j - 4);
        const VI xb = j + 1 < 4 ? VSLL(x, 3 - j) : j + 1 == 4 ? x : VSRL(x, j - 3);
        a = VANDOR(xa, VSET1(0x10101010), a);
        b = VANDOR(xb, VSET1(0x10101010), b);
      }
      o->w[8 * (2 * i) + g] = a;
      o->w[8 * (2 * i + 1) + g] = b;
    }
}

GG_INLINE void FN(computek)(const int R, const int T, const FN(DK) *const *o, const int8_t *const *q,
                            const float *dx, const int32_t *const *aux, VF *acc) {
  VI A[2][4], B[2][4];
  for (int t = 0; t < T; t++)
    for (int r = 0; r < R; r++) A[t][r] = B[t][r] = VZERO();
  for (int j = 0; j < 8; j++) {
    VI s[2][4];
    for (int t = 0; t < T; t++)
      for (int r = 0; r < R; r++) s[t][r] = VZERO();
    for (int g = 0; g < 8; g++) {
      VI w[2];
      for (int t = 0; t < T; t++) w[t] = o[t]->w[8 * j + g];
      for (int r = 0; r < R; r++) {
        const VI bq = FN(bq)(q[r] + 32 * j + 4 * g);
        for (int t = 0; t < T; t++) s[t][r] = FN(dot)(s[t][r], w[t], bq);
      }
    }
    for (int t = 0; t < T; t++)
      for (int r = 0; r < R; r++) A[t][r] = VADD(A[t][r], VMUL(s[t][r], o[t]->sc[j]));
  }
  for (int p = 0; p < 4; p++)
    for (int t = 0; t < T; t++)
      for (int r = 0; r < R; r++) B[t][r] = FN(dotw)(B[t][r], o[t]->mn2[p], aux[r][p]);
  for (int r = 0; r < R; r++) {
    const VF fdx = FSET1(dx[r]);
    for (int t = 0; t < T; t++) {
      VF a = FADD(acc[4 * t + r], FMUL(FMUL(o[t]->d, fdx), FCVT(A[t][r])));
      acc[4 * t + r] = FSUB(a, FMUL(FMUL(o[t]->dmin, fdx), FCVT(B[t][r])));
    }
  }
}

GG_INLINE void FN(decode6)(const uint8_t *const *p, VI idx, long boff, FN(D6) *o) {
  VI ql[32], qh[16], sc[5];
#if L == 16
  (void)idx;
  for (int c = 0; c < 4; c++) FN(tr8)(p, boff + 32 * c, 0, 32, 8, ql + 8 * c);
  for (int c = 0; c < 2; c++) FN(tr8)(p, boff + 128 + 32 * c, 0, 32, 8, qh + 8 * c);
  FN(tr8)(p, boff + 192, 0, 18, 5, sc); /* the 16 scales and d */
  o->d = FN(half_lo)(sc[4]);
#else
  for (int c = 0; c < 8; c++) FN(tr4)(p, boff + 16 * c, 4, ql + 4 * c);
  for (int c = 0; c < 4; c++) FN(tr4)(p, boff + 128 + 16 * c, 4, qh + 4 * c);
  FN(tr4)(p, boff + 192, 4, sc);
  o->d = FN(half_lo)(VSRL(FN(gath)(p[0] + boff + 206, idx), 16));
#endif
  for (int j = 0; j < 16; j++) o->sc[j] = VSRA(VSLL(sc[j / 4], 24 - 8 * (j % 4)), 24);
  for (int k = 0; k < 8; k++) o->sc2[k] = VOR(VAND(o->sc[2 * k], VSET1(0xFFFF)), VSLL(o->sc[2 * k + 1], 16));
  for (int h = 0; h < 2; h++)
    for (int t = 0; t < 4; t++)
      for (int g = 0; g < 8; g++) {
        const VI l = ql[16 * h + 8 * (t & 1) + g], x = qh[8 * h + g];
        const VI nib = t < 2 ? VAND(l, M4) : VAND(VSRL(l, 4), M4);
        const VI hb = t == 0 ? VSLL(x, 4) : t == 1 ? VSLL(x, 2) : t == 2 ? x : VSRL(x, 2);
        o->w[32 * h + 8 * t + g] = VANDOR(hb, VSET1(0x30303030), nib); /* n in [0, 63]; v = n - 32 */
      }
}

GG_INLINE void FN(compute6)(const int R, const int T, const FN(D6) *const *o, const int8_t *const *q,
                            const float *dx, const int32_t *const *aux, VF *acc) {
  VI A[2][4], C[2][4];
  for (int t = 0; t < T; t++)
    for (int r = 0; r < R; r++) A[t][r] = C[t][r] = VZERO();
  for (int j = 0; j < 16; j++) {
    VI s[2][4];
    for (int t = 0; t < T; t++)
      for (int r = 0; r < R; r++) s[t][r] = VZERO();
    for (int g = 0; g < 4; g++) {
      VI w[2];
      for (int t = 0; t < T; t++) w[t] = o[t]->w[4 * j + g];
      for (int r = 0; r < R; r++) {
        const VI bq = FN(bq)(q[r] + 16 * j + 4 * g);
        for (int t = 0; t < T; t++) s[t][r] = FN(dot)(s[t][r], w[t], bq);
      }
    }
    for (int t = 0; t < T; t++)
      for (int r = 0; r < R; r++) A[t][r] = VADD(A[t][r], VMUL(s[t][r], o[t]->sc[j]));
  }
  for (int k = 0; k < 8; k++)
    for (int t = 0; t < T; t++)
      for (int r = 0; r < R; r++) C[t][r] = FN(dotw)(C[t][r], o[t]->sc2[k], aux[r][k]); /* sum_j sc_j * bsum_j */
  for (int r = 0; r < R; r++) {
    const VF fdx = FSET1(dx[r]);
    for (int t = 0; t < T; t++) {
      const VI a = VSUB(A[t][r], VSLL(C[t][r], 5)); /* sum_j sc_j * sum((n - 32) * q) */
      acc[4 * t + r] = FADD(acc[4 * t + r], FMUL(FMUL(o[t]->d, fdx), FCVT(a)));
    }
  }
}

GG_INLINE void FN(decode)(const int kind, const uint8_t *const *p, VI idx, long b, void *dec) {
  const long boff = b * KSIZE[kind];
  if (KPER[kind] == 32) FN(decode32)(kind, p, idx, boff, (FN(D32) *)dec);
  else if (kind == Q6_K) FN(decode6)(p, idx, boff, (FN(D6) *)dec);
  else FN(decodek)(kind, p, boff, (FN(DK) *)dec);
}

/* A tile's rows are one contiguous run of L * rb bytes, read block by block across its 16 rows:
   too many interleaved streams for the hardware prefetcher, so while decoding block b of this tile
   we prefetch the b-th of nb equal parts of the tile GG_PF_TILES further on. */
#ifndef GG_PF_TILES
#define GG_PF_TILES 1
#endif
GG_INLINE void FN(prefetch)(const Job *jb, long n0, long b) {
  const long next = n0 + GG_PF_TILES * L;
  if (next >= jb->N) return;
  const long lines = jb->pf_lines; /* ceil(L * rb / 64 / nb) */
  const char *base = (const char *)(jb->w + next * jb->rb) + b * lines * 64;
  for (long i = 0; i < lines; i++) _mm_prefetch(base + 64 * i, _MM_HINT_T0);
}

/* the activation rows rows[0..R) of a work item */
typedef struct { const int8_t *q[4]; const float *dx[4], *sxf[4]; const int32_t *aux[4]; } FN(Rows);

GG_INLINE void FN(rows)(const int kind, const int R, const Job *jb, long m, long nr, FN(Rows) *a) {
  for (int r = 0; r < R; r++) {
    const long row = m + (r < nr ? r : nr - 1); /* rows past nr repeat the last one (not stored) */
    a->q[r] = jb->q + row * jb->K;
    a->dx[r] = jb->dx + row * jb->nb;
    a->aux[r] = jb->aux + row * jb->naux;
    a->sxf[r] = KPER[kind] == 32 ? jb->sxf + row * jb->nb : 0;
  }
}

/* acc[4 t + r] += the contract's terms of block b of tile t (decoded in dec[t]) for row r */
GG_INLINE void FN(apply)(const int kind, const int R, const int T, const void *const *dec, const FN(Rows) *a, long b,
                         VF *acc) {
  const int per = KPER[kind], naux = KAUX[kind];
  const int8_t *q[4];
  const int32_t *aux[4];
  float dx[4], sxf[4];
  int32_t sx[4];
  for (int r = 0; r < R; r++) {
    q[r] = a->q[r] + b * per;
    dx[r] = a->dx[r][b];
    aux[r] = a->aux[r] + b * naux;
    sx[r] = aux[r][0];
    sxf[r] = per == 32 ? a->sxf[r][b] : 0.0f;
  }
  if (per == 32) FN(compute32)(kind, R, T, (const FN(D32) *const *)dec, q, dx, sx, sxf, acc);
  else if (kind == Q6_K) FN(compute6)(R, T, (const FN(D6) *const *)dec, q, dx, aux, acc);
  else FN(computek)(R, T, (const FN(DK) *const *)dec, q, dx, aux, acc);
}

GG_INLINE void FN(store_rows)(const Job *jb, long n0, long nv, long m, long nr, const VF *acc) {
  const VF bias = jb->bias ? FN(loadf)(jb->bias + n0, nv) : FZERO();
  for (int r = 0; r < 4 && r < nr; r++)
    FN(store)(jb->y + (m + r) * jb->ldy + n0, jb->bias ? FADD(acc[r], bias) : acc[r], nv);
}

/* the rows of one tile of L output rows starting at n0 (past N they repeat the last one) */
GG_INLINE long FN(tile_rows)(const Job *jb, long n0, const uint8_t **p) {
  const long nv = jb->N - n0 < L ? jb->N - n0 : L;
  for (long r = 0; r < L; r++) p[r] = jb->w + (n0 + (r < nv ? r : nv - 1)) * jb->rb;
  return nv;
}

/* one activation row: each block is decoded and used at once, the accumulator stays in a register */
GG_INLINE void FN(single)(const int kind, const Job *jb, long n0, long m0) {
  const uint8_t *p[L];
  const long nv = FN(tile_rows)(jb, n0, p);
  const VI idx = FN(row_index)(nv, jb->rb);
  FN(Rows) a;
  FN(rows)(kind, 1, jb, m0, 1, &a);
  VF acc[1] = {FZERO()};
  union { FN(D32) a; FN(DK) k; FN(D6) s; } dec;
  const void *d[1] = {&dec};
  for (long b = 0; b < jb->nb; b++) {
    FN(prefetch)(jb, n0, b);
    FN(decode)(kind, p, idx, b, &dec);
    FN(apply)(kind, 1, 1, d, &a, b, acc);
  }
  FN(store_rows)(jb, n0, nv, m0, 1, acc);
}

/* several activation rows: the work item's two tiles (2 L output rows from n0; a tile past N
   repeats the last row and stores nothing) are decoded once into scratch, then 4 activation rows
   at a time run over them, each activation broadcast feeding both tiles */
GG_INLINE void FN(batch)(const int kind, const Job *jb, long n0, long m0, long m1, char *scratch) {
  const long db = FN(dec_bytes)(kind), nb = jb->nb;
  long nv[2];
  for (int t = 0; t < 2; t++) {
    const long nt = n0 + t * L < jb->N ? n0 + t * L : n0; /* an empty second tile redoes the first */
    const uint8_t *p[L];
    nv[t] = FN(tile_rows)(jb, nt, p);
    if (t == 1 && nt == n0) nv[1] = 0;
    const VI idx = FN(row_index)(nv[t] ? nv[t] : nv[0], jb->rb);
    for (long b = 0; b < nb; b++) {
      FN(prefetch)(jb, nt, b);
      FN(decode)(kind, p, idx, b, scratch + (t * nb + b) * db);
    }
  }
  for (long m = m0; m < m1; m += 4) {
    const long nr = m1 - m < 4 ? m1 - m : 4;
    FN(Rows) a;
    FN(rows)(kind, 4, jb, m, nr, &a);
    VF acc[8];
    for (int i = 0; i < 8; i++) acc[i] = FZERO();
    for (long b = 0; b < nb; b++) {
      const void *d[2] = {scratch + b * db, scratch + (nb + b) * db};
      FN(apply)(kind, 4, 2, d, &a, b, acc);
    }
    for (int t = 0; t < 2; t++)
      if (nv[t]) FN(store_rows)(jb, n0 + t * L, nv[t], m, nr, acc + 4 * t);
  }
}

/* one work item: output rows [n0, n0 + L) (M = 1) or [n0, n0 + 2 L) (M > 1) x activation rows
   [m0, m1); scratch: 2 nb decoded blocks */
GG_INLINE void FN(tile)(const int kind, const Job *jb, long n0, long m0, long m1, char *scratch) {
  if (jb->M == 1) FN(single)(kind, jb, n0, m0);
  else FN(batch)(kind, jb, n0, m0, m1, scratch);
}

#define GG_TILE(NAME, KIND) \
  static void FN(NAME)(const Job *j, long n0, long m0, long m1, char *s) { FN(tile)(KIND, j, n0, m0, m1, s); }
GG_TILE(tile_q4_0, Q4_0)
GG_TILE(tile_q4_1, Q4_1)
GG_TILE(tile_q5_0, Q5_0)
GG_TILE(tile_q5_1, Q5_1)
GG_TILE(tile_q8_0, Q8_0)
GG_TILE(tile_q4_k, Q4_K)
GG_TILE(tile_q5_k, Q5_K)
GG_TILE(tile_q6_k, Q6_K)
#undef GG_TILE

#if GG_TEMPLATE != 4 /* the activation quantisation does not need VNNI: v3 serves v4 too */
/* one row: amax, dx = amax / 127, q = rint(x * (127 / amax)) (NaN -> 0, clamp), sums per 16 */
static void FN(quant_row)(const float *x, long K, int block, int8_t *q, float *dx, int32_t *sums) {
  for (long b = 0; b < K / block; b++) {
    const float *xb = x + b * block;
#if L == 16
    __m512 mx = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int i = 0; i < block; i += L) {
      const __m512 v = _mm512_loadu_ps(xb + i);
      mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    float amax = _mm512_reduce_max_ps(mx);
#else
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_setzero_ps(), nanv = _mm256_setzero_ps();
    for (int i = 0; i < block; i += L) {
      const __m256 v = _mm256_loadu_ps(xb + i);
      mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v));
      nanv = _mm256_or_ps(nanv, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float t[8], amax = 0.0f;
    _mm256_storeu_ps(t, mx);
    for (int i = 0; i < 8; i++) amax = t[i] > amax ? t[i] : amax;
    const int nan = _mm256_movemask_ps(nanv);
#endif
    if (nan) amax = NAN;
    dx[b] = amax / 127.0f;
    const float s = amax > 0.0f ? 127.0f / amax : 0.0f;
    const VF vs = FSET1(s), lo = FSET1(-127.0f), hi = FSET1(127.0f);
    for (int i = 0; i < block; i += 16) {
#if L == 16
      __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(xb + i), vs), _MM_FROUND_TO_NEAREST_INT);
      r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(r, r, _CMP_ORD_Q), r); /* NaN -> 0 */
      const __m512i v = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi));
      _mm_storeu_si128((__m128i *)(q + b * block + i), _mm512_cvtepi32_epi8(v));
      sums[(b * block + i) / 16] = _mm512_reduce_add_epi32(v);
#else
      int32_t s16 = 0;
      for (int h = 0; h < 16; h += 8) {
        __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + i + h), vs), _MM_FROUND_TO_NEAREST_INT);
        r = _mm256_and_ps(r, _mm256_cmp_ps(r, r, _CMP_ORD_Q)); /* NaN -> 0 */
        const __m256i v = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
        int32_t u[8];
        _mm256_storeu_si256((__m256i *)u, v);
        for (int k = 0; k < 8; k++) { q[b * block + i + h + k] = (int8_t)u[k]; s16 += u[k]; }
      }
      sums[(b * block + i) / 16] = s16;
#endif
    }
  }
}
#endif

#undef L
#undef M4
#undef Q8_BIAS
#undef VSET1
#undef VZERO
#undef VADD
#undef VSUB
#undef VAND
#undef VOR
#undef VSRL
#undef VSLL
#undef VSRA
#undef VMUL
#undef VANDOR
#undef FCVT
#undef FMUL
#undef FADD
#undef FSUB
#undef FSET1
#undef FZERO
#undef FN
#undef VI
#undef VF
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif /* GG_TEMPLATE */
