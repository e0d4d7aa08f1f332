"""The dataset format: round trip, modality derivation, and one-line errors on bad files."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from modec import data
from modec.errors import DataError


def _arrays(n: int = 4, t: int = 6) -> dict[str, np.ndarray]:
    ids = np.full((n, t), 5, dtype=np.int64)
    ids[:, 1:3] = 2  # two image tokens
    ids[0, 0] = 0
    mask = np.ones((n, t), dtype=np.int64)
    mask[0, 0] = 0
    pix = (np.arange(n * 4, dtype=np.float32).reshape(n, 1, 2, 2) % 7) * np.float32(1 / 255)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pix}


def test_round_trip_with_encoding_and_derived_modality(tmp_path):
    arr = _arrays()
    p = tmp_path / "d.npz"
    enc = {"pixel_values": {"stored": "uint8", "scale": 1 / 255, "offset": 0.0}}
    data.save(p, arr, modality=None, answer=np.arange(4), header={"image_token_id": 2},
              encodings=enc)  # fmt: skip
    ds = data.load(p)
    assert len(ds) == 4
    for k, v in arr.items():
        assert ds.inputs[k].dtype == v.dtype
        np.testing.assert_array_equal(ds.inputs[k], v)
    assert ds.modality[0, 0] == data.PAD
    assert (ds.modality[:, 1:3] == data.VISION).all()
    assert (ds.modality[1:, 0] == data.TEXT).all()
    assert ds.multimodal.all()


def test_save_is_byte_identical(tmp_path):
    arr = _arrays()
    mod = data.derive_modality(arr["input_ids"], 2, arr["attention_mask"])
    for name in ("a.npz", "b.npz"):
        data.save(tmp_path / name, arr, modality=mod, answer=np.arange(4))
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_encoding_must_be_exact(tmp_path):
    arr = _arrays()
    arr["pixel_values"] = arr["pixel_values"] + np.float32(1e-3)
    with pytest.raises(DataError, match="not exactly representable"):
        data.save(
            tmp_path / "x.npz",
            arr,
            modality=None,
            header={"image_token_id": 2},
            encodings={"pixel_values": {"stored": "uint8", "scale": 1 / 255, "offset": 0}},
        )
    assert not list(tmp_path.iterdir()), "a failed save must leave nothing behind"


def _rewrite(src, dst, drop=(), replace=None):
    with np.load(src) as z:
        out = {k: z[k] for k in z.files if k not in drop}
    out.update(replace or {})
    np.savez(dst, **out)


@pytest.mark.parametrize(
    ("drop", "replace", "message"),
    [
        (("input/input_ids",), None, "missing key 'input/input_ids'"),
        (("__header__",), None, "missing key '__header__'"),
        (("modality",), {"__header__": np.array(json.dumps({
            "format": "modec-dataset", "version": 1,
            "inputs": {"input_ids": {"dtype": "int64"}, "attention_mask": {"dtype": "int64"},
                       "pixel_values": {"dtype": "float32"}}}))},
         "no 'image_token_id'"),
        ((), {"modality": np.zeros((4, 9), dtype=np.int8)}, "key 'modality' has length 9"),
        ((), {"modality": np.zeros((3, 6), dtype=np.int8)}, "key 'modality' has shape"),
        ((), {"answer": np.zeros(5, dtype=np.int64)}, "key 'answer' has shape"),
        ((), {"input/attention_mask": np.ones((4, 6), dtype=np.int32)}, "has dtype int32"),
    ],
)  # fmt: skip
def test_bad_files_name_file_key_and_expectation(tmp_path, drop, replace, message):
    arr = _arrays()
    good = tmp_path / "good.npz"
    data.save(good, arr, modality=data.derive_modality(arr["input_ids"], 2), answer=np.arange(4))
    bad = tmp_path / "bad.npz"
    _rewrite(good, bad, drop, replace)
    with pytest.raises(DataError, match=message) as info:
        data.load(bad)
    assert str(bad) in str(info.value)
    assert "\n" not in str(info.value)


def test_not_a_dataset(tmp_path):
    p = tmp_path / "junk.npz"
    p.write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        data.load(p)
    with pytest.raises(DataError, match="no such data file"):
        data.load(tmp_path / "missing.npz")
    assert zipfile.is_zipfile(p) is False


def test_check_against_model_inputs(tmp_path):
    arr = _arrays()
    p = tmp_path / "d.npz"
    data.save(p, arr, modality=data.derive_modality(arr["input_ids"], 2))
    ds = data.load(p)
    ok = [
        data.InputSpec("input_ids", "int64", ("batch", "seq")),
        data.InputSpec("attention_mask", "int64", ("batch", "seq")),
        data.InputSpec("pixel_values", "float32", ("batch", 1, 2, 2)),
    ]
    data.check_against(ds, ok)
    wrong_shape = [*ok[:2], data.InputSpec("pixel_values", "float32", ("batch", 1, 64, 64))]
    with pytest.raises(DataError, match=r"shape \[4, 1, 2, 2\]; the model expects"):
        data.check_against(ds, wrong_shape)
    with pytest.raises(DataError, match="missing key 'input/extra'"):
        data.check_against(ds, [*ok, data.InputSpec("extra", "float32", ("batch",))])


def test_batches_trim_common_left_padding(tmp_path):
    arr = _arrays(n=3, t=6)
    arr["attention_mask"][:, :2] = 0
    arr["input_ids"][:, :2] = 0
    p = tmp_path / "d.npz"
    data.save(p, arr, modality=data.derive_modality(arr["input_ids"], 2, arr["attention_mask"]))
    ds = data.load(p)
    ((idx, feeds),) = list(ds.batches(8))
    assert feeds["input_ids"].shape == (3, 4)
    assert feeds["pixel_values"].shape == (3, 1, 2, 2)
    np.testing.assert_array_equal(idx, [0, 1, 2])
