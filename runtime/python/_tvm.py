"""The TVM runtime without the TVM compiler: ``libtvm_runtime`` driven through ``tvm_ffi``.

``import tvm`` maps the whole compiler (``libtvm_compiler.so``, ~160 MiB resident) into the
process although running an artifact needs only the runtime library the C++ runtime links
too. This module loads ``libtvm_runtime.so`` (and ``libtvm_runtime_extra.so``, which holds
``tvm.contrib.sort.topk`` for the routers) from the installed ``tvm`` package without
importing it, then uses the runtime's own global functions to load the Relax VM executable,
allocate tensors on the device and copy to and from numpy.

CUDA: ``libtvm_runtime_cuda.so`` as well; the kernels in ``model.so`` are compiled already
(a fatbin, `modec.kernels.cuda_aot`), so nothing compiles at load time and the TVM compiler
is not imported for CUDA either.

``MODEC_TVM_LIBRARY_PATH`` names a directory holding those libraries, for a deployment that
installs ``apache-tvm-ffi`` and the runtime libraries without the ~260 MiB compiler package.

Threads: TVM's CPU thread pool takes ``TVM_NUM_THREADS``, else ``OMP_NUM_THREADS``, else half
the hardware threads, which without SMT (many cloud VMs) is half the cores. Where neither
variable is set, `default_threads` sets ``TVM_NUM_THREADS`` to the physical cores this
process may run on (as onnxruntime and llama.cpp count them) before the runtime loads.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from modec.runtime._check import numpy_dtype

from modec.errors import ModelError

#: DLPack device type codes.
DEVICE_TYPES = {"cpu": 1, "cuda": 2}
#: The VM's allocator kind: 2 = pooled (what `tvm.relax.VirtualMachine` uses by default).
POOLED_ALLOCATOR = 2
#: Data alignment the compiled CPU kernels assume for every tensor argument (TVM marks each
#: argument's data 64-byte aligned and LLVM emits aligned vector loads: a misaligned param
#: crashes the process with SIGSEGV).
ALIGN = 64

_loaded: set[str] = set()


#: Environment variable: a directory with libtvm_runtime*.so (instead of the tvm package's).
LIBRARY_PATH_ENV = "MODEC_TVM_LIBRARY_PATH"
#: `runtime.GetDeviceAttr` kinds (TVM's DeviceAttrKind).
_EXIST, _COMPUTE_VERSION, _DEVICE_NAME = 0, 4, 5


def _library_dir() -> Path:
    override = os.environ.get(LIBRARY_PATH_ENV)
    if override:
        return Path(override)
    spec = importlib.util.find_spec("tvm")
    if spec is None or spec.origin is None:
        raise ModelError("the TVM runtime is not installed; pip install apache-tvm")
    return Path(spec.origin).parent / "lib"


def physical_cores(sysfs: Path = Path("/sys/devices/system/cpu")) -> int | None:
    """The physical cores among the CPUs this process may run on: distinct (package, core)
    pairs of their sysfs topology; None where that cannot be read."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
        cores = {
            tuple((sysfs / f"cpu{c}" / "topology" / f).read_text().strip()
                  for f in ("physical_package_id", "core_id"))
            for c in cpus
        }  # fmt: skip
    except (OSError, AttributeError):
        return None
    return len(cores) or None


def default_threads() -> None:
    """Set ``TVM_NUM_THREADS`` to `physical_cores` unless it or ``OMP_NUM_THREADS`` is set
    (the user's choice wins; see the module docstring)."""
    if "TVM_NUM_THREADS" in os.environ or "OMP_NUM_THREADS" in os.environ:
        return
    cores = physical_cores()
    if cores:
        os.environ["TVM_NUM_THREADS"] = str(cores)


def load_libraries(device: str) -> None:
    """Make the TVM runtime (and its CUDA module for ``device == "cuda"``) available."""
    default_threads()
    names = ["libtvm_runtime.so", "libtvm_runtime_extra.so"]
    if device == "cuda":
        names.append("libtvm_runtime_cuda.so")
    libdir = _library_dir()
    for name in names:
        if name in _loaded:
            continue
        path = libdir / name
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            raise ModelError(
                f"cannot load the TVM runtime library {path} ({exc}); reinstall apache-tvm"
                + (" on a machine with the NVIDIA driver" if device == "cuda" else "")
            ) from exc
        _loaded.add(name)


