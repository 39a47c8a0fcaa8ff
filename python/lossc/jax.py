"""JAX: a lossc loss as a differentiable function that works under `jax.jit`.

    import jax, lossc.jax
    loss_fn = lossc.jax.function("0.5*dice(sigmoid(x), y) + bce_logits(x, y)")
    value, grad = jax.value_and_grad(loss_fn)(logits, masks)

Arrays are laid out as for `lossc.Loss` (`[N, C, *spatial]`). The loss runs on the CPU,
as an XLA custom call (`jax.ffi`) that reads and writes XLA's own buffers: under
`jax.grad`, one call computes the value and the gradients of exactly the inputs being
differentiated (lossc's fused sweeps), and the backward pass only scales them. Inputs
go to the kernels as float32. With `reference=True`, where JAX has no `jax.ffi`, or in a
program lowered for another platform than the CPU, the call goes through
`jax.pure_callback` instead, which copies the arrays out of XLA and back. The value is
float32 (float64 for `reference=True` with `jax_enable_x64`); gradients come in each
input's dtype. Shapes are checked when the function is traced: a mismatch raises
`lossc.ShapeError` there. `jax.vmap` evaluates the loss once per mapped element, laid
out by that element's own shape: a per-example `[C, H, W]` reads as batch C, so map
over `[N, 1, C, H, W]` (`x[:, None]`) to keep each example's class axis. Under
`jax.shard_map` the loss of each shard's arrays is that shard's (combine them with
`jax.lax.pmean`). Higher-order derivatives are refused (the gradients are computed,
not traced).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np

import lossc as _lossc
from lossc._capi import lib as _lib

__all__ = ["function", "register"]

# The XLA custom call's name; `_direct` registers it on first use.
_TARGET = "lossc_eval"
_registered = None


def _direct(reference):
    """Whether this call may go to lossc as an XLA custom call on the CPU (registered
    here, once). Where registration fails, calls go through `jax.pure_callback`."""
    global _registered
    if reference:
        return False
    if _registered is None:
        try:
            from jax import ffi

            # The backend first: a target registered before it starts is registered as
            # it starts, and a refusal then reads as the backend failing.
            jax.devices("cpu")
            ffi.register_ffi_target(_TARGET, ffi.pycapsule(_lib.lossc_xla_ffi), platform="cpu")
            _registered = True
        except (ImportError, AttributeError):  # a JAX before jax.ffi
            _registered = False
        except Exception as e:  # XLA refused it (a name taken, an FFI version)
            warnings.warn(f"lossc.jax cannot register its XLA custom call, so it copies arrays: {e}")
            _registered = False
    return _registered


def register():
    """Registers lossc's XLA custom call ("lossc_eval") with JAX's CPU backend, as the
    first trace of a lossc.jax function does; returns whether it is available. A process
    that runs a program exported by `jax.export` (whose export needs
    `disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("lossc_eval")]`) and
    traces no lossc.jax function calls this first."""
    return _direct(False)


def _on_the_cpu(direct, callback, *args):
    """`direct(*args)` where the program runs on the CPU, `callback(*args)` elsewhere: the
    platform is known when the program is lowered, not when it is traced."""
    return jax.lax.platform_dependent(*args, cpu=direct, default=callback)


def _manual_axes(x):
    """The mesh axes of a `jax.shard_map` that `x` varies over (none outside one)."""
    typeof = getattr(jax, "typeof", None)  # JAX 0.6 and later
    kind = getattr(typeof(x), "manual_axis_type", None) if typeof else None
    return frozenset(getattr(kind, "varying", None) or ())


def _varying_like(result, arrays):
    """`result` typed as varying over every mesh axis the arrays vary over. A call's
    results are otherwise typed as the same on every shard of a `jax.shard_map`, and JAX
    would pass off one shard's loss as the loss of all."""
    axes = frozenset().union(*(_manual_axes(a) for a in arrays)) - _manual_axes(result)
    return jax.lax.pcast(result, tuple(sorted(axes)), to="varying") if axes else result


