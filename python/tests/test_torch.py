"""lossc.torch against losses written in PyTorch itself (autograd for the gradients)."""

import io
import unittest

import numpy as np
import torch
import torch.nn.functional as F

import lossc
import lossc.torch


def dice(p, y, smooth=1.0):
    return 1 - (2 * (p * y).sum() + smooth) / (p.sum() + y.sum() + smooth)


def focal(x, y, alpha=0.25, gamma=2.0):
    # torchvision.ops.sigmoid_focal_loss, reduction="mean".
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * (1 - p_t) ** gamma
    return ((alpha * y + (1 - alpha) * (1 - y)) * loss).mean()


def combined(x, y):
    return 0.5 * dice(torch.sigmoid(x), y) + F.binary_cross_entropy_with_logits(x, y)


CASES = [
    ("0.5*dice(sigmoid(x), y) + bce_logits(x, y)", {}, combined),
    ("focal", {"gamma": 2}, focal),
    ("bce_logits", {"pos_weight": 3}, lambda x, y: F.binary_cross_entropy_with_logits(x, y, pos_weight=torch.tensor(3.0))),
]


def inputs(shape, classes=None):
    x = torch.randn(shape) * 2
    if classes is None:
        return x, (torch.rand(shape) < 0.4).float()
    labels = torch.randint(0, classes, (shape[0],) + tuple(shape[2:]))
    return x, F.one_hot(labels, classes).movedim(-1, 1).float()


class AgainstPyTorch(unittest.TestCase):
    def check(self, criterion, formula, x, y, grad_y=True):
        x1, y1 = x.clone().requires_grad_(), y.clone().requires_grad_(grad_y)
        value = criterion(x1, y1)
        value.backward()
        x2, y2 = x.double().requires_grad_(), y.double().requires_grad_(grad_y)
        expected = formula(x2, y2)
        expected.backward()
        self.assertEqual(value.dtype, torch.float32)
        self.assertEqual(value.shape, ())
        self.assertLess(abs(value.item() - expected.item()), 1e-5 * abs(expected.item()))
        pairs = [(x1, x2)] + ([(y1, y2)] if grad_y else [])
        for mine, theirs in pairs:
            scale = theirs.grad.abs().max().item()
            self.assertLess((mine.grad.double() - theirs.grad).abs().max().item(), 1e-5 * scale)

    def test_binary_losses(self):
        for source, params, formula in CASES:
            for shape in [(4, 1, 33, 31), (2, 1, 128, 128)]:
                with self.subTest(loss=source, shape=shape):
                    x, y = inputs(shape)
                    self.check(lossc.torch.Loss(source, **params), formula, x, y)

    def test_multiclass_cross_entropy_and_dice(self):
        x, y = inputs((2, 5, 20, 24), classes=5)
        self.check(lossc.torch.Loss("cross_entropy"), lambda x, y: F.cross_entropy(x, y), x, y, grad_y=False)

        def dice_multiclass(x, y):
            s = torch.softmax(x, dim=1)
            dims = (0, 2, 3)
            return 1 - ((2 * (s * y).sum(dims) + 1) / (s.sum(dims) + y.sum(dims) + 1)).mean()

        self.check(lossc.torch.Loss("dice_multiclass"), dice_multiclass, x, y, grad_y=False)

    def test_index_labels_with_an_ignored_class(self):
        x = torch.randn(2, 4, 10, 12)
        t = torch.randint(0, 4, (2, 10, 12))
        t[0, :3] = -100
        x1 = x.clone().requires_grad_()
        value = lossc.torch.Loss("cross_entropy_index")(x1, t.unsqueeze(1))
        value.backward()
        x2 = x.double().requires_grad_()
        expected = F.cross_entropy(x2, t, ignore_index=-100)
        expected.backward()
        self.assertLess(abs(value.item() - expected.item()), 1e-5 * expected.item())
        self.assertLess((x1.grad.double() - x2.grad).abs().max().item(), 1e-5 * x2.grad.abs().max().item())

    def test_gradcheck_with_the_reference_evaluator(self):
        criterion = lossc.torch.Loss("tversky", reference=True, alpha=0.3, beta=0.7)
        p = torch.rand(2, 1, 3, 4, dtype=torch.float64).clamp(0.05, 0.95).requires_grad_()
        y = torch.rand(2, 1, 3, 4, dtype=torch.float64).requires_grad_()
        self.assertTrue(torch.autograd.gradcheck(criterion, (p, y)))
        self.assertEqual(criterion(p, y).dtype, torch.float64)


