"""Ctrl-C that cannot be lost.

Python turns SIGINT into a ``KeyboardInterrupt`` raised wherever the main thread happens to
be. If that is inside a ``__del__`` or another callback whose exceptions Python ignores
(python-mip's ``Model.__del__`` runs after every allocate-bits solve, for one), the
interrupt is printed as "Exception ignored" and the compile carries on to write its output
as if nothing had happened.

`catch_sigint` (the CLI wraps every command in it) installs a handler that also records the
request; `checkpoint` raises ``KeyboardInterrupt`` again if one was recorded. The pass runner
calls it between passes and the writers call it just before they commit an output, so an
interrupt that was swallowed still stops the run before anything is written. Outside
`catch_sigint` (library use, where the caller owns SIGINT) `checkpoint` does nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

_requested = False


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _requested
    _requested = True
    if frame is not None and frame.f_code.co_name == "__del__":
        return  # Python would print and drop it; the next checkpoint raises it instead
    raise KeyboardInterrupt


@contextlib.contextmanager
def catch_sigint() -> Iterator[None]:
    """Record SIGINT for `checkpoint` while the block runs (main thread only; else a no-op)."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    _requested = False
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _requested = False


def checkpoint() -> None:
    """Raise ``KeyboardInterrupt`` if SIGINT arrived since `catch_sigint` began."""
    if _requested:
        raise KeyboardInterrupt
