"""The NumPy layer against hand-written float64 formulas (from the papers, not from
lossc's sources), against finite differences, and on bad input."""

import os
import pickle
import re
import signal
import tempfile
import threading
import time
import unittest
from pathlib import Path

import numpy as np

import lossc

RNG = np.random.default_rng()


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def softplus(x):
    return np.logaddexp(0, x)


def log_softmax(x):
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


# Independent float64 references: (source, hyperparameters, formula of the inputs, inputs).
def dice(p, y, smooth=1.0):
    return 1 - (2 * (p * y).sum() + smooth) / (p.sum() + y.sum() + smooth)


def tversky(p, y, alpha, beta, smooth=1.0):
    tp, fp, fn = (p * y).sum(), (p * (1 - y)).sum(), ((1 - p) * y).sum()
    return 1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)


def bce_logits(x, y, pos_weight=1.0):
    # PyTorch's BCEWithLogitsLoss: -[w y log s(x) + (1 - y) log(1 - s(x))], averaged.
    return (pos_weight * y * softplus(-x) + (1 - y) * softplus(x)).mean()


def focal(x, y, alpha, gamma):
    # Lin et al. 2017, as torchvision.ops.sigmoid_focal_loss(reduction="mean").
    p = sigmoid(x)
    ce = y * softplus(-x) + (1 - y) * softplus(x)
    p_t = p * y + (1 - p) * (1 - y)
    alpha_t = alpha * y + (1 - alpha) * (1 - y) if alpha >= 0 else 1  # torchvision: -1 is off
    return (alpha_t * ce * (1 - p_t) ** gamma).mean()


def cross_entropy(x, y):
    return -(y * log_softmax(x)).sum(axis=1).mean()


def dice_multiclass(x, y, smooth=1.0):
    s = np.exp(log_softmax(x))
    axes = tuple(a for a in range(x.ndim) if a != 1)
    per_class = (2 * (s * y).sum(axis=axes) + smooth) / (s.sum(axis=axes) + y.sum(axis=axes) + smooth)
    return 1 - per_class.mean()


def lovasz_hinge(x, y):
    """Berman et al. 2018, binary, over the flattened tensor: the value and d/dx."""
    signs = 2 * y.ravel() - 1
    errors = 1 - x.ravel() * signs
    order = np.argsort(-errors, kind="stable")
    gt = y.ravel()[order]
    intersection = gt.sum() - np.cumsum(gt)
    union = gt.sum() + np.cumsum(1 - gt)
    jaccard = 1 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1]
    value = np.dot(np.maximum(errors[order], 0), jaccard)
    # The loss is linear in the sorted errors: d/de_k = [e_k > 0] * jaccard_k, de/dx = -sign.
    grad = np.zeros_like(errors)
    grad[order] = (errors[order] > 0) * jaccard * -signs[order]
    return value, grad.reshape(x.shape)


def probabilities(shape):
    return RNG.uniform(0.02, 0.98, shape)


def logits(shape):
    return RNG.normal(0, 2, shape)


def masks(shape):
    return (RNG.uniform(size=shape) < 0.4).astype(np.float64)


def one_hot(shape):
    n, c = shape[0], shape[1]
    labels = RNG.integers(0, c, (n,) + tuple(shape[2:]))
    return np.moveaxis(np.eye(c)[labels], -1, 1)


BINARY = [
    ("dice", {}, dice, probabilities),
    ("tversky", {"alpha": 0.3, "beta": 0.7}, lambda p, y: tversky(p, y, 0.3, 0.7), probabilities),
    ("bce_logits", {"pos_weight": 2.5}, lambda x, y: bce_logits(x, y, 2.5), logits),
    ("focal", {"alpha": 0.25, "gamma": 2}, lambda x, y: focal(x, y, 0.25, 2.0), logits),
    ("focal", {"alpha": -1, "gamma": 1.5}, lambda x, y: focal(x, y, -1, 1.5), logits),
    ("0.5*dice(sigmoid(x), y) + bce_logits(x, y)", {}, lambda x, y: 0.5 * dice(sigmoid(x), y) + bce_logits(x, y), logits),
]
MULTICLASS = [
    ("cross_entropy", {}, cross_entropy),
    ("dice_multiclass", {}, dice_multiclass),
]


