/* The C client of liblossc: every exported function, on success and on every
 * error path, with values and gradients checked against the f64 reference numbers
 * that tests/c_abi.rs computes with the Rust API and writes to a fixture file.
 *
 * Built with -std=c11 -Wall -Wextra -Werror -pedantic, linked against liblossc.so
 * and liblossc.a, and run under valgrind by tests/c_abi.rs.
 *
 * usage: capi_test FIXTURE
 *
 * The fixture is whitespace-separated text: `cases N`, then per case
 *   case SOURCE PARAMS(or -) N_INPUTS N_TERMS
 *   input NAME B C S v...        (one line per input)
 *   value V
 *   grad NAME g...               (one line per input, float64 reference)
 *   terms t...                   (N_TERMS values)
 * and at the end `show LEN` and `show_grad LEN`, each followed by a newline and LEN
 * bytes: the Rust API's canonical text of the first case's loss.
 */
#define _POSIX_C_SOURCE 200809L /* access() */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lossc.h"

#define MAX_INPUTS 4

static int failures = 0;

#define CHECK(cond, ...)                                                    \
    do {                                                                    \
        if (!(cond)) {                                                      \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                   \
            fprintf(stderr, "\n");                                          \
            failures++;                                                     \
        }                                                                   \
    } while (0)

/* A call that must fail with `want`, leaving a last error that contains `needle`. */
static void expect_failure(lossc_status got, lossc_status want, const char *needle, const char *what) {
    const char *msg = lossc_last_error();
    CHECK(got == want, "%s: status %s, expected %s; message: %s", what, lossc_status_name((int)got),
          lossc_status_name((int)want), msg);
    CHECK(msg != NULL && strstr(msg, needle) != NULL, "%s: message lacks \"%s\": %s", what, needle,
          msg ? msg : "(null)");
}

typedef struct {
    char name[32];
    lossc_shape shape;
    size_t len;
    float *data;
    double *data64;
    double *grad_ref;
} input_t;

typedef struct {
    char source[256];
    char params[128];
    size_t n_inputs, n_terms;
    input_t inputs[MAX_INPUTS];
    double value;
    double terms[8];
} case_t;

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

static void expect_word(FILE *f, const char *word) {
    char buf[64];
    if (fscanf(f, "%63s", buf) != 1 || strcmp(buf, word) != 0) {
        fprintf(stderr, "fixture: expected `%s`\n", word);
        exit(2);
    }
}

static double read_double(FILE *f) {
    char buf[64];
    if (fscanf(f, "%63s", buf) != 1) {
        fprintf(stderr, "fixture: expected a number\n");
        exit(2);
    }
    return strtod(buf, NULL);
}

static void read_case(FILE *f, case_t *c) {
    long n_inputs, n_terms;
    expect_word(f, "case");
    if (fscanf(f, "%255s %127s %ld %ld", c->source, c->params, &n_inputs, &n_terms) != 4 || n_inputs < 1 ||
        n_inputs > MAX_INPUTS || n_terms < 1 || n_terms > 8) {
        fprintf(stderr, "fixture: bad case line\n");
        exit(2);
    }
    c->n_inputs = (size_t)n_inputs;
    c->n_terms = (size_t)n_terms;
    for (size_t i = 0; i < c->n_inputs; i++) {
        input_t *in = &c->inputs[i];
        long b, k, s;
        expect_word(f, "input");
        if (fscanf(f, "%31s %ld %ld %ld", in->name, &b, &k, &s) != 4) {
            fprintf(stderr, "fixture: bad input line\n");
            exit(2);
        }
        in->shape.batch = b;
        in->shape.classes = k;
        in->shape.spatial = s;
        in->len = (size_t)(b * k * s);
        in->data = xmalloc(in->len * sizeof(float));
        in->data64 = xmalloc(in->len * sizeof(double));
        for (size_t j = 0; j < in->len; j++) {
            in->data64[j] = read_double(f);
            in->data[j] = (float)in->data64[j];
        }
    }
    expect_word(f, "value");
    c->value = read_double(f);
    for (size_t i = 0; i < c->n_inputs; i++) {
        input_t *in = &c->inputs[i];
        char name[32];
        expect_word(f, "grad");
        if (fscanf(f, "%31s", name) != 1 || strcmp(name, in->name) != 0) {
            fprintf(stderr, "fixture: bad grad line\n");
            exit(2);
        }
        in->grad_ref = xmalloc(in->len * sizeof(double));
        for (size_t j = 0; j < in->len; j++) in->grad_ref[j] = read_double(f);
    }
    expect_word(f, "terms");
    for (size_t t = 0; t < c->n_terms; t++) c->terms[t] = read_double(f);
}

static char *read_text(FILE *f, const char *word) {
    long len;
    expect_word(f, word);
    if (fscanf(f, "%ld", &len) != 1 || len < 0 || fgetc(f) != '\n') {
        fprintf(stderr, "fixture: bad %s length\n", word);
        exit(2);
    }
    char *text = xmalloc((size_t)len + 1);
    if (fread(text, 1, (size_t)len, f) != (size_t)len) {
        fprintf(stderr, "fixture: short %s text\n", word);
        exit(2);
    }
    text[len] = '\0';
    return text;
}

