"""Pass infrastructure: passes, the context they share, the runner and the report.

A pass is a small class of configuration (its options are dataclass fields) with a kebab-case
``name``, the fact types it ``reads`` and ``writes`` (`modec.facts`), and
``run(model, ctx) -> PassResult``. Passes hold no state between runs: counters go to
``ctx.stats``, whole-model decisions to ``ctx.report``, typed results to ``ctx.facts``.

The runner checks before the first pass that every fact a pass reads is written by an
earlier pass (or given by the caller) and that the passes agree on shared options (one group
size, one set of widths); after each pass, that it wrote exactly the facts it declared. It
calls the instruments around each pass (`modec.instruments`: timing, IR dumps), wraps
failures with the names of the passes that ran before, and assembles one report. Pipelines
as text: `modec.pipeline_text`; the named pipelines: `modec.pipelines`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import onnx_ir as ir

from modec.distributed import Engine, SerialEngine, summarize
from modec.errors import InternalError, ModecError, UsageError
from modec.facts import Facts
from modec.instruments import Instrument, InterruptibleBar, NullBar, PassTimer, ProgressBar
from modec.interrupt import checkpoint
from modec.output import REPORT_SCHEMA
from modec.pipeline_text import format_value, parse_pass, split_top
from modec.streaming import default_max_memory

log = logging.getLogger(__name__)

R = TypeVar("R")


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (possibly new) model and whether it changed the graph."""

    model: ir.Model
    modified: bool


@dataclass
class PassRecord:
    """One executed pass, as the report shows it."""

    name: str
    text: str
    seconds: float
    modified: bool
    stats: dict[str, Any]
    #: the process's peak RSS while the pass ran (`modec.instruments.PeakRSS`) and how it
    #: was measured (``VmHWM``: the pass's own peak; ``ru_maxrss``: the process's so far).
    peak_rss_bytes: int = 0
    peak_rss_source: str = ""
    #: what the engine ran for the pass (`modec.distributed.summarize`): each map's label,
    #: tasks and wall seconds, and per worker its tasks and busy seconds; empty: none.
    workers: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunOptions:
    """Run-wide settings that no single pass owns.

    Attributes:
        seed: seeds every random choice (sensitivity subset, solver).
        threads: onnxruntime intra-op threads of the executors.
        cache_dir: where analysis results are cached by content hash; None: no cache.
        artifact_dir: where lower-tvm writes the artifact (the driver's temporary directory).
        pipeline: the pipeline text, recorded in the artifact's manifest.
        max_memory: bytes of activations the layer-streamed passes hold in RAM; past it
            they spill to memory-mapped files (`modec.streaming`).
        spill_dir: where spill files go (default: the system temp directory).
    """

    seed: int = 0
    threads: int = 2
    cache_dir: str | None = None
    artifact_dir: str | None = None
    pipeline: str = ""
    max_memory: int = field(default_factory=default_max_memory)
    spill_dir: str | None = None


@dataclass
class PassContext:
    """What the passes of one pipeline run share.

    Attributes:
        facts: the typed facts known so far (`modec.facts`); the caller gives the initial
            ones (the calibration set).
        options: run-wide settings.
        stats: per pass, named counters.
        report: per pass, the section it contributes to ``report.json``.
        instruments: hooks called around each pass (timing, IR dumps).
        progress: factory for progress bars ``progress(total, desc)``; a no-op by default.
        engine: where fanned-out tasks run (`modec.distributed`): in process by default, or
            on Ray (the driver opens it for ``--workers`` / ``--ray-address``).
    """

    facts: Facts = field(default_factory=Facts)
    options: RunOptions = field(default_factory=RunOptions)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    report: dict[str, dict[str, Any]] = field(default_factory=dict)
    instruments: list[Instrument] = field(default_factory=list)
    progress: Callable[[int, str], ProgressBar] | None = None
    engine: Engine = field(default_factory=SerialEngine)
    current: str = ""

    def stat(self, key: str, value: Any) -> None:
        """Record a named statistic of the running pass."""
        self.stats.setdefault(self.current, {})[key] = value

    def section(self) -> dict[str, Any]:
        """The running pass's section of the report (created on first use)."""
        return self.report.setdefault(self.current, {})

    def fork(self) -> PassContext:
        """A context for another pipeline over the same facts (later writes stay apart)."""
        return PassContext(
            facts=self.facts.copy(), options=self.options, progress=self.progress,
            instruments=list(self.instruments), engine=self.engine,
        )  # fmt: skip

    def map(
        self, fn: Callable[..., R], items: Sequence[Any], *args: Any, label: str,
        done: Callable[[int], None] | None = None,
    ) -> list[R]:  # fmt: skip
        """``[fn(item, *args) for item in items]`` on the run's engine, in item order
        (`modec.distributed.Engine.map`)."""
        if done is None:
            return self.engine.map(fn, items, *args, label=label)
        return self.engine.map(fn, items, *args, label=label, done=done)

    @contextmanager
    def bar(self, total: int, desc: str) -> Iterator[ProgressBar]:
        """A progress bar for a long step (silent unless the caller installed a factory).

        Every tick is also an interrupt `checkpoint`, so a Ctrl-C that Python could not
        raise where it landed stops a long step at its next tick, not at the end of the pass.
        """
        bar = self.progress(total, desc) if self.progress else NullBar()
        try:
            yield InterruptibleBar(bar)
        finally:
            bar.close()


class Pass(ABC):
    """Base class of every pass. Subclasses are dataclasses whose fields are the options."""

    name: ClassVar[str]
    #: The fact types (`modec.facts`) the pass reads; each must be written earlier.
    reads: ClassVar[tuple[type, ...]] = ()
    #: The fact types the pass writes; the runner checks it wrote exactly these.
    writes: ClassVar[tuple[type, ...]] = ()
    #: Options the pass no longer has, each with what replaced it (said when one is given).
    removed_options: ClassVar[dict[str, str]] = {}

    @abstractmethod
    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Run on ``model``; return the model and whether the graph was modified."""

    def options(self) -> dict[str, Any]:
        """The pass's options (its dataclass fields) and their values."""
        if not dataclasses.is_dataclass(self):
            return {}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def text(self) -> str:
        """``name`` or ``name{opt=value,...}`` with the options that differ from defaults."""
        if not dataclasses.is_dataclass(self):
            return self.name
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else f.default_factory()
                if f.default_factory is not dataclasses.MISSING
                else dataclasses.MISSING
            )
            if value != default:
                parts.append(f"{f.name}={format_value(value)}")
        return f"{self.name}{{{','.join(parts)}}}" if parts else self.name


#: Options that every pass having them must agree on (`Pipeline.validate`).
SHARED_OPTIONS = ("group_size", "bits")

#: Every registered pass by name.
REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to pipeline text."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise InternalError(f"two passes are named {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class Pipeline:
    """A named, ordered list of passes."""

    passes: list[Pass]
    name: str = "custom"

    @classmethod
    def parse(cls, text: str, name: str = "custom") -> Pipeline:
        """Passes from pipeline text (`modec.pipeline_text`); passes must be registered."""
        items = split_top(text)
        if not items:
            raise UsageError("empty pipeline; name at least one pass, e.g. find-moe")
        return cls([parse_pass(t, REGISTRY) for t in items], name)

    def text(self) -> str:
        return ",".join(p.text() for p in self.passes)

    def __str__(self) -> str:
        return self.text()

    def validate(self, given: Iterable[type] = ()) -> None:
        """Check the contracts before anything runs.

        1. Every fact a pass reads is given or written by an earlier pass (the error names
           the passes that write it).
        2. Options that several passes must agree on (`SHARED_OPTIONS`: one group size, one
           set of widths) have one value across the pipeline.
        """
        have = set(given)
        for i, p in enumerate(self.passes):
            missing = [r for r in p.reads if r not in have]
            if missing:
                earlier = [q.name for q in self.passes[:i]]
                writers = sorted(
                    q.name for q in REGISTRY.values() if any(m in q.writes for m in missing)
                )
                fix = (
                    f"put one of {writers} before it"
                    if writers
                    else "no pass writes it: the caller gives it (modec.driver.load_inputs "
                    "gives the Calibration)"
                )
                raise UsageError(
                    f"pass {p.name} reads {[m.__name__ for m in missing]} but no earlier pass "
                    f"writes it (earlier: {earlier or 'none'}); {fix}"
                )
            have.update(p.writes)
        for option in SHARED_OPTIONS:
            values = {p.name: v for p in self.passes if (v := p.options().get(option)) is not None}
            if len(set(values.values())) > 1:
                listed = ", ".join(f"{n} {option}={format_value(v)}" for n, v in values.items())
                raise UsageError(
                    f"the passes disagree on {option} ({listed}); give every pass the same {option}"
                )

    def run(self, model: ir.Model, ctx: PassContext) -> tuple[ir.Model, list[PassRecord]]:
        """Run every pass in order; return the final model and what ran."""
        self.validate(ctx.facts.kinds())
        timer = PassTimer()
        instruments = [timer, *ctx.instruments]
        records: list[PassRecord] = []
        for p in self.passes:
            checkpoint()  # a Ctrl-C swallowed inside the previous pass stops the run here
            ctx.current = p.name
            for inst in instruments:
                inst.before_pass(p, ctx)
            before = ctx.facts.ids()
            ctx.engine.take_records()  # what ran outside a pass is not this pass's
            try:
                with ctx.facts.restrict(p.name, p.reads):
                    result = p.run(model, ctx)
            except ModecError as exc:
                raise _with_history(exc, p, records) from exc
            except Exception as exc:
                ran = [r.name for r in records]
                raise InternalError(
                    f"pass {p.name} failed after {ran or 'no other pass'}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            _check_writes(p, before, ctx.facts.ids())
            for inst in instruments:
                inst.after_pass(p, ctx, result)
            seconds = timer.seconds[-1]
            rss = (timer.peak_rss_bytes[-1], timer.peak_rss_source[-1])
            stats = ctx.stats.get(p.name, {})
            maps = summarize(ctx.engine.take_records())
            records.append(
                PassRecord(p.name, p.text(), seconds, result.modified, stats, *rss, maps)
            )
            log.info("%s: %.2f s%s", p.name, seconds, " (modified)" if result.modified else "")
            model = result.model
        checkpoint()
        ctx.current = ""
        return model, records


def _check_writes(p: Pass, before: dict[type, int], after: dict[type, int]) -> None:
    """A pass writes exactly the facts it declares (a new value for each, nothing else)."""
    written = {k for k, v in after.items() if before.get(k) != v}
    declared = set(p.writes)
    if written != declared:
        extra = sorted(k.__name__ for k in written - declared)
        absent = sorted(k.__name__ for k in declared - written)
        raise InternalError(
            f"pass {p.name} broke its contract: wrote undeclared {extra or 'nothing'}, did not "
            f"write declared {absent or 'nothing'}; fix its `writes`"
        )


def _with_history(exc: ModecError, p: Pass, records: list[PassRecord]) -> ModecError:
    """The same error class, its message prefixed with the failing pass."""
    msg = f"{p.name}: {exc}"
    try:
        new = type(exc)(msg)
    except TypeError:
        return exc
    new.__dict__.update(exc.__dict__)
    return new


def build_report(
    pipeline: Pipeline,
    records: list[PassRecord],
    ctx: PassContext,
    options: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``report.json`` document (schema `REPORT_SCHEMA`, see docs/report.md)."""
    return {
        "schema": REPORT_SCHEMA,
        "pipeline": pipeline.text(),
        "pipeline_name": pipeline.name,
        "options": options,
        "passes": [dataclasses.asdict(r) for r in records],
        "sections": ctx.report,
        **(extra or {}),
    }


def json_text(doc: Any) -> str:
    """The canonical JSON text modec writes (sorted keys, numpy values as plain numbers)."""
    return json.dumps(doc, indent=2, sort_keys=True, default=_json_default) + "\n"


def write_json(path: str | os.PathLike[str], doc: Any) -> None:
    """Write JSON atomically (temp file in the same directory, then rename)."""
    dest = Path(path)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(json_text(doc))
    os.replace(tmp, dest)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
