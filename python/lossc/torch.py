"""PyTorch: a lossc loss as an `nn.Module` with exact gradients.

    import lossc.torch
    criterion = lossc.torch.Loss("0.5*dice(sigmoid(x), y) + bce_logits(x, y)")
    loss = criterion(logits, masks)      # a 0-d tensor; inputs in the loss's input order
    loss.backward()

Tensors are laid out as for `lossc.Loss`: `[N, C, *spatial]` (PyTorch's NCHW). The
forward pass computes the value and, for every input that requires a gradient, that
gradient, in one call (lossc's fused sweeps); the backward pass only scales them. CPU
tensors are handed to the kernels without a copy when they are contiguous float32 (by
their data pointers, without a NumPy array in between).
CUDA tensors run through `lossc_eval_cuda` (PTX kernels, on PyTorch's current stream;
Keras on the PyTorch backend takes this path too on a GPU): it has not yet run on one.
The result is float32 (float64 if an input is float64); half-precision inputs are
evaluated in float32 and get gradients of their own dtype. A second derivative
(`create_graph=True`: a Hessian, a gradient penalty) is refused with an error: the
gradients are computed, not traced. Of the `torch.func` transforms, `grad`, `vjp`,
`jacrev` and `vmap` work (`vmap` evaluates one example at a time, as the function would
see it: without the mapped axis); forward-mode ones (`jvp`, `jacfwd`) do not.
Under `torch.compile` (PyTorch 2.4 and later) the loss is one opaque operator in the
graph, `lossc::value_and_grad`, so `fullgraph=True` works; earlier PyTorch breaks the
graph at the loss.
"""

import ctypes
import functools
import threading
from typing import List, Tuple

import numpy as np
import torch

import lossc as _lossc
from lossc._capi import lib

__all__ = ["Loss", "evaluate"]

_Tensor = torch.Tensor
_float32, _float64 = torch.float32, torch.float64
_cpu = torch.device("cpu")
_FLOAT32_MAX = torch.finfo(torch.float32).max
_strided = torch.strided
_is_grad_enabled = torch.is_grad_enabled
_scalar_tensor = torch.scalar_tensor
_from_numpy = torch.from_numpy
_np_empty = np.empty
# Tensors whose `data_ptr` is their data, as `.numpy()` would see it: not a subclass
# that may redefine it (nn.Parameter is a plain tensor).
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))
# What tells a tensor batched by vmap: torch.func's, or the older one behind batched
# gradients (looked up once; a PyTorch without one has no such tensors).
_functorch = getattr(torch._C, "_functorch", None)
_is_wrapped = getattr(_functorch, "is_functorch_wrapped_tensor", lambda _: False)
_is_legacy_batched = getattr(_functorch, "is_legacy_batchedtensor", lambda _: False)


def evaluate(loss, *tensors, reference=False):
    """The loss (a `lossc.Loss`) on tensors, as a 0-d tensor that autograd can differentiate."""
    if not isinstance(loss, _lossc.Loss):
        raise TypeError(f"`loss` is a lossc.Loss, not {type(loss).__name__}")
    if _value_and_grad_op is not None and _compiling() and not _overridden(loss):
        return _evaluate_compiled(loss, reference, tensors)
    if len(tensors) != len(loss.inputs):
        # Here, before autograd: lossc's own message, whatever requires a gradient.
        loss.check_shapes(*(np.shape(t) for t in tensors))
    for t in tensors:
        if not isinstance(t, _Tensor):
            tensors = tuple(t if isinstance(t, _Tensor) else _as_tensor(t) for t in tensors)
            break
    if not _is_grad_enabled():
        # no_grad / inference: the value only (autograd would still ask for gradients).
        value, _ = _value_and_grad(loss, reference, tensors, ())
        return _result(value, tensors)
    # The gradients autograd will ask for (its `needs_input_grad`), known before the call
    # so that the forward pass computes them.
    wanted = tuple([i for i, t in enumerate(tensors) if t.requires_grad])
    function = _EvaluateTransformed if _transforms_active() else _Evaluate
    return function.apply(loss, reference, wanted, *tensors)[0]


