/* ditto integer elementwise kernels: torch-exact int64 chains of the integer numerics mode
   (wrapped by ditto/numerics/kernels/integer_elementwise_c.py, whose docstring maps each kernel to
   the torch chain it reproduces). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ditto_int.h"

/* ---------------------------------------------------------------- quantize_rows */
/* integer_ops.quantize_rows of one row of K >= 1 values: q (K,) int8, *a16, *sa. */
#define DEF_QUANT_ROW(NAME, T)                                                                  \
  static void NAME(const T *restrict x, long K, int8_t *restrict q, i64 *a16, i64 *sa) {        \
    i64 amax = INT64_MIN;                                                                       \
    for (long k = 0; k < K; k++) amax = tmax(amax, tabs((i64)x[k]));                            \
    const i64 s = tmax(bitlen(amax) - 15, 0);                                                   \
    const i64 a = tmax(tshr(wsub(wadd(amax, tshl(1, s)), 1), s), 1);                           \
    const i64 recip = ((127LL << 38) + (a >> 1)) / a; /* a >= 1: C division is the floor */     \
    const i64 sh = 38 + s, rt = round_term(sh);                                                 \
    const int shc = sh > 63 ? 63 : (int)sh;                                                     \
    for (long k = 0; k < K; k++) {                                                              \
      const i64 v = wadd(wmul((i64)x[k], recip), rt) >> shc;                                    \
      q[k] = (int8_t)tclamp(v, -127, 127);                                                      \
    }                                                                                           \
    *a16 = a;                                                                                   \
    *sa = s;                                                                                    \
  }
DEF_QUANT_ROW(quant_row32, int32_t)
DEF_QUANT_ROW(quant_row64, i64)

/* x (T, K) with row stride ldx -> q (T, K) int8, a16 (T,), sa (T,) int64. */
void ditto_quantize_i32(const int32_t *x, long T, long K, long ldx, int8_t *q, i64 *a16, i64 *sa) {
  #pragma omp parallel for schedule(static)
  for (long t = 0; t < T; t++) quant_row32(x + t * ldx, K, q + t * K, a16 + t, sa + t);
}

void ditto_quantize_i64(const i64 *x, long T, long K, long ldx, int8_t *q, i64 *a16, i64 *sa) {
  #pragma omp parallel for schedule(static)
  for (long t = 0; t < T; t++) quant_row64(x + t * ldx, K, q + t * K, a16 + t, sa + t);
}

/* ---------------------------------------------------------------- linear epilogue */
/* IntLinear.epilogue on columns [c0, c1) of one row: ((acc * a16 * m_c + rt) >> sh) + bias_c,
   clamped to [lo, hi]; sh = shift - sa is constant over a part. */
static inline void epi_cols(const int32_t *restrict acc, i64 a, const i64 *restrict m, const i64 *restrict bias,
                            long c0, long c1, i64 sh, i64 lo, i64 hi, i64 *restrict y) {
  const i64 rt = round_term(sh);
  const u64 us = (u64)sh;
  const int s = us > 63 ? 63 : (int)us;
  if (bias)
    for (long c = c0; c < c1; c++)
      y[c - c0] = tclamp(wadd(wadd(wmul(wmul(acc[c], a), m[c]), rt) >> s, bias[c]), lo, hi);
  else
    for (long c = c0; c < c1; c++) y[c - c0] = tclamp(wadd(wmul(wmul(acc[c], a), m[c]), rt) >> s, lo, hi);
}

#define EPI_BLOCK 512

/* acc (T, N) int32 (row stride lda), parts [seg_end[j-1], seg_end[j]) with shift seg_shift[j] and
   clamp [seg_lo[j], seg_hi[j]]; out (T, N) int32 (when outf is NULL) or float32 y * fscale. */
