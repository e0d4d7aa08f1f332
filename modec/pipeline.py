"""Pass infrastructure: passes, the context they share, pipelines as text, and the runner.

A pass is a small class of configuration (its options are dataclass fields) with a kebab-case
``name``, the facts it ``reads`` and ``writes``, and ``run(model, ctx) -> PassResult``.
Passes hold no state between runs: counters go to ``ctx.stats``, per-node annotations to the
IR (``modec.*`` meta keys), whole-model decisions to ``ctx.report``.

A pipeline is a list of passes and can be written and printed as text, MLIR style::

    find-moe,canonicalize-moe,collect-routing{key_ratio=0.2},allocate-bits{budget=3.0,bits=2:3:4}

The runner checks that every fact a pass reads is written by an earlier pass (or given by
the caller), times each pass, optionally dumps the graph after each pass that changed it,
wraps failures with the names of the passes that ran before, and assembles one report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import onnx_ir as ir

from modec.errors import InternalError, ModecError, UsageError
from modec.interrupt import checkpoint

log = logging.getLogger(__name__)

REPORT_SCHEMA = "modec.report/1"


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


class Instrument:
    """Hooks around each pass (timing, IR dumps and progress are instruments)."""

    def before_pass(self, p: Pass, ctx: PassContext) -> None:
        return None

    def after_pass(self, p: Pass, ctx: PassContext, result: PassResult, seconds: float) -> None:
        return None


class DumpIR(Instrument):
    """Writes the graph as ONNX after every pass that modified it: ``NN-<pass>.onnx``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.count = 0

    def after_pass(self, p: Pass, ctx: PassContext, result: PassResult, seconds: float) -> None:
        self.count += 1
        if not result.modified:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self.count:02d}-{p.name}.onnx"
        ir.save(result.model, str(path))
        log.debug("dumped IR after %s to %s", p.name, path)


