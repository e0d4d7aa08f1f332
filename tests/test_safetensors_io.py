"""The streaming safetensors writer against the reference ``safetensors.numpy.save_file``."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from modec.errors import ModelError
from modec.safetensors_io import DTYPE_TAGS, TensorEntry, write_safetensors

_DTYPES = [d for d in DTYPE_TAGS if d != "bfloat16"]


def _random_tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(int(rng.integers(1, 12))):
        dtype = _DTYPES[int(rng.integers(len(_DTYPES)))]
        shape = tuple(int(d) for d in rng.integers(0, 5, int(rng.integers(0, 4))))
        arr = np.asarray((rng.normal(size=shape) * 50).astype(dtype))
        name = "".join(rng.choice(list("abcxyz._0123"), int(rng.integers(1, 8)))) + str(i)
        out[name] = arr
    return out


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("meta", [None, {"modec": '{"a": 1}'}])
def test_bytes_equal_save_file(seed, meta, tmp_path):
    tensors = _random_tensors(seed)
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=meta)
    # Half the tensors produced lazily: the bytes must not depend on how a tensor arrives.
    entries = [
        TensorEntry(n, str(a.dtype), a.shape, (lambda a=a: a)) if i % 2 else TensorEntry.of(n, a)
        for i, (n, a) in enumerate(tensors.items())
    ]
    write_safetensors(tmp_path / "ours.safetensors", entries, metadata=meta)
    assert (tmp_path / "ours.safetensors").read_bytes() == (
        tmp_path / "ref.safetensors"
    ).read_bytes()
    back = load_file(str(tmp_path / "ours.safetensors"))
    for n, a in tensors.items():
        np.testing.assert_array_equal(back[n], a)


def test_lazy_tensor_must_match_its_declaration(tmp_path):
    bad = TensorEntry("w", "float32", (2, 3), lambda: np.zeros((3, 2), np.float32))
    with pytest.raises(ModelError, match="declared float32"):
        write_safetensors(tmp_path / "x.safetensors", [bad])


def test_refuses_unknown_dtypes_and_duplicates(tmp_path):
    with pytest.raises(ModelError, match="complex64"):
        write_safetensors(tmp_path / "x", [TensorEntry.of("c", np.zeros(2, np.complex64))])
    a = np.zeros(2, np.float32)
    with pytest.raises(ModelError, match="duplicate"):
        write_safetensors(tmp_path / "x", [TensorEntry.of("a", a), TensorEntry.of("a", a)])