def finite_difference(f, arrays, i, h=1e-6):
    """Central differences of the float64 formula `f` with respect to input `i`."""
    grad = np.zeros_like(arrays[i])
    for k in np.ndindex(arrays[i].shape):
        up = [a.copy() for a in arrays]
        down = [a.copy() for a in arrays]
        up[i][k] += h
        down[i][k] -= h
        grad[k] = (f(*up) - f(*down)) / (2 * h)
    return grad


class Formulas(unittest.TestCase):
    """Values within 1e-5 relative, gradients within 1e-5 of max|g| (float32 kernels)."""

    def assert_matches(self, loss, formula, arrays, wrt=(0, 1)):
        arrays32 = [a.astype(np.float32) for a in arrays]
        exact = [a.astype(np.float64) for a in arrays32]  # the formula sees the same numbers
        value, grads = loss.value_and_grad(*arrays32, wrt=wrt)
        expected = formula(*exact)
        self.assertLess(abs(value - expected), 1e-5 * abs(expected), f"{loss.name}: {value} vs {expected}")
        small = [a[:1, :, :3, :3].copy() for a in exact]
        _, small_grads = loss.value_and_grad(*small, wrt=wrt, reference=True)
        for i, g in zip(wrt, small_grads):
            fd = finite_difference(formula, small, i)
            scale = np.abs(fd).max()
            self.assertLess(np.abs(g - fd).max(), 1e-6 * max(scale, 1e-3), f"{loss.name} d/d{loss.inputs[i]}")
        _, reference_grads = loss.value_and_grad(*exact, wrt=wrt, reference=True)
        for i, g, r in zip(wrt, grads, reference_grads):
            self.assertEqual(g.shape, arrays[i].shape)
            self.assertEqual(g.dtype, np.float32)
            scale = np.abs(r).max()
            self.assertLess(np.abs(g - r).max(), 1e-5 * scale, f"{loss.name} d/d{loss.inputs[i]}")

    def test_binary_losses_batched_and_odd_sized(self):
        for source, params, formula, make_input in BINARY:
            for shape in [(3, 1, 17, 13), (2, 1, 64, 65)]:
                with self.subTest(loss=source, shape=shape):
                    loss = lossc.Loss(source, **params)
                    self.assert_matches(loss, formula, [make_input(shape), masks(shape)])

    def test_multiclass_losses(self):
        for source, params, formula in MULTICLASS:
            with self.subTest(loss=source):
                shape = (2, 4, 9, 11)
                loss = lossc.Loss(source, **params)
                self.assert_matches(loss, formula, [logits(shape), one_hot(shape)], wrt=(0,))

    def test_lovasz_hinge_value_and_gradient(self):
        shape = (2, 1, 31, 29)
        x, y = logits(shape).astype(np.float32), masks(shape).astype(np.float32)
        value, (dx,) = lossc.Loss("lovasz_hinge").value_and_grad(x, y, wrt=["x"])
        expected, expected_dx = lovasz_hinge(x.astype(np.float64), y.astype(np.float64))
        self.assertLess(abs(value - expected), 1e-5 * expected)
        self.assertLess(np.abs(dx - expected_dx).max(), 1e-5 * np.abs(expected_dx).max())

    def test_class_weights_broadcast_over_batch_and_positions(self):
        shape = (2, 3, 8, 8)
        x, y = logits(shape), one_hot(shape)
        w = RNG.uniform(0.5, 2, (1, 3))
        loss = lossc.Loss("dice_multiclass_weighted")
        value, (dw,) = loss.value_and_grad(x, y, w, wrt=["w"])
        s = np.exp(log_softmax(x.astype(np.float32).astype(np.float64)))
        per_class = (2 * (s * y).sum(axis=(0, 2, 3)) + 1) / (s.sum(axis=(0, 2, 3)) + y.sum(axis=(0, 2, 3)) + 1)
        wf = w.astype(np.float32).astype(np.float64)[0]
        expected = 1 - (wf * per_class).sum() / wf.sum()
        self.assertLess(abs(value - expected), 1e-5 * abs(expected))
        self.assertEqual(dw.shape, (1, 3))
        expected_dw = -(per_class * wf.sum() - (wf * per_class).sum()) / wf.sum() ** 2
        self.assertLess(np.abs(dw[0] - expected_dw).max(), 1e-5 * np.abs(expected_dw).max())

    def test_one_million_elements_sum_without_drift(self):
        shape = (4, 1, 512, 512)
        loss = lossc.Loss("dice")
        self.assert_matches_large(loss, dice, [probabilities(shape), masks(shape)])

    def assert_matches_large(self, loss, formula, arrays):
        arrays32 = [a.astype(np.float32) for a in arrays]
        value = loss(*arrays32)
        expected = formula(*[a.astype(np.float64) for a in arrays32])
        self.assertLess(abs(value - expected), 1e-6 * abs(expected))


