"""lossc.keras in `model.fit`, on the JAX backend (and on PyTorch's, in a subprocess,
since Keras picks its backend once per process)."""

import os
import subprocess
import sys
import unittest

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import lossc  # noqa: E402
import lossc.keras  # noqa: E402

SOURCE = "0.5*dice(sigmoid(x), y) + bce_logits(x, y)"


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, 16, 16, 3)).astype("float32")
    masks = (images[..., :1] + 0.5 * images[..., 1:2] > 0).astype("float32")
    return images, masks


class KerasLoss(unittest.TestCase):
    def test_channels_last_batches_match_the_numpy_layer(self):
        images, masks = data(4)
        logits = images[..., :1] - 0.3 * images[..., 2:3]  # [N, H, W, 1]
        value = float(lossc.keras.Loss(SOURCE)(masks, logits))
        expected = lossc.Loss(SOURCE)(np.moveaxis(logits, -1, 1), np.moveaxis(masks, -1, 1))
        self.assertAlmostEqual(value, expected, places=5)

    def test_model_fit_lowers_the_loss(self):
        keras.utils.set_random_seed(0)
        images, masks = data()
        model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(1, 1)])
        model.compile(optimizer=keras.optimizers.Adam(0.05), loss=lossc.keras.Loss(SOURCE))
        history = model.fit(images, masks, epochs=8, batch_size=8, verbose=0).history["loss"]
        self.assertLess(history[-1], 0.6 * history[0])
        config = model.loss.get_config()
        self.assertEqual(config["source"], SOURCE)

    def test_masks_without_a_channel_axis_and_saving(self):
        images, masks = data(4)
        logits = images[..., :1] - 0.3 * images[..., 2:3]
        loss = lossc.keras.Loss(SOURCE)
        self.assertAlmostEqual(float(loss(masks[..., 0], logits)), float(loss(masks, logits)), places=6)
        wrapped = lossc.keras.Loss(lossc.Loss("tversky", alpha=0.9), beta=0.1)
        copy = lossc.keras.Loss.from_config(wrapped.get_config())
        p = 1 / (1 + np.exp(-logits))
        expected = lossc.Loss("tversky", alpha=0.9, beta=0.1)(np.moveaxis(p, -1, 1), np.moveaxis(masks, -1, 1))
        for loss in (wrapped, copy):
            self.assertAlmostEqual(float(loss(masks, p)), expected, places=5)
        model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(1, 1)])
        model.compile(optimizer="adam", loss=wrapped)
        path = os.path.join(self.scratch(), "model.keras")
        model.save(path)
        restored = keras.models.load_model(path)
        self.assertAlmostEqual(float(restored.loss(masks, p)), expected, places=5)

    def scratch(self):
        import tempfile

        folder = tempfile.mkdtemp(prefix="lossc-keras-")
        self.addCleanup(__import__("shutil").rmtree, folder)
        return folder

    def test_targets_of_another_rank(self):
        # As Keras's own losses: a target [N, 1] for a prediction [N] (not an N x N
        # broadcast), index labels for a loss on index labels; index labels for a loss
        # whose target is one-hot are refused rather than broadcast over the classes.
        rng = np.random.default_rng()
        logits = rng.normal(size=(6,)).astype(np.float32)
        targets = (rng.uniform(size=(6, 1)) < 0.5).astype(np.float32)
        expected = keras.losses.BinaryCrossentropy(from_logits=True)(targets[:, 0], logits)
        self.assertAlmostEqual(float(lossc.keras.Loss("bce_logits")(targets, logits)), float(expected), places=5)
        images = rng.normal(size=(2, 5, 4, 3)).astype(np.float32)
        labels = rng.integers(0, 3, (2, 5, 4))
        expected = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, images)
        self.assertAlmostEqual(float(lossc.keras.Loss("cross_entropy_index")(labels, images)), float(expected), places=5)
        with self.assertRaisesRegex(ValueError, "one-hot"):
            lossc.keras.Loss("dice_multiclass")(labels, images)
        with self.assertRaisesRegex(ValueError, "the target has shape"):
            lossc.keras.Loss("bce_logits")(targets[:, :, None], logits)

    def test_refusals(self):
        with self.assertRaisesRegex(ValueError, "takes \\(prediction, target\\)"):
            lossc.keras.Loss("dice_masked")
        images, masks = data(2)
        with self.assertRaisesRegex(ValueError, "sample_weight"):
            lossc.keras.Loss(SOURCE)(masks, images[..., :1], sample_weight=np.ones(2))

    def test_the_torch_backend(self):
        if keras.backend.backend() != "jax":
            self.skipTest("runs once, from the JAX backend's process")
        here = os.path.dirname(os.path.abspath(__file__))
        package_root = os.path.dirname(os.path.dirname(lossc.__file__))
        path = os.pathsep.join(filter(None, [package_root, here, os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, KERAS_BACKEND="torch", PYTHONPATH=path)
        test = f"{__name__}.KerasLoss.test_model_fit_lowers_the_loss"
        out = subprocess.run(
            [sys.executable, "-m", "unittest", test],
            env=env,
            capture_output=True,
            text=True,
        )
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        self.assertIn("OK", out.stderr)


if __name__ == "__main__":
    unittest.main()