static void free_case(case_t *c) {
    for (size_t i = 0; i < c->n_inputs; i++) {
        free(c->inputs[i].data);
        free(c->inputs[i].data64);
        free(c->inputs[i].grad_ref);
    }
}

static int close_to(double got, double want, double rel, double abs_tol) {
    return fabs(got - want) <= abs_tol + rel * fabs(want);
}

/* Largest |got - want| over an array, relative to the largest |want| (or 1e-3). */
static double grad_error(const float *got32, const double *got64, const double *want, size_t n) {
    double err = 0.0, scale = 1e-3;
    for (size_t j = 0; j < n; j++) {
        double g = got32 ? (double)got32[j] : got64[j];
        double d = fabs(g - want[j]);
        if (!(d <= err)) err = d; /* NaN sticks */
        if (fabs(want[j]) > scale) scale = fabs(want[j]);
    }
    return err / scale;
}

/* Values and gradients of one case, float32 and float64, against the reference. */
static void check_case(const case_t *c) {
    lossc_loss *loss = NULL;
    const char *params = strcmp(c->params, "-") == 0 ? NULL : c->params;
    lossc_status st = lossc_compile(c->source, params, &loss);
    CHECK(st == LOSSC_STATUS_OK, "compile %s: %s", c->source, lossc_last_error());
    if (st != LOSSC_STATUS_OK) return;

    CHECK(lossc_num_inputs(loss) == c->n_inputs, "%s: %zu inputs", c->source, lossc_num_inputs(loss));
    const float *inputs[MAX_INPUTS];
    const double *inputs64[MAX_INPUTS];
    lossc_shape shapes[MAX_INPUTS];
    float *grads[MAX_INPUTS];
    double *grads64[MAX_INPUTS];
    for (size_t i = 0; i < c->n_inputs; i++) {
        const char *name = lossc_input_name(loss, i);
        CHECK(name && strcmp(name, c->inputs[i].name) == 0, "%s: input %zu is %s", c->source, i,
              name ? name : "(null)");
        inputs[i] = c->inputs[i].data;
        inputs64[i] = c->inputs[i].data64;
        shapes[i] = c->inputs[i].shape;
        grads[i] = xmalloc(c->inputs[i].len * sizeof(float));
        grads64[i] = xmalloc(c->inputs[i].len * sizeof(double));
    }

    /* float32: value only, then value and every gradient. */
    double value = -1.0, value_only = -1.0;
    st = lossc_eval(loss, inputs, shapes, c->n_inputs, &value_only, NULL);
    CHECK(st == LOSSC_STATUS_OK, "eval %s: %s", c->source, lossc_last_error());
    CHECK(close_to(value_only, c->value, 1e-5, 1e-6), "%s: value %.9g, reference %.9g", c->source, value_only,
          c->value);
    st = lossc_eval(loss, inputs, shapes, c->n_inputs, &value, grads);
    CHECK(st == LOSSC_STATUS_OK, "eval+grad %s: %s", c->source, lossc_last_error());
    CHECK(close_to(value, c->value, 1e-5, 1e-6), "%s: value %.9g, reference %.9g", c->source, value, c->value);
    for (size_t i = 0; i < c->n_inputs; i++) {
        double err = grad_error(grads[i], NULL, c->inputs[i].grad_ref, c->inputs[i].len);
        CHECK(err <= 1e-4, "%s: d/d%s off by %.3g (relative)", c->source, c->inputs[i].name, err);
    }

    /* A NULL entry skips that gradient and leaves its buffer alone. */
    if (c->n_inputs >= 2) {
        float *some[MAX_INPUTS];
        for (size_t i = 0; i < c->n_inputs; i++) some[i] = grads[i];
        some[1] = NULL;
        grads[1][0] = 12345.0f;
        st = lossc_eval(loss, inputs, shapes, c->n_inputs, &value, some);
        CHECK(st == LOSSC_STATUS_OK, "eval skip %s: %s", c->source, lossc_last_error());
        CHECK(grads[1][0] == 12345.0f, "%s: a skipped gradient was written", c->source);
        double err = grad_error(grads[0], NULL, c->inputs[0].grad_ref, c->inputs[0].len);
        CHECK(err <= 1e-4, "%s: d/d%s off by %.3g with another skipped", c->source, c->inputs[0].name, err);
    }

    /* float64 by the reference evaluator: tight. */
    double value64 = -1.0;
    st = lossc_eval_f64(loss, inputs64, shapes, c->n_inputs, &value64, grads64);
    CHECK(st == LOSSC_STATUS_OK, "eval_f64 %s: %s", c->source, lossc_last_error());
    CHECK(close_to(value64, c->value, 1e-12, 1e-14), "%s: f64 value %.17g, reference %.17g", c->source, value64,
          c->value);
    for (size_t i = 0; i < c->n_inputs; i++) {
        double err = grad_error(NULL, grads64[i], c->inputs[i].grad_ref, c->inputs[i].len);
        CHECK(err <= 1e-12, "%s: f64 d/d%s off by %.3g", c->source, c->inputs[i].name, err);
    }
    st = lossc_eval_f64(loss, inputs64, shapes, c->n_inputs, &value64, NULL);
    CHECK(st == LOSSC_STATUS_OK && close_to(value64, c->value, 1e-12, 1e-14), "%s: f64 value only", c->source);

    /* Terms of the top-level sum, and the total. */
    size_t n_terms = lossc_num_terms(loss);
    CHECK(n_terms == c->n_terms, "%s: %zu terms, expected %zu", c->source, n_terms, c->n_terms);
    if (n_terms == c->n_terms) {
        double terms[8], total = -1.0;
        st = lossc_eval_terms(loss, inputs, shapes, c->n_inputs, terms, n_terms, &total);
        CHECK(st == LOSSC_STATUS_OK, "eval_terms %s: %s", c->source, lossc_last_error());
        CHECK(close_to(total, c->value, 1e-5, 1e-6), "%s: total %.9g", c->source, total);
        double sum = 0.0;
        for (size_t t = 0; t < n_terms; t++) {
            const char *text = lossc_term_text(loss, t);
            CHECK(text && strncmp(text, "loss ", 5) == 0, "%s: term %zu text", c->source, t);
            CHECK(close_to(terms[t], c->terms[t], 1e-5, 1e-6), "%s: term %zu is %.9g, reference %.9g", c->source, t,
                  terms[t], c->terms[t]);
            sum += terms[t];
        }
        CHECK(close_to(sum, total, 1e-5, 1e-6), "%s: terms add up to %.9g, not %.9g", c->source, sum, total);
        CHECK(lossc_term_text(loss, n_terms) == NULL, "%s: a term past the end", c->source);
        st = lossc_eval_terms(loss, inputs, shapes, c->n_inputs, terms, n_terms + 1, &total);
        expect_failure(st, LOSSC_STATUS_INVALID_ARGUMENT, "n_terms", "eval_terms with a wrong n_terms");
    }

    /* No non-finite values in the fixture's inputs. */
    uint64_t counts[MAX_INPUTS] = {99, 99, 99, 99};
    st = lossc_count_nonfinite(loss, inputs, shapes, c->n_inputs, counts);
    CHECK(st == LOSSC_STATUS_OK, "count_nonfinite %s: %s", c->source, lossc_last_error());
    for (size_t i = 0; i < c->n_inputs; i++) CHECK(counts[i] == 0, "%s: %llu non-finite", c->source,
                                                   (unsigned long long)counts[i]);

    /* A NaN in the first input: a NaN loss, never a failure or a crash. */
    float *nan_input = xmalloc(c->inputs[0].len * sizeof(float));
    memcpy(nan_input, c->inputs[0].data, c->inputs[0].len * sizeof(float));
    nan_input[c->inputs[0].len / 2] = NAN;
    inputs[0] = nan_input;
    st = lossc_eval(loss, inputs, shapes, c->n_inputs, &value, grads);
    CHECK(st == LOSSC_STATUS_OK, "%s with a NaN: %s", c->source, lossc_last_error());
    CHECK(isnan(value), "%s: a NaN input gave the loss %g", c->source, value);
    st = lossc_count_nonfinite(loss, inputs, shapes, c->n_inputs, counts);
    CHECK(st == LOSSC_STATUS_OK && counts[0] == 1, "%s: %llu non-finite, expected 1", c->source,
          (unsigned long long)counts[0]);
    free(nan_input);

    for (size_t i = 0; i < c->n_inputs; i++) {
        free(grads[i]);
        free(grads64[i]);
    }
    lossc_free(loss);
}

