"""Arrays computed on demand from constant tensors, so that find-moe and canonicalize-moe
never read an expert weight (issue #15: a 60 GB bf16 model on a 24 GiB machine).

A `LazyArray` knows its shape and dtype without reading anything; its value is the source
tensor(s) (an initializer, often a memory-mapped ``ir.ExternalTensor``) put through the
recorded ops: transpose, row selection (the gate/up split), slicing, reshape, elementwise
maps (casts, ``Neg``, Gemm's alpha), constant-index gathers, broadcasting arithmetic, and
stacking of per-expert weights.

- `LazyArray.numpy` computes the whole value (possibly a view of a memory-mapped source);
- `LazyArray.expert` is the lazy ``x[e]``, pushed down to the sources where the ops allow,
  so that one expert reads only its own bytes;
- `to_float32` writes the value into a new C-contiguous float32 array in one pass (no
  intermediate copy for a cast, transpose or row split of a source) and releases the memory
  maps it opened itself (`ir.ExternalTensor.release`).

The values are exactly those of the same numpy ops on the materialized sources.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import numpy as np
import onnx_ir as ir

Shape = tuple[int, ...]


class LazyArray:
    """A constant array computed on demand; see the module docstring.

    Attributes:
        shape: the shape, known without reading anything.
        dtype: the numpy dtype of the value.
    """

    def __init__(self, shape: Sequence[int], dtype: np.dtype[Any]) -> None:
        self.shape: Shape = tuple(int(s) for s in shape)
        self.dtype: np.dtype[Any] = np.dtype(dtype)

    # -- what it is ------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the value in its dtype."""
        return self.size * self.dtype.itemsize

    def sources(self) -> Iterator[ir.TensorProtocol]:
        """The tensors the value is computed from."""
        for c in self._children():
            yield from c.sources()

    def _children(self) -> Sequence[LazyArray]:
        return ()

    def __repr__(self) -> str:
        return f"{type(self).__name__.lstrip('_')}<{self.dtype},{list(self.shape)}>"

    # -- values ----------------------------------------------------------------------------
    def numpy(self) -> np.ndarray:
        """The value (may be a read-only view of a memory-mapped source: copy to keep)."""
        raise NotImplementedError

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype)

    def _write(self, out: np.ndarray) -> None:
        """Store the value into ``out`` (its shape, any dtype: cast as ``astype`` does)."""
        np.copyto(out, self.numpy(), casting="unsafe")

    # -- ops (each returns a new LazyArray; nothing is read) -------------------------------
    def expert(self, e: int) -> LazyArray:
        """``x[e]``: the slice of index ``e`` along axis 0, reading only its own part."""
        n = self.shape[0]
        if not -n <= e < n:
            raise IndexError(f"index {e} out of range for axis 0 of size {n}")
        return self._index0(e % n)

    def _index0(self, e: int) -> LazyArray:
        return _Index0(self, e)

    def transpose(self, perm: Sequence[int] | None = None) -> LazyArray:
        """``np.transpose(x, perm)``."""
        if perm is None:
            p = tuple(reversed(range(self.ndim)))
        else:
            p = tuple(_axis(int(a), self.ndim) for a in perm)
        if sorted(p) != list(range(self.ndim)):
            raise ValueError(f"bad permutation {p} for {self.ndim} axes")
        if p == tuple(range(self.ndim)):
            return self
        return _Transpose(self, p)

    @property
    def T(self) -> LazyArray:
        """The reversed-axes transpose."""
        return self.transpose()

    def astype(self, dtype: Any) -> LazyArray:
        """``x.astype(dtype)`` (always a new value, as numpy's copy)."""
        dt = np.dtype(dtype)
        return _Map(self, lambda a: a.astype(dt), dt, cast=True)

    def map(self, fn: Callable[[np.ndarray], np.ndarray]) -> LazyArray:
        """An elementwise function (``fn(x)[i] == fn(x[i])``); its dtype is found on one
        element of ``x``'s dtype."""
        dt = np.asarray(fn(np.zeros(1, self.dtype))).dtype
        return _Map(self, fn, dt)

    def take(self, indices: np.ndarray | int, axis: int = 0) -> LazyArray:
        """``np.take(x, indices, axis)`` with constant ``indices``."""
        idx = np.asarray(indices)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"indices of dtype {idx.dtype}")
        ax = _axis(axis, self.ndim)
        n = self.shape[ax]
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for axis {ax} of size {n}")
        idx = np.where(idx < 0, idx + n, idx).astype(np.int64)
        if idx.ndim == 0:
            return self._take_one(int(idx), ax)
        return _Take(self, idx, ax)

    def _take_one(self, i: int, axis: int) -> LazyArray:
        if axis == 0:
            return self._index0(i)
        return _Take(self, np.asarray(i, np.int64), axis)

    def slice(self, slices: Sequence[slice]) -> LazyArray:
        """``x[slices]`` (basic slicing, one slice per leading axis)."""
        if len(slices) > self.ndim:
            raise IndexError("too many slices")
        full = tuple(slices) + (slice(None),) * (self.ndim - len(slices))
        norm = tuple(slice(*s.indices(n)) for s, n in zip(full, self.shape, strict=True))
        if all(s == slice(0, n, 1) for s, n in zip(norm, self.shape, strict=True)):
            return self
        return _Slice(self, norm)

    def reshape(self, shape: Sequence[int]) -> LazyArray:
        """``np.reshape(x, shape)`` (one ``-1`` allowed)."""
        new = [int(s) for s in shape]
        if new.count(-1) > 1 or any(s < -1 for s in new):
            raise ValueError(f"bad shape {new}")
        if -1 in new:
            known = math.prod(s for s in new if s != -1)
            if known == 0 or self.size % known:
                raise ValueError(f"cannot reshape {self.shape} to {new}")
            new[new.index(-1)] = self.size // known
        if math.prod(new) != self.size:
            raise ValueError(f"cannot reshape {self.shape} to {new}")
        if tuple(new) == self.shape:
            return self
        return _Reshape(self, tuple(new))


