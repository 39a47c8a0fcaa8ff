/* Eight threads share one compiled loss and evaluate different inputs at once;
 * every value and gradient must equal, bit for bit, the one computed on the main
 * thread alone. Each thread also checks that lossc_last_error is its own.
 *
 * Built with -std=c11 -Wall -Wextra -Werror -pedantic -pthread by tests/c_abi.rs.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lossc.h"

#define THREADS 8
#define ROUNDS 6
#define BATCH 2
#define SPATIAL 5000 /* several blocks per evaluation, so the pool splits the work */
#define N (BATCH * SPATIAL)

typedef struct {
    const lossc_loss *loss;
    int id;
    float x[N], y[N];
    double value;      /* the single-threaded result */
    float dx[N], dy[N];
    int failed;
} job_t;

static uint64_t next(uint64_t *s) {
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return *s >> 33;
}

static void fill(job_t *job) {
    uint64_t s = 1000u + (uint64_t)job->id;
    for (int i = 0; i < N; i++) {
        job->x[i] = (float)((double)next(&s) / 2147483648.0 * 8.0 - 4.0);
        job->y[i] = next(&s) % 3 == 0 ? 1.0f : 0.0f;
    }
}

static int eval(const job_t *job, double *value, float *dx, float *dy) {
    const float *inputs[2] = {job->x, job->y};
    lossc_shape shapes[2] = {{BATCH, 1, SPATIAL}, {BATCH, 1, SPATIAL}};
    float *grads[2] = {dx, dy};
    return lossc_eval(job->loss, inputs, shapes, 2, value, grads) == LOSSC_STATUS_OK;
}

static void *worker(void *arg) {
    job_t *job = arg;
    static float dx[THREADS][N], dy[THREADS][N];
    for (int round = 0; round < ROUNDS; round++) {
        double value;
        if (!eval(job, &value, dx[job->id], dy[job->id])) {
            fprintf(stderr, "thread %d: %s", job->id, lossc_last_error());
            job->failed = 1;
            return NULL;
        }
        if (memcmp(&value, &job->value, sizeof value) != 0 || memcmp(dx[job->id], job->dx, sizeof job->dx) != 0 ||
            memcmp(dy[job->id], job->dy, sizeof job->dy) != 0) {
            fprintf(stderr, "thread %d round %d: %.17g differs from %.17g (or a gradient does)\n", job->id, round,
                    value, job->value);
            job->failed = 1;
        }
        /* A failure on this thread sets this thread's message only. */
        char params[32];
        snprintf(params, sizeof params, "bad%d=1", job->id);
        lossc_loss *unused = NULL;
        char want[32];
        snprintf(want, sizeof want, "`bad%d`", job->id);
        if (lossc_compile("dice", params, &unused) != LOSSC_STATUS_PARAMS || !strstr(lossc_last_error(), want)) {
            fprintf(stderr, "thread %d: last error is %s", job->id, lossc_last_error());
            job->failed = 1;
        }
    }
    return NULL;
}

int main(void) {
    lossc_loss *loss = NULL;
    if (lossc_compile("0.5*dice(sigmoid(x), y) + bce_logits(x, y)", NULL, &loss) != LOSSC_STATUS_OK) {
        fprintf(stderr, "%s", lossc_last_error());
        return 1;
    }
    static job_t jobs[THREADS];
    for (int t = 0; t < THREADS; t++) {
        jobs[t].loss = loss;
        jobs[t].id = t;
        fill(&jobs[t]);
        if (!eval(&jobs[t], &jobs[t].value, jobs[t].dx, jobs[t].dy) || !isfinite(jobs[t].value)) {
            fprintf(stderr, "single-threaded eval %d failed: %s", t, lossc_last_error());
            return 1;
        }
    }
    for (int t = 1; t < THREADS; t++) {
        if (jobs[t].value == jobs[0].value) {
            fprintf(stderr, "inputs %d and 0 give the same value: the test would prove little\n", t);
            return 1;
        }
    }
    pthread_t threads[THREADS];
    for (int t = 0; t < THREADS; t++) {
        if (pthread_create(&threads[t], NULL, worker, &jobs[t]) != 0) {
            fprintf(stderr, "pthread_create failed\n");
            return 1;
        }
    }
    int failed = 0;
    for (int t = 0; t < THREADS; t++) {
        pthread_join(threads[t], NULL);
        failed |= jobs[t].failed;
    }
    lossc_free(loss);
    if (failed) return 1;
    printf("threads: %d threads x %d rounds, bitwise equal to single-threaded\n", THREADS, ROUNDS);
    return 0;
}
