"""Calls liblossc from Python through ctypes (standard library only): compile, eval,
the last error, free. Proves the ABI is callable from a foreign runtime.

usage: python3 ctypes_smoke.py LIBLOSSC_SO EXPECTED_VALUE DP0 DP1 DP2 DP3
(the value and d/dp of `dice` on the inputs below, from the Rust reference evaluator)
"""

import ctypes
import math
import sys


class Shape(ctypes.Structure):
    _fields_ = [("batch", ctypes.c_int64), ("classes", ctypes.c_int64), ("spatial", ctypes.c_int64)]


def main():
    lib = ctypes.CDLL(sys.argv[1])
    expected = float(sys.argv[2])
    expected_dp = [float(v) for v in sys.argv[3:7]]

    lib.lossc_compile.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.lossc_compile.restype = ctypes.c_int
    lib.lossc_free.argtypes = [ctypes.c_void_p]
    lib.lossc_free.restype = None
    lib.lossc_num_inputs.argtypes = [ctypes.c_void_p]
    lib.lossc_num_inputs.restype = ctypes.c_size_t
    lib.lossc_input_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.lossc_input_name.restype = ctypes.c_char_p
    lib.lossc_last_error.argtypes = []
    lib.lossc_last_error.restype = ctypes.c_char_p
    lib.lossc_version.restype = ctypes.c_char_p
    FloatP = ctypes.POINTER(ctypes.c_float)
    lib.lossc_eval.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(FloatP),
        ctypes.POINTER(Shape),
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_double),
        ctypes.POINTER(FloatP),
    ]
    lib.lossc_eval.restype = ctypes.c_int

    print("liblossc", lib.lossc_version().decode())
    loss = ctypes.c_void_p()
    status = lib.lossc_compile(b"dice", None, ctypes.byref(loss))
    assert status == 0, lib.lossc_last_error().decode()
    n = lib.lossc_num_inputs(loss)
    names = [lib.lossc_input_name(loss, i).decode() for i in range(n)]
    assert names == ["p", "y"], names

    p = (ctypes.c_float * 4)(0.1, 0.9, 0.8, 0.3)
    y = (ctypes.c_float * 4)(0.0, 1.0, 1.0, 0.0)
    dp = (ctypes.c_float * 4)()
    inputs = (FloatP * 2)(ctypes.cast(p, FloatP), ctypes.cast(y, FloatP))
    shapes = (Shape * 2)(Shape(1, 1, 4), Shape(1, 1, 4))
    grads = (FloatP * 2)(ctypes.cast(dp, FloatP), None)
    value = ctypes.c_double()
    status = lib.lossc_eval(loss, inputs, shapes, 2, ctypes.byref(value), grads)
    assert status == 0, lib.lossc_last_error().decode()
    assert math.isclose(value.value, expected, rel_tol=1e-6), (value.value, expected)
    for got, want in zip(dp, expected_dp):
        assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-7), (list(dp), expected_dp)

    # Wrong shapes fail with a message that names the input; the loss stays usable.
    bad = (Shape * 2)(Shape(1, 1, 4), Shape(1, 1, 3))
    status = lib.lossc_eval(loss, inputs, bad, 2, ctypes.byref(value), None)
    message = lib.lossc_last_error().decode()
    assert status == 4 and "`y`" in message, (status, message)

    # A parse error carries line:col.
    other = ctypes.c_void_p()
    status = lib.lossc_compile(b"dice(p, y", None, ctypes.byref(other))
    message = lib.lossc_last_error().decode()
    assert status == 1 and "<source>:1:" in message, (status, message)
    assert other.value is None

    lib.lossc_free(loss)
    print(f"ctypes: dice = {value.value:.9f}, d/dp = {[round(v, 6) for v in dp]}")


if __name__ == "__main__":
    main()