def _result(value, tensors):
    """The value as a 0-d tensor: float64 if an input is, else float32; on the inputs' device."""
    dtype = _float32
    for t in tensors:
        if t.dtype is _float64:
            dtype = _float64
            break
    device = None
    if tensors:
        first = tensors[0]
        device = _cpu if first.is_cpu else first.device
    if dtype is _float64 or -_FLOAT32_MAX <= value <= _FLOAT32_MAX:
        # torch.scalar_tensor rounds the double as torch.tensor does, in half the time;
        # but it refuses a value beyond float32's range, which torch.tensor makes infinite.
        return _scalar_tensor(value, dtype=dtype, device=device)
    return torch.tensor(value, dtype=dtype, device=device)


def _as_tensor(value):
    """A Python number or array as a tensor; floats in the default dtype (float32), as
    PyTorch's own operators take them."""
    array = np.asarray(value)
    dtype = torch.get_default_dtype() if array.dtype.kind == "f" else None
    return torch.as_tensor(array, dtype=dtype)


class Loss(torch.nn.Module):
    """A compiled lossc loss as a module: `Loss("tversky", alpha=0.3, beta=0.7)`.

    `source` is a stdlib name, an expression or loss definitions (or a `lossc.Loss`);
    keyword arguments override hyperparameters. `reference=True` evaluates with lossc's
    float64 reference evaluator (exact and slow; CPU only), as for `torch.autograd.gradcheck`.
    """

    def __init__(self, source, reference=False, **params):
        super().__init__()
        self.loss = _lossc.as_loss(source, **params)
        self.reference = reference

    @property
    def inputs(self):
        return self.loss.inputs

    def forward(self, *tensors):
        return evaluate(self.loss, *tensors, reference=self.reference)

    def extra_repr(self):
        return repr(self.loss)


_handover = threading.Lock()


def _forward(loss, reference, wanted, *tensors):
    """The value and, as outputs autograd does not differentiate, the gradients in `wanted`."""
    value, grads = _value_and_grad(loss, reference, tensors, wanted)
    return (_result(value, tensors), *grads)


def _setup_context(ctx, inputs, output):
    loss, reference, wanted, *tensors = inputs
    ctx.mark_non_differentiable(*output[1:])
    # Else autograd hands backward a zero tensor the size of each gradient output.
    ctx.set_materialize_grads(False)
    ctx.loss, ctx.reference, ctx.wanted, ctx.grads = loss, reference, wanted, list(output[1:])
    ctx.dtypes = [t.dtype for t in tensors]
    # Only a second backward (retain_graph=True) reads the inputs back, to recompute the
    # gradients the first one handed over; autograd then checks they were not changed
    # in place.
    ctx.save_for_backward(*tensors)


def _backward(ctx, grad_output, *_):
    if grad_output is None:
        # No gradient reaches the value (grads are not materialized): none to give.
        return (None,) * (3 + len(ctx.dtypes))
    with _handover:
        grads, ctx.grads = ctx.grads, None
    if grads is None:
        _, grads = _value_and_grad(ctx.loss, ctx.reference, ctx.saved_tensors, ctx.wanted)
    # The gradients (float32, or float64 for reference=True) are handed over, not
    # copied: `loss.backward()` seeds 1, and another scale (a GradScaler's 65536) is
    # applied in place in that precision, before any cast to a half-precision input's
    # dtype. Batched seeds (vmap, is_grads_batched) need a new, batched tensor.
    batched = _is_batched(grad_output)
    unit = not batched and grad_output.is_cpu and grad_output.item() == 1.0
    dtypes = ctx.dtypes
    out = [None] * len(dtypes)
    for i, g in zip(ctx.wanted, grads):
        if batched:
            g = g * grad_output.to(g.dtype)
        elif not unit:
            g = g.mul_(grad_output.to(g.dtype))
        dtype = dtypes[i]
        out[i] = g if g.dtype is dtype else g.to(dtype)
    if _is_grad_enabled():
        # create_graph=True (and every torch.func.grad): the gradients are numbers, not
        # a graph, so a derivative of them (a Hessian, a gradient penalty) would
        # silently be zero. Tied to the inputs, differentiating them raises instead.
        inputs = [t for t in ctx.saved_tensors if t.requires_grad]
        out = [g if g is None else _FirstOrderOnly.apply(g, *inputs) for g in out]
    return (None, None, None, *out)