@contextlib.contextmanager
def private_library(data: bytes) -> Iterator[Path | None]:
    """A path, used by no load before, of a file holding ``data``; None where none can be made.

    Loading ``DIR/model.so`` by its path would read the file again after its checksum was
    checked and, worse, return the library this process already loaded under that path when
    the artifact was replaced since (glibc matches the path first): the session would run the
    old model.so with the new weights. So the checked bytes go into an anonymous memory file
    (``memfd``) reached through a symlink in a fresh temporary directory, both removed once
    loaded (the mapping keeps the memory file). Without memfd or /proc (not Linux) the caller
    loads the artifact's file by its path.
    """
    if not hasattr(os, "memfd_create"):
        yield None
        return
    try:
        fd = os.memfd_create("modec-model.so", os.MFD_CLOEXEC)
    except OSError:
        yield None
        return
    tmp: Path | None = None
    try:
        path: Path | None = None
        try:
            with os.fdopen(os.dup(fd), "wb") as f:
                f.write(data)
            proc = Path(f"/proc/self/fd/{fd}")
            if proc.exists():
                tmp = Path(tempfile.mkdtemp(prefix="modec-lib-"))
                (tmp / "model.so").symlink_to(proc)
                path = tmp / "model.so"
        except OSError:
            path = None
        yield path
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