void ditto_epilogue(const int32_t *acc, long T, long N, long lda, const i64 *a16, const i64 *sa, const i64 *m,
                    const i64 *bias, long nseg, const i64 *seg_end, const i64 *seg_shift, const i64 *seg_lo,
                    const i64 *seg_hi, int32_t *out, float *outf, float fscale) {
  const long nb = (N + EPI_BLOCK - 1) / EPI_BLOCK;
  #pragma omp parallel for schedule(static)
  for (long it = 0; it < T * nb; it++) {
    const long t = it / nb, b0 = (it % nb) * EPI_BLOCK, b1 = b0 + EPI_BLOCK < N ? b0 + EPI_BLOCK : N;
    i64 y[EPI_BLOCK];
    long start = 0;
    for (long j = 0; j < nseg; j++) {
      const long c0 = start > b0 ? start : b0, c1 = seg_end[j] < b1 ? seg_end[j] : b1;
      start = seg_end[j];
      if (c0 >= c1) continue;
      epi_cols(acc + t * lda, a16[t], m, bias, c0, c1, wsub(seg_shift[j], sa[t]), seg_lo[j], seg_hi[j], y);
      if (outf)
        for (long c = c0; c < c1; c++) outf[t * N + c] = (float)y[c - c0] * fscale;
      else
        for (long c = c0; c < c1; c++) out[t * N + c] = (int32_t)y[c - c0];
    }
  }
}

/* ---------------------------------------------------------------- activations */
/* Loop constants of the activations for Q.frac, 0 <= frac <= 24 (so every shift count below is a
   constant in [0, 62] and the row loops vectorise): F = frac + 14 (exp2_neg_fixed's format), the
   gelu dyadics cm / 2^ce = 0.044715, km / 2^ke = 2 sqrt(2/pi). */
typedef struct { int frac, F; i64 rtw, rtf, b16, cm, ce, rtce, km, ke, rtke; } Act;

static Act act_consts(int frac, const i64 *g) {
  const Act a = {frac, frac + 14, round_term(frac + 4), round_term(frac), 16LL << frac,
                 g[0], g[1], round_term(g[1]), g[2], g[3], round_term(g[3])};
  return a;
}

/* integer_ops.sigmoid_int(x, frac) in Q30 (exp_neg_fixed -> exp2_neg_fixed with the exp2 table). */
static inline i64 sigmoid_q30(i64 x, const Act *c, const i64 *restrict tab) {
  const i64 ax0 = tabs(x);                                  /* < 0 only for x = INT64_MIN: torch gives e = 0 */
  const i64 ax = ax0 < 0 ? 0 : tmin(ax0, 4294967295LL);    /* x.abs().clamp(max=2^32 - 1) */
  const i64 t = (ax * LOG2E_Q30 + (1LL << 15)) >> 16;       /* exp_neg_fixed(-ax): t < 2^47 */
  const int F = c->F;
  const i64 k = tmin(t >> F, 62);                           /* exp2_neg_fixed(t, F), F >= 14 */
  const i64 f = t & ((1LL << F) - 1);
  const i64 idx = f >> (F - 10), w = f & ((1LL << (F - 10)) - 1);
  const i64 lo = tab[idx], hi = tab[tmin(idx + 1, 1024)];
  const i64 val = lo + (((hi - lo) * w + c->rtw) >> (F - 10)); /* |(hi - lo) w| < 2^48 */
  i64 e = (val + RT[k]) >> k;                               /* rshift_round(val, k), 0 <= k <= 62 */
  e = ax0 < 0 ? 0 : e;                                      /* 0 <= e <= 2^30 */
  /* pos = (2^60 + (d >> 1)) // d, d = e + 2^30 in [2^30, 2^31]: double quotient, then exact floor */
  const i64 d = e + Q30_ONE, num = (1LL << 60) + (d >> 1);
  i64 q = (i64)((double)num / (double)d);
  i64 r = num - q * d;
  q = r < 0 ? q - 1 : q;
  r = r < 0 ? r + d : r;
  q = r >= d ? q + 1 : q;
  return x >= 0 ? q : Q30_ONE - q;
}

/* integer_ops.silu_int (gelu == 0) / gelu_tanh_int (gelu == 1) at Q.frac */
static inline i64 act_int(i64 x, int gelu, const Act *c, const i64 *restrict tab) {
  i64 z = x;
  if (gelu) {
    const int fr = c->frac;
    const i64 xc = tclamp(x, -c->b16, c->b16);
    const i64 sq = wadd(wmul(xc, xc), c->rtf) >> fr;
    const i64 cube = wadd(wmul(sq, xc), c->rtf) >> fr;
    const i64 inner = wadd(xc, wadd(wmul(cube, c->cm), c->rtce) >> c->ce);
    z = wadd(wmul(inner, c->km), c->rtke) >> c->ke;
  }
  return wadd(wmul(x, sigmoid_q30(z, c, tab)), 1LL << 29) >> 30;
}

/* integer_ops.sigmoid_int(x, frac) of n values (the activations' core, exported for tests) */
void ditto_sigmoid(const i64 *x, long n, int frac, const i64 *tab, i64 *out) {
  const i64 g[4] = {0, 0, 0, 0};
  const Act c = act_consts(frac, g);
  for (long i = 0; i < n; i++) out[i] = sigmoid_q30(x[i], &c, tab);
}

/* ---------------------------------------------------------------- MLP */
/* IntMLP: acc (T, 2I) int32 of the fused gate|up GEMM (row stride lda), a16 / sa (T,); m, bias (2I,)
   (bias may be NULL); part shifts / clamps shift[2], lo[2], hi[2]; act 0 = silu, 1 = gelu_tanh at
   Q.frac; h = gate_act * up, rshift_round(h, pshift) (pshift >= 0) or h << -pshift, clamped to
   [-hlim, hlim]; then quantize_rows -> q (T, I), oa16, osa (T,), or h itself into raw (T, I) when raw
   is not NULL. Returns -1 when out of memory. */
long ditto_mlp(const int32_t *acc, long T, long I, long lda, const i64 *a16, const i64 *sa, const i64 *m,
               const i64 *bias, const i64 *shift, const i64 *lo, const i64 *hi, int act, int frac, const i64 *gconst,
               i64 pshift, i64 hlim, const i64 *tab, int8_t *q, i64 *oa16, i64 *osa, i64 *raw) {
  const Act ac = act_consts(frac, gconst);
  long oom = 0;
  #pragma omp parallel reduction(+:oom)
  {
    i64 *g = (i64 *)malloc(sizeof(i64) * (size_t)(2 * I));
    #pragma omp for schedule(static)
    for (long t = 0; t < T; t++) {
      if (!g) { oom++; continue; }
      i64 *u = g + I;
      const int32_t *row = acc + t * lda;
      epi_cols(row, a16[t], m, bias, 0, I, wsub(shift[0], sa[t]), lo[0], hi[0], g);
      epi_cols(row, a16[t], m, bias, I, 2 * I, wsub(shift[1], sa[t]), lo[1], hi[1], u);
      if (act == 1)
        for (long c = 0; c < I; c++) g[c] = act_int(g[c], 1, &ac, tab);
      else
        for (long c = 0; c < I; c++) g[c] = act_int(g[c], 0, &ac, tab);
      const i64 rt = round_term(pshift);
      for (long c = 0; c < I; c++) {
        const i64 p = wmul(g[c], u[c]);
        const i64 h = pshift >= 0 ? tshr(wadd(p, rt), pshift) : tshl(p, -pshift);
        g[c] = tclamp(h, -hlim, hlim);
      }
      if (raw) memcpy(raw + t * I, g, sizeof(i64) * (size_t)I);
      else quant_row64(g, I, q + t * I, oa16 + t, osa + t);
    }
    free(g);
  }
  return oom ? -1 : 0;
}

/* ---------------------------------------------------------------- RMSNorm */
/* integer_ops.isqrt: Newton's method from 2^ceil(bits/2), stopping when the step stops decreasing. */
static inline i64 isqrt_torch(i64 n) {
  if (n == 0) return 0;
  const i64 sn = n < 1 ? 1 : n;
  i64 x = tshl(1, (bitlen(n) + 1) >> 1);
  for (;;) {
    const i64 nxt = wadd(x, sn / x) >> 1;
    if (nxt >= x) return x;
    x = nxt;
  }
}

typedef struct {
  const i64 *gm;  /* (D,) gamma_m */
  i64 ge, eps_term, b, oshift;  /* gamma_e, min(eps_int * D, 2^60), (61 - ceil(log2 D)) // 2, IntRMSNorm.shift */
} Norm;

/* IntRMSNorm.forward of one row (rmsnorm_int, then << oshift or rshift_round by -oshift, then int32). */
static void rmsnorm_row(const int32_t *restrict x, long D, const Norm *nm, int32_t *restrict y) {
  i64 amax = INT64_MIN;
  for (long i = 0; i < D; i++) amax = tmax(amax, tabs((i64)x[i]));
  const i64 sh = tmax(bitlen(amax) - nm->b, 0), rsh = round_term(sh);
  const int shc = sh > 63 ? 63 : (int)sh;
  i64 ss = 0;
  for (long i = 0; i < D; i++) {
    const i64 xs = wadd(x[i], rsh) >> shc;
    ss = wadd(ss, wmul(xs, xs));
  }
  ss = tmax(wadd(ss, tshr(nm->eps_term, 2 * sh)), 1);
  const i64 u = tmax((62 - bitlen(ss)) >> 1, 0);
  const i64 r = isqrt_torch(tshl(ss, 2 * u));
  const i64 inv = (1LL << 62) / r;
  const i64 k1 = tmax(bitlen(tshr(amax, sh)) - 5, 0);
  const i64 shift = 62 + nm->ge - u - k1, pre = tmax(shift - 62, 0), e = shift - pre;
  const i64 os = nm->oshift;
  for (long i = 0; i < D; i++) {
    const i64 xs = wadd(x[i], rsh) >> shc;
    const i64 t = rshift_round(rshift_round(wmul(xs, inv), k1), pre);
    const i64 v = rshift_round(wmul(t, nm->gm[i]), e);
    y[i] = (int32_t)(os >= 0 ? tshl(v, os) : rshift_round(v, -os));
  }
}

/* x (T, D) int32 (row stride ldx) -> y (T, D) int32 */
void ditto_rmsnorm(const int32_t *x, long T, long D, long ldx, const i64 *gm, i64 ge, i64 eps_term, i64 b,
                   i64 oshift, int32_t *y) {
  const Norm nm = {gm, ge, eps_term, b, oshift};
  #pragma omp parallel for schedule(static)
  for (long t = 0; t < T; t++) rmsnorm_row(x + t * ldx, D, &nm, y + t * D);
}

/* ---------------------------------------------------------------- attention heads */
/* x (T, Hx, D) int32 (token stride ldx, head stride D) -> per head: IntRMSNorm (when gm != NULL),
   rope_int at position pos[t] with Q1.frac tables cos / sin (P, D/2) int32, quantize_rows ->
   q (T, Hx, D) int8, a16 / sa (T, Hx), or the RoPE output into raw (T, Hx, D) when raw is not NULL.
   Returns -1 when out of memory. */
long ditto_head_post(const int32_t *x, long T, long Hx, long D, long ldx, const i64 *gm, i64 ge, i64 eps_term,
                     i64 b, i64 oshift, const i64 *pos, const int32_t *cos_t, const int32_t *sin_t, i64 frac, int8_t *q,
                     i64 *a16, i64 *sa, i64 *raw) {
  const Norm nm = {gm, ge, eps_term, b, oshift};
  const long half = D / 2;
  long oom = 0;
  #pragma omp parallel reduction(+:oom)
  {
    int32_t *yn = (int32_t *)malloc(sizeof(int32_t) * (size_t)D);
    i64 *yr = (i64 *)malloc(sizeof(i64) * (size_t)D);
    #pragma omp for schedule(static)
    for (long it = 0; it < T * Hx; it++) {
      if (!yn || !yr) { oom++; continue; }
      const long t = it / Hx, h = it % Hx;
      const int32_t *xr = x + t * ldx + h * D;
      if (gm) { rmsnorm_row(xr, D, &nm, yn); xr = yn; }
      const int32_t *c = cos_t + pos[t] * half, *s = sin_t + pos[t] * half;
      const i64 rt = round_term(frac);
      const u64 uf = (u64)frac;
      const int fs = uf > 63 ? 63 : (int)uf;
      for (long i = 0; i < half; i++) {
        const i64 x1 = xr[i], x2 = xr[half + i];
        yr[i] = wadd(wsub(wmul(x1, c[i]), wmul(x2, s[i])), rt) >> fs;
        yr[half + i] = wadd(wadd(wmul(x2, c[i]), wmul(x1, s[i])), rt) >> fs;
      }
      if (raw) memcpy(raw + it * D, yr, sizeof(i64) * (size_t)D);
      else quant_row64(yr, D, q + it * D, a16 + it, sa + it);
    }
    free(yn);
    free(yr);
  }
  return oom ? -1 : 0;
}

