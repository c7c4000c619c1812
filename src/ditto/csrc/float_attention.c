/* ditto float attention over a paged KV cache: K (NB, Hkv, D, bs), V (NB, Hkv, bs, D). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* exp(x) for x <= 0 (scores minus their max): Cephes-style range reduction x = k ln2 + r and a degree-6
   polynomial, all in explicit fmaf, so it vectorises and gives the same bits wherever it is built
   (no libm). Within ~2 ulp of expf; 0 below -87 (where expf is denormal or 0). */
static inline float exp_neg(float x) {
  const float magic = 12582912.f;                       /* 1.5 * 2^23: adding it rounds to an integer */
  const float xc = x < -87.f ? -87.f : x;
  const float k = fmaf(xc, 1.44269504088896341f, magic) - magic;
  float r = fmaf(k, -0.693359375f, xc);
  r = fmaf(k, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  const float y = fmaf(p, r * r, r) + 1.f;
  const int32_t bits = ((int32_t)k + 127) << 23;        /* 2^k, k in [-126, 0] */
  float scale;
  memcpy(&scale, &bits, 4);
  return x < -87.f ? 0.f : y * scale;
}

static inline float bf16f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline float f16f(uint16_t h) { _Float16 f; memcpy(&f, &h, 2); return (float)f; }

/* One work item, all loops over the keys block by block (no division per key). The body is inlined
   into the callers below with constant block size / head dim where they are the usual ones, so the
   inner loops become fixed-length vector code; the arithmetic (and so every bit) is the same. */
#define ITEM(NAME, T, LOAD)                                                                            \
static inline __attribute__((always_inline)) void NAME##_body(                                         \
    const float *q, const T *K, const T *V, const long Hkv, const long D, const long G, const long bs,  \
    const int64_t *trw, const int64_t lo, const int64_t cnt, const long g, float *sc, float *o) {      \
  float acc[G * bs], row[D > bs ? D : bs], sum[G], ob[G * D]; /* ob: o, kept local (no aliasing) */        \
  int64_t l = 0;                                                                                       \
  for (int64_t p = lo; p < lo + cnt;) { /* scores: one fmaf chain over d per key (all bs slots) */      \
    const int64_t b = trw[p / bs], s0 = p % bs;                                                        \
    const int64_t s1 = lo + cnt - p < bs - s0 ? s0 + (lo + cnt - p) : bs;                              \
    const T *kb = K + (b * Hkv + g) * D * bs;                                                          \
    for (long i = 0; i < G * bs; i++) acc[i] = 0.f;                                                    \
    for (long d = 0; d < D; d++) {                                                                     \
      for (long s = 0; s < bs; s++) row[s] = LOAD(kb[d * bs + s]);                                     \
      for (long j = 0; j < G; j++) {                                                                   \
        const float qd = q[j * D + d];                                                                 \
        for (long s = 0; s < bs; s++) acc[j * bs + s] = fmaf(qd, row[s], acc[j * bs + s]);             \
      }                                                                                                \
    }                                                                                                  \
    for (long j = 0; j < G; j++)                                                                       \
      for (int64_t s = s0; s < s1; s++) sc[j * cnt + l + s - s0] = acc[j * bs + s];                    \
    l += s1 - s0;                                                                                      \
    p += s1 - s0;                                                                                      \
  }                                                                                                    \
  /* softmax numerators and their sums: each head's max and sum run in key order, the G heads'         \
     chains side by side (independent, so they overlap instead of waiting on one another) */           \
  float mx[G];                                                                                         \
  for (long j = 0; j < G; j++) mx[j] = sc[j * cnt];                                                    \
  for (int64_t i = 1; i < cnt; i++)                                                                    \
    for (long j = 0; j < G; j++) mx[j] = sc[j * cnt + i] > mx[j] ? sc[j * cnt + i] : mx[j];            \
  for (long j = 0; j < G; j++)                                                                         \
    for (int64_t i = 0; i < cnt; i++) sc[j * cnt + i] = exp_neg(sc[j * cnt + i] - mx[j]);              \
  for (long j = 0; j < G; j++) sum[j] = 0.f;                                                           \
  for (int64_t i = 0; i < cnt; i++)                                                                    \
    for (long j = 0; j < G; j++) sum[j] += sc[j * cnt + i];                                            \
  for (long i = 0; i < G * D; i++) ob[i] = 0.f;                                                        \
  l = 0;                                                                                               \
  for (int64_t p = lo; p < lo + cnt;) { /* o_j = sum_l e_jl v_l: one fmaf chain per channel */          \
    const int64_t b = trw[p / bs], s0 = p % bs;                                                        \
    const int64_t s1 = lo + cnt - p < bs - s0 ? s0 + (lo + cnt - p) : bs;                              \
    const T *vb = V + (b * Hkv + g) * bs * D;                                                          \
    for (int64_t s = s0; s < s1; s++, l++) {                                                           \
      for (long d = 0; d < D; d++) row[d] = LOAD(vb[s * D + d]);                                       \
      for (long j = 0; j < G; j++) {                                                                   \
        const float e = sc[j * cnt + l];                                                               \
        for (long d = 0; d < D; d++) ob[j * D + d] = fmaf(e, row[d], ob[j * D + d]);                   \
      }                                                                                                \
    }                                                                                                  \
    p += s1 - s0;                                                                                      \
  }                                                                                                    \
  for (long j = 0; j < G; j++)                                                                         \
    for (long d = 0; d < D; d++) o[j * D + d] = ob[j * D + d] / sum[j];                                \
}                                                                                                      \
static void NAME(const float *q, const T *K, const T *V, long Hkv, long D, long G, long bs,              \
                 const int64_t *trw, int64_t lo, int64_t cnt, long g, float *sc, float *o) {            \
  /* constant head dim, block size and group size: accumulators live in registers */                   \
  if (bs == 16 && D == 64 && G == 3) NAME##_body(q, K, V, Hkv, 64, 3, 16, trw, lo, cnt, g, sc, o);      \
  else if (bs == 16 && D == 64 && G == 4) NAME##_body(q, K, V, Hkv, 64, 4, 16, trw, lo, cnt, g, sc, o); \
  else if (bs == 16 && D == 64 && G == 7) NAME##_body(q, K, V, Hkv, 64, 7, 16, trw, lo, cnt, g, sc, o); \
  else if (bs == 16 && D == 64) NAME##_body(q, K, V, Hkv, 64, G, 16, trw, lo, cnt, g, sc, o);           \
  else if (bs == 16 && D == 128 && G == 2) NAME##_body(q, K, V, Hkv, 128, 2, 16, trw, lo, cnt, g, sc, o); \
  else if (bs == 16 && D == 128 && G == 4) NAME##_body(q, K, V, Hkv, 128, 4, 16, trw, lo, cnt, g, sc, o); \
  else if (bs == 16 && D == 128 && G == 7) NAME##_body(q, K, V, Hkv, 128, 7, 16, trw, lo, cnt, g, sc, o); \
  else if (bs == 16 && D == 128) NAME##_body(q, K, V, Hkv, 128, G, 16, trw, lo, cnt, g, sc, o);         \
  else if (bs == 16 && D == 256 && G == 4) NAME##_body(q, K, V, Hkv, 256, 4, 16, trw, lo, cnt, g, sc, o); \
  else if (bs == 16 && D == 256) NAME##_body(q, K, V, Hkv, 256, G, 16, trw, lo, cnt, g, sc, o);         \
  else NAME##_body(q, K, V, Hkv, D, G, bs, trw, lo, cnt, g, sc, o);                                    \
}

