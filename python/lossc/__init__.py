"""lossc: loss functions written as text, compiled into fused native kernels.

    >>> import numpy as np, lossc
    >>> loss = lossc.Loss("0.5*dice(sigmoid(x), y) + bce_logits(x, y)")
    >>> x = np.random.randn(4, 1, 64, 64).astype(np.float32)
    >>> y = (np.random.rand(4, 1, 64, 64) > 0.5).astype(np.float32)
    >>> value, (dx, dy) = loss.value_and_grad(x, y)

This module is the NumPy layer over liblossc's C ABI (include/lossc.h): the same
kernels, the same error messages. `lossc.torch`, `lossc.jax` and `lossc.keras` make a
`Loss` differentiable in those frameworks.

Arrays follow the `lossc eval` convention for `.npy` files: an array of shape
`[N, C, *spatial]` is `batch = N`, `class = C`, `spatial = prod(spatial)`; `[N, C]` has
one position; a 0-d or 1-d array of n values is `[1, 1, n]`. An extent of 1 broadcasts,
so class weights for `[N, C, H, W]` inputs are given as shape `[1, C]` (or `[1, C, 1]`).
Two arrays of the same rank must agree on their dimensions after the class axis where
they hold the same number of positions: `[2, 3, 4, 5]` against `[2, 3, 5, 4]` (a
transposed target) is a `ShapeError`, not a silent pairing of other positions.
"""

import ctypes
import math
import os

import numpy as np

from ._capi import Shape, lib

_ndarray = np.ndarray
_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_c_char = ctypes.c_char
_c_double = ctypes.c_double
_addressof = ctypes.addressof
_byref = ctypes.byref
# Bits of `ndarray.flags.num` (NumPy's C API: NPY_ARRAY_C_CONTIGUOUS, NPY_ARRAY_ALIGNED,
# NPY_ARRAY_WRITEABLE, NPY_ARRAY_WARN_ON_WRITE), one read instead of a flags object per test.
_C_CONTIGUOUS, _ALIGNED, _WRITEABLE, _WARN_ON_WRITE = 0x1, 0x100, 0x400, 0x80000000
_READY = _C_CONTIGUOUS | _ALIGNED  # what lossc reads without a copy
_WRITABLE = _READY | _WRITEABLE  # what ctypes takes a buffer of (`_address`)
_WRITABLE_MASK = _WRITABLE | _WARN_ON_WRITE

__all__ = [
    "Loss",
    "LosscError",
    "ParseError",
    "CheckError",
    "ParamsError",
    "ShapeError",
    "InvalidArgumentError",
    "BackendError",
    "InternalError",
    "NoDeviceError",
    "DeviceError",
    "stdlib",
    "layout",
    "as_loss",
]

from ._version import __version__  # noqa: E402 (checked against the library's by _capi)


class LosscError(Exception):
    """A failed lossc call: `status` is the C ABI's `lossc_status` value."""

    status = None


class ParseError(LosscError, ValueError):
    """The source does not parse; the message has `line:col` and the underlined text."""

    status = 1


class CheckError(LosscError, ValueError):
    """The source parses but is wrong: an unknown name, a bad argument, mismatched axes."""

    status = 2


class ParamsError(LosscError, ValueError):
    """A hyperparameter the loss does not have, or a value that is not a finite number."""

    status = 3


class ShapeError(LosscError, ValueError):
    """Inputs of the wrong number or shape, or a broadcast too large for memory."""

    status = 4


class InvalidArgumentError(LosscError, ValueError):
    """An argument outside its domain."""

    status = 6


class BackendError(LosscError):
    """The evaluator cannot run this loss on these inputs."""

    status = 7


class InternalError(LosscError):
    """A bug in lossc; please report the message."""

    status = 8


class NoDeviceError(LosscError):
    """The GPU path cannot run here: no CUDA driver, or no device."""

    status = 9


class DeviceError(LosscError):
    """A CUDA driver call failed."""

    status = 10


_ERRORS = {cls.status: cls for cls in LosscError.__subclasses__()}


def _check(status):
    if status != 0:
        message = lib.lossc_last_error()
        name = lib.lossc_status_name(status)
        text = message.decode().strip() if message else (name.decode() if name else f"status {status}")
        text = text[len("error: ") :] if text.startswith("error: ") else text
        error = _ERRORS.get(status, LosscError)(text)
        error.status = status
        raise error


def _take_string(call, *args):
    """Calls a function that returns an owned string through `char **`, and frees it."""
    out = ctypes.c_void_p()
    _check(call(*args, ctypes.byref(out)))
    try:
        return ctypes.string_at(out.value).decode()
    finally:
        lib.lossc_string_free(out)


