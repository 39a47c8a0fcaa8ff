/* What a hand-written kernel can do: BCE on logits, value and gradient, with SSE/AVX2 and FMA
 * intrinsics, the same algorithm as lossc's kernel (e^-|x| once, computed a step ahead; a
 * division for the sigmoid; log(1 + e^-|x|) as 2 atanh(z/(2+z)), the same polynomials). Built with
 * 128-bit vectors (what Cranelift 0.135 offers) or 256-bit ones (what it lacks):
 *
 *   cc -O3 -mavx2 -mfma -fopenmp           bench/c/bce_logits.c -o /tmp/bce4 -lm && /tmp/bce4
 *   cc -O3 -mavx2 -mfma -fopenmp -DWIDTH=8 bench/c/bce_logits.c -o /tmp/bce8 -lm && /tmp/bce8
 *
 * It prints ns per element at 1M elements (cache-resident, one thread) for Horner and Estrin
 * polynomials, then the median time at 16M elements over the median of a same-run
 * bandwidth probe (read two arrays, write one), the ratio `lossc bench` reports as
 * "x probe", on one thread and, built with -fopenmp, on two (each a half of the arrays).
 * Not run in CI; docs/backend.md quotes its figures. */
#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef WIDTH
#define WIDTH 4
#endif

#if WIDTH == 8
typedef __m256 V;
typedef __m256i VI;
#define K(c) _mm256_set1_ps(c)
#define KI(c) _mm256_set1_epi32(c)
#define LOAD _mm256_loadu_ps
#define STORE _mm256_storeu_ps
#define ADD _mm256_add_ps
#define SUB _mm256_sub_ps
#define MUL _mm256_mul_ps
#define DIV _mm256_div_ps
#define FMA _mm256_fmadd_ps
#define FNMA _mm256_fnmadd_ps
#define MAX _mm256_max_ps
#define OR _mm256_or_ps
#define BLEND _mm256_blendv_ps
#define LT(a, b) _mm256_cmp_ps(a, b, _CMP_LT_OQ)
#define ISUB _mm256_sub_epi32
#define IADD _mm256_add_epi32
#define IAND _mm256_and_si256
#define SRAI _mm256_srai_epi32
#define SLLI _mm256_slli_epi32
#define TOF _mm256_castsi256_ps
#define TOI _mm256_castps_si256
#define CVT _mm256_cvtepi32_ps
#define ZERO _mm256_setzero_ps
#else
typedef __m128 V;
typedef __m128i VI;
#define K(c) _mm_set1_ps(c)
#define KI(c) _mm_set1_epi32(c)
#define LOAD _mm_loadu_ps
#define STORE _mm_storeu_ps
#define ADD _mm_add_ps
#define SUB _mm_sub_ps
#define MUL _mm_mul_ps
#define DIV _mm_div_ps
#define FMA _mm_fmadd_ps
#define FNMA _mm_fnmadd_ps
#define MAX _mm_max_ps
#define OR _mm_or_ps
#define BLEND _mm_blendv_ps
#define LT _mm_cmplt_ps
#define ISUB _mm_sub_epi32
#define IADD _mm_add_epi32
#define IAND _mm_and_si128
#define SRAI _mm_srai_epi32
#define SLLI _mm_slli_epi32
#define TOF _mm_castsi128_ps
#define TOI _mm_castps_si128
#define CVT _mm_cvtepi32_ps
#define ZERO _mm_setzero_ps
#endif

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Coefficients as in src/backend/cranelift/math.rs. */
static const float EXP_C[5] = {1.3838903e-3f, 8.3691925e-3f, 4.1668102e-2f, 0.16666517f, 0.49999994f};
static const float ATANH_C[4] = {0.28006372f, 0.28003097f, 0.40021434f, 0.66666418f};

/* Highest degree first; Horner's rule or Estrin's scheme. */
static inline V poly(V x, const float *c, int n, int estrin) {
    if (!estrin) {
        V p = K(c[0]);
        for (int i = 1; i < n; i++) p = FMA(p, x, K(c[i]));
        return p;
    }
    V t[8];
    int m = 0;
    for (int i = n - 1; i >= 0; i -= 2) /* pairs, lowest degree first */
        t[m++] = i > 0 ? FMA(K(c[i - 1]), x, K(c[i])) : K(c[i]);
    V power = MUL(x, x);
    while (m > 1) {
        int k = 0;
        for (int i = 0; i < m; i += 2) t[k++] = i + 1 < m ? FMA(t[i + 1], power, t[i]) : t[i];
        m = k;
        power = MUL(power, power);
    }
    return t[0];
}

/* e^x for x <= 0. */
static inline V exp_neg(V x, int estrin) {
    x = MAX(K(-104.f), x);
    V t = FMA(x, K(1.44269504f), K(12582912.f));
    V n = SUB(t, K(12582912.f));
    V r = FMA(n, K(-0.693145751953125f), x);
    r = FMA(n, K(-1.4286068e-6f), r);
    V p = poly(r, EXP_C, 5, estrin);
    p = FMA(FMA(p, r, K(1.f)), r, K(1.f));
    VI ni = ISUB(TOI(t), TOI(K(12582912.f)));
    VI n1 = SRAI(ni, 1), n2 = ISUB(ni, n1);
    V s1 = TOF(SLLI(IADD(n1, KI(127)), 23));
    V s2 = TOF(SLLI(IADD(n2, KI(127)), 23));
    return MUL(MUL(p, s1), s2);
}

static inline V neg_abs(V x) { return OR(x, K(-0.f)); }

/* One step: WIDTH positions, given z = e^-|x|. Adds the loss to *acc, writes the gradient. */
static inline void step(const float *x, const float *y, float *g, long i, V z, float scale, V *acc, int estrin) {
    V xv = LOAD(x + i), yv = LOAD(y + i);
    V r = DIV(K(1.f), ADD(z, K(1.f)));
    /* log(1 + z) = 2 atanh(s) = 2s + s^3 Q(s^2), s = z/d, d = 2 + z; the rounding errors of d
     * and of s are recovered (c and res, exact) and added in as a correction. */
    V d = ADD(z, K(2.f));
    V s = DIV(z, d);
    V t = MUL(s, s);
    V q = poly(t, ATANH_C, 4, estrin);
    V c = SUB(z, SUB(d, K(2.f)));
    V res = FNMA(s, d, z);
    V err = FNMA(s, c, res);
    V correction = MUL(err, FMA(d, K(-0.32625f), K(1.632f)));
    V l = ADD(ADD(s, s), FMA(MUL(s, t), q, correction));
    V loss = SUB(ADD(MAX(xv, K(0.f)), l), MUL(xv, yv));
    V sig = BLEND(r, MUL(z, r), LT(xv, K(0.f)));
    STORE(g + i, MUL(SUB(sig, yv), K(scale)));
    *acc = ADD(*acc, loss);
}

/* n a multiple of WIDTH. */
static float run(const float *x, const float *y, float *g, long n, int estrin) {
    V acc = ZERO();
    float scale = 1.0f / (float)n;
    V next = exp_neg(neg_abs(LOAD(x)), estrin);
    for (long i = 0; i < n; i += WIDTH) {
        V z = next;
        long j = i + WIDTH < n ? i + WIDTH : i;
        next = exp_neg(neg_abs(LOAD(x + j)), estrin);
        step(x, y, g, i, z, scale, &acc, estrin);
    }
    float s[WIDTH], total = 0;
    STORE(s, acc);
    for (int k = 0; k < WIDTH; k++) total += s[k];
    return total * scale;
}

/* The bandwidth probe: read two arrays, write one (what `lossc bench` times as "probe"). */
static float probe(const float *x, const float *y, float *g, long n) {
    V acc = ZERO();
    for (long i = 0; i < n; i += WIDTH) {
        V s = ADD(LOAD(x + i), LOAD(y + i));
        STORE(g + i, s);
        acc = ADD(acc, s);
    }
    float s[WIDTH];
    STORE(s, acc);
    return s[0];
}

static volatile float sink;

/* The kernel (or the probe) over n elements on `threads` threads, each a contiguous share
 * (a multiple of WIDTH). */
static void split(int kernel, const float *x, const float *y, float *g, long n, int threads) {
    float sum = 0;
    long share = n / threads / WIDTH * WIDTH;
#pragma omp parallel for num_threads(threads) reduction(+ : sum)
    for (int k = 0; k < threads; k++) {
        long lo = share * k, m = k == threads - 1 ? n - lo : share;
        sum += kernel ? run(x + lo, y + lo, g + lo, m, 1) : probe(x + lo, y + lo, g + lo, m);
    }
    sink += sum;
}

static int by_value(const void *a, const void *b) {
    double d = *(const double *)a - *(const double *)b;
    return (d > 0) - (d < 0);
}

int main(void) {
    long big = 1L << 24, n = 1L << 20;
    float *x = malloc(4 * big), *y = malloc(4 * big), *g = malloc(4 * big);
    srand((unsigned)time(NULL));
    for (long i = 0; i < big; i++) {
        x[i] = (rand() / (float)RAND_MAX - 0.5f) * 8;
        y[i] = (float)(rand() % 2);
    }
    memset(g, 0, 4 * big);
    /* The mean loss in f64, to check the kernel against: they agree to the error of its f32
     * sums of n/WIDTH values per lane, a few 1e-5 (lossc moves its sums into f64 every 64
     * positions). */
    double reference = 0;
    for (long i = 0; i < n; i++) {
        double xi = x[i];
        reference += fmax(xi, 0) + log1p(exp(-fabs(xi))) - xi * y[i];
    }
    reference /= (double)n;
    printf("%d-bit vectors\n", WIDTH * 32);
    for (int estrin = 0; estrin < 2; estrin++) {
        double best = 1e9;
        float loss = 0;
        for (int rep = 0; rep < 15; rep++) {
            double t0 = now();
            loss = run(x, y, g, n, estrin);
            double t = now() - t0;
            if (t < best) best = t;
        }
        printf("%s, 1M elements: %.2f ns/element (loss off the f64 mean by %.1e)\n", estrin ? "estrin" : "horner",
               best * 1e9 / n, fabs(loss - reference) / reference);
    }
    /* 16M elements, out of cache: kernel and probe alternate, medians of 9 after a warm-up. */
    enum { RUNS = 9 };
#ifdef _OPENMP
    int most = 2;
#else
    int most = 1;
#endif
    for (int threads = 1; threads <= most; threads++) {
        double kernel[RUNS], floor[RUNS];
        for (int rep = -1; rep < RUNS; rep++) {
            double t0 = now();
            split(1, x, y, g, big, threads);
            double t1 = now();
            split(0, x, y, g, big, threads);
            if (rep >= 0) {
                kernel[rep] = t1 - t0;
                floor[rep] = now() - t1;
            }
        }
        qsort(kernel, RUNS, sizeof(double), by_value);
        qsort(floor, RUNS, sizeof(double), by_value);
        printf("estrin, 16M elements, %d thread%s: %.2f ms, probe %.2f ms, x probe %.2f\n", threads,
               threads > 1 ? "s" : "", kernel[RUNS / 2] * 1e3, floor[RUNS / 2] * 1e3,
               kernel[RUNS / 2] / floor[RUNS / 2]);
    }
    return 0;
}