/* o (T, N) int64 -> requantise(o, m, e) (per column), clamp [lo, hi], quantize_rows -> q (T, N), a16, sa (T,),
   or the clamped values into raw (T, N) when raw is not NULL. Returns -1 when out of memory. */
long ditto_requant_quant(const i64 *o, long T, long N, const i64 *m, const i64 *e, i64 lo, i64 hi, int8_t *q,
                         i64 *a16, i64 *sa, i64 *raw) {
  long oom = 0;
  #pragma omp parallel reduction(+:oom)
  {
    i64 *y = (i64 *)malloc(sizeof(i64) * (size_t)N);
    #pragma omp for schedule(static)
    for (long t = 0; t < T; t++) {
      if (!y) { oom++; continue; }
      const i64 *r = o + t * N;
      for (long c = 0; c < N; c++) y[c] = tclamp(rshift_round(wmul(r[c], m[c]), e[c]), lo, hi);
      if (raw) memcpy(raw + t * N, y, sizeof(i64) * (size_t)N);
      else quant_row64(y, N, q + t * N, a16 + t, sa + t);
    }
    free(y);
  }
  return oom ? -1 : 0;
}

/* ---------------------------------------------------------------- fused layer steps */
/* The steps of one decoder layer between its int8 GEMMs, each one call for every token row (the lean
   layer of ditto/numerics/integer_lean.py): the same chains as the calls above, in the same order. */

/* One or several fused IntLinear epilogues (the arguments of ditto_epilogue, gathered). */
typedef struct {
  const i64 *m, *bias, *seg_end, *seg_shift, *seg_lo, *seg_hi;
  long nseg;
} Epi;

/* The epilogue of one acc row (N columns) -> int32 y (the .to(int32) of IntLinear.forward). */
static void epi_row(const int32_t *restrict acc, i64 a, i64 s, const Epi *ep, long N, i64 *restrict tmp,
                    int32_t *restrict y) {
  long start = 0;
  for (long j = 0; j < ep->nseg; j++) {
    const long c1 = ep->seg_end[j] < N ? ep->seg_end[j] : N;
    if (start < c1) {
      epi_cols(acc, a, ep->m, ep->bias, start, c1, wsub(ep->seg_shift[j], s), ep->seg_lo[j], ep->seg_hi[j], tmp);
      for (long c = start; c < c1; c++) y[c] = (int32_t)tmp[c - start];
    }
    start = ep->seg_end[j];
  }
}

/* Per token row t: y = the epilogue of acc[t] (int32; skipped when acc is NULL), then the post norm
   (Gemma's sandwich norm, when post is not NULL), then the residual add x[t] += y (int32, wrapping like
   torch); then z = IntRMSNorm `next` of x[t], written to z (when not NULL) and quantized (quantize_rows)
   into q, qa16, qsa (when q is not NULL). x, z (T, N) int32 with row stride N; acc (T, N) with row
   stride lda. Returns -1 when out of memory. */
long ditto_res_norm_quant(long T, long N, const int32_t *acc, long lda, const i64 *a16, const i64 *sa,
                          const Epi *ep, const Norm *post, int32_t *x, const Norm *next, int32_t *z, int8_t *q,
                          i64 *qa16, i64 *qsa) {
  long oom = 0;
  #pragma omp parallel reduction(+:oom)
  {
    i64 *tmp = (i64 *)malloc(sizeof(i64) * (size_t)N);
    int32_t *y = (int32_t *)malloc(sizeof(int32_t) * (size_t)(2 * N)), *yn = y ? y + N : NULL;
    #pragma omp for schedule(static)
    for (long t = 0; t < T; t++) {
      if (!tmp || !y) { oom++; continue; }
      int32_t *xr = x + t * N;
      if (acc) {
        epi_row(acc + t * lda, a16[t], sa[t], ep, N, tmp, y);
        const int32_t *h = y;
        if (post) { rmsnorm_row(y, N, post, yn); h = yn; }
        for (long c = 0; c < N; c++) xr[c] = (int32_t)((uint32_t)xr[c] + (uint32_t)h[c]);
      }
      int32_t *zr = z ? z + t * N : yn;
      rmsnorm_row(xr, N, next, zr);
      if (q) quant_row32(zr, N, q + t * N, qa16 + t, qsa + t);
    }
    free(tmp);
    free(y);
  }
  return oom ? -1 : 0;
}