def _custom_call(loss, args, wanted):
    """The value and the gradients of the inputs in `wanted` (float32), by lossc_xla_ffi."""
    arrays = [a if jnp.result_type(a) == jnp.float32 else jnp.asarray(a, jnp.float32) for a in args]
    shapes = (jax.ShapeDtypeStruct((), jnp.float32),) + tuple(
        jax.ShapeDtypeStruct(jnp.shape(args[i]), jnp.float32) for i in wanted
    )
    call = jax.ffi.ffi_call(_TARGET, shapes, vmap_method="sequential")
    out = call(
        *arrays,
        source=loss._source,
        params=_lossc._params_text(loss._params),
        wrt=np.int64(sum(1 << i for i in wanted)),
    )
    return out[0], tuple(out[1:])


def function(source, reference=False, **params):
    """A JAX function of the loss's inputs (in their declared order) giving its value.

    `source` is a stdlib name, an expression or loss definitions (or a `lossc.Loss`);
    keyword arguments override hyperparameters. `reference=True` evaluates with lossc's
    float64 reference evaluator (exact and slow).
    """
    loss = _lossc.as_loss(source, **params)
    count = len(loss.inputs)

    def out_dtype():
        return jnp.float64 if reference and jax.config.jax_enable_x64 else jnp.float32

    def check(args):
        # At trace time, so that a mistake raises lossc's own error here, not a runtime
        # error from inside the callback.
        if len(args) != count:
            raise TypeError(
                f"{loss.name} takes {count} inputs ({', '.join(loss.inputs)}), but {len(args)} {'was' if len(args) == 1 else 'were'} given"
            )
        for name, a in zip(loss.inputs, args):
            if jnp.issubdtype(jnp.result_type(a), jnp.complexfloating):
                raise TypeError(f"input `{name}` holds complex numbers; lossc takes real numbers")
        loss.check_shapes(*(jnp.shape(a) for a in args))

    def value_only(*arrays):
        return np.asarray(loss(*arrays, reference=reference), dtype=out_dtype())

    # The custom call takes at most 63 inputs (`wrt` is a bit mask).
    direct = count < 64

    @jax.custom_vjp
    def apply(*args):
        check(args)
        result = jax.ShapeDtypeStruct((), out_dtype())

        def callback(*args):
            return jax.pure_callback(value_only, result, *args, vmap_method="sequential")

        if direct and _direct(reference):
            value = _on_the_cpu(lambda *args: _custom_call(loss, args, ())[0], callback, *args)
        else:
            value = callback(*args)
        return _varying_like(value, args)

    def forward(*primals):
        args = [p.value for p in primals]
        check(args)
        wanted = tuple(i for i, p in enumerate(primals) if p.perturbed)
        dtypes = [jnp.result_type(a) for a in args]

        def value_and_grad(*arrays):
            value, grads = loss.value_and_grad(*arrays, wrt=wanted, reference=reference)
            return (
                np.asarray(value, dtype=out_dtype()),
                tuple(g.astype(dtypes[i], copy=False) for i, g in zip(wanted, grads)),
            )

        shapes = (
            jax.ShapeDtypeStruct((), out_dtype()),
            tuple(jax.ShapeDtypeStruct(jnp.shape(args[i]), dtypes[i]) for i in wanted),
        )
        def custom_call(*arrays):
            value, grads = _custom_call(loss, arrays, wanted)
            return value, tuple(g.astype(dtypes[i]) for i, g in zip(wanted, grads))

        def callback(*arrays):
            return jax.pure_callback(value_and_grad, shapes, *arrays, vmap_method="sequential")

        @jax.custom_jvp
        def fused(*arrays):
            if direct and _direct(reference):
                return _on_the_cpu(custom_call, callback, *arrays)
            return callback(*arrays)

        @fused.defjvp
        def _(primals, tangents):
            # Differentiating the gradient (jax.hessian, grad of grad): the gradients are
            # numbers from the callback, not a trace, so say so rather than JAX's advice
            # to write a custom_jvp.
            raise TypeError(
                f"lossc.jax gives first derivatives only: the gradient of {loss.name} cannot be "
                "differentiated again (jax.hessian, grad of grad)"
            )

        value, grads = fused(*args)
        value = _varying_like(value, args)
        grads = tuple(_varying_like(g, args) for g in grads)
        by_input = dict(zip(wanted, grads))
        return value, tuple(by_input.get(i) for i in range(count))

    def backward(grads, cotangent):
        return tuple(None if g is None else g * cotangent.astype(g.dtype) for g in grads)

    apply.defvjp(forward, backward, symbolic_zeros=True)
    apply.loss = loss
    return apply
