/* Weight-only quantized matrix products on CPU: y[m, n] = sum_k x[m, k] * w[n, k], with
 * w[n, k] = code[n, k] * scale[n, k / g] + offset[n, k / g] (offsets optional), scales and offsets
 * in float16. Decoding is bound by the bytes of weights read, so each weight is read once from its
 * compact form and expanded in registers, never written back out as floats.
 *
 * As llama.cpp does, x is first quantized to int8 in blocks of 32 (one float scale a block), so that
 * the inner products are integer multiply-adds (AVX2's maddubs: 32 products an instruction, four
 * times float32's FMA); each block's integer sum is then scaled by the weight's and x's scales.
 *
 * int4 codes: [N, K / 2] bytes; in each run of 32 weights, byte j holds weight j in its low nibble
 * and weight j + 16 in its high nibble (GGUF's Q4_0/Q4_1 order). int8 codes: [N, K] signed bytes.
 * The offsets' part, sum_k offset * x, is sum_groups offset * (sum of x over the group).
 *
 * GGUF's Q4_K and Q6_K blocks (256 weights in 144 and 210 bytes) are read as stored, so decoding
 * reads no more bytes than llama.cpp does: ``kquant_matmul``.
 * Built at first use by llamita/kernels.py with -march=native; llamita/quantize.py keeps the
 * pure-PyTorch path that tests check this against. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define ROW_TILE 8 /* rows of x that share one expansion of a weight run */

static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else { exp = 127 - 15 + 1; while (!(man & 0x400)) { man <<= 1; exp--; } bits = sign | (exp << 23) | ((man & 0x3ff) << 13); }
    } else if (exp == 31) bits = sign | 0x7f800000 | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f; memcpy(&f, &bits, 4); return f;
#endif
}

