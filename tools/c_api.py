"""The runtime's C API (`runtime/include/modec/modec.h`) through ctypes, for the tests and
benchmarks that load ``libmodec_runtime.so`` into a Python process, as a plugin host would
(ctypes loads it ``RTLD_LOCAL``)."""

from __future__ import annotations

import ctypes
from pathlib import Path

#: ``modec_dtype`` codes, in order: the numpy name of code i is ``DTYPES[i]``.
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool", "uint32",
          "uint16", "int16", "uint64", "bfloat16")  # fmt: skip

#: A session or a generation (``modec_session*``, ``modec_generation*``).
Handle = ctypes.c_void_p


class Tensor(ctypes.Structure):
    """``modec_tensor``."""

    _fields_ = [("name", ctypes.c_char_p), ("dtype", ctypes.c_int), ("ndim", ctypes.c_int32),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("data", ctypes.c_void_p)]  # fmt: skip


class GenerationConfig(ctypes.Structure):
    """``modec_generation_config``."""

    _fields_ = [("max_new_tokens", ctypes.c_int32),
                ("stop_tokens", ctypes.POINTER(ctypes.c_int64)),
                ("n_stop_tokens", ctypes.c_size_t), ("temperature", ctypes.c_double),
                ("top_k", ctypes.c_int32), ("top_p", ctypes.c_double),
                ("seed", ctypes.c_uint64)]  # fmt: skip


def load(library: Path | str) -> ctypes.CDLL:
    """``libmodec_runtime.so`` with the argument and result types of the C API's sessions,
    runs and generations set."""
    lib = ctypes.CDLL(str(library))
    out = ctypes.POINTER(Handle)
    size, pointer = ctypes.c_size_t, ctypes.c_void_p
    lib.modec_last_error.restype = ctypes.c_char_p
    lib.modec_open.argtypes = [ctypes.c_char_p, ctypes.c_char_p, out]
    lib.modec_num_inputs.argtypes = lib.modec_num_outputs.argtypes = [Handle]
    lib.modec_num_inputs.restype = lib.modec_num_outputs.restype = size
    lib.modec_input_info.argtypes = [Handle, size, ctypes.POINTER(Tensor)]
    lib.modec_run.argtypes = [Handle, ctypes.POINTER(Tensor), size, ctypes.POINTER(Tensor),
                              ctypes.POINTER(size)]  # fmt: skip
    lib.modec_close.argtypes = [Handle]
    lib.modec_prefill.argtypes = [Handle, ctypes.POINTER(Tensor), size, out]
    lib.modec_generation_config_default.argtypes = [ctypes.POINTER(GenerationConfig)]
    lib.modec_generate_from.argtypes = [Handle, ctypes.POINTER(GenerationConfig), pointer,
                                        pointer, pointer, pointer]  # fmt: skip
    lib.modec_generation_free.argtypes = [Handle]
    return lib