class Interface(unittest.TestCase):
    def test_names_texts_and_terms(self):
        loss = lossc.Loss("tversky", alpha=0.3, beta=0.7)
        self.assertEqual(loss.name, "tversky")
        self.assertEqual(loss.inputs, ("p", "y"))
        self.assertIn("0.3 * sum(p * (1 - y))", loss.show())
        self.assertIn("d/dp =", loss.show_grad())
        combined = lossc.Loss("0.5*dice(sigmoid(x), y) + bce_logits(x, y)")
        self.assertEqual(len(combined.terms), 2)
        x, y = logits((2, 1, 10, 10)), masks((2, 1, 10, 10))
        total, terms = combined.eval_terms(x, y)
        self.assertAlmostEqual(total, sum(terms), places=6)
        self.assertAlmostEqual(terms[1], bce_logits(x.astype(np.float32).astype(np.float64), y), places=6)

    def test_a_loss_file_and_the_stdlib_listing(self):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "my_tversky.loss"
            path.write_text("loss my_tversky(p, y; alpha = 0.3) = tversky(p, y, alpha = alpha, beta = 1 - alpha);\n")
            loss = lossc.Loss(path, alpha=0.2)
        p, y = probabilities((1, 1, 40)), masks((1, 1, 40))
        self.assertAlmostEqual(loss(p, y), tversky(p.astype(np.float32).astype(np.float64), y, 0.2, 0.8), places=6)
        library = lossc.stdlib()
        self.assertEqual(library["dice"], "dice(p, y; smooth = 1)")
        self.assertGreaterEqual(len(library), 30)

    def test_version_matches_the_library_and_the_crate(self):
        self.assertEqual(lossc._capi.lib.lossc_version().decode(), lossc.__version__)
        cargo = (Path(__file__).parents[2] / "Cargo.toml").read_text()
        self.assertEqual(re.search(r'^version = "(.*)"', cargo, re.M).group(1), lossc.__version__)

    def test_zero_dimensional_inputs_get_zero_dimensional_gradients(self):
        value, (dx, dy) = lossc.Loss("bce_logits").value_and_grad(np.float32(0.3), np.float32(1))
        self.assertEqual((dx.shape, dy.shape), ((), ()))
        self.assertAlmostEqual(float(dx), sigmoid(np.float64(np.float32(0.3))) - 1, places=6)
        self.assertAlmostEqual(value, softplus(-np.float64(np.float32(0.3))), places=6)

    def test_gradients_into_given_buffers_and_integer_labels(self):
        x, y = logits((2, 1, 30)), masks((2, 1, 30)).astype(np.int64)
        loss = lossc.Loss("bce_logits")
        out = np.full((2, 1, 30), np.nan, dtype=np.float32)
        value, (dx,) = loss.value_and_grad(x, y, wrt=["x"], out=[out])
        self.assertIs(dx, out)
        expected = (sigmoid(x.astype(np.float32).astype(np.float64)) - y) / y.size
        self.assertLess(np.abs(out - expected).max(), 1e-6 * np.abs(expected).max())
        self.assertAlmostEqual(value, loss(x, y))
        # A float32 view at an odd address is read through an aligned copy; as a
        # gradient buffer it is refused.
        raw = np.zeros(4 * 60 + 1, np.uint8)
        odd = raw[1:].view(np.float32).reshape(2, 1, 30)
        odd[...] = x
        self.assertFalse(odd.flags.aligned)
        self.assertEqual(loss(odd, y), loss(x.astype(np.float32), y))
        with self.assertRaisesRegex(ValueError, "not aligned"):
            loss.value_and_grad(x, y, wrt=["x"], out=[odd])

    def test_inputs_read_in_place_or_through_a_copy_agree_bitwise(self):
        # The quick path (float32, contiguous, writable: the address from ctypes) and
        # every other (read-only, a broadcast view NumPy warns about writing, a subclass,
        # another byte order, Fortran order, another dtype) give the same bits.
        import warnings

        loss = lossc.Loss("0.5*dice(sigmoid(x), y) + bce_logits(x, y)")
        x, y = logits((2, 1, 5, 6)).astype(np.float32), masks((2, 1, 5, 6)).astype(np.float32)
        value, (dx, dy) = loss.value_and_grad(x, y)
        read_only = x.copy()
        read_only.flags.writeable = False
        row = np.broadcast_arrays(y[0, 0, 0], np.zeros((1, 1, 1, 6), np.float32))[0]  # warns on write
        self.assertTrue(row.flags.c_contiguous and row.flags.writeable)
        with tempfile.TemporaryDirectory() as d:
            mapped = np.memmap(Path(d) / "x", dtype=np.float32, mode="w+", shape=x.shape)
            mapped[...] = x
            variants = [
                (read_only, y),
                (mapped, y),
                (x.astype(">f4"), y),
                (np.asfortranarray(x), y),
                (x.astype(np.float64).astype(np.float32), y.astype(np.int64)),
            ]
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                for a, b in variants:
                    v, (ga, gb) = loss.value_and_grad(a, b)
                    self.assertEqual(v, value)
                    self.assertTrue(np.array_equal(ga, dx) and np.array_equal(gb, dy))
                    self.assertEqual(loss(a, b), value)
                first = loss(x[:1, :, :1], row)
            del mapped
        self.assertEqual(first, loss(x[:1, :, :1], row.copy()))
        # Positions by every spelling; a bool or a float is no position.
        for wrt in [(0,), [0], (np.int64(0),), ("x",), np.array([0])]:
            v, (g,) = loss.value_and_grad(x, y, wrt=wrt)
            self.assertTrue(np.array_equal(g, dx))
        for wrt in [(True,), (1.0,), (-1,), (2,)]:
            with self.assertRaisesRegex(ValueError, "names no input"):
                loss.value_and_grad(x, y, wrt=wrt)
        # Shapes: the C array for each tuple of shapes is built once, and stays right as
        # they change.
        for shape in [(3,), (), (1, 4), (2, 1, 3, 2), (2, 1, 5, 6)]:
            a, b = logits(shape).astype(np.float32), masks(shape).astype(np.float32)
            self.assertEqual(loss(a, b), loss(a.astype(np.float64), b.astype(np.float64)))
            self.assertEqual(loss.value_and_grad(a, b, wrt=[0])[1][0].shape, a.shape)
        self.assertIs(lossc._shape_array((x.shape, y.shape)), lossc._shape_array((x.shape, y.shape)))
        with self.assertRaisesRegex(lossc.ShapeError, "along batch"):
            loss(x, y[:1].repeat(3, axis=0))

    def test_threads_share_one_loss_and_agree_bitwise(self):
        loss = lossc.Loss("0.5*dice(sigmoid(x), y) + bce_logits(x, y)")
        x, y = logits((2, 1, 300, 301)).astype(np.float32), masks((2, 1, 300, 301))
        first, (g,) = loss.value_and_grad(x, y, wrt=[0])
        results = []

        def work():
            for _ in range(5):
                results.append(loss.value_and_grad(x, y, wrt=[0]))

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(len(results), 20)
        for value, (grad,) in results:
            self.assertEqual(value, first)
            self.assertTrue(np.array_equal(grad, g))

    @unittest.skipUnless(hasattr(os, "fork"), "needs fork")
    def test_a_forked_child_evaluates(self):
        # rayon's pool has no threads in a forked child (a multiprocessing or DataLoader
        # worker): lossc gives the child a pool of its own instead of waiting forever.
        loss = lossc.Loss("dice")
        p, y = RNG.random(1 << 20).astype(np.float32), masks((1 << 20,))
        first = loss(p, y)  # a parallel evaluation before the fork
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                values = (loss(p, y), lossc.Loss("bce_logits")(p, y))
                os.write(write, " ".join(v.hex() for v in values).encode())
            finally:
                os._exit(0)
        os.close(write)
        deadline = time.monotonic() + 60
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                self.fail("the forked child hangs")
            time.sleep(0.05)
        with os.fdopen(read) as f:
            value, other = map(float.fromhex, f.read().split())
        self.assertEqual(value, first)
        self.assertAlmostEqual(other, lossc.Loss("bce_logits")(p, y), places=12)

    def test_pickles_by_its_text(self):
        loss = lossc.Loss("focal", gamma=3)
        copy = pickle.loads(pickle.dumps(loss))
        x, y = logits((1, 1, 50)), masks((1, 1, 50))
        self.assertEqual(copy(x, y), loss(x, y))
        self.assertIn("gamma=3", repr(copy))