/* One head row of int32 y (D,): IntRMSNorm (when nm) -> rope_int at table rows c, s -> quantize_rows. */
static void head_row(const int32_t *restrict y, long D, const Norm *nm, const int32_t *restrict c,
                     const int32_t *restrict s, i64 frac, int32_t *restrict yn, i64 *restrict yr, int8_t *q,
                     i64 *a16, i64 *sa) {
  if (nm) { rmsnorm_row(y, D, nm, yn); y = yn; }
  const long half = D / 2;
  const i64 rt = round_term(frac);
  const u64 uf = (u64)frac;
  const int fs = uf > 63 ? 63 : (int)uf;
  for (long i = 0; i < half; i++) {
    const i64 x1 = y[i], x2 = y[half + i];
    yr[i] = wadd(wsub(wmul(x1, c[i]), wmul(x2, s[i])), rt) >> fs;
    yr[half + i] = wadd(wadd(wmul(x2, c[i]), wmul(x1, s[i])), rt) >> fs;
  }
  quant_row64(yr, D, q, a16, sa);
}

/* IntAttention from the fused qkv GEMM to the attention's inputs, per token row t: y = the q|k|v
   epilogues of acc[t] (int32); each of the H query heads -> head_row (q_norm, RoPE at pos[t], quantize)
   into q8 (T, H, D), qa16, qsa (T, H); each of the Hkv key heads -> head_row (k_norm) stored in the cache
   at slot slots[t]: k8c (S, Hkv, D) int8, kac (S, Hkv) int32, ksc (S, Hkv) int8; the value heads
   y.to(int8) into v8c (S, Hkv, D). Returns -1 when out of memory. */
long ditto_qkv_post(long T, const int32_t *acc, long lda, const i64 *a16, const i64 *sa, const Epi *ep, long H,
                    long Hkv, long D, const Norm *qn, const Norm *kn, const i64 *pos, const int32_t *cos_t,
                    const int32_t *sin_t, i64 frac, int8_t *q8, i64 *qa16, i64 *qsa, const i64 *slots,
                    int8_t *k8c, int32_t *kac, int8_t *ksc, int8_t *v8c) {
  const long N = (H + 2 * Hkv) * D, half = D / 2;
  long oom = 0;
  #pragma omp parallel reduction(+:oom)
  {
    i64 *tmp = (i64 *)malloc(sizeof(i64) * (size_t)(N > D ? N : D));
    int32_t *y = (int32_t *)malloc(sizeof(int32_t) * (size_t)(N + D));
    #pragma omp for schedule(static)
    for (long t = 0; t < T; t++) {
      if (!tmp || !y) { oom++; continue; }
      epi_row(acc + t * lda, a16[t], sa[t], ep, N, tmp, y);
      const int32_t *c = cos_t + pos[t] * half, *s = sin_t + pos[t] * half;
      int32_t *yn = y + N;
      for (long h = 0; h < H; h++) {
        const long i = t * H + h;
        head_row(y + h * D, D, qn, c, s, frac, yn, tmp, q8 + i * D, qa16 + i, qsa + i);
      }
      const i64 slot = slots[t];
      for (long h = 0; h < Hkv; h++) {
        const i64 i = slot * Hkv + h;
        i64 ka, ks;
        head_row(y + (H + h) * D, D, kn, c, s, frac, yn, tmp, k8c + i * D, &ka, &ks);
        kac[i] = (int32_t)ka;
        ksc[i] = (int8_t)ks;
        const int32_t *v = y + (H + Hkv + h) * D;
        for (long d = 0; d < D; d++) v8c[i * D + d] = (int8_t)v[d];
      }
    }
    free(tmp);
    free(y);
  }
  return oom ? -1 : 0;
}

/* ---------------------------------------------------------------- int8 GEMV */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define DITTO_GEMV_AVX512 1
#endif

