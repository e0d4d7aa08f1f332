"""Instruments: what observes a pipeline run from outside the passes (TVM's PassInstrument).

Timing, IR dumps and progress are instruments, not code inside passes or the driver:

- `PassTimer` records each pass's wall time and peak resident memory (`PeakRSS`; the runner
  always installs one);
- `DumpIR` writes the graph after chosen passes (``modec compile --dump-ir-after PASS``);
- progress bars come from the context's ``progress`` factory and every tick is an interrupt
  checkpoint (`InterruptibleBar`).
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import sys
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


#: Writing "5" here resets the kernel's peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
CLEAR_REFS = "/proc/self/clear_refs"
#: Where the kernel reports VmHWM (peak RSS, kB).
PROC_STATUS = "/proc/self/status"
#: `PeakRSS.source` values: the interval's own peak, or the process's peak since it started.
VMHWM, RU_MAXRSS = "VmHWM", "ru_maxrss"


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (another C library)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def _trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc ``malloc_trim``; else none)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class PeakRSS:
    """The peak resident set size of this process over an interval (`reset`, then `peak`).

    Where ``/proc/self/clear_refs`` is writable, `reset` writes ``5`` to it, which sets the
    kernel's high-water mark (``VmHWM`` in ``/proc/self/status``) to the current RSS, so
    `peak` is the peak of the interval alone (``source`` ``"VmHWM"``). Elsewhere (not Linux,
    ``/proc`` read-only, a kernel before 4.0) `peak` falls back to ``ru_maxrss``, the peak
    since the process started (``source`` ``"ru_maxrss"``): an interval then shows a value
    only when it exceeds every earlier one. Only this process counts: memory of child
    processes (a compiler the lowering runs) is not included.

    The reset also lowers what ``getrusage`` reports as ``ru_maxrss`` for this process, for
    itself and, after it exits, for its parent (``/usr/bin/time``'s maximum resident set
    size is then the peak since the last reset). `overall` keeps the whole-process peak: the
    largest value read before any reset and since.
    """

    def __init__(self, clear_refs: str = CLEAR_REFS, status: str = PROC_STATUS) -> None:
        self._clear_refs = clear_refs
        self._status = status
        before = self._vmhwm()
        self.source = VMHWM if before is not None and self._reset() else RU_MAXRSS
        self._overall = before or 0

    def _reset(self) -> bool:
        try:
            with open(self._clear_refs, "w") as f:
                f.write("5")
        except OSError:
            return False
        return True

    def _vmhwm(self) -> int | None:
        try:
            with open(self._status) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
        return None

    def reset(self) -> None:
        """Start an interval (a no-op for the ``ru_maxrss`` fallback).

        The C heap is trimmed first: freed small allocations of the previous pass (glibc keeps
        them mapped) would otherwise count towards this pass's peak.
        """
        if self.source != VMHWM:
            return
        _trim_heap()
        self.peak()  # what the reset is about to erase goes into `overall` first
        if not self._reset():
            log.warning("cannot write %s any more; peak RSS is now the process peak",
                        self._clear_refs)  # fmt: skip
            self.source = RU_MAXRSS

    @property
    def overall(self) -> int:
        """The process's peak RSS in bytes since it started, resets notwithstanding."""
        return max(self._overall, self.peak())

    def peak(self) -> int:
        """Peak RSS in bytes since `reset` (``VmHWM``) or since the process started."""
        if self.source == VMHWM:
            hwm = self._vmhwm()
            if hwm is not None:
                self._overall = max(self._overall, hwm)
                return hwm
            self.source = RU_MAXRSS
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = int(maxrss if sys.platform == "darwin" else maxrss * 1024)  # macOS: bytes
        self._overall = max(self._overall, peak)
        return peak


class PassTimer(Instrument):
    """Wall-clock seconds and peak RSS of every pass, by position in the pipeline.

    ``peak_rss_bytes[i]`` is the largest resident set size of the process while pass ``i``
    ran, measured as `PeakRSS` says (``peak_rss_source`` names how: ``"VmHWM"``, the pass's
    own peak, or ``"ru_maxrss"``, the process's peak up to the end of the pass). `entry`
    gives both as the fields of the pass's report entry.
    """

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.peak_rss_bytes: list[int] = []
        self.peak_rss_source: list[str] = []
        self._rss = PeakRSS()
        self._t0 = 0.0

    def before_pass(self, p: Pass, ctx: PassContext) -> None:
        self._rss.reset()
        self._t0 = time.perf_counter()

    def after_pass(self, p: Pass, ctx: PassContext, result: PassResult) -> None:
        self.seconds.append(time.perf_counter() - self._t0)
        self.peak_rss_bytes.append(self._rss.peak())
        self.peak_rss_source.append(self._rss.source)

    @property
    def process_peak_bytes(self) -> int:
        """The whole process's peak RSS so far, including before the first pass (`overall`)."""
        return self._rss.overall

    def entry(self, i: int = -1) -> dict[str, Any]:
        """The report fields of pass ``i``: ``seconds``, ``peak_rss_bytes``, ``peak_rss_source``."""
        return {
            "seconds": self.seconds[i],
            "peak_rss_bytes": self.peak_rss_bytes[i],
            "peak_rss_source": self.peak_rss_source[i],
        }


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