/* Shapes, counts and NULLs that lossc_eval must refuse with a message to act on. */
static void check_eval_errors(const case_t *c) {
    lossc_loss *loss = NULL;
    if (lossc_compile(c->source, NULL, &loss) != LOSSC_STATUS_OK) {
        CHECK(0, "compile %s: %s", c->source, lossc_last_error());
        return;
    }
    const float *inputs[2] = {c->inputs[0].data, c->inputs[1].data};
    lossc_shape shapes[2] = {c->inputs[0].shape, c->inputs[1].shape};
    double value = 42.0;
    lossc_status st;

    st = lossc_eval(loss, inputs, shapes, 1, &value, NULL);
    expect_failure(st, LOSSC_STATUS_SHAPE, "takes 2 inputs", "one input for two");
    st = lossc_eval(loss, NULL, NULL, 0, &value, NULL);
    expect_failure(st, LOSSC_STATUS_SHAPE, "0 were given", "no inputs");
    /* A count past the arrays is refused before they are read. */
    st = lossc_eval(loss, inputs, shapes, 3, &value, NULL);
    expect_failure(st, LOSSC_STATUS_SHAPE, "3 were given", "three inputs for two");
    st = lossc_eval(loss, inputs, shapes, (size_t)1 << 40, &value, NULL);
    expect_failure(st, LOSSC_STATUS_SHAPE, "takes 2 inputs", "an absurd input count");
    st = lossc_eval(loss, inputs, shapes, SIZE_MAX, &value, NULL);
    expect_failure(st, LOSSC_STATUS_SHAPE, "takes 2 inputs", "SIZE_MAX inputs");

    lossc_shape shorter[2] = {shapes[0], shapes[1]};
    shorter[1].spatial = shapes[1].spatial / 2;
    st = lossc_eval(loss, inputs, shorter, 2, &value, NULL);
    expect_failure(st, LOSSC_STATUS_SHAPE, "broadcast", "mismatched spatial extents");
    CHECK(strstr(lossc_last_error(), "`y`") != NULL && strstr(lossc_last_error(), "`p`") != NULL,
          "the shape message names both inputs: %s", lossc_last_error());

    lossc_shape negative[2] = {shapes[0], shapes[1]};
    negative[0].batch = -2;
    st = lossc_eval(loss, inputs, negative, 2, &value, NULL);
    expect_failure(st, LOSSC_STATUS_SHAPE, "negative", "a negative extent");

    lossc_shape empty[2] = {shapes[0], shapes[1]};
    empty[1].spatial = 0;
    st = lossc_eval(loss, inputs, empty, 2, &value, NULL);
    expect_failure(st, LOSSC_STATUS_SHAPE, "empty", "an empty input");

    st = lossc_eval(loss, NULL, shapes, 2, &value, NULL);
    expect_failure(st, LOSSC_STATUS_NULL_ARGUMENT, "`inputs`", "NULL inputs");
    st = lossc_eval(loss, inputs, NULL, 2, &value, NULL);
    expect_failure(st, LOSSC_STATUS_NULL_ARGUMENT, "`shapes`", "NULL shapes");
    const float *holey[2] = {inputs[0], NULL};
    st = lossc_eval(loss, holey, shapes, 2, &value, NULL);
    expect_failure(st, LOSSC_STATUS_NULL_ARGUMENT, "`inputs[1]` (input `y`)", "a NULL input array");
    st = lossc_eval(loss, inputs, shapes, 2, NULL, NULL);
    expect_failure(st, LOSSC_STATUS_NULL_ARGUMENT, "`loss_out`", "NULL loss_out");
    st = lossc_eval(NULL, inputs, shapes, 2, &value, NULL);
    expect_failure(st, LOSSC_STATUS_NULL_ARGUMENT, "`loss`", "NULL loss");
    CHECK(value == 42.0, "a failed call wrote its output: %g", value);

    double value64 = 42.0;
    const double *inputs64[2] = {c->inputs[0].data64, c->inputs[1].data64};
    st = lossc_eval_f64(loss, inputs64, shorter, 2, &value64, NULL);
    expect_failure(st, LOSSC_STATUS_SHAPE, "broadcast", "f64: mismatched spatial extents");
    st = lossc_eval_f64(NULL, inputs64, shapes, 2, &value64, NULL);
    expect_failure(st, LOSSC_STATUS_NULL_ARGUMENT, "`loss`", "f64: NULL loss");
    CHECK(value64 == 42.0, "a failed f64 call wrote its output");

    uint64_t counts[2] = {7, 7};
    st = lossc_count_nonfinite(loss, inputs, shorter, 2, counts);
    expect_failure(st, LOSSC_STATUS_SHAPE, "broadcast", "count_nonfinite: mismatched shapes");
    st = lossc_count_nonfinite(loss, inputs, shapes, 2, NULL);
    expect_failure(st, LOSSC_STATUS_NULL_ARGUMENT, "`counts_out`", "count_nonfinite: NULL counts_out");
    CHECK(counts[0] == 7 && counts[1] == 7, "a failed count wrote its output");

    /* Shapes alone, as a JAX trace checks them: the same verdicts as lossc_eval. */
    st = lossc_check_shapes(loss, shapes, 2);
    CHECK(st == LOSSC_STATUS_OK, "check_shapes: %s", lossc_last_error());
    st = lossc_check_shapes(loss, shorter, 2);
    expect_failure(st, LOSSC_STATUS_SHAPE, "broadcast", "check_shapes: mismatched shapes");
    st = lossc_check_shapes(loss, empty, 2);
    expect_failure(st, LOSSC_STATUS_SHAPE, "empty", "check_shapes: an empty input");
    st = lossc_check_shapes(loss, shapes, 3);
    expect_failure(st, LOSSC_STATUS_SHAPE, "but 3 were given", "check_shapes: a wrong count");
    st = lossc_check_shapes(loss, NULL, 2);
    expect_failure(st, LOSSC_STATUS_NULL_ARGUMENT, "`shapes`", "check_shapes: NULL shapes");
    st = lossc_check_shapes(NULL, shapes, 2);
    expect_failure(st, LOSSC_STATUS_NULL_ARGUMENT, "`loss`", "check_shapes: NULL loss");

    double terms[1];
    st = lossc_eval_terms(loss, inputs, shapes, 2, NULL, 1, &value);
    expect_failure(st, LOSSC_STATUS_NULL_ARGUMENT, "`terms_out`", "eval_terms: NULL terms_out");
    st = lossc_eval_terms(loss, inputs, shorter, 2, terms, 1, &value);
    expect_failure(st, LOSSC_STATUS_SHAPE, "broadcast", "eval_terms: mismatched shapes");

    /* NaN and infinity in an input: a NaN loss and a count, never a failure. */
    float *p = xmalloc(c->inputs[0].len * sizeof(float));
    float *dp = xmalloc(c->inputs[0].len * sizeof(float));
    memcpy(p, c->inputs[0].data, c->inputs[0].len * sizeof(float));
    p[3] = NAN;
    p[5] = INFINITY;
    p[6] = -INFINITY;
    const float *bad[2] = {p, inputs[1]};
    float *grads[2] = {dp, NULL};
    st = lossc_eval(loss, bad, shapes, 2, &value, grads);
    CHECK(st == LOSSC_STATUS_OK, "eval with NaN: %s", lossc_last_error());
    CHECK(isnan(value), "a NaN input gave the loss %g", value);
    st = lossc_count_nonfinite(loss, bad, shapes, 2, counts);
    CHECK(st == LOSSC_STATUS_OK && counts[0] == 3 && counts[1] == 0, "non-finite counts %llu %llu",
          (unsigned long long)counts[0], (unsigned long long)counts[1]);
    free(p);
    free(dp);
    lossc_free(loss);
}