class Errors(unittest.TestCase):
    def test_source_errors_point_at_the_text(self):
        with self.assertRaises(lossc.ParseError) as caught:
            lossc.Loss("dice(p, y")
        self.assertIn("1:10", str(caught.exception))
        with self.assertRaises(lossc.CheckError) as caught:
            lossc.Loss("dcie(p, y)")
        self.assertIn("dice", str(caught.exception))  # the suggestion
        with self.assertRaises(lossc.ParamsError):
            lossc.Loss("tversky", gamma=2)
        with self.assertRaises(lossc.ParamsError):
            lossc.Loss("tversky", alpha="a lot")
        with self.assertRaises(lossc.ParamsError):
            lossc.Loss("tversky", alpha=float("nan"))
        with self.assertRaises(TypeError):
            lossc.Loss(42)
        with self.assertRaisesRegex(lossc.CheckError, "did you mean `dice`"):
            lossc.Loss("dcie")
        with self.assertRaisesRegex(ValueError, "NUL"):
            lossc.Loss("dice\0junk")
        for bad in [{"alpha": "0.3"}, {"alpha": True}, {"alpha=0.9,beta": 0.1}, {"alpha": 10**400}]:
            with self.assertRaises(lossc.ParamsError):
                lossc.Loss("tversky", **bad)

    def test_shape_errors_name_the_inputs(self):
        loss = lossc.Loss("dice")
        with self.assertRaisesRegex(lossc.ShapeError, "input `y`"):
            loss(probabilities((4, 1, 8, 8)), masks((2, 1, 8, 8)))
        with self.assertRaisesRegex(lossc.ShapeError, r"takes 2 inputs \(p, y\), but 1 was given"):
            loss(probabilities((4, 1, 8, 8)))
        with self.assertRaisesRegex(lossc.ShapeError, "but 3 were given"):
            loss.value_and_grad(*[probabilities((4, 1, 8, 8))] * 3)
        with self.assertRaises(TypeError):
            loss(np.array(["a", "b"]), np.array(["c", "d"]))
        with self.assertRaisesRegex(TypeError, "complex"):
            loss(np.ones(4) + 1j, np.ones(4))

    def test_shapes_are_checked_without_data(self):
        loss = lossc.Loss("dice_multiclass_weighted")
        loss.check_shapes((2, 3, 8, 8), (2, 3, 8, 8), (1, 3))
        with self.assertRaisesRegex(lossc.ShapeError, "along spatial"):
            loss.check_shapes((2, 3, 8, 8), (2, 3, 8, 9), (1, 3))
        with self.assertRaisesRegex(lossc.ShapeError, "may vary only over class"):
            loss.check_shapes((2, 3, 8, 8), (2, 3, 8, 8), (2, 3))
        with self.assertRaisesRegex(lossc.ShapeError, "but 2 were given"):
            loss.check_shapes((2, 3, 8, 8), (2, 3, 8, 8))

    def test_with_params_keeps_the_others(self):
        loss = lossc.Loss("focal_tversky", alpha=0.3, beta=0.7)
        changed = loss.with_params(gamma=2)
        p, y = probabilities((1, 1, 30)), masks((1, 1, 30))
        exact = p.astype(np.float32).astype(np.float64)
        self.assertAlmostEqual(changed(p, y), tversky(exact, y, 0.3, 0.7) ** 2, places=6)
        self.assertIs(loss.with_params(), loss)

    def test_bad_requests_for_gradients(self):
        loss = lossc.Loss("dice")
        p, y = probabilities((1, 1, 8)), masks((1, 1, 8))
        with self.assertRaisesRegex(ValueError, "not an input"):
            loss.value_and_grad(p, y, wrt=["x"])
        with self.assertRaisesRegex(ValueError, "twice"):
            loss.value_and_grad(p, y, wrt=["p", 0])
        with self.assertRaises(TypeError):
            loss.value_and_grad(p, y, wrt="p")
        with self.assertRaisesRegex(ValueError, "float32"):
            loss.value_and_grad(p, y, wrt=["p"], out=[np.empty(8)])
        with self.assertRaisesRegex(ValueError, r"has shape \(8,\); the input has \(1, 1, 8\)"):
            loss.value_and_grad(p, y, wrt=["p"], out=[np.empty(8, dtype=np.float32)])
        with self.assertRaisesRegex(ValueError, "names no input"):
            loss.value_and_grad(p, y, wrt=[True])
        shared = np.empty((1, 1, 8), dtype=np.float32)
        with self.assertRaisesRegex(ValueError, "overlaps"):
            loss.value_and_grad(p, y, out=[shared, shared])
        p32 = p.astype(np.float32)
        with self.assertRaisesRegex(ValueError, "overlaps an input"):
            loss.value_and_grad(p32, y, wrt=["p"], out=[p32])

    def test_nan_inputs_give_nan_and_are_counted(self):
        loss = lossc.Loss("dice")
        p, y = probabilities((1, 1, 20)), masks((1, 1, 20))
        p[0, 0, 3] = np.nan
        p[0, 0, 7] = np.inf
        self.assertTrue(np.isnan(loss(p, y)))
        self.assertEqual(loss.count_nonfinite(p, y), {"p": 2, "y": 0})

    def test_a_target_laid_out_differently_is_refused(self):
        # [2, 3, 4, 5] and [2, 3, 5, 4] are both (2, 3, 20) flattened: a transposed target.
        loss = lossc.Loss("dice")
        p, y = probabilities((2, 3, 4, 5)), masks((2, 3, 5, 4))
        for call in (lambda: loss(p, y), lambda: loss.value_and_grad(p, y), lambda: loss.check_shapes(p.shape, y.shape)):
            with self.assertRaisesRegex(lossc.ShapeError, r"\[2, 3, 4, 5\] and \[2, 3, 5, 4\].*laid out differently"):
                call()
        # Flattened against unflattened, or one position broadcast, is the same layout.
        flat = np.ascontiguousarray(y.transpose(0, 1, 3, 2)).reshape(2, 3, 20)
        self.assertAlmostEqual(loss(p, flat), loss(p, flat.reshape(2, 3, 4, 5)), places=6)
        self.assertTrue(np.isfinite(loss(p, masks((2, 3, 1, 1)))))

    def test_an_outer_product_broadcast_is_refused(self):
        # 2^32 broadcast elements from two inputs of 2^16: never what was meant.
        loss = lossc.Loss("lovasz_hinge")
        x, y = logits((1 << 16, 1, 1)), masks((1, 1, 1 << 16))
        with self.assertRaisesRegex(lossc.ShapeError, r"larger than each of them .* must have the full shape"):
            loss(x, y)
        # Logits [N] against targets [N, 1] (batch N, one position each): PyTorch refuses it too.
        with self.assertRaisesRegex(lossc.ShapeError, r"broadcast to \[8, 1, 8\]"):
            lossc.Loss("bce_logits")(logits((8,)), masks((8, 1)))


if __name__ == "__main__":
    unittest.main()
