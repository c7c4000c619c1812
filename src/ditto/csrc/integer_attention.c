/* ditto integer attention: torch-exact integer softmax attention over a paged int8 KV cache
   (wrapped by ditto/numerics/kernels/integer_attention_c.py; the torch reference is integer_ops.attend_int). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ditto_int.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define DITTO_AVX512 1
#endif

typedef struct {
  const int8_t *q8; const i64 *qa16, *qsa; long H, Hkv, D, G;
  const int8_t *k8, *v8; const int32_t *ka16; const int8_t *ksa; long bs;
  const i64 *table; long tstride;
  i64 score_m, score_e; int score_frac, prob_bits; const i64 *tab; int checks;
} Args;

typedef struct {
  i64 *slot;       /* (lmax,) cache row of each visible key: (block * bs + offset) * Hkv + g */
  int32_t *dots;   /* (G, lmax) q.k, then scores, then exp, then probabilities */
  i64 *ka, *ks;    /* (lmax,) key scales */
  int32_t *acc;    /* (G, D) P.V sums (portable path) */
} Scratch;

/* q.k for the G heads of group g over keys slot[0..cnt): dots[j * lmax + l], exact int32. */
static void qk_dots(const Args *a, i64 tok, long g, const i64 *slot, i64 cnt, int32_t *dots, i64 lmax) {
  const long D = a->D, G = a->G;
#ifdef DITTO_AVX512
  /* u8 x s8 VNNI: sum (q + 128) k = q.k + 128 sum k, with sum k from a row of ones (head "G"). */
  const long nch = (D + 63) / 64;
  const __mmask64 tail = (D % 64) ? (((__mmask64)1 << (D % 64)) - 1) : ~(__mmask64)0;
  const __m512i flip = _mm512_set1_epi8((char)0x80), ones = _mm512_set1_epi8(1);
  __m512i part[16];
  for (i64 l0 = 0; l0 < cnt; l0 += 16) {
    const int nk = cnt - l0 < 16 ? (int)(cnt - l0) : 16;
    __m512i ksum = _mm512_setzero_si512();
    for (long j = 0; j <= G; j++) {
      const int8_t *qr = a->q8 + (tok * a->H + g * G + (j < G ? j : 0)) * D;
      for (int kk = 0; kk < 16; kk++) part[kk] = _mm512_setzero_si512();
      for (long c = 0; c < nch; c++) {
        const __mmask64 m = c == nch - 1 ? tail : ~(__mmask64)0;
        const __m512i qu = j < G ? _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, qr + c * 64), flip) : ones;
        for (int kk = 0; kk < nk; kk++) {
          const __m512i kv = _mm512_maskz_loadu_epi8(m, a->k8 + slot[l0 + kk] * D + c * 64);
          part[kk] = _mm512_dpbusd_epi32(part[kk], qu, kv);
        }
      }
      /* 16 vectors of partial sums -> one vector of 16 sums (lane kk = key l0 + kk) */
      const __m512i sum = hsum16_epi32(part);
      if (j == G) {
        ksum = _mm512_slli_epi32(sum, 7);
        for (long jj = 0; jj < G; jj++) {
          int32_t *dst = dots + jj * lmax + l0;
          const __mmask16 mk = (__mmask16)((1u << nk) - 1);
          _mm512_mask_storeu_epi32(dst, mk, _mm512_sub_epi32(_mm512_maskz_loadu_epi32(mk, dst), ksum));
        }
      } else {
        _mm512_mask_storeu_epi32(dots + j * lmax + l0, (__mmask16)((1u << nk) - 1), sum);
      }
    }
  }
#else
  for (i64 l = 0; l < cnt; l++) {
    const int8_t *kr = a->k8 + slot[l] * D;
    for (long j = 0; j < G; j++) {
      const int8_t *qr = a->q8 + (tok * a->H + g * G + j) * D;
      int32_t s = 0;
      for (long d = 0; d < D; d++) s += (int32_t)qr[d] * (int32_t)kr[d];
      dots[j * lmax + l] = s;
    }
  }
#endif
}