static void check_compile_errors(void) {
    lossc_loss *loss = NULL;
    lossc_status st;

    st = lossc_compile(NULL, NULL, &loss);
    expect_failure(st, LOSSC_STATUS_NULL_ARGUMENT, "`source`", "NULL source");
    st = lossc_compile("dice", NULL, NULL);
    expect_failure(st, LOSSC_STATUS_NULL_ARGUMENT, "`out`", "NULL out");
    st = lossc_compile("dice(sigmoid(x), y) + * 2", NULL, &loss);
    expect_failure(st, LOSSC_STATUS_PARSE, "<source>:1:23", "a parse error");
    CHECK(strstr(lossc_last_error(), "dice(sigmoid(x), y) + * 2") != NULL, "the message shows the line: %s",
          lossc_last_error());
    st = lossc_compile("loss f(p, y) {\n    let a = sum(p * y);\n    a +\n}\n", NULL, &loss);
    expect_failure(st, LOSSC_STATUS_PARSE, "<source>:4:1", "a parse error on line 4");
    st = lossc_compile("dice(sigmoid(x), y) + dcie(x, y)", NULL, &loss);
    expect_failure(st, LOSSC_STATUS_CHECK, "<source>:1:23", "an unknown function");
    CHECK(strstr(lossc_last_error(), "dice") != NULL, "a suggestion: %s", lossc_last_error());
    st = lossc_compile("sigmoid(x) * y", NULL, &loss);
    expect_failure(st, LOSSC_STATUS_CHECK, "scalar", "a loss that is not a scalar");
    st = lossc_compile("dice", "smoth=2", &loss);
    expect_failure(st, LOSSC_STATUS_PARAMS, "unknown parameter `smoth`", "an unknown parameter");
    CHECK(strstr(lossc_last_error(), "did you mean `smooth`") != NULL, "a suggestion: %s", lossc_last_error());
    st = lossc_compile("tversky", "alpha", &loss);
    expect_failure(st, LOSSC_STATUS_PARAMS, "name=value", "a malformed parameter list");
    st = lossc_compile("tversky", "alpha=abc", &loss);
    expect_failure(st, LOSSC_STATUS_PARAMS, "not a number", "a parameter that is not a number");
    const char not_utf8[] = {'d', (char)0xff, 'e', '\0'};
    st = lossc_compile(not_utf8, NULL, &loss);
    expect_failure(st, LOSSC_STATUS_INVALID_ARGUMENT, "UTF-8", "a source that is not UTF-8");
    CHECK(loss == NULL, "a failed compile wrote *out");
}

