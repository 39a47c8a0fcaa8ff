/* What a hand-written kernel can do for the Combo loss (Taghanaki et al.): the same two
 * sweeps as lossc's plan, with SSE/FMA intrinsics, 128-bit vectors (what Cranelift 0.135
 * offers), and lossc's log (the exponent split at sqrt(1/2), e ln 2 + f as two floats, a
 * degree-8 polynomial by Estrin's scheme, the same coefficients):
 *
 *   sweep 1: read p, y: sum of the weighted cross-entropy (two clamped logs), p y, p and y
 *   sweep 2: read p, y, write d/dp (two divisions)
 *
 *   cc -O3 -mavx2 -mfma -fopenmp bench/c/combo.c -o /tmp/combo -lm && /tmp/combo
 *
 * It prints the median time at 16M elements over the median of a same-run bandwidth probe
 * of the same plan (read two arrays; read two, write one): the ratio `lossc bench combo`
 * reports as "x probe", on one thread and on two (each a half of the arrays). Not run in
 * CI; docs/backend.md quotes its figures. */
#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef __m128 V;
typedef __m128i VI;
#define K(c) _mm_set1_ps(c)
#define KI(c) _mm_set1_epi32(c)
#define ADD _mm_add_ps
#define SUB _mm_sub_ps
#define MUL _mm_mul_ps
#define DIV _mm_div_ps
#define FMA _mm_fmadd_ps
#define MAX _mm_max_ps
#define MIN _mm_min_ps
#define BLEND _mm_blendv_ps

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Q(f), highest degree first, as LOG_POLY in src/backend/cranelift/math.rs. */
static const float LOG_C[9] = {-7.6571643e-2f, 0.12764545f, -0.13156588f, 0.14201236f, -0.16623379f,
                               0.20001256f,    -0.25000823f, 0.33333331f, -0.5f};

/* log(x) for a positive normal x, as lossc's `log_normal` (the NaN select left out: a
 * clamped probability is never NaN here). */
static inline V log_normal(V x) {
    VI i = _mm_sub_epi32(_mm_castps_si128(x), KI(0x3f3504f3));
    VI e = _mm_srai_epi32(i, 23);
    V m = _mm_castsi128_ps(_mm_add_epi32(_mm_and_si128(i, KI(0x007fffff)), KI(0x3f3504f3)));
    V f = SUB(m, K(1.f));
    V ef = _mm_cvtepi32_ps(e);
    V a = MUL(ef, K(0.693145751953125f));
    V hi = ADD(a, f);
    V lo = SUB(f, SUB(hi, a));
    V small = FMA(ef, K(1.4286068e-6f), lo);
    /* Estrin over the first 8 coefficients, then Horner for the last. */
    V f2 = MUL(f, f), f4 = MUL(f2, f2);
    V t0 = FMA(K(LOG_C[6]), f, K(LOG_C[7])), t1 = FMA(K(LOG_C[4]), f, K(LOG_C[5]));
    V t2 = FMA(K(LOG_C[2]), f, K(LOG_C[3])), t3 = FMA(K(LOG_C[0]), f, K(LOG_C[1]));
    V u0 = FMA(t1, f2, t0), u1 = FMA(t3, f2, t2);
    V q = FMA(FMA(u1, f4, u0), f, K(LOG_C[8]));
    return ADD(hi, FMA(f2, q, small));
}

#define LO 1e-7f
#define HI 0.9999999f

/* Sweep 1: the four sums, in f32 lanes over 1024 positions at a time, then in f64 (lossc
 * moves them into f64 every 64 positions). */
static void sweep1(const float *p, const float *y, long n, double sums[4]) {
    for (long start = 0; start < n; start += 1024) {
        long end = start + 1024 < n ? start + 1024 : n;
        V ce = _mm_setzero_ps(), py = ce, sp = ce, sy = ce;
        for (long i = start; i < end; i += 4) {
            V pv = _mm_loadu_ps(p + i), yv = _mm_loadu_ps(y + i);
            V t1 = MIN(MAX(pv, K(LO)), K(HI));
            V below = _mm_cmplt_ps(pv, K(LO)), above = _mm_cmpgt_ps(pv, K(HI));
            V t7 = BLEND(BLEND(SUB(K(1.f), pv), K(1e-7f), above), K(HI), below);
            V term = FMA(MUL(K(0.5f), yv), log_normal(t1), MUL(MUL(K(0.5f), SUB(K(1.f), yv)), log_normal(t7)));
            ce = SUB(ce, term);
            py = FMA(pv, yv, py);
            sp = ADD(sp, pv);
            sy = ADD(sy, yv);
        }
        V all[4] = {ce, py, sp, sy};
        for (int k = 0; k < 4; k++) {
            float s[4];
            _mm_storeu_ps(s, all[k]);
            sums[k] += (double)s[0] + s[1] + s[2] + s[3];
        }
    }
}

/* Sweep 2: d/dp = y t12 - t11 - [p in range] t4 t13 / t7 + [p in range] t2 t13 / t1, as
 * `lossc show --grad combo` prints it. */