class Runtime:
    """The runtime's tensor functions on one device."""

    def __init__(self, device: str) -> None:
        import tvm_ffi

        load_libraries(device)
        self.device = tvm_ffi.device(device, 0)
        self.device_type = DEVICE_TYPES[device]
        self._ffi = tvm_ffi
        self._alloc = tvm_ffi.get_global_func("runtime.TVMTensorAllocWithScope")
        self._copy_from = tvm_ffi.get_global_func("runtime.TVMTensorCopyFromBytes")
        self._copy_to = tvm_ffi.get_global_func("runtime.TVMTensorCopyToBytes")
        # (tensor, shape, dtype, byte offset) -> a tensor of that type over the same memory
        self._view = tvm_ffi.get_global_func("runtime.TVMTensorCreateView")
        self._dtypes: dict[np.dtype, Any] = {}  # numpy dtype -> its DLPack type

    def cuda_device(self) -> tuple[str, str]:
        """(architecture "sm_XY", name) of CUDA device 0.

        Raises:
            ModelError: no CUDA GPU is visible.
        """
        attr = self._ffi.get_global_func("runtime.GetDeviceAttr")
        cuda = DEVICE_TYPES["cuda"]
        if not attr(cuda, 0, _EXIST):
            raise ModelError("no CUDA GPU is visible to this process; run on a machine with one")
        version = str(attr(cuda, 0, _COMPUTE_VERSION))
        return "sm_" + version.replace(".", ""), str(attr(cuda, 0, _DEVICE_NAME))

    def tensor(self, a: np.ndarray) -> Any:
        """A device tensor holding a copy of ``a`` (aligned as the kernels expect).

        On a CPU the copy is numpy's, into a DLPack view of the new tensor, and the dtype
        is parsed once: a decode step makes one to three of these, and of the 9.5 µs one
        took (a hot micro-benchmark, a [1, 300] int64 array) the dtype's parsing took
        3.2 µs and the ctypes pointer and the runtime's copy function 4.5 µs."""
        a = np.ascontiguousarray(a)
        dtype = self._dtypes.get(a.dtype)
        if dtype is None:
            dtype = self._dtypes[a.dtype] = self._ffi.dtype(str(a.dtype))
        t = self._alloc(self._ffi.Shape(a.shape), dtype, self.device, None)
        if self.device_type == DEVICE_TYPES["cpu"] and a.dtype.kind in "biuf":
            np.from_dlpack(t)[...] = a  # (DLPack has no numpy bfloat16: that one is copied)
        else:
            self._copy_from(t, a.ctypes.data_as(ctypes.c_void_p), a.nbytes)
        return t

    def param(self, a: np.ndarray) -> tuple[Any, bool]:
        """A tensor for a param array (a read-only view of the mapped weights file), and
        whether it is that view itself.

        On a CPU device an `ALIGN`-byte aligned array is handed over as it is, through
        DLPack (zero copy: the tensor holds the array, which holds the mapping); DLPack 1.0
        carries the read-only flag (numpy >= 2.1). DLPack has no code for numpy's bfloat16
        (ml_dtypes): such an array goes over as its 16-bit patterns (``uint16``), which
        the tensor then views as ``bfloat16`` (DLPack's kDLBfloat), still without a copy.
        Otherwise (misaligned, another device, an older numpy) the tensor is an aligned
        device copy made with `tensor`."""
        if self.device_type == DEVICE_TYPES["cpu"] and a.ctypes.data % ALIGN == 0:
            bf16 = str(a.dtype) == "bfloat16"
            try:
                capsule = (a.view(np.uint16) if bf16 else a).__dlpack__(max_version=(1, 0))
            except (TypeError, BufferError):  # numpy < 2.1: no read-only export
                return self.tensor(a), False
            t = self._ffi.from_dlpack(capsule, require_alignment=ALIGN)
            if bf16:
                t = self._view(t, self._ffi.Shape(a.shape), self._ffi.dtype("bfloat16"), 0)
            return t, True
        return self.tensor(a), False

    def shape(self, dims: list[int]) -> Any:
        """A shape value (a Relax ``R.Shape`` argument)."""
        return self._ffi.Shape(tuple(dims))

    def grown(self, t: Any, capacity: int, filled: int) -> Any:
        """A new tensor ``[B, H, capacity, D]`` holding the first ``filled`` positions of the
        cache tensor ``t`` (``[B, H, C, D]``), the rest zero."""
        a = self.numpy(t)
        out = np.zeros((*a.shape[:2], capacity, *a.shape[3:]), a.dtype)
        out[:, :, :filled] = a[:, :, :filled]
        return self.tensor(out)

    def numpy(self, t: Any) -> np.ndarray:
        """A numpy copy of a tensor the VM returned."""
        out = np.empty(tuple(int(d) for d in t.shape), dtype=numpy_dtype(str(t.dtype)))
        self._copy_to(t, out.ctypes.data_as(ctypes.c_void_p), out.nbytes)
        return out

    def last_position(self, t: Any) -> np.ndarray:
        """``t[:, -1, :]`` as numpy for a ``[B, S, V]`` tensor the VM returned (the logits a
        token is picked from). On a CPU a read-only DLPack view of those rows, no copy (a
        prompt's logits are ``S`` times larger: 67 MB for 8 rows of 256 tokens over 8,192
        ids); it holds ``t``, whose memory the VM does not reuse while it is alive.
        Elsewhere, and for bfloat16 (which DLPack cannot hand to numpy), a copy."""
        if self.device_type == DEVICE_TYPES["cpu"] and str(t.dtype) != "bfloat16":
            view: np.ndarray = np.from_dlpack(t)[:, -1, :]
            view.flags.writeable = False
            return view
        return self.numpy(t)[:, -1, :]

    def load_vm(self, library: Path, data: bytes | None = None) -> Any:
        """Load ``model.so``'s Relax VM executable on the device; return the VM (its entry
        functions by name: ``vm["main"]``).

        With ``data`` (the library's bytes, as checked), those bytes are loaded, not the file
        again: see `private_library`."""
        if data is None:
            mod = self._ffi.load_module(str(library))
        else:
            with private_library(data) as path:
                mod = self._ffi.load_module(str(path if path is not None else library))
        vm = mod["vm_load_executable"]()
        init = [self.device_type, 0, POOLED_ALLOCATOR]
        if self.device_type != DEVICE_TYPES["cpu"]:
            init += [DEVICE_TYPES["cpu"], 0, POOLED_ALLOCATOR]  # the host, for shape functions
        vm["vm_initialization"](*init)
        return vm
