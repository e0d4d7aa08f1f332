"""find-moe and canonicalize-moe never read an expert weight (issue #15).

The canonical node's expert weights are `modec.moe.canonical.LazyWeight`s computed from the
source initializers on access. Checked three ways:

- every initializer of every fixture form (hand-written graphs and exported models, stored
  in float32, float16 and bfloat16 as external data) is wrapped in a tensor that counts
  reads: find-moe + canonicalize-moe read only the router weights; the canonical weights
  then equal, bit for bit, the source arrays put through the layout by numpy;
- a 214 MB float16 (and bfloat16) stacked model loaded with ``ir.load`` (memory-mapped
  ``ExternalTensor``s): in a fresh process find-moe + canonicalize-moe grow the peak RSS by
  far less than the expert bytes, map no expert file, and `expert_slice` over every expert
  keeps the RSS flat (the maps are released);
- `LazyArray`'s ops against numpy on small arrays (`expert` pushes ``x[e]`` down).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest

from modec.moe import lazy
from modec.moe.canonical import LazyWeight, canonicalize_moe, expert_slice, is_moe_node
from modec.moe.discover import find_moe
from modec.moe.reference import INPUT_NAMES, MoEParams
from tests.moe import graphs
from tests.moe.cases import CASES, Case
from tests.moe.onnx_text import onnx_model

ROOT = Path(__file__).resolve().parents[2]
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
EXPERT_INPUTS = ("gate", "up", "down", "shared_gate", "shared_up", "shared_down")


def _bits(a: np.ndarray) -> np.ndarray:
    assert a.dtype == np.float32
    return np.ascontiguousarray(a).view(np.uint32)


def _assert_bit_equal(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, (what, got.shape, want.shape)
    np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=what)


def _stored_as(model: ir.Model, dtype: str, directory: Path) -> ir.Model:
    """``model`` with its float32 initializers stored as ``dtype``, saved as external data
    and loaded back (every initializer an ``ir.ExternalTensor``)."""
    if dtype != "float32":
        for v in model.graph.initializers.values():
            t = v.const_value
            if t is not None and t.dtype == ir.DataType.FLOAT:
                with np.errstate(over="ignore"):  # attention masks' -3.4e38 fill: -inf
                    arr = t.numpy().astype(DTYPES[dtype])
                v.const_value = ir.tensor(arr, name=v.name)
                v.type = ir.TensorType(v.const_value.dtype)
    directory.mkdir(parents=True, exist_ok=True)
    ir.save(model, directory / "model.onnx", external_data="w.bin", size_threshold_bytes=0)
    return ir.load(directory / "model.onnx")


class Reads:
    """Wraps initializers in tensors that record each read of their data (not of shapes)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.wrapped: dict[int, str] = {}

    def wrap(self, v: ir.Value) -> None:
        t = v.const_value
        assert t is not None and v.name
        name = v.name

        def read() -> ir.TensorProtocol:
            self.names.append(name)
            return t

        w = ir.LazyTensor(read, dtype=t.dtype, shape=t.shape, name=t.name, cache=False)
        v.const_value = w
        self.wrapped[id(w)] = name


def _stacked_bias(v: ir.Value) -> bool:
    """``[E, N]`` gathered by the routed indices and added: a stacked expert bias."""
    users = [u.node for u in v.uses()]
    return len(v.shape or ()) == 2 and all(
        u.op_type in ("Gather", "GatherND")
        and all(w.node.op_type == "Add" for w in u.outputs[0].uses())
        for u in users
    )


def _wrap_all_but_routers(model: ir.Model) -> Reads:
    """Wrap every initializer of rank >= 2 but the routers', ``[1, H]`` gates and stacked
    biases (read by design: small, needed to describe the layer)."""
    plain_regions = find_moe(model)
    routers = {n for r in plain_regions for n in r.router.initializers}
    reads = Reads()
    for v in model.graph.initializers.values():
        t = v.const_value
        if t is None or len(t.shape) < 2 or 1 in t.shape or v.name in routers:
            continue
        if not _stacked_bias(v):
            reads.wrap(v)
    assert reads.wrapped, "nothing wrapped: the test would check nothing"
    return reads