#if defined(__AVX2__) && defined(__FMA__)
static inline float hsum(__m256 v) { /* the sum of the 8 lanes */
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
#endif

/* x [M, K] -> int8 codes q and one scale d per block of ``block`` values (32, or 256 for the k-quants:
 * x ~ q * d), and the sums of q * d over each group of g (for the offsets). */
static void quantize_rows(const float *x, int64_t M, int64_t K, int64_t block, int64_t g, int8_t *q, float *d,
                          float *sums) {
    int64_t blocks = K / block, part = g < block ? g : block, groups = K / g;
    for (int64_t m = 0; m < M; m++) {
        float *sm = sums + m * groups;
        for (int64_t G = 0; G < groups; G++) sm[G] = 0.0f;
        for (int64_t b = 0; b < blocks; b++) {
            const float *xb = x + m * K + b * block;
            int8_t *qb = q + m * K + b * block;
            float amax = 0.0f;
            for (int64_t j = 0; j < block; j++) amax = fmaxf(amax, fabsf(xb[j]));
            float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            d[m * blocks + b] = scale;
            for (int64_t j0 = 0; j0 < block; j0 += part) {
                int s = 0;
                for (int64_t j = j0; j < j0 + part; j++) { qb[j] = (int8_t)lrintf(xb[j] * inv); s += qb[j]; }
                sm[(b * block + j0) / g] += s * scale;
            }
        }
    }
}

/* Rows m0 .. m0 + rows of x against one output feature: sum over k of code * scale, per row.
 * Always inlined with a constant ``rows``, so that the accumulators live in registers. */
static inline __attribute__((always_inline)) void dot_rows(
        const int8_t *xq, const float *xd, int64_t K, const uint8_t *codes, int bits, const uint16_t *scales,
        int64_t g, int rows, float *out) {
    int64_t blocks = K / 32, per_group = g >= 32 ? g / 32 : 1;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[ROW_TILE];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    const __m128i low = _mm_set1_epi8(0x0f);
    const __m256i low2 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    int64_t b = 0;
    if (bits == 4 && g >= 32) { /* two runs a step: one 32-byte load, two chains of sums */
        __m256 acc2[ROW_TILE]; /* a second chain of sums, where few rows leave the FMA unit waiting */
        for (int r = 0; r < rows; r++) acc2[r] = _mm256_setzero_ps();
        for (; b + 2 <= blocks; b += 2) {
            __m256i packed = _mm256_loadu_si256((const __m256i *)(codes + b * 16));
            __m256i lo = _mm256_and_si256(packed, low2), hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low2);
            __m256i w0 = _mm256_permute2x128_si256(lo, hi, 0x20), w1 = _mm256_permute2x128_si256(lo, hi, 0x31);
            __m256 s0 = _mm256_set1_ps(half_to_float(scales[b / per_group]));
            __m256 s1 = _mm256_set1_ps(half_to_float(scales[(b + 1) / per_group]));
            for (int r = 0; r < rows; r++) {
                const int8_t *xr = xq + r * K + b * 32;
                __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(w0, _mm256_loadu_si256((const __m256i *)xr)), ones);
                __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(w1, _mm256_loadu_si256((const __m256i *)(xr + 32))), ones);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_mul_ps(s0, _mm256_set1_ps(xd[r * blocks + b])), acc[r]);
                __m256 *second = rows < 4 ? &acc2[r] : &acc[r];
                *second = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_mul_ps(s1, _mm256_set1_ps(xd[r * blocks + b + 1])), *second);
            }
        }
        if (rows < 4)
            for (int r = 0; r < rows; r++) acc[r] = _mm256_add_ps(acc[r], acc2[r]);
    }
    for (; b < blocks; b++) {
        __m256i w;
        if (bits == 4) {
            __m128i packed = _mm_loadu_si128((const __m128i *)(codes + b * 16));
            w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), low), _mm_and_si128(packed, low));
        } else {
            w = _mm256_loadu_si256((const __m256i *)(codes + b * 32));
        }
        __m256 ws = g >= 32 ? _mm256_set1_ps(half_to_float(scales[b / per_group]))
                            : _mm256_set_m128(_mm_set1_ps(half_to_float(scales[2 * b + 1])),
                                              _mm_set1_ps(half_to_float(scales[2 * b])));
        __m256i wa = bits == 4 ? w : _mm256_sign_epi8(w, w); /* maddubs wants its first operand unsigned */
        for (int r = 0; r < rows; r++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + r * K + b * 32));
            if (bits == 8) xv = _mm256_sign_epi8(xv, w);
            __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(wa, xv), ones); /* 8 sums of 4 products */
            __m256 scale = _mm256_mul_ps(ws, _mm256_set1_ps(xd[r * blocks + b]));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) out[r] = hsum(acc[r]);
#else
    for (int r = 0; r < rows; r++) out[r] = 0.0f;
    for (int64_t b = 0; b < blocks; b++) {
        int w[32];
        if (bits == 4)
            for (int j = 0; j < 16; j++) { w[j] = codes[b * 16 + j] & 15; w[j + 16] = codes[b * 16 + j] >> 4; }
        else
            for (int j = 0; j < 32; j++) w[j] = ((const int8_t *)codes)[b * 32 + j];
        for (int r = 0; r < rows; r++) {
            const int8_t *xb = xq + r * K + b * 32;
            for (int h = 0; h < 2; h++) {
                int s = 0;
                for (int j = 16 * h; j < 16 * h + 16; j++) s += w[j] * xb[j];
                float ws = half_to_float(scales[g >= 32 ? b / per_group : 2 * b + h]);
                out[r] += (float)s * ws * xd[r * blocks + b];
            }
        }
    }
#endif
}

/* sum over groups of offset * (sum of x over the group) */
static inline float offset_dot(const uint16_t *offsets, const float *sums, int64_t groups) {
    float t = 0.0f;
    int64_t G = 0;
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; G + 8 <= groups; G += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(offsets + G))),
                              _mm256_loadu_ps(sums + G), acc);
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    for (int j = 0; j < 8; j++) t += lanes[j];
#endif
    for (; G < groups; G++) t += half_to_float(offsets[G]) * sums[G];
    return t;
}

