/* ditto row operations for the fp32 stream between linears: one C call where eager torch issues
   ten ops (numerics/kernels/rowops.py states the contract and holds the torch reference).

   rmsnorm: y = (x * r) * (offset + w), r = 1 / sqrtf(ss / D + eps), where ss is the sum of squares
            in one fixed order: 16 lanes, lane j adds x[i]^2 for i = j, j + 16, ... in index order,
            then lanes fold by halves (lane j += lane j + 8, then + 4, + 2, + 1). Every product and
            sum is rounded on its own (no FMA contraction), so the bits depend on the row alone.
   rope:    rotate-half RoPE, y[d] = x[d] * cos[d] - x[d + D/2] * sin[d] (first half) and
            x[d] * cos[d] + x[d - D/2] * sin[d] (second half): each product rounded, then one add,
            which is what torch's `x * cos + cat(-x2, x1) * sin` computes, bit for bit. */
#include <math.h>
#include <stdint.h>

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#define LANES 16

/* x, y: M rows of D floats (row strides ldx, ldy; y may be x); w: D floats */
long ditto_rmsnorm(const float *x, long M, long D, long ldx, const float *w, float offset, float eps,
                   float *y, long ldy) {
  if (M < 0 || D <= 0) return 1;
  for (long m = 0; m < M; m++) {
    const float *xr = x + m * ldx;
    float acc[LANES] = {0};
    long i = 0;
    for (; i + LANES <= D; i += LANES)
      for (int j = 0; j < LANES; j++) {
        const float s = xr[i + j] * xr[i + j];
        acc[j] = acc[j] + s;
      }
    for (int j = 0; i < D; i++, j++) {
      const float s = xr[i] * xr[i];
      acc[j] = acc[j] + s;
    }
    for (int half = LANES / 2; half >= 1; half /= 2)
      for (int j = 0; j < half; j++) acc[j] = acc[j] + acc[j + half];
    const float r = 1.0f / sqrtf(acc[0] / (float)D + eps);
    float *yr = y + m * ldy;
    for (long k = 0; k < D; k++) {
      const float g = offset + w[k];
      yr[k] = (xr[k] * r) * g;
    }
  }
  return 0;
}

/* s = x + a (elementwise, into s; s may be x), then y = rmsnorm(s): the residual add and the next
   norm in one pass. All rows contiguous with D floats each. */
long ditto_add_rmsnorm(const float *x, const float *a, long M, long D, const float *w, float offset, float eps,
                       float *s, float *y) {
  if (M < 0 || D <= 0) return 1;
  for (long i = 0; i < M * D; i++) s[i] = x[i] + a[i];
  return ditto_rmsnorm(s, M, D, D, w, offset, eps, y, D);
}

/* x: T tokens x H heads x D (token stride ldx, head stride D); y likewise (ldy; y may be x);
   cos, sin: tables (P, D) row-major; pos: T positions (each < P, checked by the caller) */
long ditto_rope(const float *x, long T, long H, long D, long ldx, const int64_t *pos, const float *cos_t,
                const float *sin_t, float *y, long ldy) {
  if (T < 0 || H <= 0 || D <= 0 || D % 2) return 1;
  const long half = D / 2;
  for (long t = 0; t < T; t++) {
    const float *c = cos_t + pos[t] * D, *s = sin_t + pos[t] * D;
    for (long h = 0; h < H; h++) {
      const float *xr = x + t * ldx + h * D;
      float *yr = y + t * ldy + h * D;
      for (long d = 0; d < half; d++) { /* both halves from the pair read first */
        const float x1 = xr[d], x2 = xr[d + half];
        const float a1 = x1 * c[d], b1 = x2 * s[d];
        const float a2 = x2 * c[d + half], b2 = x1 * s[d + half];
        yr[d] = a1 - b1;
        yr[d + half] = a2 + b2;
      }
    }
  }
  return 0;
}