static void check_accessors(const char *show_ref, const char *show_grad_ref) {
    lossc_loss *loss = NULL;
    lossc_status st = lossc_compile("dice", "", &loss);
    CHECK(st == LOSSC_STATUS_OK, "compile dice: %s", lossc_last_error());
    if (st != LOSSC_STATUS_OK) return;
    CHECK(strcmp(lossc_loss_name(loss), "dice") == 0, "name %s", lossc_loss_name(loss));
    CHECK(lossc_input_name(loss, 2) == NULL, "an input past the end has a name");
    CHECK(strstr(lossc_last_error(), "input 2 of 2") != NULL, "index message: %s", lossc_last_error());

    char *text = NULL;
    st = lossc_show(loss, &text);
    CHECK(st == LOSSC_STATUS_OK && text && strcmp(text, show_ref) == 0, "show:\n%s\nexpected:\n%s",
          text ? text : "(null)", show_ref);
    lossc_string_free(text);
    text = NULL;
    st = lossc_show_grad(loss, &text);
    CHECK(st == LOSSC_STATUS_OK && text && strcmp(text, show_grad_ref) == 0, "show_grad:\n%s\nexpected:\n%s",
          text ? text : "(null)", show_grad_ref);
    lossc_string_free(text);
    st = lossc_show(loss, NULL);
    expect_failure(st, LOSSC_STATUS_NULL_ARGUMENT, "`text_out`", "show: NULL text_out");
    st = lossc_show_grad(NULL, &text);
    expect_failure(st, LOSSC_STATUS_NULL_ARGUMENT, "`loss`", "show_grad: NULL loss");
    lossc_free(loss);

    /* NULL handles are harmless where a C user might pass them. */
    CHECK(lossc_num_inputs(NULL) == 0, "num_inputs(NULL)");
    CHECK(lossc_input_name(NULL, 0) == NULL, "input_name(NULL)");
    CHECK(lossc_loss_name(NULL) == NULL, "loss_name(NULL)");
    CHECK(lossc_num_terms(NULL) == 0, "num_terms(NULL)");
    CHECK(lossc_term_text(NULL, 0) == NULL, "term_text(NULL)");
    lossc_free(NULL);
    lossc_string_free(NULL);

    /* Version, status names, the stdlib list. */
    CHECK(strcmp(lossc_version(), LOSSC_TEST_VERSION) == 0, "version %s", lossc_version());
    CHECK(strcmp(lossc_status_name(LOSSC_STATUS_OK), "ok") == 0, "status name ok");
    CHECK(strcmp(lossc_status_name(LOSSC_STATUS_PARSE), "parse") == 0, "status name parse");
    CHECK(strcmp(lossc_status_name(LOSSC_STATUS_SHAPE), "shape") == 0, "status name shape");
    CHECK(strcmp(lossc_status_name(LOSSC_STATUS_INTERNAL), "internal") == 0, "status name internal");
    CHECK(strcmp(lossc_status_name(-1), "unknown") == 0, "status name -1");
    CHECK(strcmp(lossc_status_name(1000), "unknown") == 0, "status name 1000");

    size_t n = lossc_stdlib_count();
    CHECK(n >= 30, "%zu stdlib losses", n);
    int saw_dice = 0, saw_helper = 0;
    for (size_t i = 0; i < n; i++) {
        const char *name = lossc_stdlib_name(i), *sig = lossc_stdlib_signature(i);
        CHECK(name && sig && strncmp(sig, name, strlen(name)) == 0, "stdlib %zu: %s %s", i, name ? name : "?",
              sig ? sig : "?");
        if (name && strcmp(name, "dice") == 0) {
            saw_dice = 1;
            CHECK(strcmp(sig, "dice(p, y; smooth = 1)") == 0, "dice's signature: %s", sig);
        }
        if (name && strcmp(name, "lovasz_dot") == 0) saw_helper = 1;
        lossc_loss *l = NULL;
        CHECK(name && lossc_compile(name, NULL, &l) == LOSSC_STATUS_OK, "stdlib %s compiles: %s",
              name ? name : "?", lossc_last_error());
        lossc_free(l);
    }
    CHECK(saw_dice && !saw_helper, "dice listed, helpers not");
    CHECK(lossc_stdlib_name(n) == NULL && lossc_stdlib_signature(n) == NULL, "stdlib past the end");
}