@dataclass
class PassContext:
    """What the passes of one pipeline run share.

    Attributes:
        facts: names of the facts available so far (initial ones come from the caller).
        artifacts: in-memory analysis results by fact name (routing statistics, ...).
        stats: per pass, named counters.
        report: per pass, the section it contributes to ``report.json``.
        options: run-wide options (seed, cache directory, ...).
        instruments: hooks called around each pass.
        progress: factory for progress bars ``progress(total, desc)``; a no-op by default.
    """

    facts: set[str] = field(default_factory=set)
    artifacts: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    report: dict[str, dict[str, Any]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    instruments: list[Instrument] = field(default_factory=list)
    progress: Callable[[int, str], ProgressBar] | None = None
    current: str = ""

    def stat(self, key: str, value: Any) -> None:
        """Record a named statistic of the running pass."""
        self.stats.setdefault(self.current, {})[key] = value

    def section(self) -> dict[str, Any]:
        """The running pass's section of the report (created on first use)."""
        return self.report.setdefault(self.current, {})

    @contextmanager
    def bar(self, total: int, desc: str) -> Iterator[ProgressBar]:
        """A progress bar for a long step (silent unless the caller installed a factory).

        Every tick is also an interrupt `checkpoint`, so a Ctrl-C that Python could not
        raise where it landed stops a long step at its next tick, not at the end of the pass.
        """
        bar = self.progress(total, desc) if self.progress else _NullBar()
        try:
            yield _InterruptibleBar(bar)
        finally:
            bar.close()


class ProgressBar(typing.Protocol):
    def update(self, n: int = 1) -> Any: ...

    def close(self) -> Any: ...


class _InterruptibleBar:
    def __init__(self, bar: ProgressBar) -> None:
        self._bar = bar

    def update(self, n: int = 1) -> Any:
        checkpoint()
        return self._bar.update(n)

    def close(self) -> Any:
        return self._bar.close()


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class Pass(ABC):
    """Base class of every pass. Subclasses are dataclasses whose fields are the options."""

    name: ClassVar[str]
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()

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
                parts.append(f"{f.name}={_format_value(value)}")
        return f"{self.name}{{{','.join(parts)}}}" if parts else self.name


#: Every registered pass by name.
REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to pipeline text."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise InternalError(f"two passes are named {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


def _format_value(value: Any) -> str:
    if isinstance(value, tuple | list):
        return ":".join(_format_value(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse_value(raw: str, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    try:
        if origin is tuple:
            return tuple(_parse_value(v, args[0], where) for v in raw.split(":") if v)
        if origin is typing.Literal:
            if raw not in args:
                raise ValueError(f"choose from {list(args)}")
            return raw
        if annotation is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            return raw.lower() in ("true", "1")
        if annotation is int:
            return int(raw)
        if annotation is float:
            return float(raw)
        if args and type(None) in args:  # Optional[X]
            if raw in ("", "none", "None"):
                return None
            inner = next(a for a in args if a is not type(None))
            return _parse_value(raw, inner, where)
        return raw
    except ValueError as exc:
        raise UsageError(f"{where}: bad value {raw!r} ({exc})") from exc


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside braces."""
    out: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def parse_pass(text: str) -> Pass:
    """One pass from ``name`` or ``name{opt=value,...}``."""
    name, _, rest = text.partition("{")
    name = name.strip()
    if name not in REGISTRY:
        raise UsageError(f"unknown pass {name!r}; known passes: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    kwargs: dict[str, Any] = {}
    if rest:
        if not rest.endswith("}"):
            raise UsageError(f"pass {text!r}: missing '}}'")
        hints = typing.get_type_hints(cls)
        fields: set[str] = (
            {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        )
        for item in _split_top(rest[:-1]):
            key, eq, raw = item.partition("=")
            key = key.strip()
            if not eq or key not in fields:
                raise UsageError(
                    f"pass {name}: unknown option {key!r}; options: {', '.join(sorted(fields))}"
                )
            kwargs[key] = _parse_value(raw.strip(), hints[key], f"pass {name} option {key}")
    try:
        return cls(**kwargs)
    except ModecError:
        raise
    except (TypeError, ValueError) as exc:
        raise UsageError(f"pass {name}: {exc}") from exc


@dataclass
class Pipeline:
    """A named, ordered list of passes."""

    passes: list[Pass]
    name: str = "custom"

    @classmethod
    def parse(cls, text: str, name: str = "custom") -> Pipeline:
        items = _split_top(text)
        if not items:
            raise UsageError("empty pipeline; name at least one pass, e.g. find-moe")
        return cls([parse_pass(t) for t in items], name)

    def text(self) -> str:
        return ",".join(p.text() for p in self.passes)

    def __str__(self) -> str:
        return self.text()

    def validate(self, given: Iterable[str] = ()) -> None:
        """Every fact a pass reads must be given or written by an earlier pass."""
        have = set(given)
        for i, p in enumerate(self.passes):
            missing = [r for r in p.reads if r not in have]
            if missing:
                earlier = [q.name for q in self.passes[:i]]
                writers = sorted(
                    q.name for q in REGISTRY.values() if any(m in q.writes for m in missing)
                )
                raise UsageError(
                    f"pass {p.name} reads {missing} but no earlier pass writes it (earlier: "
                    f"{earlier or 'none'}); put one of {writers or ['?']} before it"
                )
            have.update(p.writes)

    def run(self, model: ir.Model, ctx: PassContext) -> tuple[ir.Model, list[PassRecord]]:
        """Run every pass in order; return the final model and what ran."""
        self.validate(ctx.facts)
        records: list[PassRecord] = []
        for p in self.passes:
            checkpoint()  # a Ctrl-C swallowed inside the previous pass stops the run here
            ctx.current = p.name
            for inst in ctx.instruments:
                inst.before_pass(p, ctx)
            t0 = time.perf_counter()
            try:
                result = p.run(model, ctx)
            except ModecError as exc:
                raise _with_history(exc, p, records) from exc
            except Exception as exc:
                ran = [r.name for r in records]
                raise InternalError(
                    f"pass {p.name} failed after {ran or 'no other pass'}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            seconds = time.perf_counter() - t0
            for inst in ctx.instruments:
                inst.after_pass(p, ctx, result, seconds)
            ctx.facts.update(p.writes)
            records.append(
                PassRecord(p.name, p.text(), seconds, result.modified, ctx.stats.get(p.name, {}))
            )
            log.info("%s: %.2f s%s", p.name, seconds, " (modified)" if result.modified else "")
            model = result.model
        checkpoint()
        ctx.current = ""
        return model, records


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
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``report.json`` document (schema `REPORT_SCHEMA`, see docs/report.md)."""
    return {
        "schema": REPORT_SCHEMA,
        "pipeline": pipeline.text(),
        "pipeline_name": pipeline.name,
        "options": ctx.options,
        "passes": [dataclasses.asdict(r) for r in records],
        "sections": ctx.report,
        **(extra or {}),
    }


def write_json(path: str | os.PathLike[str], doc: Any) -> None:
    """Write JSON atomically (temp file in the same directory, then rename)."""
    dest = Path(path)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True, default=_json_default) + "\n")
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
