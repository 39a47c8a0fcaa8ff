"""The C ABI of liblossc (include/lossc.h), declared for ctypes.

The library is found, in order, at `$LOSSC_LIBRARY`, beside this file (where
`pip install` puts the one it builds), or as `liblossc.so` on the loader's path.
"""

import ctypes
import ctypes.util
import glob
import os

from ._version import __version__


class Shape(ctypes.Structure):
    _fields_ = [("batch", ctypes.c_int64), ("classes", ctypes.c_int64), ("spatial", ctypes.c_int64)]


_DoubleP = ctypes.POINTER(ctypes.c_double)
# Arrays of data pointers are passed as `c_void_p` arrays of addresses: building typed
# pointers (`ndarray.ctypes.data_as`) costs microseconds per array on every call.
_Pointers = ctypes.POINTER(ctypes.c_void_p)
_Handle = ctypes.c_void_p
_Status = ctypes.c_int

# name: (restype, argtypes), as in include/lossc.h.
_SIGNATURES = {
    "lossc_version": (ctypes.c_char_p, []),
    "lossc_status_name": (ctypes.c_char_p, [ctypes.c_int]),
    "lossc_last_error": (ctypes.c_char_p, []),
    "lossc_string_free": (None, [ctypes.c_void_p]),
    "lossc_compile": (_Status, [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(_Handle)]),
    "lossc_free": (None, [_Handle]),
    "lossc_loss_name": (ctypes.c_char_p, [_Handle]),
    "lossc_num_inputs": (ctypes.c_size_t, [_Handle]),
    "lossc_input_name": (ctypes.c_char_p, [_Handle, ctypes.c_size_t]),
    "lossc_show": (_Status, [_Handle, ctypes.POINTER(ctypes.c_void_p)]),
    "lossc_show_grad": (_Status, [_Handle, ctypes.POINTER(ctypes.c_void_p)]),
    "lossc_stdlib_count": (ctypes.c_size_t, []),
    "lossc_stdlib_name": (ctypes.c_char_p, [ctypes.c_size_t]),
    "lossc_stdlib_signature": (ctypes.c_char_p, [ctypes.c_size_t]),
    "lossc_eval": (
        _Status,
        [_Handle, _Pointers, ctypes.POINTER(Shape), ctypes.c_size_t, _DoubleP, _Pointers],
    ),
    "lossc_eval_f64": (
        _Status,
        [_Handle, _Pointers, ctypes.POINTER(Shape), ctypes.c_size_t, _DoubleP, _Pointers],
    ),
    "lossc_count_nonfinite": (
        _Status,
        [_Handle, _Pointers, ctypes.POINTER(Shape), ctypes.c_size_t, ctypes.POINTER(ctypes.c_uint64)],
    ),
    "lossc_check_shapes": (_Status, [_Handle, ctypes.POINTER(Shape), ctypes.c_size_t]),
    "lossc_num_terms": (ctypes.c_size_t, [_Handle]),
    "lossc_term_text": (ctypes.c_char_p, [_Handle, ctypes.c_size_t]),
    "lossc_eval_terms": (
        _Status,
        [_Handle, _Pointers, ctypes.POINTER(Shape), ctypes.c_size_t, _DoubleP, ctypes.c_size_t, _DoubleP],
    ),
    "lossc_xla_ffi": (ctypes.c_void_p, [ctypes.c_void_p]),
    "lossc_eval_cuda": (
        _Status,
        [
            _Handle,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(Shape),
            ctypes.c_size_t,
            _DoubleP,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_void_p,
        ],
    ),
}


def _candidates():
    explicit = os.environ.get("LOSSC_LIBRARY")
    if explicit:
        return [explicit]
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "*lossc*.so")) + glob.glob(os.path.join(here, "*lossc*.dylib")))
    system = ctypes.util.find_library("lossc")
    return found + ([system] if system else [])


def load():
    """Loads liblossc of this package's version and declares its functions; raises
    ImportError with what was tried."""
    tried = []
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
            for name, (restype, argtypes) in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.restype = restype
                fn.argtypes = argtypes
        except (OSError, AttributeError) as e:
            tried.append(f"{path}: {e}")
            continue
        version = lib.lossc_version().decode()
        if version != __version__:
            tried.append(f"{path}: liblossc {version}, not {__version__}")
            continue
        return lib
    detail = "; ".join(tried) if tried else "no library found"
    raise ImportError(
        "lossc cannot load liblossc (" + detail + "). Install the package with `pip install ./python` "
        "from a lossc checkout, or build the library (`cargo build --release`) and set "
        "LOSSC_LIBRARY=target/release/liblossc.so."
    )


lib = load()
