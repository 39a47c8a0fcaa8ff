/* The smallest complete use of liblossc: Dice on logits, its value and gradient. */
#include <stdio.h>

#include "lossc.h"

int main(void) {
    lossc_loss *loss = NULL;
    if (lossc_compile("dice(sigmoid(x), y)", NULL, &loss) != LOSSC_STATUS_OK) {
        fprintf(stderr, "%s", lossc_last_error()); /* file:line:col, the line, what was expected */
        return 1;
    }
    float x[4] = {2.0f, -1.0f, 0.5f, -3.0f}; /* logits */
    float y[4] = {1.0f, 0.0f, 1.0f, 0.0f};   /* targets */
    float dx[4];                              /* d loss / d x, written by lossc_eval */
    const float *inputs[2] = {x, y};          /* in the order of lossc_input_name */
    lossc_shape shapes[2] = {{1, 1, 4}, {1, 1, 4}}; /* {batch, classes, spatial} */
    float *grads[2] = {dx, NULL};             /* NULL: no gradient for y */
    double value;
    if (lossc_eval(loss, inputs, shapes, 2, &value, grads) != LOSSC_STATUS_OK) {
        fprintf(stderr, "%s", lossc_last_error());
        lossc_free(loss);
        return 1;
    }
    printf("%s = %.6f\n", lossc_loss_name(loss), value);
    printf("d/dx = [%.6f, %.6f, %.6f, %.6f]\n", dx[0], dx[1], dx[2], dx[3]);
    lossc_free(loss);
    return 0;
}
