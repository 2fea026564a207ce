/* Weight-only quantized matrix products for CPU decoding: y[m, n] = sum_k x[m, k] * w[n, k], with
 * w[n, k] = code[n, k] * scale[n, k / g] + offset[n, k / g] (offset optional), scales and offsets
 * in float16. Decoding is bound by the bytes of weights read, so each weight is read once from its
 * compact form and expanded in registers, never written back out as floats.
 *
 * int4 codes: [N, K / 2] bytes; in each run of 32 weights, byte j holds weight j in its low nibble
 * and weight j + 16 in its high nibble (GGUF's Q4_0/Q4_1 order). int8 codes: [N, K] signed bytes.
 * The offsets' part, sum_k offset * x, is sum_groups offset * xsum[m, group], xsum given.
 * Built at first use by llamita/kernels.py with -march=native; llamita/quantize.py keeps the
 * pure-PyTorch path that tests check this against. */
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define ROW_TILE 4 /* rows of x that share one expansion of a weight chunk */

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

/* One output feature n for rows m0 .. m0 + rows of x: the sum over k of code * scale, per row. */
static void dot_rows(const float *x, int64_t K, const uint8_t *codes, int bits, const uint16_t *scales,
                     int64_t g, int rows, float *out) {
    int64_t chunks = K / 32, per_group = g / 32 > 0 ? g / 32 : 1, sub = g < 32 ? 32 / g : 1;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[ROW_TILE];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    const __m128i low = _mm_set1_epi8(0x0f);
    for (int64_t c = 0; c < chunks; c++) {
        __m256 w[4];
        if (bits == 4) {
            __m128i b = _mm_loadu_si128((const __m128i *)(codes + c * 16));
            __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
            w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
            w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
            w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
            w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        } else {
            const int8_t *q = (const int8_t *)codes + c * 32;
            for (int j = 0; j < 4; j++)
                w[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * j))));
        }
        if (sub == 1) { /* one scale for the chunk */
            __m256 s = _mm256_set1_ps(half_to_float(scales[c / per_group]));
            for (int r = 0; r < rows; r++) {
                const float *xr = x + r * K + c * 32;
                __m256 t = _mm256_mul_ps(w[0], _mm256_loadu_ps(xr));
                t = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xr + 8), t);
                t = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xr + 16), t);
                t = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xr + 24), t);
                acc[r] = _mm256_fmadd_ps(t, s, acc[r]);
            }
        } else { /* groups of 16: two scales in the chunk */
            __m256 s0 = _mm256_set1_ps(half_to_float(scales[2 * c])), s1 = _mm256_set1_ps(half_to_float(scales[2 * c + 1]));
            for (int r = 0; r < rows; r++) {
                const float *xr = x + r * K + c * 32;
                __m256 t0 = _mm256_mul_ps(w[0], _mm256_loadu_ps(xr));
                t0 = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xr + 8), t0);
                __m256 t1 = _mm256_mul_ps(w[2], _mm256_loadu_ps(xr + 16));
                t1 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xr + 24), t1);
                acc[r] = _mm256_fmadd_ps(t0, s0, _mm256_fmadd_ps(t1, s1, acc[r]));
            }
        }
    }
    for (int r = 0; r < rows; r++) {
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        out[r] = _mm_cvtss_f32(h);
    }
#else
    for (int r = 0; r < rows; r++) out[r] = 0.0f;
    for (int64_t c = 0; c < chunks; c++) {
        float w[32];
        if (bits == 4)
            for (int j = 0; j < 16; j++) { w[j] = (float)(codes[c * 16 + j] & 15); w[j + 16] = (float)(codes[c * 16 + j] >> 4); }
        else
            for (int j = 0; j < 32; j++) w[j] = (float)((const int8_t *)codes)[c * 32 + j];
        for (int r = 0; r < rows; r++) {
            const float *xr = x + r * K + c * 32;
            for (int h = 0; h < sub; h++) {
                float t = 0.0f;
                for (int j = h * 32 / sub; j < (h + 1) * 32 / sub; j++) t += w[j] * xr[j];
                out[r] += t * half_to_float(scales[sub > 1 ? c * sub + h : c / per_group]);
            }
        }
    }
#endif
}

/* y [M, N] = x [M, K] @ w.T for w held as codes ([N, K / 2] for 4 bits, [N, K] for 8), scales and
 * offsets [N, K / g] (offsets may be NULL), xsum [M, K / g] the sums of x per group. */
void quant_matmul(const float *x, int64_t M, int64_t K, const uint8_t *codes, int bits, const uint16_t *scales,
                  const uint16_t *offsets, const float *xsum, int64_t N, int64_t g, float *y, int threads) {
    int64_t groups = K / g, row_bytes = bits == 4 ? K / 2 : K;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *cn = codes + n * row_bytes;
        const uint16_t *sn = scales + n * groups;
        for (int64_t m0 = 0; m0 < M; m0 += ROW_TILE) {
            int rows = M - m0 < ROW_TILE ? (int)(M - m0) : ROW_TILE;
            float out[ROW_TILE];
            dot_rows(x + m0 * K, K, cn, bits, sn, g, rows, out);
            if (offsets)
                for (int r = 0; r < rows; r++) {
                    const float *xs = xsum + (m0 + r) * groups;
                    const uint16_t *on = offsets + n * groups;
                    float t = 0.0f;
                    for (int64_t G = 0; G < groups; G++) t += half_to_float(on[G]) * xs[G];
                    out[r] += t;
                }
            for (int r = 0; r < rows; r++) y[(m0 + r) * N + n] = out[r];
        }
    }
}
