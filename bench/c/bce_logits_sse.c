/* What a 128-bit kernel can do: BCE on logits, value and gradient, hand-written with SSE/FMA
 * intrinsics, the same algorithm as lossc's kernel (e^-|x| once, one division, a log of
 * 1 + e^-|x| by the same reduction and polynomials). It bounds what lossc's Cranelift
 * kernels (128-bit vectors only) could reach, and shows where the time goes:
 *
 *   cc -O3 -mavx2 -mfma bench/c/bce_logits_sse.c -o /tmp/bce -lm && /tmp/bce
 *
 * prints ns per element at 1M elements (cache-resident in L2/L3, one thread) for four
 * variants: Horner or Estrin polynomials, and e^-|x| in the step's own chain or computed
 * a step ahead. Not run in CI; docs/backend.md quotes its figures. */
#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define K(c) _mm_set1_ps(c)

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Coefficients as in src/backend/cranelift/math.rs. */
static const float EXP_C[5] = {1.3838903e-3f, 8.3691925e-3f, 4.1668102e-2f, 0.16666517f, 0.49999994f};
static const float LOG_C[8] = {-7.6571643e-2f, 0.12764545f, -0.13156588f, 0.14201236f,
                               -0.16623379f,   0.20001256f, -0.25000823f, 0.33333331f};

/* Highest degree first; Horner's rule or Estrin's scheme. */
static inline __m128 poly(__m128 x, const float *c, int n, int estrin) {
    if (!estrin) {
        __m128 p = K(c[0]);
        for (int i = 1; i < n; i++) p = _mm_fmadd_ps(p, x, K(c[i]));
        return p;
    }
    __m128 t[8];
    int m = 0;
    for (int i = n - 1; i >= 0; i -= 2) /* pairs, lowest degree first */
        t[m++] = i > 0 ? _mm_fmadd_ps(K(c[i - 1]), x, K(c[i])) : K(c[i]);
    __m128 power = _mm_mul_ps(x, x);
    while (m > 1) {
        int k = 0;
        for (int i = 0; i < m; i += 2) t[k++] = i + 1 < m ? _mm_fmadd_ps(t[i + 1], power, t[i]) : t[i];
        m = k;
        power = _mm_mul_ps(power, power);
    }
    return t[0];
}

/* e^x for x <= 0. */
static inline __m128 exp_neg(__m128 x, int estrin) {
    x = _mm_max_ps(K(-104.f), x);
    __m128 t = _mm_fmadd_ps(x, K(1.44269504f), K(12582912.f));
    __m128 n = _mm_sub_ps(t, K(12582912.f));
    __m128 r = _mm_fmadd_ps(n, K(-0.693145751953125f), x);
    r = _mm_fmadd_ps(n, K(-1.4286068e-6f), r);
    __m128 p = poly(r, EXP_C, 5, estrin);
    p = _mm_fmadd_ps(_mm_fmadd_ps(p, r, K(1.f)), r, K(1.f));
    __m128i ni = _mm_sub_epi32(_mm_castps_si128(t), _mm_castps_si128(K(12582912.f)));
    __m128i n1 = _mm_srai_epi32(ni, 1), n2 = _mm_sub_epi32(ni, n1);
    __m128 s1 = _mm_castsi128_ps(_mm_slli_epi32(_mm_add_epi32(n1, _mm_set1_epi32(127)), 23));
    __m128 s2 = _mm_castsi128_ps(_mm_slli_epi32(_mm_add_epi32(n2, _mm_set1_epi32(127)), 23));
    return _mm_mul_ps(_mm_mul_ps(p, s1), s2);
}

static inline __m128 neg_abs(__m128 x) { return _mm_or_ps(x, K(-0.f)); }