/* y [M, N] = x [M, K] @ w.T for w held as codes ([N, K / 2] for 4 bits, [N, K] for 8), scales and
 * offsets [N, K / g] (offsets may be NULL). */
void quant_matmul(const float *x, int64_t M, int64_t K, const uint8_t *codes, int bits, const uint16_t *scales,
                  const uint16_t *offsets, int64_t N, int64_t g, float *y, int threads) {
    int64_t groups = K / g, row_bytes = bits == 4 ? K / 2 : K;
    int8_t *xq = malloc(M * K);
    float *xd = malloc(M * (K / 32) * sizeof(float)), *xs = malloc(M * groups * sizeof(float));
    quantize_rows(x, M, K, 32, g, xq, xd, xs);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *cn = codes + n * row_bytes;
        const uint16_t *sn = scales + n * groups;
        for (int64_t m0 = 0; m0 < M; m0 += ROW_TILE) {
            int rows = M - m0 < ROW_TILE ? (int)(M - m0) : ROW_TILE;
            const int8_t *q = xq + m0 * K;
            const float *d = xd + m0 * (K / 32);
            float out[ROW_TILE];
            switch (rows) { /* a constant row count for each copy of dot_rows */
                case 1: dot_rows(q, d, K, cn, bits, sn, g, 1, out); break;
                case 2: dot_rows(q, d, K, cn, bits, sn, g, 2, out); break;
                case 3: dot_rows(q, d, K, cn, bits, sn, g, 3, out); break;
                case 4: dot_rows(q, d, K, cn, bits, sn, g, 4, out); break;
                case 5: dot_rows(q, d, K, cn, bits, sn, g, 5, out); break;
                case 6: dot_rows(q, d, K, cn, bits, sn, g, 6, out); break;
                case 7: dot_rows(q, d, K, cn, bits, sn, g, 7, out); break;
                default: dot_rows(q, d, K, cn, bits, sn, g, 8, out); break;
            }
            if (offsets)
                for (int r = 0; r < rows; r++) out[r] += offset_dot(offsets + n * groups, xs + (m0 + r) * groups, groups);
            for (int r = 0; r < rows; r++) y[(m0 + r) * N + n] = out[r];
        }
    }
    free(xq); free(xd); free(xs);
}

/* -- GGUF k-quant blocks, as stored -------------------------------------------------------------- */

/* The k-quants take x in int8 blocks of 256 (one scale a super-block, as llama.cpp's Q8_K), so that a
 * super-block's products, each scaled by its integer sub-scale, add up in integers; xd: x's scale per
 * super-block, xs: the sums of x per 32 (for Q4_K's mins). */

/* Q4_K: w = d * sc[run] * q - dmin * mn[run], q 0..15, sc and mn 6-bit; 32-byte chunk i holds run 2i
 * in its low nibbles and run 2i + 1 in its high ones. */
static inline void q4k_six_bit(const uint8_t *b, uint8_t *sc, uint8_t *mn) {
    for (int j = 0; j < 4; j++) {
        sc[j] = b[j] & 63; mn[j] = b[j + 4] & 63;
        sc[j + 4] = (b[j + 8] & 15) | ((b[j] >> 6) << 4);
        mn[j + 4] = (b[j + 8] >> 4) | ((b[j + 4] >> 6) << 4);
    }
}

static inline __attribute__((always_inline)) void q4k_rows(
        const int8_t *xq, const float *xd, const float *xs, int64_t K, const uint8_t *row, int rows, float *out) {
    int64_t supers = K / 256, runs = K / 32;
    for (int r = 0; r < rows; r++) out[r] = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[ROW_TILE], macc[ROW_TILE];
    for (int r = 0; r < rows; r++) acc[r] = macc[r] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0f);