def _canonical_inputs(node: ir.Node) -> dict[str, ir.Value]:
    return {
        name: v
        for name, v in zip(INPUT_NAMES, node.inputs, strict=False)
        if v is not None and name != "hidden"
    }


def _check_lazy_and_unread(model: ir.Model, reads: Reads) -> list[ir.Node]:
    """canonicalize-moe on ``model``; no wrapped tensor read; the expert weights are
    LazyWeights whose sources are wrapped tensors; returns the MoE nodes."""
    nodes = canonicalize_moe(model, find_moe(model))
    assert nodes
    assert reads.names == [], f"find-moe / canonicalize-moe read {sorted(set(reads.names))}"
    for node in nodes:
        for name, v in _canonical_inputs(node).items():
            t = v.const_value
            if name not in EXPERT_INPUTS:
                assert not isinstance(t, ir.LazyTensor), name
                continue
            assert isinstance(t, LazyWeight) and isinstance(t, ir.LazyTensor), name
            assert t.cache is False and t.dtype == ir.DataType.FLOAT, name
            assert tuple(t.shape.numpy()) == t.source.shape == tuple(v.shape.numpy()), name  # type: ignore[union-attr]
            srcs = {id(s) for s in t.source.sources()}
            assert srcs and srcs <= reads.wrapped.keys(), f"{name} is not computed from the source"
    assert reads.names == [], "checking the canonical node read a weight"
    return nodes


def _check_expert_slices(node: ir.Node) -> None:
    """`expert_slice` equals ``numpy()[e]`` bit for bit, for every expert of every weight."""
    for name, v in _canonical_inputs(node).items():
        if name not in ("gate", "up", "down"):
            continue
        full = v.const_value.numpy()  # type: ignore[union-attr]
        assert full.dtype == np.float32 and full.flags.c_contiguous
        for e in range(full.shape[0]):
            _assert_bit_equal(expert_slice(v, e), full[e], f"{name}[{e}]")


HAND = {
    "stacked_softmax": graphs.stacked_softmax,
    "grouped_sigmoid": graphs.grouped_sigmoid,
    "shared_expert": graphs.shared_expert,
    "dispatch": graphs.dispatch,
    "dense": graphs.dense,
    "vlm": graphs.vlm,
}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("form", list(HAND))
def test_hand_forms_read_no_expert_weight(form: str, dtype: str, tmp_path: Path) -> None:
    before = HAND[form]()
    model = _stored_as(before.model, dtype, tmp_path)
    reads = _wrap_all_but_routers(model)
    (node,) = _check_lazy_and_unread(model, reads)
    params = MoEParams.from_node(node)
    for name, v in _canonical_inputs(node).items():
        # the hand-written canonical layout of the float32 source, applied to the stored
        # (rounded) source: the layout is a rearrangement, the rounding elementwise
        want = np.asarray(before.canonical[name]).astype(DTYPES[dtype]).astype(np.float32)
        _assert_bit_equal(v.const_value.numpy(), want, name)  # type: ignore[union-attr]
        _assert_bit_equal(getattr(params, name), want, f"from_node {name}")
    _check_expert_slices(node)


def _canonical_arrays(model: ir.Model) -> list[dict[str, np.ndarray]]:
    return [
        {k: v.const_value.numpy() for k, v in _canonical_inputs(n).items()}  # type: ignore[union-attr]
        for n in model.graph
        if is_moe_node(n)
    ]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_exported_forms_read_no_expert_weight(
    case: Case, moe_model: Callable[[str, str], Path], tmp_path: Path
) -> None:
    path = moe_model(case.name, case.exporter)
    ref = ir.load(path)
    canonicalize_moe(ref)
    want32 = _canonical_arrays(ref)
    for dtype in ("float16", "bfloat16"):
        model = _stored_as(ir.load(path), dtype, tmp_path / dtype)
        reads = _wrap_all_but_routers(model)
        nodes = _check_lazy_and_unread(model, reads)
        got = _canonical_arrays(model)
        assert len(got) == len(want32) == len(nodes) == 2
        for layer, (g, w) in enumerate(zip(got, want32, strict=True)):
            assert g.keys() == w.keys()
            for name in g:
                want = w[name].astype(DTYPES[dtype]).astype(np.float32)
                _assert_bit_equal(g[name], want, f"{dtype} layer {layer} {name}")
        _check_expert_slices(nodes[1])