class _Evaluate(torch.autograd.Function):
    """The loss for autograd. A forward that takes `ctx` (not `setup_context`): for one
    without, `Function.apply` binds the arguments with `inspect.signature` on every call,
    40-80 us here, several times the rest of a small call."""

    @staticmethod
    def forward(ctx, *args):
        output = _forward(*args)
        _setup_context(ctx, args, output)
        return output

    backward = staticmethod(_backward)


class _EvaluateTransformed(torch.autograd.Function):
    """The loss under `torch.func` transforms, which need `setup_context` and a `vmap` rule."""

    forward = staticmethod(_forward)
    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)

    @staticmethod
    def jvp(ctx, *_):
        raise NotImplementedError(
            "lossc.torch has no forward-mode derivatives (torch.func.jvp, jacfwd, hessian): "
            "use reverse mode (backward, torch.func.grad, vjp, jacrev)"
        )

    @staticmethod
    def vmap(info, in_dims, loss, reference, wanted, *tensors):
        # The loss of each example (what the function sees: the tensors without the
        # mapped axis), one evaluation each, stacked.
        if info.batch_size == 0:
            raise ValueError(f"vmap of {loss.name} over an empty axis: there is no example to evaluate")
        dims = in_dims[3:]
        # A mapped tensor reports no requires_grad above this level (vmap under plain
        # autograd): the tensors here tell which gradients autograd will want.
        wanted = tuple(sorted(set(wanted) | {i for i, t in enumerate(tensors) if t.requires_grad}))
        results = []
        for k in range(info.batch_size):
            example = [t if d is None else t.select(d, k) for t, d in zip(tensors, dims)]
            results.append(_EvaluateTransformed.apply(loss, reference, wanted, *example))
        stacked = tuple(torch.stack(column) for column in zip(*results))
        return stacked, (0,) * len(stacked)


_transforms_active_check = getattr(torch._C, "_are_functorch_transforms_active", None)


def _transforms_active():
    """Whether a `torch.func` transform (grad, vmap, ...) is running."""
    return _transforms_active_check is not None and _transforms_active_check()


class _FirstOrderOnly(torch.autograd.Function):
    """The identity on a gradient lossc computed, as a function of the inputs it came from
    whose derivative is refused."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad, *inputs):
        return grad.view_as(grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "lossc.torch gives first derivatives only: the gradient of a lossc loss cannot be "
            "differentiated again (a Hessian, a gradient penalty)"
        )


def _is_batched(t):
    """Whether `t` is batched by vmap: torch.func's, or the older one behind batched gradients."""
    return _is_wrapped(t) or _is_legacy_batched(t)


_POINTER_ALIGN = {_float32: 3, _float64: 7}  # address bits that must be zero
_loss_value_and_grad = _lossc.Loss.value_and_grad


def _overridden(loss):
    """Whether `loss.value_and_grad` is not lossc's own (a subclass's or an instance's
    override), which must then be called: the quick path and the compiled operator (which
    rebuilds the loss from its text) would bypass it. Under torch.compile such a loss
    breaks the graph and runs eagerly."""
    return type(loss).value_and_grad is not _loss_value_and_grad or "value_and_grad" in loss.__dict__