class Behaviour(unittest.TestCase):
    def test_only_inputs_that_require_grad_get_one(self):
        x, y = inputs((2, 1, 16, 16))
        x.requires_grad_()
        lossc.torch.Loss("bce_logits")(x, y).backward()
        self.assertIsNotNone(x.grad)
        self.assertIsNone(y.grad)
        with torch.no_grad():
            value = lossc.torch.Loss("bce_logits")(x, y)
        self.assertFalse(value.requires_grad)

    def test_half_precision_inputs_get_gradients_of_their_dtype(self):
        x, y = inputs((2, 1, 16, 16))
        xh = x.half().requires_grad_()
        value = lossc.torch.Loss("bce_logits")(xh, y)
        value.backward()
        self.assertEqual(value.dtype, torch.float32)
        self.assertEqual(xh.grad.dtype, torch.float16)
        expected = (torch.sigmoid(xh.float()) - y) / y.numel()
        self.assertLess((xh.grad.float() - expected).abs().max().item(), 2e-3 * expected.abs().max().item())

    def test_upstream_gradient_scales_and_non_contiguous_inputs(self):
        x, y = inputs((2, 16, 16, 1))
        x = x.permute(0, 3, 1, 2).requires_grad_()  # a view, not contiguous
        y = y.permute(0, 3, 1, 2)
        (3 * lossc.torch.Loss("bce_logits")(x, y)).backward()
        expected = 3 * (torch.sigmoid(x.detach()) - y) / y.numel()
        self.assertLess((x.grad - expected).abs().max().item(), 1e-5 * expected.abs().max().item())
        # A negated view carries a bit that `numpy()` refuses; its values are -x.
        negated = torch._neg_view(x.detach())
        expected = lossc.torch.Loss("bce_logits")(-x.detach(), y)
        self.assertAlmostEqual(lossc.torch.Loss("bce_logits")(negated, y).item(), expected.item(), places=6)

    def test_a_second_backward_recomputes_and_in_place_changes_are_caught(self):
        x, y = inputs((2, 1, 16, 16))
        x.requires_grad_()
        value = lossc.torch.Loss("focal")(x, y)
        (first,) = torch.autograd.grad(value, x, retain_graph=True)
        expected = first.clone()
        first.zero_()  # the caller owns the gradient it was given
        (second,) = torch.autograd.grad(2 * value, x, retain_graph=True)
        self.assertTrue(torch.equal(second, 2 * expected))
        with torch.no_grad():
            x.add_(1)
        with self.assertRaisesRegex(RuntimeError, "modified by an inplace operation"):
            torch.autograd.grad(value, x)

    def test_scaled_half_precision_batched_and_late_in_place_changes(self):
        x, y = inputs((2, 1, 16, 16))
        criterion = lossc.torch.Loss("bce_logits")
        expected = (torch.sigmoid(x.half().float()) - y) / y.numel()
        # A GradScaler's 65536 is infinite in float16: the scale applies before the cast.
        xh = x.half().requires_grad_()
        (grad,) = torch.autograd.grad(criterion(xh, y) * 65536.0, xh)
        self.assertEqual(grad.dtype, torch.float16)
        self.assertTrue(torch.isfinite(grad).all())
        self.assertLess((grad.float() / 65536 - expected).abs().max().item(), 1e-3 * expected.abs().max().item())
        # Batched seeds, as torch.autograd.functional.jacobian(vectorize=True) gives.
        x1 = x.clone().requires_grad_()
        (batched,) = torch.autograd.grad(criterion(x1, y), x1, torch.tensor([1.0, -2.0]), is_grads_batched=True)
        single = (torch.sigmoid(x) - y) / y.numel()
        self.assertLess((batched - torch.stack([single, -2 * single])).abs().max().item(), 1e-6)
        # The gradient was computed in the forward pass: a later change to the target does
        # not stop the first backward.
        x2, y2 = x.clone().requires_grad_(), y.clone()
        value = criterion(x2, y2)
        y2.fill_(0)
        value.backward()
        self.assertLess((x2.grad - single).abs().max().item(), 1e-6)

    def test_no_gradients_are_computed_without_grad_mode(self):
        loss = lossc.Loss("dice")
        asked = []
        original = loss.value_and_grad
        loss.value_and_grad = lambda *a, **k: asked.append(k.get("wrt")) or original(*a, **k)
        p = torch.rand(1, 1, 8, requires_grad=True)
        with torch.no_grad():
            lossc.torch.evaluate(loss, p, torch.rand(1, 1, 8))
        lossc.torch.evaluate(loss, p, torch.rand(1, 1, 8))
        self.assertEqual(asked, [(), (0,)])

    def test_plain_cpu_tensors_reach_lossc_by_their_addresses(self):
        # Contiguous float32 (float64 for reference=True) CPU tensors go to the kernels by
        # their data pointers, without NumPy: the same bits as through the NumPy layer,
        # and gradients only where autograd will ask for them.
        loss = lossc.Loss("0.5*dice(sigmoid(x), y) + bce_logits(x, y)")
        x, y = inputs((2, 1, 5, 6))
        value, (dx, dy) = loss.value_and_grad(x.numpy(), y.numpy())
        lib = lossc._capi.lib
        real, seen = lib.lossc_eval, []
        # The NumPy layer's marshalling, counted: the quick path never takes it.
        marshal, marshalled = lossc.Loss._marshal, []

        def spy(handle, pointers, shapes, n, out, slots):
            asked = None if slots is None else [slots[i] is not None for i in range(n)]
            seen.append(([pointers[i] for i in range(n)], asked))
            return real(handle, pointers, shapes, n, out, slots)

        def counted(self, *args, **kwargs):
            marshalled.append(1)
            return marshal(self, *args, **kwargs)

        lib.lossc_eval = spy
        lossc.Loss._marshal = counted
        try:
            x1, y1 = x.clone().requires_grad_(), y.clone().requires_grad_()
            result = lossc.torch.evaluate(loss, x1, y1)
            result.backward()
            with torch.no_grad():
                lossc.torch.evaluate(loss, x1, y1)
            lossc.torch.evaluate(loss, x1, y)
        finally:
            lib.lossc_eval = real
            lossc.Loss._marshal = marshal
        self.assertEqual(marshalled, [], "plain float32 tensors skip the NumPy layer")
        addresses = [x1.data_ptr(), y1.data_ptr()]
        third = [x1.data_ptr(), y.data_ptr()]
        self.assertEqual(seen, [(addresses, [True, True]), (addresses, None), (third, [True, False])])
        self.assertEqual((result.dtype, result.shape, result.device.type), (torch.float32, (), "cpu"))
        self.assertEqual(result.item(), float(np.float32(value)))
        self.assertTrue(torch.equal(x1.grad, torch.from_numpy(dx)) and torch.equal(y1.grad, torch.from_numpy(dy)))
        # Others take the general path, to the same bits: a parameter, other dtypes, a view.
        x2 = torch.nn.Parameter(x.clone())
        lossc.Loss._marshal = counted
        try:
            lossc.torch.evaluate(loss, x2, y.double()).backward()
        finally:
            lossc.Loss._marshal = marshal
        self.assertEqual(len(marshalled), 1, "a float64 input takes the NumPy layer")
        self.assertTrue(torch.equal(x2.grad, x1.grad))
        x3 = x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2).requires_grad_()
        lossc.torch.evaluate(loss, x3, y.bool()).backward()
        self.assertTrue(torch.equal(x3.grad, x1.grad))
        # The reference evaluator, on float64 tensors.
        xd, yd = x.double().requires_grad_(), y.double()
        value64, (dx64,) = loss.value_and_grad(xd.detach().numpy(), yd.numpy(), wrt=[0], reference=True)
        result = lossc.torch.evaluate(loss, xd, yd, reference=True)
        result.backward()
        self.assertEqual(result.item(), value64)
        self.assertTrue(torch.equal(xd.grad, torch.from_numpy(dx64)))
        # A value beyond float32's range is infinite in a float32 result, as torch.tensor
        # rounds it (torch.scalar_tensor, the quick way, would refuse it).
        big = lossc.torch.Loss("sum(x) * sum(x)")(torch.full((1, 1, 4), 1e30, requires_grad=True))
        self.assertEqual((big.item(), big.dtype), (float("inf"), torch.float32))
        # 0-d inputs keep 0-d gradients; empty ones get lossc's message.
        x0 = torch.tensor(0.3, requires_grad=True)
        lossc.torch.Loss("bce_logits")(x0, torch.tensor(1.0)).backward()
        self.assertEqual(x0.grad.shape, ())
        with self.assertRaisesRegex(lossc.ShapeError, "is empty"):
            lossc.torch.Loss("dice")(torch.rand(0, 1, 4, requires_grad=True), torch.rand(0, 1, 4))

        # A loss whose value_and_grad is overridden is called through it.
        class Logged(lossc.Loss):
            def value_and_grad(self, *arrays, **options):
                asked.append(options["wrt"])
                return super().value_and_grad(*arrays, **options)

        asked = []
        lossc.torch.evaluate(Logged("dice"), torch.rand(1, 1, 8, requires_grad=True), torch.rand(1, 1, 8)).backward()
        self.assertEqual(asked, [(0,)])

    def test_a_model_learns_and_the_module_saves(self):
        torch.manual_seed(0)
        images = torch.randn(16, 3, 24, 24)
        masks = (images[:, :1] + 0.5 * images[:, 1:2] > 0).float()
        model = torch.nn.Conv2d(3, 1, 1)
        criterion = lossc.torch.Loss("0.5*dice(sigmoid(x), y) + bce_logits(x, y)")
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        history = []
        for _ in range(40):
            optimizer.zero_grad()
            loss = criterion(model(images), masks)
            loss.backward()
            optimizer.step()
            history.append(loss.item())
        self.assertLess(history[-1], 0.5 * history[0])
        buffer = io.BytesIO()
        torch.save(criterion, buffer)
        buffer.seek(0)
        restored = torch.load(buffer, weights_only=False)
        with torch.no_grad():
            out = model(images)
            self.assertEqual(restored(out, masks).item(), criterion(out, masks).item())

    def test_torch_func_transforms(self):
        torch.manual_seed(3)
        criterion = lossc.torch.Loss("0.5*dice(sigmoid(x), y) + bce_logits(x, y)")
        x, y = inputs((3, 1, 9, 7))
        double = (x.double(), y.double())
        expected = torch.func.grad(combined)(*double)
        self.assertLess((torch.func.grad(criterion)(x, y) - expected).abs().max().item(), 1e-6)
        value, pullback = torch.func.vjp(lambda a: criterion(a, y), x)
        self.assertAlmostEqual(value.item(), combined(*double).item(), places=6)
        self.assertLess((pullback(torch.tensor(-2.0))[0] + 2 * expected).abs().max().item(), 2e-6)
        self.assertLess((torch.func.jacrev(criterion)(x, y) - expected).abs().max().item(), 1e-6)
        # Per-example losses and gradients: each example as the function sees it.
        xs, ys = inputs((4, 2, 1, 6, 5))
        per_example = torch.func.vmap(torch.func.grad_and_value(criterion))(xs, ys)
        for k in range(4):
            grad, value = torch.func.grad_and_value(combined)(xs[k].double(), ys[k].double())
            self.assertLess((per_example[0][k] - grad).abs().max().item(), 1e-6)
            self.assertAlmostEqual(per_example[1][k].item(), value.item(), places=6)
        # vmap under plain autograd: per-example losses that backward differentiates.
        leaf = xs.clone().requires_grad_()
        torch.func.vmap(criterion)(leaf, ys).sum().backward()
        for k in range(4):
            expected = torch.func.grad(combined)(xs[k].double(), ys[k].double())
            self.assertLess((leaf.grad[k] - expected).abs().max().item(), 1e-6)
        # A mapped axis that is not the first, and an input that is not mapped.
        values = torch.func.vmap(criterion, in_dims=(2, None))(xs.movedim(0, 2), ys[0])
        for k in range(4):
            self.assertAlmostEqual(values[k].item(), combined(xs[k].double(), ys[0].double()).item(), places=6)

    def test_errors(self):
        criterion = lossc.torch.Loss("dice")
        with self.assertRaisesRegex(lossc.ShapeError, "has 3 along batch"):
            criterion(torch.rand(2, 1, 8, 8), torch.rand(3, 1, 8, 8))
        with self.assertRaises(lossc.ParamsError):
            lossc.torch.Loss("dice", smoth=1)
        with self.assertRaisesRegex(lossc.ShapeError, "takes 2 inputs"):
            criterion(*[torch.rand(1, 1, 4, requires_grad=True)] * 3)
        # A Python number is a float32 input, as in PyTorch's operators.
        self.assertEqual(lossc.torch.Loss("bce_logits")(torch.rand(1, 1, 4), 0.5).dtype, torch.float32)
        # Overrides apply to a compiled loss too.
        p, y = torch.rand(2, 1, 6, 6), torch.rand(2, 1, 6, 6)
        base = lossc.Loss("tversky")
        self.assertEqual(lossc.torch.Loss(base, alpha=0.9, beta=0.1)(p, y).item(),
                         lossc.torch.Loss("tversky", alpha=0.9, beta=0.1)(p, y).item())
        # No second derivative: refused, not silently zero. A first one with
        # create_graph=True is given (the loss may be one term of many).
        x = torch.rand(2, 1, 4, 4, requires_grad=True)
        y = torch.rand(2, 1, 4, 4)
        (first,) = torch.autograd.grad(lossc.torch.Loss("dice")(x, y), x, create_graph=True)
        self.assertLess((first - torch.autograd.grad(dice(x, y), x)[0]).abs().max().item(), 1e-6)
        with self.assertRaisesRegex(RuntimeError, "first derivatives only"):
            first.square().sum().backward()
        with self.assertRaisesRegex(RuntimeError, "first derivatives only"):
            torch.autograd.functional.hessian(lambda a: lossc.torch.Loss("dice")(a, y), x.detach())
        with self.assertRaisesRegex(RuntimeError, "first derivatives only"):
            torch.func.grad(lambda a: torch.func.grad(lambda b: lossc.torch.Loss("dice")(b, y))(a).sum())(x.detach())
        with self.assertRaisesRegex(NotImplementedError, "no forward-mode"):
            torch.func.jvp(lambda a: lossc.torch.Loss("dice")(a, y), (x.detach(),), (torch.ones_like(x),))
        self.assertTrue(np.isnan(criterion(torch.full((1, 1, 3), float("nan")), torch.rand(1, 1, 3)).item()))