# -- a paper-shaped layer: memory --------------------------------------------------------

E_BIG, H_BIG, I_BIG, K_BIG = 16, 2048, 1088, 2


def _big_stacked(path: Path, dtype: str) -> int:
    """One Mixtral-style stacked layer stored in ``dtype`` with external data; returns the
    expert bytes (gate_up ``[E, 2I, H]`` and down ``[E, H, I]``)."""
    e, h, i, k = E_BIG, H_BIG, I_BIG, K_BIG

    def i64(*v: int) -> np.ndarray:
        return np.array(v, np.int64)

    shapes = {
        "flat": i64(-1, h), "k": i64(k), "last": i64(-1), "one": i64(1), "rep": i64(1, k, 1),
        "minus1": i64(-1), "tkh": i64(-1, k, h), "col": i64(-1, 1),
    }  # fmt: skip
    text = f"""
    big (float16[T, {h}] x) => (float16[T, {h}] out) {{
        {graphs.SOFTMAX_ROUTER}
        {graphs.stacked_experts("xf", "top_i", "weights", "out")}
    }}"""
    rng = np.random.default_rng(0)
    weights = {
        "router": (e, h), "gate_up": (e, 2 * i, h), "down": (e, h, i),
    }  # fmt: skip
    model = onnx_model(text, {**shapes, **{n: np.zeros((1, 1), np.float32) for n in weights}})
    size = 0
    for name, shape in weights.items():
        arr = (rng.standard_normal(shape, np.float32) * 0.05).astype(DTYPES[dtype])
        v = model.graph.initializers[name]
        v.const_value = ir.tensor(arr, name=name)
        v.type, v.shape = ir.TensorType(v.const_value.dtype), ir.Shape(shape)
        size += arr.nbytes if name != "router" else 0
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, path, external_data="w.bin")
    return size


_MEASURE = r"""
import json, os, sys
import numpy as np
import onnx_ir as ir
from modec.moe.canonical import LazyWeight, canonicalize_moe, expert_slice
from modec.moe.discover import find_moe
from modec.moe.reference import MoEParams

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass

def peak():
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

model = ir.load(sys.argv[1])
src = {n: model.graph.initializers[n].const_value for n in ("gate_up", "down")}
assert all(isinstance(t, ir.ExternalTensor) for t in src.values())
out = {}
reset_peak(); r0 = rss()
regions = find_moe(model)
(node,) = canonicalize_moe(model, regions)
out["find_canon_rss"] = rss() - r0
out["find_canon_peak"] = peak() - r0
out["mapped_after_canon"] = [n for n, t in src.items() if t.raw is not None]
w = {name: node.inputs[i] for name, i in (("gate", 3), ("up", 4), ("down", 5))}
out["lazy"] = all(isinstance(v.const_value, LazyWeight) for v in w.values())
out["kept_initializers"] = sorted(model.graph.initializers)

reset_peak(); r0 = rss()
for name, v in w.items():
    for e in range(16):
        expert_slice(v, e)
out["slices_rss"] = rss() - r0
out["slices_peak"] = peak() - r0
out["mapped_after_slices"] = [n for n, t in src.items() if t.raw is not None]

reset_peak(); r0 = rss()
p = MoEParams.from_node(node)
out["from_node_peak"] = peak() - r0
out["from_node_bytes"] = sum(a.nbytes for a in (p.gate, p.up, p.down))

# bit-exactness against numpy on the source arrays
i = p.up.shape[1]
gu, down = src["gate_up"].numpy(), src["down"].numpy()
want = {"gate": gu[:, :i], "up": gu[:, i:], "down": down}
ok = {}
for name, arr in want.items():
    exp = arr.astype(np.float32)
    got = getattr(p, name)
    same = got.shape == exp.shape and np.array_equal(got.view(np.uint32), exp.view(np.uint32))
    ok[name] = bool(same)
    one = expert_slice(w[name], 3)
    ok[name + "_slice3"] = bool(np.array_equal(one.view(np.uint32), exp[3].view(np.uint32)))
out["equal"] = ok
print(json.dumps(out))
"""