def _value_and_grad_cpu(loss, reference, tensors, wanted):
    """`_value_and_grad` where no input needs converting: plain, contiguous CPU tensors of
    the dtype the kernels read (float32; float64 for `reference`), handed to lossc by
    their data pointers without NumPy (`Loss.value_and_grad`, inlined). None where any
    other input makes the general path (and its checks and messages) necessary, or where
    `value_and_grad` is not lossc's own (a subclass's or an instance's override)."""
    n = len(tensors)
    if not n or n != len(loss.inputs):
        return None  # lossc's count error, after `wanted`'s checks
    if _overridden(loss):
        return None
    dtype = _float64 if reference else _float32
    mask = _POINTER_ALIGN[dtype]
    pointers = []
    for t in tensors:
        if (
            type(t) not in _PLAIN
            or t.dtype is not dtype
            or not t.is_cpu
            or t.layout is not _strided
            or not t.is_contiguous()
            or t.is_neg()
            or _is_batched(t)
        ):
            return None
        p = t.data_ptr()
        if not p or p & mask:
            return None  # empty (no storage) or misaligned: NumPy's path copies it
        pointers.append(p)
    grads = []
    slots = None
    if wanted:
        np_dtype = np.float64 if reference else np.float32
        addresses = [None] * n
        for i in wanted:
            if type(i) is not int or not 0 <= i < n or addresses[i] is not None:
                return None  # `Loss.value_and_grad` refuses it with its message
            # NumPy's buffers, not torch.empty's: NumPy advises huge pages for arrays of
            # 4 MB or more, which makes the first touch of a fresh gradient several times
            # cheaper.
            g = _from_numpy(_np_empty(tensors[i].shape, np_dtype))
            address = addresses[i] = g.data_ptr()
            if not address:
                return None  # no elements: NumPy's path gives lossc the address it has
            grads.append(g)
        slots = _lossc._pointer_array(n)(*addresses)
    shapes = _lossc._shape_array(tuple([t.shape for t in tensors]))
    value = ctypes.c_double()
    call = lib.lossc_eval_f64 if reference else lib.lossc_eval
    status = call(loss._handle, _lossc._pointer_array(n)(*pointers), shapes, n, ctypes.byref(value), slots)
    if status:
        _lossc._check(status)
    return value.value, grads


def _value_and_grad(loss, reference, tensors, wanted):
    """The value (a float) and the gradients of the inputs in `wanted`, each a fresh tensor
    shaped like its input, on its device, in float32 (float64 for `reference`)."""
    fast = _value_and_grad_cpu(loss, reference, tensors, wanted)
    if fast is not None:
        return fast
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"the inputs of {loss.name} are on different devices: {sorted(map(str, devices))}")
    device = next(iter(devices)) if devices else torch.device("cpu")
    if device.type == "cuda":
        if reference:
            raise ValueError("reference=True evaluates on the CPU; move the inputs there")
        value, grads = _evaluate_cuda(loss, tensors, wanted)
    elif device.type == "cpu":
        dtype = np.float64 if reference else np.float32
        arrays = [_to_numpy(t, dtype) for t in tensors]
        # NumPy's buffers, not torch.empty's: NumPy advises huge pages for arrays of 4 MB
        # or more, which makes the first touch of a fresh gradient several times cheaper.
        value, grads = loss.value_and_grad(*arrays, wrt=wanted, reference=reference)
        grads = [torch.from_numpy(g) for g in grads]
    else:
        raise ValueError(f"lossc runs on CPU and CUDA tensors, not on {device.type}")
    return value, [g.reshape(tensors[i].shape) for i, g in zip(wanted, grads)]


def _to_numpy(t, dtype):
    # A negated view (`torch._neg_view`, what some views produce) keeps a bit `numpy()` refuses.
    t = t.detach().resolve_neg()
    if t.dtype.is_complex:
        raise TypeError(f"lossc takes real numbers, not {t.dtype}")
    if t.is_floating_point() or t.dtype == torch.bool:
        t = t.to(torch.float64 if dtype == np.float64 else torch.float32)
    return np.ascontiguousarray(t.numpy(), dtype=dtype)


def _evaluate_cuda(loss, tensors, wanted):
    """`lossc_eval_cuda` on device pointers, on PyTorch's current stream."""
    # resolve_neg: a negated view's data pointer holds the values before the negation.
    inputs = [t.detach().resolve_neg().to(torch.float32).contiguous() for t in tensors]
    grads = [torch.empty_like(inputs[i]) for i in wanted]
    n = len(inputs)
    shapes = _lossc._shape_array(tuple([t.shape for t in inputs]))
    pointers = _lossc._pointer_array(n)(*[t.data_ptr() for t in inputs])
    slots = None
    if wanted:
        by_input = dict(zip(wanted, grads))
        slots = _lossc._pointer_array(n)(*[by_input[i].data_ptr() if i in by_input else None for i in range(n)])
    stream = torch.cuda.current_stream(inputs[0].device).cuda_stream if inputs else None
    value = ctypes.c_double()
    with torch.cuda.device(inputs[0].device if inputs else None):
        _lossc._check(lib.lossc_eval_cuda(loss._handle, pointers, shapes, n, ctypes.byref(value), slots, stream))
    return value.value, grads