#endif
    for (int64_t sb = 0; sb < supers; sb++) {
        const uint8_t *blk = row + sb * 144;
        float d = half_to_float(*(const uint16_t *)blk), dmin = half_to_float(*(const uint16_t *)(blk + 2));
        uint8_t sc[8], mn[8];
        q4k_six_bit(blk + 4, sc, mn);
#if defined(__AVX2__) && defined(__FMA__)
        __m256 mins = _mm256_mul_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)mn))));
        for (int r = 0; r < rows; r++) /* the mins' part, subtracted at the end */
            macc[r] = _mm256_fmadd_ps(mins, _mm256_loadu_ps(xs + r * runs + sb * 8), macc[r]);
        __m256i isum[ROW_TILE];
        for (int r = 0; r < rows; r++) isum[r] = _mm256_setzero_si256();
        for (int i = 0; i < 4; i++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * i));
            __m256i w0 = _mm256_and_si256(v, low), w1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            __m256i s0 = _mm256_set1_epi16(sc[2 * i]), s1 = _mm256_set1_epi16(sc[2 * i + 1]);
            for (int r = 0; r < rows; r++) {
                const int8_t *x0 = xq + r * K + sb * 256 + 64 * i;
                __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(w0, _mm256_loadu_si256((const __m256i *)x0)), s0);
                __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(w1, _mm256_loadu_si256((const __m256i *)(x0 + 32))), s1);
                isum[r] = _mm256_add_epi32(isum[r], _mm256_add_epi32(p0, p1));
            }
        }
        for (int r = 0; r < rows; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_set1_ps(d * xd[r * supers + sb]), acc[r]);
#else
        for (int r = 0; r < rows; r++) {
            const float *sums = xs + r * runs + sb * 8;
            float t = 0.0f;
            for (int j = 0; j < 8; j++) t += mn[j] * sums[j];
            out[r] -= dmin * t;
        }
        for (int r = 0; r < rows; r++) {
            int total = 0;
            for (int i = 0; i < 4; i++) {
                const uint8_t *q = blk + 16 + 32 * i;
                const int8_t *x0 = xq + r * K + sb * 256 + 64 * i;
                int s0 = 0, s1 = 0;
                for (int j = 0; j < 32; j++) { s0 += (q[j] & 15) * x0[j]; s1 += (q[j] >> 4) * x0[32 + j]; }
                total += sc[2 * i] * s0 + sc[2 * i + 1] * s1;
            }
            out[r] += d * xd[r * supers + sb] * total;
        }
#endif
    }
#if defined(__AVX2__) && defined(__FMA__)
    for (int r = 0; r < rows; r++) out[r] += hsum(acc[r]) - hsum(macc[r]);
#endif
}

/* Q4_K with x in int8 blocks of 32: each run's sum scaled as a float. For one to three rows (decoding),
 * where it is faster than the integer sums below, which need fewer operations only per extra row. */