def _axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for {ndim} dimensions")
    return axis % ndim


def source(tensor: ir.TensorProtocol) -> LazyArray:
    """The value of ``tensor``; reading it is deferred to the first access."""
    return _Source(tensor)


def const(array: np.ndarray) -> LazyArray:
    """An array already in memory, as a `LazyArray`."""
    return _Const(np.asarray(array))


def stack(items: Sequence[LazyArray]) -> LazyArray:
    """``np.stack(items)`` along a new axis 0."""
    if not items:
        raise ValueError("nothing to stack")
    shapes = {i.shape for i in items}
    if len(shapes) != 1:
        raise ValueError(f"cannot stack shapes {sorted(shapes)}")
    dt = np.result_type(*(i.dtype for i in items))
    return _Stack(tuple(items), dt)


def computed(shape: Sequence[int], dtype: Any, fn: Callable[[], np.ndarray]) -> LazyArray:
    """The array ``fn()`` returns, of the declared shape and dtype, computed when read.

    ``fn`` runs on every read (nothing is cached, so that a writer holds one value at a
    time); a result of another shape or dtype raises ``ValueError``.
    """
    return _Computed(shape, np.dtype(dtype), fn)


def binary(
    fn: Callable[[np.ndarray, np.ndarray], np.ndarray], a: LazyArray, b: LazyArray,
    dtype: np.dtype[Any],
) -> LazyArray:  # fmt: skip
    """``fn(a, b)`` with numpy broadcasting, computed when read, as ``dtype``."""
    shape = np.broadcast_shapes(a.shape, b.shape)
    return _Binary(a, b, fn, shape, np.dtype(dtype))


class _Source(LazyArray):
    def __init__(self, tensor: ir.TensorProtocol) -> None:
        super().__init__(tuple(int(d) for d in tensor.shape.numpy()), tensor.dtype.numpy())
        self.tensor = tensor

    def sources(self) -> Iterator[ir.TensorProtocol]:
        yield self.tensor

    def numpy(self) -> np.ndarray:
        return np.asarray(self.tensor.numpy())


class _Const(LazyArray):
    def __init__(self, array: np.ndarray) -> None:
        super().__init__(array.shape, array.dtype)
        self.array = array

    def numpy(self) -> np.ndarray:
        return self.array


class _Computed(LazyArray):
    def __init__(self, shape: Sequence[int], dtype: np.dtype[Any], fn: Callable[[], np.ndarray]):
        super().__init__(shape, dtype)
        self.fn = fn

    def numpy(self) -> np.ndarray:
        arr = np.asarray(self.fn())
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError(
                f"computed array is {arr.dtype}{list(arr.shape)}, declared "
                f"{self.dtype}{list(self.shape)}"
            )
        return arr


class _Index0(LazyArray):
    def __init__(self, child: LazyArray, e: int) -> None:
        super().__init__(child.shape[1:], child.dtype)
        self.child, self.e = child, e

    def _children(self) -> Sequence[LazyArray]:
        return (self.child,)

    def numpy(self) -> np.ndarray:
        return np.asarray(self.child.numpy()[self.e])