# torch.compile. Dynamo cannot trace an autograd.Function that calls into ctypes, so it
# breaks the graph there; a custom operator is opaque to it instead. The operator takes
# the loss as its text and parameters (as lossc.jax's custom call does), not as a
# pointer, so that the graph holds only strings, numbers and tensors; `_compiled` turns
# them back into a `lossc.Loss`, compiled once per loss.


def _compiling():
    """Whether Dynamo is tracing (constant True in the traced code)."""
    compiler = getattr(torch, "compiler", None)
    if hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()


@functools.lru_cache(maxsize=64)
def _compiled(source, params):
    """The `lossc.Loss` of a source and its parameters as `lossc._params_text` writes them."""
    values = dict(item.split("=", 1) for item in params.split(",") if item)
    return _lossc.Loss(source, **{name: float(value) for name, value in values.items()})


def _evaluate_compiled(loss, reference, tensors):
    # Only what Dynamo traces: no NumPy dtypes (`_as_tensor`), no ctypes (the count
    # check in `evaluate`; the operator checks the inputs' number and shapes as it runs).
    tensors = [t if isinstance(t, torch.Tensor) else _as_tensor_traced(t) for t in tensors]
    # Which gradients the forward computes: from requires_grad at trace time, as eager.
    # Dynamo guards on requires_grad and grad mode, so a change recompiles.
    wanted = [i for i, t in enumerate(tensors) if t.requires_grad] if torch.is_grad_enabled() else []
    value, _ = _value_and_grad_op(loss._source, _lossc._params_text(loss._params), reference, wanted, tensors)
    return value


def _as_tensor_traced(value):
    """`_as_tensor` in torch's own operations, which Dynamo traces."""
    t = torch.as_tensor(value)
    return t.to(torch.get_default_dtype()) if t.is_floating_point() else t


# typing's List and Tuple: PyTorch 2.6 and earlier refuse list[int] in an operator's
# signature (pytorch/pytorch#146594).
def _value_and_grad_impl(
    source: str, params: str, reference: bool, wanted: List[int], inputs: List[torch.Tensor]
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """The value (as eager gives it) and the gradients in `wanted`, in float32 (float64
    for `reference`): the backward pass scales them in that precision, as eager does."""
    loss = _compiled(source, params)
    if len(inputs) != len(loss.inputs):
        loss.check_shapes(*(t.shape for t in inputs))  # lossc's message, before `wanted`'s
    value, grads = _value_and_grad(loss, reference, inputs, tuple(wanted))
    return _result(value, inputs), grads


def _value_and_grad_fake(source, params, reference, wanted, inputs):
    # No shape check here: Dynamo would wrap lossc's error in its own. The real call
    # checks, and raises lossc's exception when the compiled function runs.
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in inputs) else torch.float32
    value = inputs[0].new_empty((), dtype=dtype) if inputs else torch.empty((), dtype=dtype)
    grad_dtype = torch.float64 if reference else torch.float32
    grads = [torch.empty_like(inputs[i], dtype=grad_dtype, memory_format=torch.contiguous_format) for i in wanted]
    return value, grads


def _value_and_grad_setup(ctx, inputs, output):
    _, _, _, wanted, tensors = inputs
    ctx.wanted, ctx.dtypes = list(wanted), [t.dtype for t in tensors]
    ctx.save_for_backward(*output[1])


def _value_and_grad_backward(ctx, grad_value, _grad_grads):
    out = [None] * len(ctx.dtypes)
    if grad_value is not None:
        # As eager: scaled in the gradients' precision, then cast to the input's dtype.
        for i, g in zip(ctx.wanted, ctx.saved_tensors):
            out[i] = (g * grad_value.to(g.dtype)).to(ctx.dtypes[i])
    return None, None, None, None, out


_value_and_grad_op = None
if hasattr(torch, "library") and hasattr(torch.library, "custom_op"):  # PyTorch 2.4 and later
    _value_and_grad_op = torch.library.custom_op("lossc::value_and_grad", mutates_args=())(_value_and_grad_impl)
    _value_and_grad_op.register_fake(_value_and_grad_fake)
    _value_and_grad_op.register_autograd(_value_and_grad_backward, setup_context=_value_and_grad_setup)