static void sweep2(const float *p, const float *y, float *g, long n, float t11, float t12, float t13) {
    for (long i = 0; i < n; i += 4) {
        V pv = _mm_loadu_ps(p + i), yv = _mm_loadu_ps(y + i);
        V t0 = MAX(pv, K(LO));
        V t1 = MIN(t0, K(HI));
        V below = _mm_cmplt_ps(pv, K(LO)), above = _mm_cmpgt_ps(pv, K(HI));
        V t7 = BLEND(BLEND(SUB(K(1.f), pv), K(1e-7f), above), K(HI), below);
        V t4 = MUL(K(0.5f), SUB(K(1.f), yv));
        V inside = _mm_andnot_ps(_mm_or_ps(below, above), _mm_castsi128_ps(KI(-1)));
        V a = _mm_and_ps(inside, DIV(MUL(t4, K(t13)), t7));
        V kept = _mm_and_ps(_mm_cmpge_ps(pv, K(LO)), _mm_cmple_ps(t0, K(HI)));
        V b = _mm_and_ps(kept, DIV(MUL(MUL(K(0.5f), yv), K(t13)), t1));
        _mm_storeu_ps(g + i, ADD(SUB(SUB(MUL(yv, K(t12)), K(t11)), a), b));
    }
}

/* The probe of the same plan: read p, y; then read p, y and write g. */
static void probe1(const float *p, const float *y, long n, double sums[4]) {
    V acc = _mm_setzero_ps();
    for (long i = 0; i < n; i += 4) acc = ADD(acc, ADD(_mm_loadu_ps(p + i), _mm_loadu_ps(y + i)));
    float s[4];
    _mm_storeu_ps(s, acc);
    sums[0] = s[0];
}

static void probe2(const float *p, const float *y, float *g, long n) {
    for (long i = 0; i < n; i += 4) _mm_storeu_ps(g + i, ADD(_mm_loadu_ps(p + i), _mm_loadu_ps(y + i)));
}

static volatile double sink;

/* The loss (kernel = 1) or the probe (0) over n elements on `threads` threads, each a
 * contiguous share (a multiple of 4); the sums meet between the sweeps. */
static double combo(int kernel, const float *p, const float *y, float *g, long n, int threads) {
    double total[4] = {0, 0, 0, 0};
    long share = n / threads / 4 * 4;
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        int k = omp_get_thread_num();
#else
        int k = 0;
#endif
        long lo = share * k, m = k == threads - 1 ? n - lo : share;
        double sums[4] = {0, 0, 0, 0};
        kernel ? sweep1(p + lo, y + lo, m, sums) : probe1(p + lo, y + lo, m, sums);
#pragma omp critical
        for (int j = 0; j < 4; j++) total[j] += sums[j];
#pragma omp barrier
        double size = (double)n, t9 = total[2] + total[3] + 1, t10 = (2 * total[1] + 1) / t9;
        float t11 = (float)(-0.5 * (t10 / t9)), t12 = (float)(2 * (-0.5 / t9)), t13 = (float)(-(0.5 / size));
        kernel ? sweep2(p + lo, y + lo, g + lo, m, t11, t12, t13) : probe2(p + lo, y + lo, g + lo, m);
    }
    double t9 = total[2] + total[3] + 1;
    return 0.5 * (total[0] / (double)n) - 0.5 * ((2 * total[1] + 1) / t9);
}

static int by_value(const void *a, const void *b) {
    double d = *(const double *)a - *(const double *)b;
    return (d > 0) - (d < 0);
}

int main(void) {
    long n = 1L << 24;
    float *p = malloc(4 * n), *y = malloc(4 * n), *g = malloc(4 * n);
    srand((unsigned)time(NULL));
    for (long i = 0; i < n; i++) {
        p[i] = rand() / (float)RAND_MAX;
        y[i] = (float)(rand() % 2);
    }
    memset(g, 0, 4 * n);
    /* The loss in f64, to check the kernel against. */
    double ce = 0, py = 0, sp = 0, sy = 0;
    for (long i = 0; i < n; i++) {
        double pi = fmin(fmax(p[i], 1e-7), 1 - 1e-7);
        ce -= 0.5 * y[i] * log(pi) + 0.5 * (1 - y[i]) * log(1 - pi);
        py += p[i] * (double)y[i], sp += p[i], sy += y[i];
    }
    double reference = 0.5 * ce / n - 0.5 * (2 * py + 1) / (sp + sy + 1);
    printf("128-bit vectors; the loss is off the f64 one by %.1e relative\n",
           fabs(combo(1, p, y, g, n, 1) - reference) / fabs(reference));
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
            sink += combo(1, p, y, g, n, threads);
            double t1 = now();
            sink += combo(0, p, y, g, n, threads);
            if (rep >= 0) {
                kernel[rep] = t1 - t0;
                floor[rep] = now() - t1;
            }
        }
        qsort(kernel, RUNS, sizeof(double), by_value);
        qsort(floor, RUNS, sizeof(double), by_value);
        printf("16M elements, %d thread%s: %.2f ms, probe %.2f ms, x probe %.2f\n", threads, threads > 1 ? "s" : "",
               kernel[RUNS / 2] * 1e3, floor[RUNS / 2] * 1e3, kernel[RUNS / 2] / floor[RUNS / 2]);
    }
    return 0;
}