/* out[j, :] = sum_l p[j, l] v[slot[l], :] for the G heads, exact (int32 sums, bounds checked up front). */
static void pv_sums(const Args *a, const i64 *slot, i64 cnt, const int32_t *p, i64 lmax, i64 *out, int32_t *acc) {
  const long D = a->D, G = a->G;
#ifdef DITTO_AVX512
  /* tiles of up to 4 heads x 64 channels in registers; each v row chunk is widened once per tile */
  (void)acc;
  const long nch = (D + 15) / 16;
  for (long j0 = 0; j0 < G; j0 += 4) {
    const int nj = G - j0 < 4 ? (int)(G - j0) : 4;
    for (long c0 = 0; c0 < nch; c0 += 4) {
      const int nc = nch - c0 < 4 ? (int)(nch - c0) : 4;
      __mmask16 m[4];
      for (int c = 0; c < 4; c++) {
        const long left = D - (c0 + c) * 16;
        m[c] = c >= nc ? 0 : (left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1));
      }
      __m512i s[4][4];
      for (int jj = 0; jj < 4; jj++)
        for (int c = 0; c < 4; c++) s[jj][c] = _mm512_setzero_si512();
      for (i64 l = 0; l < cnt; l++) {
        const int8_t *vr = a->v8 + slot[l] * D + c0 * 16;
        __m512i pb[4];
        for (int jj = 0; jj < nj; jj++) pb[jj] = _mm512_set1_epi32(p[(j0 + jj) * lmax + l]);
        for (int c = 0; c < nc; c++) {
          const __m512i v = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m[c], vr + c * 16));
          for (int jj = 0; jj < nj; jj++) s[jj][c] = _mm512_add_epi32(s[jj][c], _mm512_mullo_epi32(pb[jj], v));
        }
      }
      for (int jj = 0; jj < nj; jj++)
        for (int c = 0; c < nc; c++) {
          i64 *o = out + (j0 + jj) * D + (c0 + c) * 16;
          const __mmask16 mc = m[c];
          const __m512i lo8 = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(s[jj][c]));
          const __m512i hi8 = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(s[jj][c], 1));
          _mm512_mask_storeu_epi64(o, (__mmask8)(mc & 0xFF), lo8);
          _mm512_mask_storeu_epi64(o + 8, (__mmask8)(mc >> 8), hi8);
        }
    }
  }
#else
  memset(acc, 0, sizeof(int32_t) * (size_t)(G * D));
  for (i64 l = 0; l < cnt; l++) {
    const int8_t *vr = a->v8 + slot[l] * D;
    for (long j = 0; j < G; j++) {
      const int32_t pj = p[j * lmax + l];
      int32_t *aj = acc + j * D;
      for (long d = 0; d < D; d++) aj[d] += pj * (int32_t)vr[d];
    }
  }
  for (long c = 0; c < G * D; c++) out[c] = acc[c];
#endif
}

/* integer_ops.exp_neg_fixed(d, frac) for -(2^31 - 1) <= d <= 0: t = -d log2(e) in Q.(frac + 14), then
   exp2_neg_fixed(t, frac + 14). Q30 result. 0 <= frac <= 40, so every shift count is in range. */
static inline i64 exp_neg(i64 d, int frac, const i64 *tab) {
  const i64 t = (-d * LOG2E_Q30 + (1LL << 15)) >> 16;
  const int F = frac + 14, wb = F - 10;
  i64 k = t >> F;
  k = k > 62 ? 62 : k;
  const i64 f = t & ((1LL << F) - 1);
  const i64 idx = f >> wb, w = f & ((1LL << wb) - 1);
  const i64 lo = tab[idx], hi = tab[idx + 1 > 1024 ? 1024 : idx + 1];
  const i64 val = wadd(lo, rshift_round(wmul(hi - lo, w), wb));
  return rshift_round(val, k);
}

/* score x = requantise(rshift_round(q.k * qa16, 8) * ka16, m, score_e - 8 - qsa - ksa), clamped to
   +-(2^31 - 1); row holds q.k on entry and x on exit. */
/* noinline: inlined into item() these loops stop vectorising (gcc 12) */
__attribute__((noinline)) static void scores_row(int32_t *restrict row, const i64 *restrict ka,
                                                 const i64 *restrict ks, i64 cnt, i64 qa, i64 m, i64 base) {
  for (i64 l = 0; l < cnt; l++) {
    const i64 t = wmul(wadd(wmul(row[l], qa), 128) >> 8, ka[l]);
    i64 x = rshift_round(wmul(t, m), base - ks[l]);
    x = x < -LIM31 ? -LIM31 : (x > LIM31 ? LIM31 : x);
    row[l] = (int32_t)x;
  }
}

/* softmax_int over cnt >= 1 scores: e = exp(x - rowmax) Q30, inv = 2^62 // sum(e),
   p = rshift_round(e * inv, 62 - B); row holds x on entry and p on exit. */
__attribute__((noinline)) static void softmax_row(int32_t *restrict row, i64 cnt, int frac, const i64 *restrict tab,
                                                  int pshift) {
  int32_t mx = row[0];
  for (i64 l = 1; l < cnt; l++) mx = row[l] > mx ? row[l] : mx;
  i64 s = 0;
  for (i64 l = 0; l < cnt; l++) {
    i64 d = (i64)row[l] - mx;
    d = d < -LIM31 ? -LIM31 : d;
    const i64 e = exp_neg(d, frac, tab);                                   /* e <= 2^30 */
    row[l] = (int32_t)e;
    s += e;
  }
  const i64 inv = ((i64)1 << 62) / (s < 1 ? 1 : s);
  for (i64 l = 0; l < cnt; l++) row[l] = (int32_t)rshift_round(wmul(row[l], inv), pshift);
}

/* One work item: the G query heads of kv head g for token tok at position pos (keys through the
   table row trw); writes o (G, D). Returns the number of requantise bound violations (if checking). */