def layout(shape):
    """The `(batch, class, spatial)` extents lossc sees for an array of this shape."""
    shape = tuple(int(d) for d in shape)
    if len(shape) <= 1:
        return (1, 1, shape[0] if shape else 1)
    if len(shape) == 2:
        return (shape[0], shape[1], 1)
    return (shape[0], shape[1], math.prod(shape[2:]))


# The C shape array for a tuple of array shapes: a pure function of the shapes, built once
# per distinct tuple (lossc reads it, never writes it: `const lossc_shape *`), so that the
# calls of a training loop (the same shapes every step) skip `layout` and ctypes'
# constructors. Bounded; a dict's get, set and clear are atomic, so threads may share it.
_SHAPE_ARRAYS = {}


def _same_layout(shapes):
    """Raises `ShapeError` where two arrays of the same rank lay the same number of
    positions out differently (`[2, 3, 4, 5]` against `[2, 3, 5, 4]`, a transposed
    target): flattened to `(batch, class, spatial)` they would pass as the same shape."""
    seen = {}
    for k, shape in enumerate(shapes):
        shape = tuple(int(d) for d in shape)
        if len(shape) < 3 or math.prod(shape[2:]) <= 1:
            continue
        key = (len(shape), math.prod(shape[2:]))
        first = seen.setdefault(key, (k, shape))
        if first[1][2:] != shape[2:]:
            raise ShapeError(
                f"inputs {first[0] + 1} and {k + 1} have shapes {list(first[1])} and {list(shape)}: the same "
                f"number of positions laid out differently (lossc flattens the dimensions after the "
                f"class axis, so these would be paired position by position); give them the same shape"
            )


def _shape_array(shapes):
    """The `Shape` array (at least one entry) for these shapes (a tuple of shape tuples)."""
    array = _SHAPE_ARRAYS.get(shapes)
    if array is None:
        _same_layout(shapes)
        array = (Shape * max(len(shapes), 1))(*(Shape(*layout(s)) for s in shapes))
        if len(_SHAPE_ARRAYS) >= 4096:
            _SHAPE_ARRAYS.clear()
        _SHAPE_ARRAYS[shapes] = array
    return array


_POINTER_ARRAYS = tuple(ctypes.c_void_p * max(n, 1) for n in range(16))


def _pointer_array(n):
    """The ctypes type of an array of `n` addresses (at least one entry)."""
    return _POINTER_ARRAYS[n] if n < 16 else ctypes.c_void_p * n


def stdlib():
    """The standard library: {name: signature}, e.g. {"dice": "dice(p, y; smooth = 1)", ...}."""
    count = lib.lossc_stdlib_count()
    return {lib.lossc_stdlib_name(i).decode(): lib.lossc_stdlib_signature(i).decode() for i in range(count)}


def as_loss(source, **params):
    """`source` if it is a `Loss` and no hyperparameter changes, else a `Loss` of it with them."""
    if isinstance(source, Loss):
        return source.with_params(**params)
    return Loss(source, **params)


def _params_text(params):
    items = []
    for name, value in params.items():
        if not name.isidentifier():
            raise ParamsError(f"{name!r} is not a hyperparameter name")
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ParamsError(f"hyperparameter `{name}` must be a number, got {value!r}")
        try:
            items.append(f"{name}={float(value)!r}")
        except OverflowError:  # an int past float's range (1e400 as a float is caught by lossc)
            raise ParamsError(f"hyperparameter `{name}` is too large for a float") from None
    return ",".join(items)


def _as_real(name, a):
    """`a` as an array lossc can convert: real numbers, bools, or ml_dtypes' floats (bfloat16)."""
    a = np.asarray(a)
    kind = a.dtype.kind
    if kind in "biuf" or (kind == "V" and "float" in a.dtype.name):
        return a
    what = "complex numbers" if kind == "c" else f"dtype {a.dtype}"
    raise TypeError(f"input `{name}` holds {what}; lossc takes real numbers")