class _Transpose(LazyArray):
    def __init__(self, child: LazyArray, perm: Shape) -> None:
        super().__init__(tuple(child.shape[a] for a in perm), child.dtype)
        self.child, self.perm = child, perm

    def _children(self) -> Sequence[LazyArray]:
        return (self.child,)

    def numpy(self) -> np.ndarray:
        return np.transpose(self.child.numpy(), self.perm)

    def _index0(self, e: int) -> LazyArray:
        # transpose(x, p)[e] == transpose(take(x, e, p[0]), p without p[0], renumbered)
        a = self.perm[0]
        rest = [p - (p > a) for p in self.perm[1:]]
        return self.child._take_one(e, a).transpose(rest)


class _Map(LazyArray):
    def __init__(
        self, child: LazyArray, fn: Callable[[np.ndarray], np.ndarray], dtype: np.dtype[Any],
        cast: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(child.shape, dtype)
        self.child, self.fn, self.cast = child, fn, cast

    def _children(self) -> Sequence[LazyArray]:
        return (self.child,)

    def numpy(self) -> np.ndarray:
        return np.asarray(self.fn(self.child.numpy()))

    def _write(self, out: np.ndarray) -> None:
        if self.cast and out.dtype == self.dtype:
            # copyto casts with astype's conversion: one pass, no intermediate.
            self.child._write(out)
        else:
            super()._write(out)

    # Elementwise: the structural ops commute with it. Applied on the source side, a read
    # converts only the part it keeps, straight from the source.
    def _wrap(self, x: LazyArray) -> LazyArray:
        return _Map(x, self.fn, self.dtype, self.cast)

    def _index0(self, e: int) -> LazyArray:
        return self._wrap(self.child._index0(e))

    def _take_one(self, i: int, axis: int) -> LazyArray:
        return self._wrap(self.child._take_one(i, axis))

    def transpose(self, perm: Sequence[int] | None = None) -> LazyArray:
        return self._wrap(self.child.transpose(perm))

    def take(self, indices: np.ndarray | int, axis: int = 0) -> LazyArray:
        return self._wrap(self.child.take(indices, axis))

    def slice(self, slices: Sequence[slice]) -> LazyArray:
        return self._wrap(self.child.slice(slices))

    def reshape(self, shape: Sequence[int]) -> LazyArray:
        return self._wrap(self.child.reshape(shape))


class _Take(LazyArray):
    def __init__(self, child: LazyArray, idx: np.ndarray, axis: int) -> None:
        s = child.shape
        super().__init__(s[:axis] + idx.shape + s[axis + 1 :], child.dtype)
        self.child, self.idx, self.axis = child, idx, axis

    def _children(self) -> Sequence[LazyArray]:
        return (self.child,)

    def numpy(self) -> np.ndarray:
        x = self.child.numpy()
        step = _progression(self.idx)
        if step is not None:  # a view: halves, every other row
            start = int(self.idx[0])
            end = start + step * self.idx.size
            stop = None if end < 0 else end  # a descending run down to index 0
            sl = [slice(None)] * x.ndim
            sl[self.axis] = slice(start, stop, step)
            return x[tuple(sl)]
        return np.take(x, self.idx, axis=self.axis)

    def _index0(self, e: int) -> LazyArray:
        if self.axis == 0:
            return self.child.take(self.idx[e], 0)
        return self.child._index0(e).take(self.idx, self.axis - 1)


def _progression(idx: np.ndarray) -> int | None:
    """The step of a 1-D non-empty arithmetic progression of indices, else None."""
    if idx.ndim != 1 or idx.size == 0:
        return None
    if idx.size == 1:
        return 1
    step = int(idx[1] - idx[0])
    if step == 0 or not np.array_equal(np.diff(idx), np.full(idx.size - 1, step)):
        return None
    return step


class _Slice(LazyArray):
    def __init__(self, child: LazyArray, slices: tuple[slice, ...]) -> None:
        shape = tuple(len(range(s.start, s.stop, s.step)) for s in slices)
        super().__init__(shape, child.dtype)
        self.child, self.slices = child, slices

    def _children(self) -> Sequence[LazyArray]:
        return (self.child,)

    def numpy(self) -> np.ndarray:
        return self.child.numpy()[tuple(_as_key(s) for s in self.slices)]

    def _index0(self, e: int) -> LazyArray:
        s0 = self.slices[0]
        i = range(s0.start, s0.stop, s0.step)[e]
        return self.child._index0(i).slice([_as_key(s) for s in self.slices[1:]])


def _as_key(s: slice) -> slice:
    """A slice normalized by ``slice.indices`` as an index: its stop -1 (a descending run
    down to index 0) means "to the start", numpy's None, not the last element."""
    return slice(s.start, None if s.stop < 0 else s.stop, s.step)


class _Reshape(LazyArray):
    def __init__(self, child: LazyArray, shape: Shape) -> None:
        super().__init__(shape, child.dtype)
        self.child = child

    def _children(self) -> Sequence[LazyArray]:
        return (self.child,)

    def numpy(self) -> np.ndarray:
        return np.reshape(self.child.numpy(), self.shape)

    def _index0(self, e: int) -> LazyArray:
        c = self.child
        if c.ndim and self.ndim and c.shape[0] == self.shape[0]:
            return c._index0(e).reshape(self.shape[1:])
        if c.ndim + 1 == self.ndim and self.shape[0] == 1 and self.shape[1:] == c.shape:
            return c  # expand_dims(x, 0)[0]
        return super()._index0(e)


class _Stack(LazyArray):
    def __init__(self, items: tuple[LazyArray, ...], dtype: np.dtype[Any]) -> None:
        super().__init__((len(items), *items[0].shape), dtype)
        self.items = items

    def _children(self) -> Sequence[LazyArray]:
        return self.items

    def numpy(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        self._write(out)
        return out

    def _write(self, out: np.ndarray) -> None:
        for i, item in enumerate(self.items):
            item._write(out[i])

    def _index0(self, e: int) -> LazyArray:
        item = self.items[e]
        return item if item.dtype == self.dtype else item.astype(self.dtype)

    # Ops that keep axis 0 apply to each item: a read then never builds the whole stack.
    def _uniform(self) -> bool:
        return all(i.dtype == self.dtype for i in self.items)

    def take(self, indices: np.ndarray | int, axis: int = 0) -> LazyArray:
        if self.ndim < 2 or _axis(axis, self.ndim) == 0 or not self._uniform():
            return super().take(indices, axis)
        return stack([i.take(indices, _axis(axis, self.ndim) - 1) for i in self.items])

    def transpose(self, perm: Sequence[int] | None = None) -> LazyArray:
        if perm is None or _axis(int(perm[0]), self.ndim) != 0 or not self._uniform():
            return super().transpose(perm)
        rest = [_axis(int(p), self.ndim) - 1 for p in perm[1:]]
        return stack([i.transpose(rest) for i in self.items])

    def slice(self, slices: Sequence[slice]) -> LazyArray:
        if not slices or not self._uniform():
            return super().slice(slices)
        kept = range(*slices[0].indices(len(self.items)))
        if len(kept) == 0:
            return super().slice(slices)
        return stack([self.items[k].slice(slices[1:]) for k in kept])


class _Binary(LazyArray):
    def __init__(
        self, a: LazyArray, b: LazyArray, fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
        shape: Shape, dtype: np.dtype[Any],
    ) -> None:  # fmt: skip
        super().__init__(shape, dtype)
        self.a, self.b, self.fn = a, b, fn

    def _children(self) -> Sequence[LazyArray]:
        return (self.a, self.b)

    def numpy(self) -> np.ndarray:
        return np.asarray(self.fn(self.a.numpy(), self.b.numpy())).astype(self.dtype)


# -- materialization ---------------------------------------------------------------------

_LOCK = threading.Lock()
_READERS: dict[int, int] = {}


@contextmanager
def reading(tensors: Sequence[ir.TensorProtocol]) -> Iterator[None]:
    """Release, on exit, the memory maps of the ``ir.ExternalTensor``s that were not mapped on
    entry (and that no other `reading` still uses): read them, then leave them as found."""
    opened: list[ir.ExternalTensor] = []
    with _LOCK:
        for t in {id(t): t for t in tensors}.values():
            if not isinstance(t, ir.ExternalTensor):
                continue
            if id(t) in _READERS:
                _READERS[id(t)] += 1
            elif t.raw is None:
                _READERS[id(t)] = 1
            else:
                continue  # mapped by someone else: theirs to release
            opened.append(t)
    try:
        yield
    finally:
        with _LOCK:
            for t in opened:
                _READERS[id(t)] -= 1
                if _READERS[id(t)] == 0:
                    del _READERS[id(t)]
                    # BufferError: a view of the map is still alive somewhere; leave it mapped
                    with suppress(BufferError):
                        t.release()


def to_float32(x: LazyArray) -> np.ndarray:
    """A new C-contiguous float32 array holding ``x`` (``x.numpy().astype(np.float32)``)."""
    out = np.empty(x.shape, np.float32)
    with reading(list(x.sources())):
        x._write(out)
    return out
