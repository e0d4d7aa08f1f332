"""Instruments: what observes a pipeline run from outside the passes (TVM's PassInstrument).

Timing, IR dumps and progress are instruments, not code inside passes or the driver:

- `PassTimer` records each pass's wall time (the runner always installs one);
- `DumpIR` writes the graph after chosen passes (``modec compile --dump-ir-after PASS``);
- progress bars come from the context's ``progress`` factory and every tick is an interrupt
  checkpoint (`InterruptibleBar`).
"""

from __future__ import annotations

import logging
import os
import time
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from modec.interrupt import checkpoint

if TYPE_CHECKING:
    from modec.pipeline import Pass, PassContext, PassResult

log = logging.getLogger(__name__)


class Instrument:
    """Hooks around each pass; subclasses override what they need."""

    def before_pass(self, p: Pass, ctx: PassContext) -> None:
        return None

    def after_pass(self, p: Pass, ctx: PassContext, result: PassResult) -> None:
        return None


class PassTimer(Instrument):
    """Wall-clock seconds of every pass, by position in the pipeline."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._t0 = 0.0

    def before_pass(self, p: Pass, ctx: PassContext) -> None:
        self._t0 = time.perf_counter()

    def after_pass(self, p: Pass, ctx: PassContext, result: PassResult) -> None:
        self.seconds.append(time.perf_counter() - self._t0)


class DumpIR(Instrument):
    """Writes the graph as ONNX after passes: ``NN-<pass>.onnx`` in ``directory``.

    Args:
        directory: where the files go (created on first dump).
        after: the pass names to dump after, or ``all``; by default every pass that
            modified the graph.
    """

    def __init__(
        self, directory: str | os.PathLike[str], after: Iterable[str] | None = None
    ) -> None:
        self.directory = Path(directory)
        self.after = None if after is None else frozenset(after)
        self.count = 0
        self.written: list[Path] = []

    def after_pass(self, p: Pass, ctx: PassContext, result: PassResult) -> None:
        self.count += 1
        if self.after is None:
            if not result.modified:
                return
        elif "all" not in self.after and p.name not in self.after:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self.count:02d}-{p.name}.onnx"
        ir.save(result.model, str(path))
        self.written.append(path)
        log.info("dumped IR after %s to %s", p.name, path)


class ProgressBar(typing.Protocol):
    def update(self, n: int = 1) -> Any: ...

    def close(self) -> Any: ...


class InterruptibleBar:
    """A progress bar whose every tick is an interrupt `checkpoint`."""

    def __init__(self, bar: ProgressBar) -> None:
        self._bar = bar

    def update(self, n: int = 1) -> Any:
        checkpoint()
        return self._bar.update(n)

    def close(self) -> Any:
        return self._bar.close()


class NullBar:
    """The progress bar when nobody watches."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass
