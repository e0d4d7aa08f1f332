"""Pass infrastructure: pipeline text, typed contracts, timing records, errors, IR dumps."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir
import pytest

from modec import pipeline as pl
from modec.errors import BadInputError, InternalError, UsageError
from modec.facts import FACT_TYPES, CanonicalMoE, Facts, MoELayers
from modec.instruments import DumpIR
from modec.interrupt import catch_sigint, checkpoint


def _tiny_model() -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    node = ir.Node("", "Relu", [x], num_outputs=1)
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 18}, name="g")
    return ir.Model(graph, ir_version=10)


@pl.register
@dataclass
class _WriteFact(pl.Pass):
    name = "test-write-fact"
    writes = (CanonicalMoE,)
    count: int = 1

    def run(self, model, ctx):
        ctx.facts.put(CanonicalMoE(("moe0",)))
        ctx.stat("count", self.count)
        ctx.section()["seen"] = True
        return pl.PassResult(model, modified=False)


@pl.register
@dataclass
class _ReadFact(pl.Pass):
    name = "test-read-fact"
    reads = (CanonicalMoE,)
    mode: Literal["fast", "exact"] = "fast"
    ratio: float = 0.2
    widths: tuple[int, ...] = (2, 3, 4)
    flag: bool = False

    def run(self, model, ctx):
        return pl.PassResult(model, modified=False)


@pl.register
@dataclass
class _Rename(pl.Pass):
    name = "test-rename"

    def run(self, model, ctx):
        model.graph.name = "renamed"
        return pl.PassResult(model, modified=True)


@pl.register
@dataclass
class _Boom(pl.Pass):
    name = "test-boom"
    user_error: bool = False

    def run(self, model, ctx):
        if self.user_error:
            raise BadInputError("budget 1.5 is infeasible; raise --budget")
        raise RuntimeError("kaboom")


def test_text_round_trip_keeps_non_default_options():
    text = "test-write-fact,test-read-fact{mode=exact,ratio=0.3,widths=2:4,flag=true}"
    p = pl.Pipeline.parse(text)
    assert p.text() == text
    read = p.passes[1]
    assert isinstance(read, _ReadFact)
    assert (read.mode, read.ratio, read.widths, read.flag) == ("exact", 0.3, (2, 4), True)
    assert pl.Pipeline.parse(p.text()).text() == text
    assert pl.Pipeline.parse("test-write-fact{count=1}").text() == "test-write-fact"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("no-such-pass", "unknown pass 'no-such-pass'"),
        ("test-read-fact{speed=1}", "unknown option 'speed'"),
        ("test-read-fact{mode=slow}", "bad value 'slow'"),
        ("test-read-fact{ratio=abc}", "bad value 'abc'"),
        ("", "empty pipeline"),
    ],
)
def test_bad_pipeline_text(text, message):
    with pytest.raises(UsageError, match=message):
        pl.Pipeline.parse(text)


def test_reads_need_an_earlier_writer():
    p = pl.Pipeline.parse("test-read-fact,test-write-fact")
    with pytest.raises(
        UsageError,
        match=r"reads \['CanonicalMoE'\].*put one of \[[^]]*'test-write-fact'[^]]*\] before",
    ):
        p.validate()
    p.validate(given={CanonicalMoE})  # a fact supplied by the caller is enough


@pl.register
@dataclass
class _Liar(pl.Pass):
    """Declares one fact and writes another (or nothing)."""

    name = "test-liar"
    writes = (CanonicalMoE,)
    write_other: bool = True

    def run(self, model, ctx):
        if self.write_other:
            ctx.facts.put(MoELayers(()))
        return pl.PassResult(model, modified=False)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "test-liar",
            r"wrote undeclared \['MoELayers'\], did not write declared \['CanonicalMoE'\]",
        ),
        ("test-liar{write_other=false}", r"wrote undeclared nothing, did not write declared"),
    ],
)
def test_a_pass_must_write_exactly_what_it_declares(text, message):
    with pytest.raises(InternalError, match=message):
        pl.Pipeline.parse(text).run(_tiny_model(), pl.PassContext())


@pl.register
@dataclass
class _Sneak(pl.Pass):
    """Reads a fact it did not declare."""

    name = "test-sneak"

    def run(self, model, ctx):
        ctx.facts.get(CanonicalMoE)
        return pl.PassResult(model, modified=False)


def test_a_pass_reads_only_what_it_declares():
    with pytest.raises(InternalError, match="test-sneak reads CanonicalMoE without declaring"):
        pl.Pipeline.parse("test-write-fact,test-sneak").run(_tiny_model(), pl.PassContext())


def test_facts_are_typed():
    facts = Facts(CanonicalMoE(("a",)))
    assert facts.get(CanonicalMoE).nodes == ("a",)
    assert facts.find(MoELayers) is None
    with pytest.raises(InternalError, match="no MoELayers fact"):
        facts.get(MoELayers)
    with pytest.raises(InternalError, match="dict is not a fact type"):
        facts.put({"moe.nodes": 1})


def test_passes_must_agree_on_group_size_and_bits():
    import modec.passes  # noqa: F401  (registers the real passes)

    text = "allocate-bits{group_size=64},quantize-experts"
    with pytest.raises(
        UsageError,
        match=r"disagree on group_size \(allocate-bits group_size=64, quantize-experts "
        r"group_size=128\)",
    ):
        pl.Pipeline.parse(text).validate(given=FACT_TYPES)
    text = "measure-sensitivity{bits=2:4},allocate-bits"
    with pytest.raises(UsageError, match=r"disagree on bits"):
        pl.Pipeline.parse(text).validate(given=FACT_TYPES)


def test_every_named_pipeline_round_trips_through_text():
    from modec.pipelines import PIPELINES, CompileOptions, parse_pipeline, standard_pipeline

    for name in PIPELINES:
        for o in (
            CompileOptions(method=name),
            CompileOptions(method=name, budget=4.0, bits=(2, 4), group_size=64, target="none"),
        ):
            if name == "uniform" and o.budget != int(o.budget):
                continue
            p = standard_pipeline(o)
            again = parse_pipeline(p.text())
            assert again.text() == p.text()
            assert [type(q) for q in again.passes] == [type(q) for q in p.passes]
            assert [q.options() for q in again.passes] == [q.options() for q in p.passes]
            p.validate(given=(pl.REGISTRY["collect-routing"].reads[-1],))


def test_run_records_passes_stats_and_report(tmp_path):
    p = pl.Pipeline.parse("test-write-fact{count=3},test-read-fact,test-rename")
    ctx = pl.PassContext(instruments=[DumpIR(tmp_path / "dump")])
    model, records = p.run(_tiny_model(), ctx)
    assert [r.name for r in records] == ["test-write-fact", "test-read-fact", "test-rename"]
    assert [r.modified for r in records] == [False, False, True]
    assert records[0].stats == {"count": 3}
    assert all(r.seconds >= 0 for r in records)
    assert model.graph.name == "renamed"
    # Only the pass that modified the graph is dumped.
    assert [f.name for f in (tmp_path / "dump").iterdir()] == ["03-test-rename.onnx"]
    report = pl.build_report(p, records, ctx, {"seed": 0})
    assert report["schema"] == pl.REPORT_SCHEMA
    assert report["pipeline"] == p.text()
    assert [x["name"] for x in report["passes"]] == [r.name for r in records]
    assert report["sections"]["test-write-fact"] == {"seen": True}
    assert report["options"] == {"seed": 0}


def test_dump_ir_after_named_passes(tmp_path):
    p = pl.Pipeline.parse("test-write-fact,test-read-fact,test-rename")
    dump = DumpIR(tmp_path / "dump", after=["test-read-fact"])
    p.run(_tiny_model(), pl.PassContext(instruments=[dump]))
    # Named passes are dumped whether or not they modified the graph; others are not.
    assert [f.name for f in (tmp_path / "dump").iterdir()] == ["02-test-read-fact.onnx"]
    every = DumpIR(tmp_path / "all", after=["all"])
    p.run(_tiny_model(), pl.PassContext(instruments=[every]))
    assert sorted(f.name for f in (tmp_path / "all").iterdir()) == [
        "01-test-write-fact.onnx", "02-test-read-fact.onnx", "03-test-rename.onnx",
    ]  # fmt: skip
    assert ir.load(str(tmp_path / "all" / "03-test-rename.onnx")).graph.name == "renamed"


def test_failures_name_the_pass_and_what_ran_before():
    p = pl.Pipeline.parse("test-write-fact,test-boom")
    with pytest.raises(InternalError, match=r"pass test-boom failed after \['test-write-fact'\]"):
        p.run(_tiny_model(), pl.PassContext())
    p = pl.Pipeline.parse("test-write-fact,test-boom{user_error=true}")
    with pytest.raises(BadInputError, match=r"^test-boom: budget 1\.5 is infeasible"):
        p.run(_tiny_model(), pl.PassContext())


def test_write_json_is_atomic_and_handles_numpy(tmp_path):
    import json

    import numpy as np

    path = tmp_path / "r.json"
    pl.write_json(path, {"a": np.int64(3), "b": np.arange(2), "c": {1, 0}})
    assert json.loads(path.read_text()) == {"a": 3, "b": [0, 1], "c": [0, 1]}
    assert [f.name for f in tmp_path.iterdir()] == ["r.json"]


class _RaisesSigintWhenCollected:
    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)  # Python cannot raise out of __del__


@pl.register
@dataclass
class _SwallowsSigint(pl.Pass):
    name = "test-swallows-sigint"

    def run(self, model, ctx):
        _RaisesSigintWhenCollected()
        ctx.stat("ran", True)
        return pl.PassResult(model, modified=False)


def test_sigint_swallowed_by_a_finalizer_is_raised_at_the_next_checkpoint():
    checkpoint()  # outside catch_sigint nothing is recorded and nothing raised
    with catch_sigint():
        _RaisesSigintWhenCollected()
        with pytest.raises(KeyboardInterrupt):
            checkpoint()
    checkpoint()  # the request ends with the block


def test_pipeline_stops_between_passes_after_a_swallowed_sigint():
    ctx = pl.PassContext()
    p = pl.Pipeline.parse("test-swallows-sigint,test-write-fact")
    with catch_sigint(), pytest.raises(KeyboardInterrupt):
        p.run(_tiny_model(), ctx)
    assert ctx.stats["test-swallows-sigint"] == {"ran": True}
    assert "test-write-fact" not in ctx.stats


def test_progress_tick_is_a_checkpoint_and_interrupted_results_are_not_cached(tmp_path):
    from modec import cache

    ticks: list[int] = []
    entry = tmp_path / "sensitivity-x.npz"
    ctx = pl.PassContext()
    with catch_sigint(), pytest.raises(KeyboardInterrupt), ctx.bar(3, "work") as bar:
        for i in range(3):
            if i == 1:
                _RaisesSigintWhenCollected()
            ticks.append(i)
            bar.update(1)
    assert ticks == [0, 1]  # the tick after the swallowed SIGINT stopped the loop
    with catch_sigint():
        _RaisesSigintWhenCollected()
        with pytest.raises(KeyboardInterrupt):
            cache.store(entry, "key", {"a": np.zeros(2)})
    assert not entry.exists() and list(tmp_path.iterdir()) == []