/* PTX for a GPU, and the CUDA path, which on a machine without an NVIDIA driver or device
 * must say so with LOSSC_STATUS_NO_DEVICE. */
static void check_gpu(void) {
    lossc_loss *loss = NULL;
    lossc_status st = lossc_compile("dice", NULL, &loss);
    CHECK(st == LOSSC_STATUS_OK, "compile dice");
    char *ptx = NULL;
    st = lossc_emit_ptx(loss, "sm_80", &ptx);
    CHECK(st == LOSSC_STATUS_OK && ptx && strstr(ptx, ".target sm_80") && strstr(ptx, ".visible .entry lossc_sweep_2("),
          "emit_ptx: %s", ptx ? ptx : lossc_last_error());
    lossc_string_free(ptx);
    ptx = NULL;
    st = lossc_emit_ptx_classes(loss, "sm_90", 4, &ptx);
    CHECK(st == LOSSC_STATUS_OK && ptx && strstr(ptx, "C = 4 classes"), "emit_ptx_classes: %s",
          ptx ? "wrong text" : lossc_last_error());
    lossc_string_free(ptx);
    ptx = NULL;
    st = lossc_emit_ptx(loss, "sm_75", &ptx);
    expect_failure(st, LOSSC_STATUS_INVALID_ARGUMENT, "sm_70, sm_80 or sm_90", "emit_ptx: unknown target");
    st = lossc_emit_ptx_classes(loss, "sm_80", 0, &ptx);
    expect_failure(st, LOSSC_STATUS_INVALID_ARGUMENT, "`classes`", "emit_ptx_classes: 0 classes");
    st = lossc_emit_ptx(loss, NULL, &ptx);
    expect_failure(st, LOSSC_STATUS_NULL_ARGUMENT, "`sm`", "emit_ptx: NULL sm");
    st = lossc_emit_ptx(loss, "sm_80", NULL);
    expect_failure(st, LOSSC_STATUS_NULL_ARGUMENT, "`ptx_out`", "emit_ptx: NULL ptx_out");
    CHECK(ptx == NULL, "no output on failure");

    /* Device pointers that are never dereferenced: every check below fails before a launch. */
    const float *inputs[2] = {(const float *)0x1000, (const float *)0x2000};
    float *grads[2] = {(float *)0x3000, NULL};
    lossc_shape shapes[2] = {{2, 1, 64}, {2, 1, 64}};
    double value = -1.0;
    st = lossc_eval_cuda(loss, inputs, shapes, 2, NULL, grads, NULL);
    expect_failure(st, LOSSC_STATUS_NULL_ARGUMENT, "`loss_out`", "eval_cuda: NULL loss_out");
    lossc_shape bad[2] = {{2, 1, 64}, {3, 1, 64}};
    st = lossc_eval_cuda(loss, inputs, bad, 2, &value, grads, NULL);
    CHECK(st == LOSSC_STATUS_SHAPE, "eval_cuda: mismatched shapes: %s", lossc_status_name((int)st));
    if (access("/dev/nvidiactl", F_OK) != 0) {
        st = lossc_eval_cuda(loss, inputs, shapes, 2, &value, grads, NULL);
        expect_failure(st, LOSSC_STATUS_NO_DEVICE, "no GPU", "eval_cuda without a device");
        CHECK(value == -1.0, "loss_out untouched on failure");
        CHECK(strcmp(lossc_status_name(LOSSC_STATUS_NO_DEVICE), "no_device") == 0, "status name no_device");
    }
    lossc_free(loss);
    lossc_loss *lovasz = NULL;
    st = lossc_compile("lovasz_hinge", NULL, &lovasz);
    CHECK(st == LOSSC_STATUS_OK, "compile lovasz_hinge");
    st = lossc_emit_ptx(lovasz, "sm_80", &ptx);
    expect_failure(st, LOSSC_STATUS_BACKEND, "do not run on the GPU", "emit_ptx: lovasz");
    st = lossc_eval_cuda(lovasz, inputs, shapes, 2, &value, grads, NULL);
    expect_failure(st, LOSSC_STATUS_BACKEND, "do not run on the GPU", "eval_cuda: lovasz");
    lossc_free(lovasz);
}

