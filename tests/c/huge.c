/* 64-bit indexing end to end: mean((x - y)^2) over 2^31 + 4099 floats (8 GiB, and 8 GiB
 * more for the gradient), y a broadcast scalar. The value against a long double sum, every
 * gradient element against 2 (x - y) / n, the last ones past 2^31 and in the padded tail.
 * Run by `c_abi::c_client_past_two_to_the_31`, which is ignored by default (17 GiB). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "lossc.h"

int main(void) {
    const size_t n = (1ull << 31) + 4099;
    lossc_loss *loss = NULL;
    if (lossc_compile("mean((x - y) * (x - y))", NULL, &loss) != LOSSC_STATUS_OK) {
        fprintf(stderr, "%s", lossc_last_error());
        return 1;
    }
    float *x = malloc(n * sizeof(float));
    float *dx = malloc(n * sizeof(float));
    if (!x || !dx) {
        fprintf(stderr, "cannot allocate 2 x %zu floats\n", n);
        return 1;
    }
    const float y = 0.25f;
    long double want = 0;
    for (size_t i = 0; i < n; i++) {
        x[i] = (float)((i * 2654435761u) % 1000003) / 1000003.0f; /* scattered in [0, 1) */
        const long double d = (long double)x[i] - y;
        want += d * d;
        dx[i] = NAN;
    }
    want /= n;
    const float *inputs[2] = {x, &y};
    lossc_shape shapes[2] = {{1, 1, n}, {1, 1, 1}};
    float *grads[2] = {dx, NULL};
    double value;
    if (lossc_eval(loss, inputs, shapes, 2, &value, grads) != LOSSC_STATUS_OK) {
        fprintf(stderr, "%s", lossc_last_error());
        return 1;
    }
    const double rel = fabs(value - (double)want) / (double)want;
    printf("value %.9f, want %.9Lf: relative error %.2e\n", value, want, rel);
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        const double g = 2.0 * ((double)x[i] - y) / (double)n;
        if (!(fabs(dx[i] - g) <= 1e-6 * 2.0 / (double)n)) { /* NaN (never written) fails too */
            if (bad++ < 5) fprintf(stderr, "dx[%zu] = %.9e, want %.9e\n", i, dx[i], g);
        }
    }
    printf("%zu of %zu gradient elements off by more than 1e-6 of their scale\n", bad, n);
    lossc_free(loss);
    free(x);
    free(dx);
    return rel <= 1e-6 && bad == 0 ? 0 : 1;
}