/* y (N,) int32 = w (N, K) int8 (row-major, row stride K) . x (K,) int8, exact: the int32 sums of
   int8 x int8 products (|y| <= K 127^2 < 2^31 for K < 2^17), which any summation order gives.
   wsum (N,) = sum_k w[n, k] (the AVX-512 path adds 128 to x for the u8 x s8 instruction and takes
   128 wsum back off). Rows are split over OpenMP threads in blocks of 16. */
void ditto_gemv_s8(const int8_t *x, const int8_t *w, const int32_t *wsum, long N, long K, int32_t *y) {
  const long nb = (N + 15) / 16;
  #pragma omp parallel for schedule(static)
  for (long b = 0; b < nb; b++) {
    const long n0 = b * 16, nr = N - n0 < 16 ? N - n0 : 16;
#ifdef DITTO_GEMV_AVX512
    const long nch = (K + 63) / 64;
    const __mmask64 tail = (K % 64) ? (((__mmask64)1 << (K % 64)) - 1) : ~(__mmask64)0;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i part[16];
    for (int r = 0; r < 16; r++) part[r] = _mm512_setzero_si512();
    for (long c = 0; c < nch; c++) {
      const __mmask64 m = c == nch - 1 ? tail : ~(__mmask64)0;
      const __m512i xu = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, x + c * 64), flip);
      for (int r = 0; r < nr; r++)
        part[r] = _mm512_dpbusd_epi32(part[r], xu, _mm512_maskz_loadu_epi8(m, w + (n0 + r) * K + c * 64));
    }
    const __m512i sum = hsum16_epi32(part);
    const __mmask16 mk = (__mmask16)((1u << nr) - 1);
    const __m512i comp = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(mk, wsum + n0), 7);
    _mm512_mask_storeu_epi32(y + n0, mk, _mm512_sub_epi32(sum, comp));
#else
    (void)wsum;
    for (long r = 0; r < nr; r++) {
      const int8_t *wr = w + (n0 + r) * K;
      int32_t s = 0;
      for (long k = 0; k < K; k++) s += (int32_t)x[k] * (int32_t)wr[k];
      y[n0 + r] = s;
    }
#endif
  }
}

/* ---- setup: weight quantisation (integer.quant_weight), bit for bit torch's float32 ops ---------
   w' = (w * c[k]) / r[n]  (c, r optional: NULL skips the multiply / divide; two separately rounded
   float32 operations, as torch's elementwise mul and div), s = max|w'| / 127 (1 where that is not
   > 0), q = rint(w' / s) (half to even, as torch.round; |q| <= 127). Rows are independent. */
void ditto_quant_weight(const float *w, long N, long K, const float *c, const float *r, int8_t *q, float *s_out) {
#pragma omp parallel for schedule(static)
  for (long n = 0; n < N; n++) {
    const float *row = w + n * K;
    float lo = 0.0f, hi = 0.0f;
    int finite = 1;
    for (long k = 0; k < K; k++) {
      float v = row[k];
      if (c) v = v * c[k];
      if (r) v = v / r[n];
      finite &= isfinite(v) != 0;
      if (k == 0 || v < lo) lo = v;
      if (k == 0 || v > hi) hi = v;
    }
    if (!finite) { /* not the caller's case: it sees the NaN scale and takes torch's ops instead */
      s_out[n] = NAN;
      continue;
    }
    float s = (-lo > hi ? -lo : hi) / 127.0f;
    if (!(s > 0.0f)) s = 1.0f;
    s_out[n] = s;
    for (long k = 0; k < K; k++) {
      float v = row[k];
      if (c) v = v * c[k];
      if (r) v = v / r[n];
      q[n * K + k] = (int8_t)rintf(v / s);
    }
  }
}

/* max over rows of |w[n, k]| per column k (integer._col_absmax; exact: a maximum rounds nothing) */
void ditto_col_absmax(const float *w, long N, long K, float *out) {
  for (long k = 0; k < K; k++) out[k] = 0.0f;
  for (long n = 0; n < N; n++) {
    const float *row = w + n * K;
    for (long k = 0; k < K; k++) {
      const float a = fabsf(row[k]);
      if (a > out[k]) out[k] = a;
    }
  }
}