/* lossc_xla_ffi as XLA calls it: a stand-in for XLA's runtime, with the structs of
 * XLA's xla/ffi/api/c_api.h (API 0.1, LP64) written out here, as an XLA client of the
 * C API would include them. */
typedef struct ext_base {
    size_t struct_size;
    int type; /* XLA_FFI_Extension_Type: 1 is the metadata query */
    struct ext_base *next;
} ext_base;
typedef struct {
    size_t struct_size;
    ext_base *extension_start;
    int major, minor;
} api_version;
typedef struct {
    size_t struct_size;
    api_version version;
    uint32_t traits;
    int64_t state_type_id;
} metadata;
typedef struct {
    ext_base base;
    metadata *metadata;
} metadata_ext;
typedef struct {
    size_t struct_size;
    ext_base *extension_start;
    const char *message;
    int errc;
} error_create_args;
typedef struct {
    size_t struct_size;
    ext_base *extension_start;
    api_version version;
    const void *internal_api;
    void *(*error_create)(error_create_args *);
} xla_api;
typedef struct {
    size_t struct_size;
    ext_base *extension_start;
    int dtype; /* 11 is F32 */
    void *data;
    int64_t rank;
    int64_t *dims;
} xla_buffer;
typedef struct {
    size_t struct_size;
    ext_base *extension_start;
    int64_t size;
    int *types; /* 1: a buffer */
    void **items;
} xla_list;
typedef struct {
    const char *ptr;
    size_t len;
} byte_span;
typedef struct {
    int dtype; /* 5 is S64 */
    void *value;
} xla_scalar;
typedef struct {
    size_t struct_size;
    ext_base *extension_start;
    int64_t size;
    int *types; /* 3: a scalar, 4: a string */
    byte_span **names;
    void **attrs;
} xla_attrs;
typedef struct {
    size_t struct_size;
    ext_base *extension_start;
    const xla_api *api;
    void *ctx;
    int stage; /* 3: execute */
    xla_list args, rets;
    xla_attrs attrs;
    void *future;
} call_frame;

static char xla_message[1024];
static int xla_code;
static int xla_error_token;

static void *fake_error_create(error_create_args *a) {
    snprintf(xla_message, sizeof xla_message, "%s", a->message);
    xla_code = a->errc;
    return &xla_error_token;
}

/* Dice on four positions through the handler: the value and d/dp against lossc_eval's,
 * then a failure reported through XLA's error constructor. */