/* One step: four positions, given z = e^-|x|. Adds the loss to *acc, writes the gradient. */
static inline void step(const float *x, const float *y, float *g, long i, __m128 z, float scale, __m128 *acc,
                        int estrin) {
    __m128 xv = _mm_loadu_ps(x + i), yv = _mm_loadu_ps(y + i);
    __m128 u = _mm_add_ps(z, K(1.f));
    __m128 r = _mm_div_ps(K(1.f), u);
    /* log(1 + z) = e ln 2 + log1p(f) + c/u, c = the rounding error of u */
    __m128i ui = _mm_sub_epi32(_mm_castps_si128(u), _mm_set1_epi32(0x3f3504f3));
    __m128 e = _mm_cvtepi32_ps(_mm_srai_epi32(ui, 23));
    __m128i fi = _mm_add_epi32(_mm_and_si128(ui, _mm_set1_epi32(0x7fffff)), _mm_set1_epi32(0x3f3504f3));
    __m128 f = _mm_sub_ps(_mm_castsi128_ps(fi), K(1.f));
    __m128 a = _mm_mul_ps(e, K(0.693145751953125f));
    __m128 hi = _mm_add_ps(a, f), lo = _mm_sub_ps(f, _mm_sub_ps(hi, a));
    __m128 c = _mm_sub_ps(z, _mm_sub_ps(u, K(1.f)));
    __m128 small = _mm_add_ps(_mm_fmadd_ps(e, K(1.4286068e-6f), lo), _mm_mul_ps(c, r));
    __m128 q = _mm_fmadd_ps(poly(f, LOG_C, 8, estrin), f, K(-0.5f));
    __m128 l = _mm_add_ps(hi, _mm_fmadd_ps(_mm_mul_ps(f, f), q, small));
    __m128 loss = _mm_sub_ps(_mm_add_ps(_mm_max_ps(xv, K(0.f)), l), _mm_mul_ps(xv, yv));
    __m128 sig = _mm_blendv_ps(r, _mm_mul_ps(z, r), _mm_cmplt_ps(xv, K(0.f)));
    _mm_storeu_ps(g + i, _mm_mul_ps(_mm_sub_ps(sig, yv), K(scale)));
    *acc = _mm_add_ps(*acc, loss);
}

static float run(const float *x, const float *y, float *g, long n, int estrin, int ahead) {
    __m128 acc = _mm_setzero_ps();
    float scale = 1.0f / (float)n;
    if (ahead) {
        __m128 next = exp_neg(neg_abs(_mm_loadu_ps(x)), estrin);
        for (long i = 0; i < n; i += 4) {
            __m128 z = next;
            long j = i + 4 < n ? i + 4 : i;
            next = exp_neg(neg_abs(_mm_loadu_ps(x + j)), estrin);
            step(x, y, g, i, z, scale, &acc, estrin);
        }
    } else {
        for (long i = 0; i < n; i += 4) step(x, y, g, i, exp_neg(neg_abs(_mm_loadu_ps(x + i)), estrin), scale, &acc, estrin);
    }
    float s[4];
    _mm_storeu_ps(s, acc);
    return (s[0] + s[1] + s[2] + s[3]) * scale;
}

int main(void) {
    long n = 1L << 20;
    float *x = malloc(4 * n), *y = malloc(4 * n), *g = malloc(4 * n);
    srand((unsigned)time(NULL));
    for (long i = 0; i < n; i++) {
        x[i] = (rand() / (float)RAND_MAX - 0.5f) * 8;
        y[i] = (float)(rand() % 2);
    }
    /* The mean loss in f64, to check the kernels against: they agree to the error of their
     * f32 sums of 256K values per lane, a few 1e-5 (lossc moves its sums into f64 every 64
     * positions). */
    double reference = 0;
    for (long i = 0; i < n; i++) {
        double xi = x[i];
        reference += fmax(xi, 0) + log1p(exp(-fabs(xi))) - xi * y[i];
    }
    reference /= (double)n;
    const char *names[4] = {"horner", "estrin", "horner, exp a step ahead", "estrin, exp a step ahead"};
    for (int v = 0; v < 4; v++) {
        double best = 1e9;
        float loss = 0;
        for (int rep = 0; rep < 15; rep++) {
            double t0 = now();
            loss = run(x, y, g, n, v & 1, v >> 1);
            double t = now() - t0;
            if (t < best) best = t;
        }
        printf("%-26s %.2f ns/element (loss off the f64 mean by %.1e)\n", names[v], best * 1e9 / n,
               fabs(loss - reference) / reference);
    }
    return 0;
}
