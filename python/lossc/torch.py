"""PyTorch: a lossc loss as an `nn.Module` with exact gradients.

    import lossc.torch
    criterion = lossc.torch.Loss("0.5*dice(sigmoid(x), y) + bce_logits(x, y)")
    loss = criterion(logits, masks)      # a 0-d tensor; inputs in the loss's input order
    loss.backward()

Tensors are laid out as for `lossc.Loss`: `[N, C, *spatial]` (PyTorch's NCHW). The
forward pass computes the value and, for every input that requires a gradient, that
gradient, in one call (lossc's fused sweeps); the backward pass only scales them. CPU
tensors are handed to the kernels without a copy when they are contiguous float32.
CUDA tensors run through `lossc_eval_cuda` (PTX kernels, on PyTorch's current stream;
Keras on the PyTorch backend takes this path too on a GPU): it has not yet run on one. The result is float32 (float64 if an input is
float64); half-precision inputs are evaluated in float32 and get gradients of their own
dtype. A second derivative (`create_graph=True`: a Hessian, a gradient penalty) is
refused with an error: the gradients are computed, not traced. `torch.func` transforms
are not supported.
"""

import ctypes

import numpy as np
import torch

import lossc as _lossc
from lossc._capi import Shape, lib

__all__ = ["Loss", "evaluate"]


def evaluate(loss, *tensors, reference=False):
    """The loss (a `lossc.Loss`) on tensors, as a 0-d tensor that autograd can differentiate."""
    if not isinstance(loss, _lossc.Loss):
        raise TypeError(f"`loss` is a lossc.Loss, not {type(loss).__name__}")
    if len(tensors) != len(loss.inputs):
        # Here, before autograd: lossc's own message, whatever requires a gradient.
        loss.check_shapes(*(np.shape(t) for t in tensors))
    tensors = tuple(t if isinstance(t, torch.Tensor) else _as_tensor(t) for t in tensors)
    return _Evaluate.apply(loss, reference, *tensors)


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


def _result_dtype(tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class _Evaluate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loss, reference, *tensors):
        wanted = tuple(i for i, needs in enumerate(ctx.needs_input_grad[2:]) if needs)
        value, grads = _value_and_grad(loss, reference, tensors, wanted)
        ctx.loss, ctx.reference, ctx.wanted, ctx.grads = loss, reference, wanted, grads
        # The inputs, not the gradients, are saved: autograd then checks they are not changed
        # in place before a second backward (retain_graph=True), which recomputes from them.
        ctx.save_for_backward(*tensors)
        return torch.tensor(value, dtype=_result_dtype(tensors), device=tensors[0].device if tensors else None)

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            # create_graph=True: a Hessian, a gradient penalty. The gradients are numbers,
            # not a graph, so their derivative would silently be taken as zero.
            raise RuntimeError(
                "lossc.torch gives first derivatives only: the gradient of a lossc loss cannot be "
                "differentiated again (create_graph=True)"
            )
        tensors = ctx.saved_tensors
        grads, ctx.grads = ctx.grads, None
        if grads is None:  # a second backward through this graph
            _, grads = _value_and_grad(ctx.loss, ctx.reference, tensors, ctx.wanted)
        # The gradients are handed over, not copied: `loss.backward()` seeds 1, and any
        # other scale is applied in place (no new buffer, one pass).
        unit = grad_output.device.type == "cpu" and grad_output.item() == 1.0
        out = [None] * len(tensors)
        for i, g in zip(ctx.wanted, grads):
            out[i] = g if unit else g.mul_(grad_output.to(g.dtype))
        return (None, None, *out)


def _value_and_grad(loss, reference, tensors, wanted):
    """The value (a float) and the gradients of the inputs in `wanted`, each a fresh tensor
    of its input's dtype, shape and device."""
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
        # Fresh buffers (autograd hands them to the caller), on huge pages where large.
        out = [_lossc.empty(arrays[i].shape, dtype) for i in wanted]
        value, _ = loss.value_and_grad(*arrays, wrt=wanted, out=out, reference=reference)
        grads = [torch.from_numpy(g) for g in out]
    else:
        raise ValueError(f"lossc runs on CPU and CUDA tensors, not on {device.type}")
    return value, [g.to(dtype=tensors[i].dtype).reshape(tensors[i].shape) for i, g in zip(wanted, grads)]


def _to_numpy(t, dtype):
    t = t.detach()
    if t.dtype.is_complex:
        raise TypeError(f"lossc takes real numbers, not {t.dtype}")
    if t.is_floating_point() or t.dtype == torch.bool:
        t = t.to(torch.float64 if dtype == np.float64 else torch.float32)
    return np.ascontiguousarray(t.numpy(), dtype=dtype)


def _evaluate_cuda(loss, tensors, wanted):
    """`lossc_eval_cuda` on device pointers, on PyTorch's current stream."""
    inputs = [t.detach().to(torch.float32).contiguous() for t in tensors]
    grads = [torch.empty_like(inputs[i]) for i in wanted]
    n = len(inputs)
    shapes = (Shape * max(n, 1))(*(Shape(*_lossc.layout(t.shape)) for t in inputs))
    pointers = (ctypes.c_void_p * max(n, 1))(*(t.data_ptr() for t in inputs))
    slots = None
    if wanted:
        by_input = dict(zip(wanted, grads))
        slots = (ctypes.c_void_p * max(n, 1))(*(by_input[i].data_ptr() if i in by_input else None for i in range(n)))
    stream = torch.cuda.current_stream(inputs[0].device).cuda_stream if inputs else None
    value = ctypes.c_double()
    with torch.cuda.device(inputs[0].device if inputs else None):
        _lossc._check(lib.lossc_eval_cuda(loss._handle, pointers, shapes, n, ctypes.byref(value), slots, stream))
    return value.value, grads