MB = 1 << 20


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_paper_shaped_layer_is_never_materialized(dtype: str, tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    expert_bytes = _big_stacked(path, dtype)
    assert expert_bytes >= 200 * MB
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)], cwd=ROOT, capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    print(dtype, {k: v for k, v in got.items() if k != "equal"})
    assert got["lazy"]
    assert got["mapped_after_canon"] == [], "find-moe / canonicalize-moe read expert data"
    assert got["find_canon_peak"] < 50 * MB, got
    assert got["find_canon_rss"] < 50 * MB, got
    # the original stacked weights are gone from the graph (the lazy weights hold them)
    assert not {"gate_up", "down"} & set(got["kept_initializers"])
    # one expert at a time: each slice is ~9 MB float32 and the maps are released after it
    # (48 slices kept or mapped would be 430 MB)
    assert got["slices_peak"] < 50 * MB, got
    assert got["slices_rss"] < 50 * MB, got
    assert got["mapped_after_slices"] == []
    # from_node builds the layer in float32 (the intended per-layer cost) and no float32
    # temporary: the peak is the result plus the source pages of one projection
    assert got["from_node_bytes"] == 2 * expert_bytes
    assert got["from_node_peak"] < got["from_node_bytes"] + expert_bytes // 2, got
    assert all(got["equal"].values()), got["equal"]


# -- LazyArray against numpy ---------------------------------------------------------------

_OPS: dict[str, Callable[[object], object]] = {
    "transpose021": lambda x: x.transpose((0, 2, 1)),  # type: ignore[attr-defined]
    "transpose120": lambda x: x.transpose((1, 2, 0)),  # type: ignore[attr-defined]
    "T": lambda x: x.T,  # type: ignore[attr-defined]
    "rows_even": lambda x: x.take(np.arange(0, 6, 2), axis=1),  # type: ignore[attr-defined]
    "rows_odd_neg_axis": lambda x: x.take(np.arange(1, 6, 2), axis=-2),  # type: ignore[attr-defined]
    "rows_scattered": lambda x: x.take(np.array([4, 0, 5, 0]), axis=1),  # type: ignore[attr-defined]
    "take_axis0": lambda x: x.take(np.array([[3, 1], [0, 2]]), axis=0),  # type: ignore[attr-defined]
    "take_scalar_axis2": lambda x: x.take(-1, axis=2),  # type: ignore[attr-defined]
    "slice_desc": lambda x: x.slice([slice(None), slice(None, None, -2)]),  # type: ignore[attr-defined]
    "slice_mid": lambda x: x.slice([slice(1, 3), slice(-4, -1), slice(0, 5, 3)]),  # type: ignore[attr-defined]
    "reshape_rows": lambda x: x.reshape((4, -1)),  # type: ignore[attr-defined]
    "reshape_flat": lambda x: x.reshape((-1, 5)),  # type: ignore[attr-defined]
    "expand": lambda x: x.reshape((1, *x.shape)),  # type: ignore[attr-defined]
    "half": lambda x: x.astype(np.float16),  # type: ignore[attr-defined]
    "neg": lambda x: x.map(np.negative),  # type: ignore[attr-defined]
}