static void check_xla_ffi(void) {
    metadata meta = {sizeof(metadata), {0, NULL, -1, -1}, 99, 0};
    metadata_ext query = {{sizeof(metadata_ext), 1, NULL}, &meta};
    xla_api api = {sizeof(xla_api), NULL, {sizeof(api_version), NULL, 0, 3}, NULL, fake_error_create};
    call_frame frame;
    memset(&frame, 0, sizeof frame);
    frame.struct_size = sizeof(call_frame);
    frame.api = &api;
    frame.extension_start = &query.base;
    CHECK(lossc_xla_ffi(&frame) == NULL, "xla metadata query failed");
    CHECK(meta.version.major == 0 && meta.version.minor == 1 && meta.traits == 0,
          "xla metadata: version %d.%d, traits %u", meta.version.major, meta.version.minor, meta.traits);
    CHECK(lossc_xla_ffi(NULL) == NULL, "xla: a NULL frame is not an error");

    float p[4] = {0.9f, 0.2f, 0.6f, 0.35f}, y[4] = {1, 0, 1, 1}, value = -1, grad[4] = {0};
    int64_t dims[3] = {1, 1, 4};
    xla_buffer in[2] = {{sizeof(xla_buffer), NULL, 11, p, 3, dims}, {sizeof(xla_buffer), NULL, 11, y, 3, dims}};
    xla_buffer out[2] = {{sizeof(xla_buffer), NULL, 11, &value, 0, NULL},
                         {sizeof(xla_buffer), NULL, 11, grad, 3, dims}};
    int buffer_types[2] = {1, 1};
    void *in_items[2] = {&in[0], &in[1]}, *out_items[2] = {&out[0], &out[1]};
    byte_span names[3] = {{"source", 6}, {"params", 6}, {"wrt", 3}};
    byte_span *name_items[3] = {&names[0], &names[1], &names[2]};
    byte_span source = {"dice", 4}, params = {"smooth=0.5", 10};
    int64_t wrt = 1;
    xla_scalar wrt_attr = {5, &wrt};
    int attr_types[3] = {4, 4, 3};
    void *attr_items[3] = {&source, &params, &wrt_attr};
    frame.extension_start = NULL;
    frame.stage = 3;
    frame.args = (xla_list){sizeof(xla_list), NULL, 2, buffer_types, in_items};
    frame.rets = (xla_list){sizeof(xla_list), NULL, 2, buffer_types, out_items};
    frame.attrs = (xla_attrs){sizeof(xla_attrs), NULL, 3, attr_types, name_items, attr_items};
    void *err = lossc_xla_ffi(&frame);
    CHECK(err == NULL, "xla dice failed: %s", xla_message);

    lossc_loss *loss = NULL;
    CHECK(lossc_compile("dice", "smooth=0.5", &loss) == LOSSC_STATUS_OK, "compile dice: %s", lossc_last_error());
    const float *inputs[2] = {p, y};
    lossc_shape shapes[2] = {{1, 1, 4}, {1, 1, 4}};
    float want_grad[4], unused[4];
    float *grads[2] = {want_grad, unused};
    double want = 0;
    CHECK(lossc_eval(loss, inputs, shapes, 2, &want, grads) == LOSSC_STATUS_OK, "eval dice: %s", lossc_last_error());
    CHECK(close_to(value, want, 1e-6, 1e-7), "xla dice value %.9g, lossc_eval %.9g", value, want);
    for (int i = 0; i < 4; i++) CHECK(grad[i] == want_grad[i], "xla dice d/dp[%d] %.9g, lossc_eval %.9g", i, grad[i], want_grad[i]);
    lossc_free(loss);

    wrt = 4; /* no third input */
    err = lossc_xla_ffi(&frame);
    CHECK(err == &xla_error_token && xla_code == 3 && strstr(xla_message, "does not have") != NULL,
          "xla: a bad wrt gave error %p, code %d: %s", err, xla_code, xla_message);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s FIXTURE\n", argv[0]);
        return 2;
    }
    FILE *f = fopen(argv[1], "rb");
    if (!f) {
        perror(argv[1]);
        return 2;
    }
    long n_cases;
    expect_word(f, "cases");
    if (fscanf(f, "%ld", &n_cases) != 1 || n_cases < 1 || n_cases > 64) {
        fprintf(stderr, "fixture: bad case count\n");
        return 2;
    }
    case_t *cases = xmalloc((size_t)n_cases * sizeof(case_t));
    for (long k = 0; k < n_cases; k++) read_case(f, &cases[k]);
    char *show_ref = read_text(f, "show");
    char *show_grad_ref = read_text(f, "show_grad");
    fclose(f);

    CHECK(strcmp(lossc_last_error(), "") == 0, "no error before any call: %s", lossc_last_error());
    for (long k = 0; k < n_cases; k++) check_case(&cases[k]);
    check_eval_errors(&cases[0]);
    check_compile_errors();
    check_accessors(show_ref, show_grad_ref);
    check_gpu();
    check_xla_ffi();

    for (long k = 0; k < n_cases; k++) free_case(&cases[k]);
    free(cases);
    free(show_ref);
    free(show_grad_ref);
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("capi_test: %ld cases, all checks passed\n", n_cases);
    return 0;
}
