"""Keras 3: a lossc loss for `model.compile(loss=...)`, on the JAX or PyTorch backend.

    import lossc.keras
    model.compile(optimizer="adam", loss=lossc.keras.Loss("0.5*dice(sigmoid(x), y) + bce_logits(x, y)"))

The loss must take two inputs, the prediction first and the target second, as every
stdlib loss and an expression such as the one above do (Keras passes `y_true, y_pred`;
this class swaps them). Keras images are channels-last (`[N, H, W, C]`): the class axis
is moved to position 1 before lossc sees them, following
`keras.config.image_data_format()` unless `channels_last` is given. The loss is already
a scalar over the whole batch, so `sample_weight` is refused: give a mask or weights as
an input of the loss instead (e.g. `mean(bce_logits_elements(x, y), mask = m)`). Targets
may leave out a class axis of extent 1 (`[N, H, W]` for a `[N, H, W, 1]` prediction),
or that of a loss on index labels (`cross_entropy_index`), or have a trailing axis of
extent 1 that the prediction lacks (`[N, 1]` for `[N]`).
The class is registered with Keras, so a saved model loads with its loss.
"""

import keras

import lossc as _lossc

__all__ = ["Loss"]

_BACKENDS = ("jax", "torch")


@keras.saving.register_keras_serializable(package="lossc")
class Loss(keras.losses.Loss):
    """`Loss(source, **params)`: a stdlib name, an expression or loss definitions, with
    hyperparameter overrides, e.g. `Loss("tversky", alpha=0.3, beta=0.7)`."""

    def __init__(self, source, channels_last=None, name=None, reduction="sum_over_batch_size", dtype=None, **params):
        self.lossc_loss = _lossc.as_loss(source, **params)
        inputs = self.lossc_loss.inputs
        if len(inputs) != 2:
            raise ValueError(
                f"a Keras loss takes (prediction, target), but {self.lossc_loss.name} takes "
                f"{len(inputs)} inputs ({', '.join(inputs)})"
            )
        backend = keras.backend.backend()
        if backend not in _BACKENDS:
            raise ValueError(f"lossc.keras runs on the {' and '.join(_BACKENDS)} backends, not on {backend}")
        super().__init__(name=name or f"lossc_{self.lossc_loss.name}", reduction=reduction, dtype=dtype)
        self.channels_last = channels_last
        if backend == "jax":
            import lossc.jax

            self._apply = lossc.jax.function(self.lossc_loss)
        else:
            import lossc.torch

            self._apply = lambda *tensors: lossc.torch.evaluate(self.lossc_loss, *tensors)

    def __call__(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise ValueError(
                f"{self.name} is a loss over the whole batch; sample_weight would only rescale it. "
                "Give weights or a mask as an input of the loss instead."
            )
        return super().__call__(y_true, y_pred)

    def call(self, y_true, y_pred):
        channels_last = self.channels_last
        if channels_last is None:
            channels_last = keras.config.image_data_format() == "channels_last"
        y_true = self._same_rank(y_true, y_pred, channels_last)
        if channels_last and len(y_pred.shape) >= 3:
            y_pred = keras.ops.moveaxis(y_pred, -1, 1)
            y_true = keras.ops.moveaxis(y_true, -1, 1)
        return self._apply(y_pred, y_true)

    def _same_rank(self, y_true, y_pred, channels_last):
        """The target with the prediction's rank, as Keras's own losses take targets: a
        trailing axis of 1 too many is dropped ([N, 1] for [N]), a class axis left out is
        added ([N, H, W] for [N, H, W, 1]). Anything else would broadcast silently."""
        t, p = tuple(y_true.shape), tuple(y_pred.shape)
        if len(t) == len(p) + 1 and t[-1] == 1:
            return keras.ops.squeeze(y_true, -1)
        if len(t) != len(p) - 1:
            if len(t) != len(p):
                raise ValueError(f"{self.name}: the target has shape {t} and the prediction {p}")
            return y_true
        classes = p[-1 if channels_last else 1]
        if classes != 1 and self._target_has_classes(classes):
            # Index labels for a loss whose target has a class axis (one-hot labels).
            raise ValueError(
                f"{self.name}: the target {t} has no class axis but the prediction {p} has {classes} "
                f"classes, and {self.lossc_loss.name}'s target takes one value per class: one-hot "
                "encode it (keras.ops.one_hot), or use a loss on index labels (cross_entropy_index)"
            )
        return keras.ops.expand_dims(y_true, -1 if channels_last else 1)

    def _target_has_classes(self, classes):
        """Whether the loss's target varies over classes (lossc refuses one that is
        declared without the class axis, as `t[batch, spatial]`)."""
        try:
            self.lossc_loss.check_shapes((1, classes, 1), (1, classes, 1))
        except _lossc.ShapeError:
            return False
        return True

    def get_config(self):
        config = super().get_config()
        config.update(
            {"source": self.lossc_loss._source, "channels_last": self.channels_last, **self.lossc_loss._params}
        )
        return config