def dice_multiclass_weighted(x, y, w, smooth=1.0):
    s = torch.softmax(x, dim=1)
    dims = (0, 2, 3)
    d = (2 * (s * y).sum(dims) + smooth) / (s.sum(dims) + y.sum(dims) + smooth)
    return 1 - (w.reshape(-1) * d).sum() / w.sum()


@unittest.skipIf(lossc.torch._value_and_grad_op is None, "torch.library.custom_op needs PyTorch 2.4")
class UnderTorchCompile(unittest.TestCase):
    """The loss as one operator in a torch.compile graph (each compile takes seconds on
    the CPU, so there are few)."""

    def assertClose(self, mine, theirs, tolerance):
        scale = max(theirs.abs().max().item(), 1e-30)
        self.assertLess((mine.double() - theirs.double()).abs().max().item(), tolerance * scale)

    def test_an_overridden_value_and_grad_is_still_called(self):
        # The operator rebuilds the loss from its text, which would bypass an override:
        # such a loss breaks the graph instead and runs eagerly, through the override.
        class Logged(lossc.Loss):
            def value_and_grad(self, *arrays, **options):
                asked.append(options["wrt"])
                return super().value_and_grad(*arrays, **options)

        asked = []
        criterion = lossc.torch.Loss(Logged("dice(sigmoid(x), y)"))
        x, y = inputs((2, 1, 5, 6))
        x.requires_grad_()
        compiled = torch.compile(lambda x, y: criterion(x, y), backend="eager")
        compiled(x, y).backward()
        self.assertEqual(asked, [(0,)])
        self.assertEqual(x.grad.shape, x.shape)

    def test_one_graph_with_the_values_and_gradients_of_eager(self):
        torch.manual_seed(5)
        binary = lossc.torch.Loss("0.5*dice(sigmoid(x), y) + bce_logits(x, y)")
        multiclass = lossc.torch.Loss("dice_multiclass_weighted", smooth=2)
        from torch._dynamo.testing import CompileCounterWithBackend

        counter = CompileCounterWithBackend("inductor")

        @torch.compile(fullgraph=True, backend=counter)
        def losses(x, y, xm, ym, w):
            return binary(x, y), multiclass(xm, ym, w)

        def fresh():
            x, y = inputs((3, 1, 12, 10))
            xm, ym = inputs((2, 4, 6, 7), classes=4)
            return x.requires_grad_(), y.requires_grad_(), xm.requires_grad_(), ym, torch.rand(1, 4) + 0.5

        sum(losses(*fresh())).backward()  # traced and compiled on these
        args = fresh()
        compiled = losses(*args)
        sum(compiled).backward()
        eager_args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
        eager = (binary(*eager_args[:2]), multiclass(*eager_args[2:]))
        sum(eager).backward()
        double = [a.detach().double().requires_grad_(a.requires_grad) for a in args]
        formulas = (combined(*double[:2]), dice_multiclass_weighted(*double[2:], smooth=2))
        sum(formulas).backward()
        for mine, theirs, exact in zip(compiled, formulas, eager):
            self.assertEqual(mine.dtype, torch.float32)
            self.assertClose(mine, exact, 1e-6)
            self.assertClose(mine, theirs, 1e-5)
        for mine, theirs, exact in zip(args, double, eager_args):
            if mine.requires_grad:
                self.assertClose(mine.grad, exact.grad, 1e-6)
                self.assertClose(mine.grad, theirs.grad, 1e-5)
        # One graph for both calls (no break, no recompile), holding both losses as
        # lossc's operator.
        self.assertEqual(counter.frame_count, 1)
        self.assertEqual(str(counter.graphs[0].code).count("lossc.value_and_grad"), 2)

    def test_a_compiled_training_step_learns(self):
        torch.manual_seed(0)
        images = torch.randn(16, 3, 24, 24)
        masks = (images[:, :1] + 0.5 * images[:, 1:2] > 0).float()
        criterion = lossc.torch.Loss("0.5*dice(sigmoid(x), y) + bce_logits(x, y)")

        def train(compile):
            torch.manual_seed(1)
            model = torch.nn.Conv2d(3, 1, 1)
            optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
            forward = lambda images, masks: criterion(model(images), masks)  # noqa: E731
            if compile:
                # Model and loss in one graph; `backward` runs its compiled backward.
                # (Dynamo itself does not trace `backward` or the optimizer's step.)
                forward = torch.compile(forward, fullgraph=True)
            history = []
            for _ in range(8):
                optimizer.zero_grad()
                loss = forward(images, masks)
                loss.backward()
                optimizer.step()
                history.append(loss.item())
            return history

        history = train(compile=True)
        self.assertLess(history[-1], 0.85 * history[0], history)
        np.testing.assert_allclose(history, train(compile=False), rtol=1e-5)

    def test_errors_surface_as_lossc_raises_them(self):
        criterion = torch.compile(lossc.torch.Loss("dice"), fullgraph=True, backend="aot_eager")
        with self.assertRaisesRegex(lossc.ShapeError, "has 3 along batch"):
            criterion(torch.rand(2, 1, 8, 8, requires_grad=True), torch.rand(3, 1, 8, 8))
        with self.assertRaisesRegex(lossc.ShapeError, "takes 2 inputs"):
            criterion(*[torch.rand(1, 1, 4, requires_grad=True)] * 3)

    def test_the_operator_against_its_fake_and_autograd(self):
        # Half precision: the fake's dtypes and the backward's cast.
        x = torch.randn(2, 1, 5, 5, dtype=torch.float16, requires_grad=True)
        y = torch.rand(2, 1, 5, 5, requires_grad=True)
        args = ("bce_logits", "pos_weight=3.0", False, [0, 1], [x, y])
        torch.library.opcheck(torch.ops.lossc.value_and_grad, args)


if __name__ == "__main__":
    unittest.main()