class _NumpyOps:
    """numpy behind LazyArray's op names, for `test_lazy_ops_match_numpy`."""

    def __init__(self, a: object) -> None:
        self.a = np.asarray(a.a if isinstance(a, _NumpyOps) else a)
        self.shape = self.a.shape

    def transpose(self, perm: tuple[int, ...]) -> np.ndarray:
        return np.transpose(self.a, perm)

    @property
    def T(self) -> np.ndarray:
        return self.a.T

    def take(self, idx: object, axis: int) -> np.ndarray:
        return np.take(self.a, idx, axis=axis)  # type: ignore[call-overload,no-any-return]

    def slice(self, slices: list[slice]) -> np.ndarray:
        return self.a[tuple(slices)]

    def reshape(self, shape: tuple[int, ...]) -> np.ndarray:
        return self.a.reshape(shape)

    def astype(self, dtype: object) -> np.ndarray:
        return self.a.astype(dtype)  # type: ignore[call-overload,no-any-return]

    def map(self, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        return fn(self.a)


_BASE = np.random.default_rng(0).standard_normal((4, 6, 5)).astype(np.float32)


def _on_numpy(names: tuple[str, ...]) -> np.ndarray | None:
    want = _BASE
    try:
        for name in names:
            want = np.asarray(_OPS[name](_NumpyOps(want)))
    except (ValueError, IndexError):
        return None  # not applicable to these shapes
    return want


_CHAINS = [
    c
    for c in [(a,) for a in _OPS] + [(a, b) for a in _OPS for b in _OPS]
    if _on_numpy(c) is not None
]


@pytest.mark.parametrize("chain", _CHAINS, ids=["-".join(c) for c in _CHAINS])
def test_lazy_ops_match_numpy(chain: tuple[str, ...]) -> None:
    w = _on_numpy(chain)
    assert w is not None
    got: object = lazy.const(_BASE)
    for name in chain:
        got = _OPS[name](got)
    assert isinstance(got, lazy.LazyArray)
    assert got.shape == w.shape and got.dtype == w.dtype
    np.testing.assert_array_equal(got.numpy(), w)
    _assert_bit_equal(lazy.to_float32(got), w.astype(np.float32), "to_float32")
    for e in range(w.shape[0]) if w.ndim else ():
        np.testing.assert_array_equal(got.expert(e).numpy(), w[e])
        _assert_bit_equal(lazy.to_float32(got.expert(e)), w[e].astype(np.float32), f"[{e}]")


def test_stack_and_expert_pushdown_reads_one_expert() -> None:
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal((6, 5)).astype(np.float16) for _ in range(3)]
    reads: list[int] = []

    def counted(i: int) -> lazy.LazyArray:
        t = ir.LazyTensor(
            lambda: (reads.append(i), ir.tensor(parts[i]))[1],
            dtype=ir.DataType.FLOAT16, shape=ir.Shape((6, 5)),
        )  # fmt: skip
        return lazy.source(t).T.astype(np.float32)

    stacked = lazy.stack([counted(i) for i in range(3)])
    assert stacked.shape == (3, 5, 6) and reads == []
    one = lazy.to_float32(stacked.expert(1))
    assert reads == [1]
    _assert_bit_equal(one, parts[1].T.astype(np.float32), "expert 1")
    _assert_bit_equal(
        lazy.to_float32(stacked), np.stack([p.T for p in parts]).astype(np.float32), "all"
    )


def test_expert_slice_of_plain_tensor_and_errors() -> None:
    arr = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    v = ir.Value(name="w", const_value=ir.tensor(arr))
    _assert_bit_equal(expert_slice(v, 1), arr[1].astype(np.float32), "plain")
    with pytest.raises(IndexError):
        expert_slice(v, 2)
    with pytest.raises(Exception, match="not a constant"):
        expert_slice(ir.Value(name="x"), 0)


def test_computed_runs_on_each_read_and_checks_its_declaration() -> None:
    runs: list[int] = []

    def value() -> np.ndarray:
        runs.append(1)
        return np.arange(6, dtype=np.uint32).reshape(2, 3)

    c = lazy.computed((2, 3), np.uint32, value)
    assert (c.shape, c.dtype, c.nbytes) == ((2, 3), np.dtype(np.uint32), 24) and not runs
    np.testing.assert_array_equal(c.numpy(), np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(c.expert(1).numpy(), [3, 4, 5])
    assert len(runs) == 2  # nothing cached
    with pytest.raises(ValueError, match="declared uint32"):
        lazy.computed((2, 3), np.uint32, lambda: np.zeros((2, 3), np.int64)).numpy()
    with pytest.raises(ValueError, match=r"\[3, 2\]"):
        lazy.computed((3, 2), np.uint32, value).numpy()