static long item(const Args *a, Scratch *w, i64 lmax, i64 tok, i64 pos, const i64 *trw, long window, long g,
                 i64 *o) {
  const long G = a->G, D = a->D, bs = a->bs;
  i64 lo = 0;
  if (window != -1) { lo = pos - window + 1; lo = lo < 0 ? 0 : lo; }
  const i64 cnt = pos - lo + 1;
  if (cnt <= 0) { memset(o, 0, sizeof(i64) * (size_t)(G * D)); return 0; }   /* fully masked: zeros */
  i64 b = lo / bs, off = lo % bs;
  for (i64 l = 0; l < cnt; l++) {
    const i64 s = (trw[b] * bs + off) * a->Hkv + g;
    w->slot[l] = s;
    w->ka[l] = a->ka16[s];
    w->ks[l] = a->ksa[s];
    if (++off == bs) { off = 0; b++; }
  }
  qk_dots(a, tok, g, w->slot, cnt, w->dots, lmax);
  long bad = 0;
  const int pshift = 62 - a->prob_bits, frac = a->score_frac;
  const i64 m = a->score_m;
  const i64 *restrict ka = w->ka, *restrict ks = w->ks, *restrict tab = a->tab;
  for (long j = 0; j < G; j++) {
    const i64 h = tok * a->H + g * G + j;
    const i64 qa = a->qa16[h], base = (a->score_e - 8) - a->qsa[h];
    int32_t *restrict row = w->dots + j * lmax;
    if (a->checks)  /* integer_ops.requantise's bound: |t| |m| + 2^(sh-1) <= 2^63 - 1 and 0 <= sh <= 62 */
      for (i64 l = 0; l < cnt; l++) {
        const i64 t = wmul(wadd(wmul(row[l], qa), 128) >> 8, ka[l]), sh = base - ks[l];
        const __int128 mag = (__int128)(t < 0 ? -(__int128)t : (__int128)t) * (m < 0 ? -(__int128)m : (__int128)m);
        if (sh < 0 || sh > 62 || mag + (__int128)round_term(sh) > (__int128)INT64_MAX) bad++;
      }
    scores_row(row, ka, ks, cnt, qa, m, base);
    softmax_row(row, cnt, frac, tab, pshift);
  }
  pv_sums(a, w->slot, cnt, w->dots, lmax, o, w->acc);
  return bad;
}

/* q8 (T, H, D) int8, qa16 / qsa (T, H) int64; cache k8 / v8 (NB, bs, Hkv, D) int8, ka16 (NB, bs, Hkv)
   int32, ksa (NB, bs, Hkv) int8; n queries: token tok[i] at position pos[i] reads the blocks of
   table row trow[i] (table (R, tstride) int64); window -1 = none. out (T, H, D) int64, rows tok[i]
   written. Returns the number of requantise bound violations (counted only when checks != 0), or
   -1 when scratch memory could not be allocated. */
long ditto_int_attend(const int8_t *q8, const i64 *qa16, const i64 *qsa, long H, long Hkv, long D,
                      const int8_t *k8, const int32_t *ka16, const int8_t *ksa, const int8_t *v8, long bs,
                      long n, const i64 *tok, const i64 *pos, const i64 *table, long tstride, const i64 *trow,
                      long window, i64 score_m, i64 score_e, int score_frac, int prob_bits, const i64 *tab,
                      i64 *out, int checks) {
  const Args a = {q8, qa16, qsa, H, Hkv, D, H / Hkv, k8, v8, ka16, ksa, bs, table, tstride,
                  score_m, score_e, score_frac, prob_bits, tab, checks};
  const long G = a.G;
  i64 lmax = 16;
  for (long i = 0; i < n; i++) lmax = pos[i] + 1 > lmax ? pos[i] + 1 : lmax;
  lmax = (lmax + 15) / 16 * 16;
  long bad = 0, oom = 0;
  #pragma omp parallel reduction(+:bad, oom)
  {
    Scratch w;
    w.slot = (i64 *)malloc(sizeof(i64) * (size_t)lmax);
    w.ka = (i64 *)malloc(sizeof(i64) * (size_t)lmax);
    w.ks = (i64 *)malloc(sizeof(i64) * (size_t)lmax);
    w.dots = (int32_t *)malloc(sizeof(int32_t) * (size_t)(G * lmax));
    w.acc = (int32_t *)malloc(sizeof(int32_t) * (size_t)(G * D));
    const int ok = w.slot && w.ka && w.ks && w.dots && w.acc;
    #pragma omp for schedule(dynamic, 1)
    for (long it = 0; it < n * Hkv; it++) {
      const long i = it / Hkv, g = it % Hkv;
      if (!ok) { oom++; continue; }
      bad += item(&a, &w, lmax, tok[i], pos[i], table + trow[i] * tstride, window, g,
                  out + (tok[i] * H + g * G) * D);
    }
    free(w.slot); free(w.ka); free(w.ks); free(w.dots); free(w.acc);
  }
  return oom ? -1 : bad;
}
