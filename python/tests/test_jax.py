"""lossc.jax against losses written in jax.numpy (jax.grad for the gradients)."""

import os
import subprocess
import sys
import textwrap
import unittest

import jax
import jax.numpy as jnp
import numpy as np

import lossc
import lossc.jax

RNG = np.random.default_rng()


def dice(p, y, smooth=1.0):
    return 1 - (2 * (p * y).sum() + smooth) / (p.sum() + y.sum() + smooth)


def combined(x, y):
    return 0.5 * dice(jax.nn.sigmoid(x), y) + jnp.mean(jax.nn.softplus(x) - x * y)


def tversky(p, y, alpha=0.3, beta=0.7, smooth=1.0):
    tp, fp, fn = (p * y).sum(), (p * (1 - y)).sum(), ((1 - p) * y).sum()
    return 1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)


def inputs(shape):
    x = RNG.normal(0, 2, shape).astype(np.float32)
    y = (RNG.uniform(size=shape) < 0.4).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


class AgainstJax(unittest.TestCase):
    def assert_close(self, value, expected, grads, expected_grads):
        self.assertLess(abs(float(value) - float(expected)), 1e-5 * abs(float(expected)))
        self.assert_grads_close(grads, expected_grads)

    def assert_grads_close(self, grads, expected_grads):
        for g, e in zip(grads, expected_grads):
            self.assertEqual(g.shape, e.shape)
            g, e = np.asarray(g, np.float64), np.asarray(e, np.float64)
            self.assertLess(np.abs(g - e).max(), 1e-5 * np.abs(e).max())

    def test_value_and_grad_under_jit(self):
        f = lossc.jax.function("0.5*dice(sigmoid(x), y) + bce_logits(x, y)")
        x, y = inputs((3, 1, 40, 37))
        value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, y)
        with jax.enable_x64(True):
            expected, expected_grads = jax.value_and_grad(combined, argnums=(0, 1))(
                x.astype(jnp.float64), y.astype(jnp.float64)
            )
        self.assertEqual(value.dtype, jnp.float32)
        self.assert_close(value, expected, grads, expected_grads)

    def test_hyperparameters_and_probabilities(self):
        f = lossc.jax.function("tversky", alpha=0.3, beta=0.7)
        x, y = inputs((2, 1, 20, 20))
        p = jax.nn.sigmoid(x)
        value, g = jax.value_and_grad(f)(p, y)
        expected, expected_g = jax.value_and_grad(tversky)(p, y)
        self.assert_close(value, expected, [g], [expected_g])

    def test_integer_labels_and_the_chain_rule(self):
        f = lossc.jax.function("bce_logits")
        x, y = inputs((2, 1, 8, 8))
        labels = y.astype(jnp.int32)
        scale = jnp.float32(1.7)
        g = jax.grad(lambda x: scale * f(x * 2, labels))(x)
        expected = scale * 2 * (jax.nn.sigmoid(2 * x) - y) / y.size
        self.assert_grads_close([g], [expected])

    def test_vmap_evaluates_per_element(self):
        f = lossc.jax.function("dice")
        x, y = inputs((4, 1, 16, 16))
        p = jax.nn.sigmoid(x)
        values = jax.vmap(f)(p[:, None], y[:, None])
        grads = jax.vmap(jax.grad(f))(p[:, None], y[:, None])
        for i in range(4):
            self.assertAlmostEqual(float(values[i]), float(dice(p[i], y[i])), places=5)
            expected = jax.grad(dice)(p[i], y[i])
            self.assertLess(float(jnp.abs(grads[i, 0] - expected).max()), 1e-5 * float(jnp.abs(expected).max()))

    def test_errors(self):
        f = lossc.jax.function("dice")
        with self.assertRaisesRegex(TypeError, "takes 2 inputs"):
            f(jnp.ones((1, 1, 4)))
        with self.assertRaises(lossc.ParseError):
            lossc.jax.function("dice(")
        # Shape mistakes are found when tracing, with lossc's own error.
        with self.assertRaisesRegex(lossc.ShapeError, "along batch"):
            jax.jit(f)(jnp.ones((2, 1, 4)), jnp.ones((3, 1, 4)))
        with self.assertRaisesRegex(lossc.ShapeError, "empty"):
            jax.grad(f)(jnp.ones((2, 1, 0)), jnp.ones((2, 1, 0)))
        with self.assertRaisesRegex(TypeError, "complex"):
            f(jnp.ones((1, 1, 4), jnp.complex64), jnp.ones((1, 1, 4)))
        # No second derivatives, with lossc's message; no forward mode, with JAX's.
        p, y = jnp.full((1, 1, 3), 0.5), jnp.ones((1, 1, 3))
        with self.assertRaisesRegex(TypeError, "first derivatives only"):
            jax.hessian(f)(p, y)
        with self.assertRaisesRegex(TypeError, "first derivatives only"):
            jax.grad(lambda p: jax.grad(f)(p, y).sum())(p)
        with self.assertRaisesRegex(TypeError, "forward-mode"):
            jax.jvp(lambda p: f(p, y), (p,), (p,))

    def test_bfloat16_inputs_and_overrides_of_a_compiled_loss(self):
        x, y = inputs((2, 1, 16, 16))
        f = lossc.jax.function(lossc.Loss("focal"), gamma=1.5)
        xb = x.astype(jnp.bfloat16)
        g = jax.grad(f)(xb, y)
        self.assertEqual(g.dtype, jnp.bfloat16)
        exact = lossc.Loss("focal", gamma=1.5).value_and_grad(np.asarray(xb.astype(jnp.float32)), np.asarray(y))[1][0]
        self.assertLess(float(jnp.abs(g.astype(jnp.float32) - exact).max()), 1e-2 * float(np.abs(exact).max()))

    def test_custom_call_on_xla_buffers_agrees_with_the_reference(self):
        # The float32 path is an XLA custom call into lossc, not a host callback; it must
        # agree with the float64 reference (a callback) on a multiclass loss with class
        # weights broadcast along batch and space, gradients of all three inputs, and
        # integer labels next to a float input in another call.
        f = lossc.jax.function("dice_multiclass_weighted")
        x = jnp.asarray(RNG.normal(0, 2, (2, 5, 9, 7)).astype(np.float32))
        y = jax.nn.one_hot(jnp.asarray(RNG.integers(0, 5, (2, 9, 7))), 5, axis=1)
        w = jnp.asarray(RNG.uniform(0.5, 2, (1, 5)).astype(np.float32))
        grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
        hlo = grad.lower(x, y, w).compile().as_text()
        self.assertIn('custom_call_target="lossc_eval"', hlo)
        self.assertNotIn("callback", hlo)
        # A program lowered for another platform takes the callback (which JAX cannot
        # lower on a machine without that platform).
        try:
            text = grad.trace(x, y, w).lower(lowering_platforms=("cuda",)).as_text()
        except ValueError as e:
            text = str(e)
        self.assertNotIn("lossc_eval", text)
        value, grads = grad(x, y, w)
        with jax.enable_x64(True):
            exact = lossc.jax.function("dice_multiclass_weighted", reference=True)
            wide = [a.astype(jnp.float64) for a in (x, y, w)]
            expected, expected_grads = jax.value_and_grad(exact, argnums=(0, 1, 2))(*wide)
        self.assertEqual([g.shape for g in grads], [x.shape, y.shape, w.shape])
        self.assert_close(value, expected, grads, expected_grads)
        # Two losses in one program, value only and value with a gradient.
        bce, tv = lossc.jax.function("bce_logits"), lossc.jax.function("tversky", alpha=0.2, beta=0.8)
        xs, ys = inputs((3, 1, 33))
        both = jax.jit(lambda x, y: bce(x, y.astype(jnp.int8)) + jax.grad(tv)(jax.nn.sigmoid(x), y).sum())
        expected = lossc.Loss("bce_logits")(np.asarray(xs), np.asarray(ys)) + float(
            lossc.Loss("tversky", alpha=0.2, beta=0.8).value_and_grad(np.asarray(jax.nn.sigmoid(xs)), np.asarray(ys))[1][0].sum()
        )
        self.assertAlmostEqual(float(both(xs, ys)), expected, places=5)

    def test_exported_programs_run_after_register(self):
        f = lossc.jax.function("focal", gamma=1.5)
        x, y = inputs((2, 1, 7, 3))
        check = jax.export.DisabledSafetyCheck.custom_call("lossc_eval")
        exported = jax.export.export(jax.jit(jax.value_and_grad(f)), disabled_checks=[check])(x, y)
        self.assertTrue(lossc.jax.register())
        value, grad = exported.call(x, y)
        expected, (expected_grad,) = lossc.Loss("focal", gamma=1.5).value_and_grad(np.asarray(x), np.asarray(y), wrt=["x"])
        self.assertAlmostEqual(float(value), expected, places=6)
        self.assertLess(float(jnp.abs(grad - expected_grad).max()), 1e-6 * float(np.abs(expected_grad).max()))

    def test_custom_call_errors_carry_lossc_messages(self):
        # What XLA hands the handler is checked, and a failure comes back as an XLA error
        # with lossc's message (the Python layer never builds such calls).
        lossc.jax.function("dice")(jnp.ones((1, 1, 2)), jnp.ones((1, 1, 2)))  # registers
        x = jnp.ones((1, 1, 4), jnp.float32)
        value = (jax.ShapeDtypeStruct((), jnp.float32),)

        def call(*args, results=value, **attrs):
            return jax.ffi.ffi_call("lossc_eval", results)(*args, **attrs)

        with self.assertRaisesRegex(Exception, "expected"):
            call(x, x, source="dice(", params="", wrt=np.int64(0))
        with self.assertRaisesRegex(Exception, "takes 2 inputs"):
            call(x, source="dice", params="", wrt=np.int64(0))
        with self.assertRaisesRegex(Exception, "does not have"):
            call(x, x, source="dice", params="", wrt=np.int64(4))
        with self.assertRaisesRegex(Exception, "expects 1 results"):
            call(x, x, source="dice", params="", wrt=np.int64(1))
        with self.assertRaisesRegex(Exception, "float32"):
            call(x.astype(jnp.int32), x, source="dice", params="", wrt=np.int64(0))
        with self.assertRaisesRegex(Exception, "along batch"):
            call(jnp.ones((2, 1, 4)), jnp.ones((3, 1, 4)), source="dice", params="", wrt=np.int64(0))
        with self.assertRaisesRegex(Exception, "not a hyperparameter|no hyperparameter|unknown"):
            call(x, x, source="dice", params="smoth=2", wrt=np.int64(0))
        with self.assertRaisesRegex(Exception, "value is one float32"):
            call(x, x, source="dice", params="", wrt=np.int64(0), results=(jax.ShapeDtypeStruct((3,), jnp.float32),))
        grad_results = value + (jax.ShapeDtypeStruct((1, 1, 4), jnp.float32),)
        with self.assertRaisesRegex(Exception, "not shaped as its input"):
            call(x, x, source="dice", params="", wrt=np.int64(1), results=value + (jax.ShapeDtypeStruct((4,), jnp.float32),))
        with self.assertRaisesRegex(Exception, "shares memory"):
            jax.ffi.ffi_call("lossc_eval", grad_results, input_output_aliases={0: 1})(
                x + 0, x, source="dice", params="", wrt=np.int64(1)
            )
        (v,) = call(x * 0.5, x, source="dice", params="smooth=2", wrt=np.int64(0))
        self.assertAlmostEqual(float(v), 1 - 6 / 8, places=6)

    def test_shard_map_sees_a_loss_per_shard(self):
        # Under jax.shard_map a loss of one shard's arrays varies over the mesh axis: a
        # replicated out_spec is refused (as for the loss written in jax.numpy), and the
        # pmean of the shards' losses differentiates as jax.numpy's does. Four CPU
        # devices need a process of their own.
        script = textwrap.dedent(
            """
            import jax, jax.numpy as jnp, numpy as np, lossc.jax
            from jax.sharding import Mesh, PartitionSpec as P
            mesh = Mesh(np.array(jax.devices()), ("d",))
            rng = np.random.default_rng()
            x = rng.standard_normal((8, 1, 6, 5)).astype(np.float32)
            y = (rng.random((8, 1, 6, 5)) > 0.5).astype(np.float32)
            ours = lossc.jax.function("dice(sigmoid(x), y)")
            def theirs(x, y):
                p = jax.nn.sigmoid(x)
                return 1 - (2 * jnp.sum(p * y) + 1) / (jnp.sum(p) + jnp.sum(y) + 1)
            results = []
            for f in (ours, theirs):
                mean = jax.shard_map(lambda x, y: jax.lax.pmean(f(x, y), "d"), mesh=mesh,
                                     in_specs=(P("d"), P("d")), out_specs=P())
                inner = jax.shard_map(jax.grad(f), mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P("d"))
                results.append((*jax.jit(jax.value_and_grad(mean))(x, y), jax.jit(inner)(x, y)))
                try:
                    jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P()))(x, y)
                    raise SystemExit("a per-shard loss passed as replicated")
                except ValueError as e:
                    assert "replicat" in str(e), e
            for a, b in zip(*results):
                a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
                assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), (a, b)
            print("ok")
            """
        )
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        self.assertEqual(run.returncode, 0, run.stderr[-3000:])
        self.assertEqual(run.stdout.strip(), "ok")


if __name__ == "__main__":
    unittest.main()
