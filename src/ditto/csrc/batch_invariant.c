/* ditto batch-invariant linear: y[m, n] = fmachain_k(x[m, k] * w[n, k]) (+ bias[n]).
   Every output element is one sequential FMA chain over k = 0..K-1 starting from +0.0f;
   tiling/threading only choose which elements a thread computes. */
#include <stdint.h>
#include <string.h>
#if defined(__GNUC__) && !defined(__clang__)
/* the 64-byte vector helpers below are static inline: no call passes a vector, so gcc's note that
   their ABI differs without AVX-512 does not apply */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#define NR 64 /* columns per packed weight panel (batch_invariant._NR) */
typedef float v16 __attribute__((vector_size(64)));
typedef uint32_t u16x __attribute__((vector_size(64)));
typedef uint16_t h16 __attribute__((vector_size(32)));
static inline v16 ldf(const float *p) { v16 v; memcpy(&v, p, 64); return v; }
static inline v16 ldh(const uint16_t *p) {
  h16 h; memcpy(&h, p, 32); u16x u = __builtin_convertvector(h, u16x) << 16;
  v16 f; memcpy(&f, &u, 64); return f;
}
static inline v16 bc(float s) { v16 v = {0}; return v + s; }

#define KERN(NAME, WT, LD)                                                                      \
static inline __attribute__((always_inline)) void NAME(const int mr, const float *x, long ldx,  \
    const WT *w, long K, float *y, long ldy, int nc, const float *bias) {                      \
  v16 acc[6][4];                                                                                \
  for (int i = 0; i < 6; i++) for (int j = 0; j < 4; j++) acc[i][j] = bc(0.f);                  \
  for (long k = 0; k < K; k++) {                                                                \
    const v16 w0 = LD(w + k * NR), w1 = LD(w + k * NR + 16);                                    \
    const v16 w2 = LD(w + k * NR + 32), w3 = LD(w + k * NR + 48);                               \
    for (int i = 0; i < mr; i++) {                                                              \
      const v16 a = bc(x[i * ldx + k]);                                                         \
      acc[i][0] = __builtin_fmaf_vec(a, w0, acc[i][0]);                                         \
      acc[i][1] = __builtin_fmaf_vec(a, w1, acc[i][1]);                                         \
      acc[i][2] = __builtin_fmaf_vec(a, w2, acc[i][2]);                                         \
      acc[i][3] = __builtin_fmaf_vec(a, w3, acc[i][3]);                                         \
    }                                                                                           \
  }                                                                                             \
  for (int i = 0; i < mr; i++) {                                                                \
    float tmp[NR]; memcpy(tmp, acc[i], sizeof(tmp));                                            \
    if (bias) for (int j = 0; j < nc; j++) tmp[j] += bias[j];                                   \
    memcpy(y + i * ldy, tmp, (size_t)nc * sizeof(float));                                       \
  }                                                                                             \
}
/* a*b+c with one rounding: contracted to vfmadd by -ffp-contract=fast (checked at build time
   by comparing against scalar fmaf in ditto_selftest). */
#define __builtin_fmaf_vec(a, b, c) ((a) * (b) + (c))
KERN(kf, float, ldf)
KERN(kh, uint16_t, ldh)

#define DRIVER(NAME, WT, KN)                                                                    \
void NAME(const float *x, long M, long K, long ldx, const WT *wp, long N, const float *bias,    \
          float *y, long mc) {                                                                  \
  const long np = (N + NR - 1) / NR, nmb = (M + mc - 1) / mc;                                   \
  _Pragma("omp parallel for collapse(2) schedule(static)")                                    \
  for (long mb = 0; mb < nmb; mb++)                                                             \
    for (long p = 0; p < np; p++) {                                                             \
      const long m0 = mb * mc, m1 = m0 + mc < M ? m0 + mc : M;                                  \
      const int nc = (int)(N - p * NR < NR ? N - p * NR : NR);                                  \
      const WT *w = wp + p * K * NR;                                                            \
      const float *b = bias ? bias + p * NR : 0;                                                \
      float *yp = y + p * NR;                                                                   \
      long m = m0;                                                                              \
      for (; m + 6 <= m1; m += 6) KN(6, x + m * ldx, ldx, w, K, yp + m * N, N, nc, b);          \
      switch (m1 - m) {                                                                         \
        case 5: KN(5, x + m * ldx, ldx, w, K, yp + m * N, N, nc, b); break;                     \
        case 4: KN(4, x + m * ldx, ldx, w, K, yp + m * N, N, nc, b); break;                     \
        case 3: KN(3, x + m * ldx, ldx, w, K, yp + m * N, N, nc, b); break;                     \
        case 2: KN(2, x + m * ldx, ldx, w, K, yp + m * N, N, nc, b); break;                     \
        case 1: KN(1, x + m * ldx, ldx, w, K, yp + m * N, N, nc, b); break;                     \
        default: break;                                                                         \
      }                                                                                         \
    }                                                                                           \
}
DRIVER(ditto_bi_linear_f32w, float, kf)
DRIVER(ditto_bi_linear_bf16w, uint16_t, kh)

/* Returns 1 when the vector kernel equals a scalar fmaf chain bit for bit (FMA contraction on). */
#include <math.h>
int ditto_selftest(void) {
  enum { K = 37 };
  float x[K], w[K * NR], y[NR];
  uint32_t s = 12345u;
  for (int i = 0; i < K; i++) { s = s * 1664525u + 1013904223u; x[i] = (float)(s >> 8) / 16777216.f - 0.5f; }
  for (int i = 0; i < K * NR; i++) { s = s * 1664525u + 1013904223u; w[i] = (float)(s >> 8) / 16777216.f - 0.5f; }
  ditto_bi_linear_f32w(x, 1, K, K, w, NR, 0, y, 96);
  for (int n = 0; n < NR; n++) {
    float acc = 0.f;
    for (int k = 0; k < K; k++) acc = fmaf(x[k], w[k * NR + n], acc);
    if (memcmp(&acc, &y[n], sizeof(float)) != 0) return 0;
  }
  return 1;
}