static inline __attribute__((always_inline)) void q4k_rows_by32(
        const int8_t *xq, const float *xd, const float *xs, int64_t K, const uint8_t *row, int rows, float *out) {
    int64_t supers = K / 256, blocks = K / 32;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[ROW_TILE], mins[ROW_TILE];
    for (int r = 0; r < rows; r++) acc[r] = mins[r] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    for (int64_t sb = 0; sb < supers; sb++) {
        const uint8_t *blk = row + sb * 144;
        float d = half_to_float(*(const uint16_t *)blk), dmin = half_to_float(*(const uint16_t *)(blk + 2));
        uint32_t u[3], six[4]; /* the 8 six-bit scales, then the 8 mins, one a byte */
        memcpy(u, blk + 4, 12);
        six[0] = u[0] & 0x3f3f3f3f;
        six[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
        six[2] = u[1] & 0x3f3f3f3f;
        six[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
        __m256 sc = _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)six))));
        __m256 mn = _mm256_mul_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(six + 2)))));
        __m256 f[ROW_TILE]; /* per row, each run's d * scale * (x's scale) */
        for (int r = 0; r < rows; r++) {
            f[r] = _mm256_mul_ps(sc, _mm256_loadu_ps(xd + r * blocks + sb * 8));
            mins[r] = _mm256_fmadd_ps(mn, _mm256_loadu_ps(xs + r * blocks + sb * 8), mins[r]);
        }
        for (int i = 0; i < 4; i++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * i));
            __m256i w0 = _mm256_and_si256(v, low), w1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            __m256i i0 = _mm256_set1_epi32(2 * i), i1 = _mm256_set1_epi32(2 * i + 1);
            for (int r = 0; r < rows; r++) {
                const int8_t *x0 = xq + r * K + (sb * 8 + 2 * i) * 32;
                __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(w0, _mm256_loadu_si256((const __m256i *)x0)), ones);
                __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(w1, _mm256_loadu_si256((const __m256i *)(x0 + 32))), ones);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_permutevar8x32_ps(f[r], i0), acc[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_permutevar8x32_ps(f[r], i1), acc[r]);
            }
        }
    }
    for (int r = 0; r < rows; r++) out[r] = hsum(acc[r]) - hsum(mins[r]);
#else
    for (int r = 0; r < rows; r++) out[r] = 0.0f;
    for (int64_t sb = 0; sb < supers; sb++) {
        const uint8_t *blk = row + sb * 144;
        float d = half_to_float(*(const uint16_t *)blk), dmin = half_to_float(*(const uint16_t *)(blk + 2));
        uint8_t sc[8], mn[8];
        q4k_six_bit(blk + 4, sc, mn);
        for (int i = 0; i < 4; i++) {
            int64_t b0 = sb * 8 + 2 * i;
            const uint8_t *q = blk + 16 + 32 * i;
            for (int r = 0; r < rows; r++) {
                const int8_t *x0 = xq + r * K + b0 * 32;
                int s0 = 0, s1 = 0;
                for (int j = 0; j < 32; j++) { s0 += (q[j] & 15) * x0[j]; s1 += (q[j] >> 4) * x0[32 + j]; }
                out[r] += d * (sc[2 * i] * s0 * xd[r * blocks + b0] + sc[2 * i + 1] * s1 * xd[r * blocks + b0 + 1])
                          - dmin * (mn[2 * i] * xs[r * blocks + b0] + mn[2 * i + 1] * xs[r * blocks + b0 + 1]);
            }
        }
    }
#endif
}

/* Q6_K: w = d * sc[16-group] * (q - 32), q 0..63 from 4 low bits (ql) and 2 high bits (qh), sc int8;
 * each half of 128 weights: runs 0 and 1 in the low nibbles of ql's two 32-byte rows, runs 2 and 3 in
 * their high nibbles, the high bits of run k at bits 2k of qh's 32 bytes. */
static inline __attribute__((always_inline)) void q6k_rows(
        const int8_t *xq, const float *xd, int64_t K, const uint8_t *row, int rows, float *out) {
    int64_t supers = K / 256;
    for (int r = 0; r < rows; r++) out[r] = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[ROW_TILE];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0f), two = _mm256_set1_epi8(3), bias = _mm256_set1_epi8(32);