#define LOAD_F32(x) (x)
#define LOAD_BF16(x) bf16f(x)
#define LOAD_F16(x) f16f(x)
ITEM(item_f32, float, LOAD_F32)
ITEM(item_bf16, uint16_t, LOAD_BF16)
ITEM(item_f16, uint16_t, LOAD_F16)

/* q (T, H, D) fp32 (already scaled); n query rows: row i is token tok[i] at position pos[i], keys
   through table row trow[i] of table (R, tstride); window -1 = none; kind 0 fp32, 1 bf16, 2 fp16.
   out (T, H, D) fp32, rows tok[i] written. Returns 0, or -1 when scratch memory ran out. */
long ditto_attend(const float *q, long H, long Hkv, long D, const void *K, const void *V, long bs, int kind,
                  long n, const int64_t *tok, const int64_t *pos, const int64_t *table, long tstride,
                  const int64_t *trow, long window, float *out) {
  const long G = H / Hkv;
  int64_t lmax = 1;
  for (long i = 0; i < n; i++) lmax = pos[i] + 1 > lmax ? pos[i] + 1 : lmax;
  long oom = 0;
  #pragma omp parallel reduction(+:oom)
  {
    float *sc = (float *)malloc(sizeof(float) * (size_t)(G * lmax));
    #pragma omp for schedule(dynamic, 1)
    for (long it = 0; it < n * Hkv; it++) {
      const long i = it / Hkv, g = it % Hkv;
      if (!sc) { oom++; continue; }
      int64_t lo = 0;
      if (window >= 0) { lo = pos[i] - window + 1; lo = lo < 0 ? 0 : lo; }
      const int64_t cnt = pos[i] - lo + 1;
      float *o = out + (tok[i] * H + g * G) * D;
      if (cnt <= 0) { memset(o, 0, sizeof(float) * (size_t)(G * D)); continue; }
      const float *qi = q + (tok[i] * H + g * G) * D;
      const int64_t *trw = table + trow[i] * tstride;
      const uint16_t *K16 = (const uint16_t *)K, *V16 = (const uint16_t *)V;
      if (kind == 0) item_f32(qi, (const float *)K, (const float *)V, Hkv, D, G, bs, trw, lo, cnt, g, sc, o);
      else if (kind == 1) item_bf16(qi, K16, V16, Hkv, D, G, bs, trw, lo, cnt, g, sc, o);
      else item_f16(qi, K16, V16, Hkv, D, G, bs, trw, lo, cnt, g, sc, o);
    }
    free(sc);
  }
  return oom ? -1 : 0;
}