class Loss:
    """A compiled loss: a stdlib name (`"dice"`), an expression
    (`"0.7*tversky(sigmoid(x), y, alpha=0.3, beta=0.7) + 0.3*bce_logits(x, y)"`) or loss
    definitions, with hyperparameter overrides as keyword arguments
    (`Loss("tversky", alpha=0.3, beta=0.7)`). Pass a `pathlib.Path` to read a `.loss` file.

    Compile once, evaluate many times; a `Loss` may be used from many threads at once
    (the evaluation releases the GIL). The native kernels compute in float32 with f64
    accumulation; `reference=True` evaluates in float64 with the exact, slow reference
    evaluator instead (inputs and gradients as float64).
    """

    def __init__(self, source, **params):
        if isinstance(source, os.PathLike):
            with open(source, encoding="utf-8") as f:
                source = f.read()
        if not isinstance(source, str):
            raise TypeError(f"a loss source is a str (or a path), not {type(source).__name__}")
        if "\0" in source:
            raise ValueError("a loss source cannot contain a NUL character")
        self._source = source
        self._params = dict(params)
        handle = ctypes.c_void_p()
        _check(lib.lossc_compile(source.encode(), _params_text(params).encode(), ctypes.byref(handle)))
        self._handle = handle
        self.name = lib.lossc_loss_name(handle).decode()
        self.inputs = tuple(lib.lossc_input_name(handle, i).decode() for i in range(lib.lossc_num_inputs(handle)))
        self._all_positions = tuple(range(len(self.inputs)))

    def __del__(self):
        handle = getattr(self, "_handle", None)
        if handle is not None and handle.value and lib is not None:
            lib.lossc_free(handle)
            self._handle = None

    def __reduce__(self):
        # A loss is rebuilt from its text: torch.save, multiprocessing and copy work.
        return (_rebuild, (self._source, self._params))

    def __repr__(self):
        params = "".join(f", {k}={v!r}" for k, v in self._params.items())
        return f"lossc.Loss({self._source!r}{params})  # {self.name}({', '.join(self.inputs)})"

    def with_params(self, **params):
        """The same source with these hyperparameters changed (the others kept)."""
        return Loss(self._source, **{**self._params, **params}) if params else self

    def check_shapes(self, *shapes):
        """Raises `ShapeError` (with `lossc_eval`'s message) unless arrays of these shapes,
        in the inputs' order, are valid inputs; reads no data."""
        shapes = tuple(tuple(int(d) for d in s) for s in shapes)
        _check(lib.lossc_check_shapes(self._handle, _shape_array(shapes), len(shapes)))

    def show(self):
        """The canonical printed form of the loss (stable text, for snapshot tests)."""
        return _take_string(lib.lossc_show, self._handle)

    def show_grad(self):
        """The canonical printed form of the loss and its gradients."""
        return _take_string(lib.lossc_show_grad, self._handle)

    @property
    def terms(self):
        """The terms of the loss's top-level sum (`a + b - c` has three, the last `-c`),
        each as the text of a loss of its own."""
        return tuple(lib.lossc_term_text(self._handle, i).decode() for i in range(lib.lossc_num_terms(self._handle)))

    def __call__(self, *arrays, reference=False):
        """The loss's value (a Python float) on these arrays."""
        value, _ = self._evaluate(arrays, (), None, reference)
        return value

    def value_and_grad(self, *arrays, wrt=None, out=None, reference=False):
        """The value and gradients: `(value, grads)`.

        `wrt` names the inputs to differentiate, by name or position (default: all);
        `grads` holds one array per entry of `wrt`, shaped like its input. `out` may give
        the arrays to write them into (float32, or float64 with `reference=True`;
        C-contiguous, of the input's shape), to save allocating them on every call. Ask
        only for the gradients you need: that of an input broadcast against the others
        (an extent of 1 where they have more) runs on a slower engine.
        Gradients come back in float32 (float64 with `reference=True`); cast them as
        you need.
        """
        wanted = self._positions(wrt)
        if out is not None and len(out) != len(wanted):
            raise ValueError(f"`out` holds {len(out)} arrays for {len(wanted)} gradients")
        return self._evaluate(arrays, wanted, out, reference)

    def count_nonfinite(self, *arrays):
        """The number of NaN and infinite values in each input as the kernels see it, in
        float32 (a float64 value beyond float32's range counts as infinite): {name: count}."""
        inputs, shapes, pointers = self._marshal(arrays, _F32)
        counts = (ctypes.c_uint64 * len(inputs))()
        _check(lib.lossc_count_nonfinite(self._handle, pointers, shapes, len(inputs), counts))
        return dict(zip(self.inputs, (int(c) for c in counts)))

    def eval_terms(self, *arrays):
        """The value of each term of the top-level sum, and the total: `(total, terms)`."""
        inputs, shapes, pointers = self._marshal(arrays, _F32)
        n_terms = lib.lossc_num_terms(self._handle)
        terms = (ctypes.c_double * n_terms)()
        total = ctypes.c_double()
        _check(lib.lossc_eval_terms(self._handle, pointers, shapes, len(inputs), terms, n_terms, ctypes.byref(total)))
        return total.value, tuple(terms)

    def _positions(self, wrt):
        if wrt is None:
            return self._all_positions
        if isinstance(wrt, (str, int)):
            raise TypeError("`wrt` is a sequence of input names or positions, e.g. wrt=['x']")
        n = len(self.inputs)
        positions = []
        for item in wrt:
            if type(item) is int and 0 <= item < n:  # the common case first; not a bool
                positions.append(item)
            elif isinstance(item, str):
                if item not in self.inputs:
                    raise ValueError(f"`{item}` is not an input of {self.name}({', '.join(self.inputs)})")
                positions.append(self.inputs.index(item))
            elif isinstance(item, (int, np.integer)) and not isinstance(item, bool) and 0 <= item < n:
                positions.append(int(item))
            else:
                raise ValueError(f"{item!r} names no input of {self.name}({', '.join(self.inputs)})")
        if len(positions) > 1 and len(set(positions)) != len(positions):
            raise ValueError(f"`wrt` names an input twice: {list(wrt)}")
        return tuple(positions)

    def _marshal(self, arrays, dtype):
        """Contiguous arrays of `dtype` (a `np.dtype`), their shapes and a C array of their
        pointers."""
        inputs = list(arrays)
        addresses = []
        for k, a in enumerate(inputs):
            if type(a) is _ndarray and a.dtype is dtype:
                flags = a.flags.num
                if flags & _WRITABLE_MASK == _WRITABLE and a.nbytes:
                    addresses.append(_addressof(_c_char.from_buffer(a)))  # `_address`, inlined
                    continue
                if flags & _READY == _READY:
                    addresses.append(_address(a))
                    continue
            # Another dtype (or a dtype object that is not NumPy's own, `a.dtype is dtype`
            # being the quick test), a copy to make, or not an ndarray at all.
            a = inputs[k] = self._converted(k, a, dtype)
            addresses.append(_address(a))
        n = len(inputs)
        shapes = _shape_array(tuple([a.shape for a in inputs]))
        pointers = _pointer_array(n)(*addresses)
        return inputs, shapes, pointers

    def _converted(self, k, a, dtype):
        """Input `k` as a contiguous, aligned array of `dtype`."""
        name = self.inputs[k] if k < len(self.inputs) else f"#{k}"
        a = _as_real(name, a)
        # np.ascontiguousarray makes a 0-d array 1-d: keep the shape, for the gradient's.
        a = np.ascontiguousarray(a, dtype=dtype).reshape(a.shape)
        if not a.flags.aligned:
            a = a.copy()  # a view at an odd address (`buf[1:].view(np.float32)`)
        return a

    def _evaluate(self, arrays, wanted, out, reference):
        if reference:
            dtype, call = _F64, lib.lossc_eval_f64
        else:
            dtype, call = _F32, lib.lossc_eval
        inputs, shapes, pointers = self._marshal(arrays, dtype)
        n = len(inputs)
        slots = None
        grads = ()
        if wanted:
            grads = [None] * n
            for k, i in enumerate(wanted):
                if i >= n:
                    break  # lossc reports the missing input
                if out is None:
                    grads[i] = np.empty(inputs[i].shape, dtype=dtype)
                else:
                    grads[i] = self._gradient_buffer(inputs, i, out[k], dtype, grads)
            slots = _pointer_array(n)(*[None if g is None else _address(g) for g in grads])
        value = _c_double()
        status = call(self._handle, pointers, shapes, n, _byref(value), slots)
        if status:
            _check(status)
        return value.value, tuple([grads[i] for i in wanted])

    def _gradient_buffer(self, inputs, i, given, dtype, taken):
        like = inputs[i]
        if given is None:
            return np.empty(like.shape, dtype=dtype)
        if not isinstance(given, np.ndarray):
            raise TypeError(f"`out` for `{self.inputs[i]}` is a {type(given).__name__}, not a numpy array")
        if given.dtype != dtype or not given.flags.c_contiguous or not given.flags.writeable or not given.flags.aligned:
            raise ValueError(
                f"`out` for `{self.inputs[i]}` must be a writable, aligned, C-contiguous {np.dtype(dtype).name} "
                f"array, got {given.dtype}{'' if given.flags.c_contiguous else ', not contiguous'}"
                f"{'' if given.flags.writeable else ', read-only'}{'' if given.flags.aligned else ', not aligned'}"
            )
        if given.shape != like.shape:
            raise ValueError(f"`out` for `{self.inputs[i]}` has shape {given.shape}; the input has {like.shape}")
        if any(np.may_share_memory(given, a) for a in inputs):
            raise ValueError(f"`out` for `{self.inputs[i]}` overlaps an input")
        if any(g is not None and np.may_share_memory(given, g) for g in taken):
            raise ValueError(f"`out` for `{self.inputs[i]}` overlaps another gradient's")
        return given


def _address(array):
    """The address of an array's first element."""
    if array.flags.num & _WRITABLE_MASK == _WRITABLE and array.nbytes:
        # A writable contiguous buffer: ctypes takes its address in a third of the time
        # `__array_interface__` takes to build its dict.
        return _addressof(_c_char.from_buffer(array))
    return array.__array_interface__["data"][0]


def _rebuild(source, params):
    return Loss(source, **params)