#endif
    for (int64_t sb = 0; sb < supers; sb++) {
        const uint8_t *blk = row + sb * 210;
        const int8_t *sc = (const int8_t *)(blk + 192);
        float d = half_to_float(*(const uint16_t *)(blk + 208));
#if defined(__AVX2__) && defined(__FMA__)
        __m256i isum[ROW_TILE];
        for (int r = 0; r < rows; r++) isum[r] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = blk + 64 * h, *qh = blk + 128 + 32 * h;
            __m256i l0 = _mm256_loadu_si256((const __m256i *)ql), l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
            __m256i hb = _mm256_loadu_si256((const __m256i *)qh);
            __m256i q[4] = {
                _mm256_or_si256(_mm256_and_si256(l0, low), _mm256_slli_epi16(_mm256_and_si256(hb, two), 4)),
                _mm256_or_si256(_mm256_and_si256(l1, low), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), two), 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), two), 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), two), 4)),
            };
            for (int k = 0; k < 4; k++) {
                __m256i w = _mm256_sub_epi8(q[k], bias), wa = _mm256_sign_epi8(w, w);
                int j = 8 * h + 2 * k; /* the run's two 16-groups */
                __m256i scale = _mm256_set_m128i(_mm_set1_epi16(sc[j + 1]), _mm_set1_epi16(sc[j]));
                for (int r = 0; r < rows; r++) {
                    __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + r * K + sb * 256 + 128 * h + 32 * k));
                    __m256i p = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(xv, w));
                    isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(p, scale));
                }
            }
        }
        for (int r = 0; r < rows; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_set1_ps(d * xd[r * supers + sb]), acc[r]);
#else
        for (int r = 0; r < rows; r++) {
            int total = 0;
            for (int h = 0; h < 2; h++) {
                const uint8_t *ql = blk + 64 * h, *qh = blk + 128 + 32 * h;
                for (int k = 0; k < 4; k++) {
                    const int8_t *x0 = xq + r * K + sb * 256 + 128 * h + 32 * k;
                    for (int l = 0; l < 32; l++) {
                        int lowbits = k % 2 == 0 ? ql[l] : ql[32 + l];
                        lowbits = k < 2 ? lowbits & 15 : lowbits >> 4;
                        int q = lowbits | (((qh[l] >> (2 * k)) & 3) << 4);
                        total += sc[8 * h + 2 * k + l / 16] * (q - 32) * x0[l];
                    }
                }
            }
            out[r] += d * xd[r * supers + sb] * total;
        }
#endif
    }
#if defined(__AVX2__) && defined(__FMA__)
    for (int r = 0; r < rows; r++) out[r] += hsum(acc[r]);
#endif
}

/* y [M, N] = x [M, K] @ w.T for w held as GGUF blocks [N, K / 256 * block bytes]: format 0 is Q4_K,
 * 1 is Q6_K. */
void kquant_matmul(const float *x, int64_t M, int64_t K, const uint8_t *blocks, int format, int64_t N, float *y,
                   int threads) {
    int64_t row_bytes = K / 256 * (format == 0 ? 144 : 210), block = format == 0 && M < 4 ? 32 : 256;
    int8_t *xq = malloc(M * K);
    float *xd = malloc(M * (K / 32) * sizeof(float)), *xs = malloc(M * (K / 32) * sizeof(float));
    quantize_rows(x, M, K, block, 32, xq, xd, xs);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = blocks + n * row_bytes;
        for (int64_t m0 = 0; m0 < M; m0 += ROW_TILE) {
            int rows = M - m0 < ROW_TILE ? (int)(M - m0) : ROW_TILE;
            const int8_t *q = xq + m0 * K;
            const float *d = xd + m0 * (K / block), *sums = xs + m0 * (K / 32);
            float out[ROW_TILE];
#define KQ_ROWS(R) (format == 1 ? q6k_rows(q, d, K, row, R, out) : block == 32 ? q4k_rows_by32(q, d, sums, K, row, R, out) \
                                                                  : q4k_rows(q, d, sums, K, row, R, out))
            switch (rows) { /* a constant row count for each copy */
                case 1: KQ_ROWS(1); break;
                case 2: KQ_ROWS(2); break;
                case 3: KQ_ROWS(3); break;
                case 4: KQ_ROWS(4); break;
                case 5: KQ_ROWS(5); break;
                case 6: KQ_ROWS(6); break;
                case 7: KQ_ROWS(7); break;
                default: KQ_ROWS(8); break;
            }
#undef KQ_ROWS
            for (int r = 0; r < rows; r++) y[(m0 + r) * N + n] = out[r];
        }
    }
    free(xq); free(xd); free(xs);
}
