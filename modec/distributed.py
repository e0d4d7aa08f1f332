"""Where the fanned-out work of a compile runs: in this process (default) or on Ray.

The passes do not know about Ray. They hand a list of independent tasks to the run's engine
(``ctx.engine``, or ``ctx.map``) and get the results back in the order of the items:

- ``engine.map(fn, items, *args, label=..., done=...)`` calls ``fn(item, *args)`` for every
  item and returns the results in item order, whatever order they finished in; ``done(i)``
  is called on the driver as item ``i`` finishes (progress bars count finished work of all
  workers);
- ``engine.share(value)`` stores a large read-only value once for every task of the run
  (`Shared`: in-process the value itself, on Ray one ``ray.put``); pass it in ``args``;
- ``engine.in_process`` says whether tasks run in this process (then they may use objects
  that cannot leave it, such as an executor with open sessions).

Engines:

1. `SerialEngine` (no ``--workers``, no ``--ray-address``): a plain loop in this process;
   Ray is never imported.
2. `RayEngine` (``modec compile --workers N``): starts a local Ray runtime with N CPUs (no
   dashboard, usage statistics off, its session and logs in a temporary directory removed
   after a clean run), or (``--ray-address ADDR|auto``) joins an existing cluster. A task
   reserves as many CPUs as it runs threads (below), so the tasks never oversubscribe the
   cores. Items go through the object store with their task; `Shared` values once per run.
   At most ``2 × CPUs`` tasks are in flight, so the store holds the inputs of those only
   (GPTQ's per-expert Hessians, not a layer's).
3. Faults: a task whose worker process dies is retried up to `RETRIES` times (Ray's
   ``max_retries``; tasks are pure functions of their inputs, so a retry returns the same
   bytes); an exception raised by the task itself is not retried and is re-raised as it
   was. A worker that keeps dying, a lost node or a cluster whose GCS stops answering for
   `GCS_GRACE` seconds is a one-line `ClusterError`; so is a cluster that cannot be reached
   at the start.

Determinism: results are gathered by item index, never in completion order, and every task
is the same function run with the same thread settings by both engines: ``threads`` threads
(``--threads``) in every library (`pinned_threads`: numpy's BLAS and the OpenMP pools through
threadpoolctl, torch's intra-op threads; the probes build their onnxruntime sessions with as
many). That is needed, not cosmetic: numpy's OpenBLAS gives other float32 products with one
thread than with two (δ moved by ~1e-8 relative, enough to flip an ILP tie on the bundled
model), so a task must compute with the same thread count wherever it runs. The output is
therefore a function of the inputs and ``--threads``, not of the engine, the number of
workers or nodes, or the cores of the machine (before engines, numpy and torch used one
thread per core). On Ray a task reserves ``threads`` CPUs: ``--workers 8 --threads 2`` runs
4 tasks at once; ``--threads 1`` gives the most tasks, and the same bytes as a serial
``--threads 1`` run.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from modec.errors import BadInputError, ModecError, UsageError

log = logging.getLogger(__name__)

__all__ = [
    "RETRIES",
    "ClusterError",
    "Engine",
    "EngineSpec",
    "MapRecord",
    "RayEngine",
    "SerialEngine",
    "Shared",
    "open_engine",
    "pinned_threads",
    "summarize",
]

T = TypeVar("T")
R = TypeVar("R")

#: How often a task whose worker died is run again before the run fails (Ray ``max_retries``).
RETRIES = 3
#: Environment variables set to the task's threads in every Ray worker process (BLAS,
#: OpenMP and MKL size their pools from them when they load, before any task runs).
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
#: Seconds to wait for a TCP connection to a cluster given by ``--ray-address``.
CONNECT_TIMEOUT = 5.0
#: While tasks run, the cluster's GCS is checked every this many seconds without a result;
#: unreachable for `GCS_GRACE` seconds in a row, the run stops with a `ClusterError`. (Ray's
#: own limit, after which it ends the driver process with pages of log, is set far above.)
HEALTH_INTERVAL = 5.0
GCS_GRACE = 20.0
#: The longest temp directory a local runtime's session goes in (else /tmp: socket paths).
SHORT_PATH = 40


class ClusterError(ModecError):
    """The Ray cluster cannot be used: unreachable, a worker that keeps dying, a lost node.

    Exit code 3, as for other inputs modec cannot use as given (`modec.errors`).
    """

    exit_code = BadInputError.exit_code


@dataclass(frozen=True)
class EngineSpec:
    """What the user asked for: ``--workers N`` (a local Ray runtime of N CPUs) or
    ``--ray-address ADDR`` (an existing cluster; ``auto`` finds a local one); neither: run
    in this process."""

    workers: int = 0
    address: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise UsageError(f"--workers {self.workers}: give a positive number of CPUs")
        if self.workers and self.address:
            raise UsageError(
                "give --workers N (a local Ray runtime) or --ray-address ADDR (an existing "
                "cluster), not both"
            )

    @property
    def distributed(self) -> bool:
        return bool(self.workers or self.address)


@dataclass(frozen=True)
class Shared(Generic[T]):
    """A read-only value stored once for every task that receives it (`Engine.share`).

    Attributes:
        ref: the value itself (in-process engine) or its Ray object reference.
    """

    ref: Any


@dataclass
class WorkerTime:
    """What one worker did in one map: tasks finished and seconds spent in them."""

    worker: str
    node: str
    tasks: int = 0
    seconds: float = 0.0


@dataclass
class MapRecord:
    """One `Engine.map` call, for the report: its label, tasks, wall time and per-worker
    busy time (``workers``, in order of first appearance)."""

    label: str
    tasks: int
    seconds: float
    workers: list[WorkerTime] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "tasks": self.tasks,
            "seconds": self.seconds,
            "workers": [vars(w).copy() for w in self.workers],
        }


def summarize(records: Sequence[MapRecord]) -> dict[str, Any]:
    """One pass's maps for the report: each map's label, tasks and wall seconds, and per
    worker (in order of first appearance) the tasks it ran and the seconds they took; an
    empty dict when the pass ran none."""
    if not records:
        return {}
    per: dict[str, WorkerTime] = {}
    for r in records:
        for w in r.workers:
            acc = per.setdefault(w.worker, WorkerTime(w.worker, w.node))
            acc.tasks += w.tasks
            acc.seconds += w.seconds
    return {
        "maps": [{"label": r.label, "tasks": r.tasks, "seconds": r.seconds} for r in records],
        "per_worker": [vars(w).copy() for w in per.values()],
    }


def _no_op(i: int) -> None:
    return None


class Engine(ABC):
    """Runs independent tasks; see the module docstring."""

    #: ``serial`` or ``ray``.
    kind: ClassVar[str]
    #: Whether tasks run in this process (they may then use unpicklable objects).
    in_process: ClassVar[bool]

    def __init__(self, threads: int | None = None) -> None:
        if threads is not None and threads < 1:
            raise UsageError(f"--threads {threads}: give at least 1")
        self._threads = threads
        self._records: list[MapRecord] = []

    @property
    def threads(self) -> int | None:
        """The threads every task runs with (`pinned_threads`); None: the thread pools are
        left as they are (only in process: an engine the caller made without a setting)."""
        return self._threads

    @property
    @abstractmethod
    def parallelism(self) -> int:
        """How many tasks run at once."""

    @abstractmethod
    def share(self, value: T) -> Shared[T]:
        """Store ``value`` once for the tasks that receive it in ``args``."""

    def map(
        self,
        fn: Callable[..., R],
        items: Sequence[Any],
        *args: Any,
        label: str,
        done: Callable[[int], None] = _no_op,
    ) -> list[R]:
        """``[fn(item, *args) for item in items]``, in item order (`Shared` args resolved).

        Args:
            fn: a module-level function (it is sent to the workers by reference).
            items: one task each.
            args: the same for every task: small values, or `Shared` handles.
            label: names the work in the report (``probes layer 3``).
            done: called with an item's index when its task finished.
        """
        t0 = time.perf_counter()
        out, workers = self._run(fn, items, args, label, done)
        self._records.append(MapRecord(label, len(items), time.perf_counter() - t0, workers))
        return out

    @abstractmethod
    def _run(
        self, fn: Callable[..., Any], items: Sequence[Any], args: tuple[Any, ...], label: str,
        done: Callable[[int], None],
    ) -> tuple[list[Any], list[WorkerTime]]:  # fmt: skip
        """`map`'s work: the results in item order and what each worker did."""

    def take_records(self) -> list[MapRecord]:
        """The maps run since the last call (the runner files them under the running pass)."""
        out, self._records = self._records, []
        return out

    def describe(self) -> dict[str, Any]:
        """The engine for the report: kind, parallelism and (Ray) the nodes."""
        return {"kind": self.kind, "parallelism": self.parallelism,
                "threads_per_task": self.threads}  # fmt: skip

    def close(self) -> None:
        """Release what the engine started (a local Ray runtime)."""
        return None


class SerialEngine(Engine):
    """Every task in this process, one after the other (what modec did before engines).

    Args:
        threads: the threads of every task (the run's ``--threads``); None leaves the
            thread pools as they are.
    """

    kind = "serial"
    in_process = True

    @property
    def parallelism(self) -> int:
        return 1

    def share(self, value: T) -> Shared[T]:
        return Shared(value)

    def _run(
        self, fn: Callable[..., Any], items: Sequence[Any], args: tuple[Any, ...], label: str,
        done: Callable[[int], None],
    ) -> tuple[list[Any], list[WorkerTime]]:  # fmt: skip
        resolved = [a.ref if isinstance(a, Shared) else a for a in args]
        local = WorkerTime("local", socket.gethostname())
        out: list[Any] = []
        for i, item in enumerate(items):
            t = time.perf_counter()
            with pinned_threads(self.threads):
                out.append(fn(item, *resolved))
            local.tasks += 1
            local.seconds += time.perf_counter() - t
            done(i)
        return out, [local]


@dataclass(frozen=True)
class _TaskResult:
    """What a Ray task sends back: the value, where and how long it ran, its log records."""

    value: Any
    worker: str
    node: str
    seconds: float
    logs: list[tuple[str, int, str]]


class _Capture(logging.Handler):
    """Collects a task's warnings so the driver can log them (Ray's own log streaming off)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.levelno, record.getMessage()))


@contextmanager
def pinned_threads(threads: int | None) -> Iterator[None]:
    """Run a task with ``threads`` threads in numpy's BLAS, every loaded OpenMP runtime and
    torch, restoring the previous settings after (the same in process and on Ray); None:
    change nothing."""
    if threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")  # the task's module imported it already, if it uses it
    before = torch.get_num_threads() if torch is not None else None
    with threadpool_limits(limits=threads):
        if torch is not None:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            if torch is not None:
                torch.set_num_threads(before)


def _run_task(fn: Callable[..., Any], item: Any, threads: int, *args: Any) -> _TaskResult:
    """The body of every Ray task: the task with ``threads`` threads, its warnings, its time."""
    import ray as _ray

    ray: Any = _ray  # partly typed: its helpers are untyped
    handler = _Capture()
    root = logging.getLogger()
    root.addHandler(handler)
    t0 = time.perf_counter()
    try:
        with pinned_threads(threads):
            value = fn(item, *args)
    finally:
        root.removeHandler(handler)
    ctx = ray.get_runtime_context()
    node = ray.util.get_node_ip_address()
    worker = f"{node}:{os.getpid()}"
    return _TaskResult(value, worker, ctx.get_node_id()[:12], time.perf_counter() - t0,
                       handler.records)  # fmt: skip


class RayEngine(Engine):
    """Tasks as Ray tasks on a local runtime (``workers``) or an existing cluster
    (``address``); see the module docstring.

    Args:
        workers: CPUs of the local runtime to start (0: join ``address``).
        address: ``host:port`` of a running cluster's GCS, ``ray://host:port``, or ``auto``.
        temp_root: where the local runtime's session directory (logs, sockets) goes.
        threads: the threads of every task (``--threads``); a task reserves as many CPUs.
    """

    kind = "ray"
    in_process = False

    def __init__(
        self,
        workers: int = 0,
        address: str | None = None,
        temp_root: str | None = None,
        threads: int = 1,
    ) -> None:
        super().__init__(threads)
        if workers and threads > workers:
            raise UsageError(
                f"a task runs --threads {threads} threads on as many CPUs, but --workers "
                f"{workers} gives {workers}: give --workers at least {threads} or lower --threads"
            )
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # read when Ray starts; never report
        # A lost GCS is noticed here (`GCS_GRACE`) and reported in one line, before Ray would
        # end this process for it (after 60 s, with pages of log).
        os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", "3600")
        try:
            import ray as _ray
        except ImportError as exc:
            raise BadInputError(
                "--workers and --ray-address need Ray: pip install -c constraints.txt "
                "'.[distributed]' in modec's checkout (the distributed extra)"
            ) from exc
        ray: Any = _ray  # partly typed: its helpers are untyped
        if ray.is_initialized():
            raise ClusterError(
                "Ray is already initialised in this process; modec starts or joins its own "
                "runtime (call ray.shutdown() first, or pass the engine's address)"
            )
        self.address = address
        self._owns_temp: str | None = None
        # The workers' pools start at the task's size (`pinned_threads` then has nothing to
        # change, and no idle thread of a larger pool spins on a shared core).
        env = {"env_vars": {k: str(threads) for k in THREAD_ENV}}
        if address:
            target = _reachable(address)
            try:
                # ``auto`` goes to Ray as given: only then does it use the local token of a
                # cluster with token authentication (Ray's rule for explicit addresses).
                ray.init(address="auto" if address == "auto" else target,
                         include_dashboard=False, logging_level=logging.ERROR,
                         log_to_driver=False, runtime_env=env, namespace="modec")  # fmt: skip
            except (ConnectionError, RuntimeError, ValueError) as exc:
                hint = ""
                if "auth" in str(exc).lower() or os.environ.get("RAY_AUTH_MODE") is None:
                    hint = (" (a cluster with token authentication, Ray's default, needs "
                            "RAY_AUTH_MODE=token and its token in ~/.ray/auth_token or "
                            "RAY_AUTH_TOKEN)")  # fmt: skip
                raise ClusterError(
                    f"cannot join the Ray cluster at {address}: {_line(exc)}{hint}"
                ) from exc
        else:
            # The compile's temp dir, if its path is short: Ray's socket paths inside it
            # (session_<date>_<pid>/sockets/plasma_store) must stay under 107 bytes.
            base = temp_root or tempfile.gettempdir()
            if len(base) > SHORT_PATH and os.path.isdir("/tmp"):
                base = "/tmp"
            self._owns_temp = tempfile.mkdtemp(prefix="modec-ray-", dir=base)
            try:
                ray.init(num_cpus=workers, num_gpus=0, include_dashboard=False,
                         _temp_dir=self._owns_temp, logging_level=logging.ERROR,
                         log_to_driver=False, runtime_env=env, namespace="modec")  # fmt: skip
            except Exception as exc:
                self._remove_temp(keep=True)
                raise ClusterError(f"could not start a local Ray runtime: {_line(exc)}") from exc
        self._ray = ray
        self._failed = False
        self._remote = ray.remote(_run_task).options(
            num_cpus=threads, max_retries=RETRIES, retry_exceptions=False
        )
        cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        # Tasks at once: on each node, as many as its CPUs hold tasks of ``threads`` CPUs.
        self._slots = sum(c // threads for c in cpus)
        if self._slots < 1:
            self.close()
            raise UsageError(
                f"a task runs --threads {threads} threads on as many CPUs, but no node of the "
                f"Ray cluster at {address} has {threads} CPUs: lower --threads"
            )
        self._gcs = str(ray.get_runtime_context().gcs_address)
        log.info("ray: %s, %d CPUs, %d task(s) of %d thread(s) at once",
                 address or "local runtime", sum(cpus), self._slots, threads)  # fmt: skip

    @property
    def parallelism(self) -> int:
        return self._slots

    def share(self, value: T) -> Shared[T]:
        return Shared(self._ray.put(value))

    def _run(
        self, fn: Callable[..., Any], items: Sequence[Any], args: tuple[Any, ...], label: str,
        done: Callable[[int], None],
    ) -> tuple[list[Any], list[WorkerTime]]:  # fmt: skip
        ray = self._ray
        refs_args = [a.ref if isinstance(a, Shared) else a for a in args]
        results: list[Any] = [None] * len(items)
        pending: dict[Any, int] = {}
        workers: dict[str, WorkerTime] = {}
        limit = 2 * self.parallelism
        nxt = 0
        try:
            while nxt < len(items) or pending:
                while nxt < len(items) and len(pending) < limit:
                    ref = self._remote.remote(fn, items[nxt], self.threads, *refs_args)
                    pending[ref] = nxt
                    nxt += 1
                finished, _ = ray.wait(list(pending), num_returns=1, timeout=HEALTH_INTERVAL)
                if not finished:
                    self._check_gcs(label)
                    continue
                self._unreachable_since = None
                for ref in finished:
                    i = pending.pop(ref)
                    res = self._get(ref, label)
                    results[i] = res.value
                    w = workers.setdefault(res.worker, WorkerTime(res.worker, res.node))
                    w.tasks += 1
                    w.seconds += res.seconds
                    for name, level, message in res.logs:
                        logging.getLogger(name).log(level, "%s", message)
                    done(i)
        except BaseException:
            self._failed = True
            for ref in pending:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # the cluster may be gone; nothing left to cancel then
                    log.debug("ray: could not cancel a task of %s", label, exc_info=True)
            raise
        return results, list(workers.values())

    _unreachable_since: float | None = None

    def _check_gcs(self, label: str) -> None:
        """Raise `ClusterError` once the GCS has not accepted a connection for `GCS_GRACE`
        seconds (a dead head, a lost network)."""
        host, _, port = self._gcs.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT):
                self._unreachable_since = None
                return
        except OSError as exc:
            now = time.monotonic()
            if self._unreachable_since is None:
                self._unreachable_since = now
            if now - self._unreachable_since >= GCS_GRACE:
                raise ClusterError(
                    f"{label}: the Ray cluster ({self.address or 'local runtime'}) stopped "
                    f"answering: its GCS at {self._gcs} is unreachable ({exc.strerror or exc}); "
                    "rerun to resume from what finished (kept in the cache directory)"
                ) from exc

    def _get(self, ref: Any, label: str) -> _TaskResult:
        """One finished task's result; Ray's failures as modec's errors."""
        from ray import exceptions as rx

        try:
            res: _TaskResult = self._ray.get(ref)
        except rx.RayTaskError as exc:  # the task raised: the same error, as if in process
            cause = exc.cause
            if isinstance(cause, BaseException):
                raise cause from None
            raise
        except (rx.WorkerCrashedError, rx.NodeDiedError, rx.ObjectLostError,
                rx.OwnerDiedError, rx.RaySystemError, rx.LocalRayletDiedError,
                rx.TaskCancelledError, rx.OutOfMemoryError) as exc:  # fmt: skip
            raise ClusterError(
                f"{label}: a Ray task failed after {RETRIES} retries ({type(exc).__name__}: "
                f"{_line(exc)}); rerun to resume from what finished (kept in the cache directory)"
            ) from exc
        return res

    def describe(self) -> dict[str, Any]:
        nodes = [
            {"node": n["NodeID"][:12], "address": n["NodeManagerAddress"],
             "cpus": int(n["Resources"].get("CPU", 0))}
            for n in self._ray.nodes() if n.get("Alive")
        ]  # fmt: skip
        return {**super().describe(), "address": self.address or "local", "nodes": nodes,
                "retries": RETRIES}  # fmt: skip

    def close(self) -> None:
        self._ray.shutdown()
        self._remove_temp(keep=self._failed)

    def _remove_temp(self, keep: bool) -> None:
        if self._owns_temp is None:
            return
        if keep:
            log.warning("ray: logs of the local runtime kept in %s", self._owns_temp)
        else:
            shutil.rmtree(self._owns_temp, ignore_errors=True)
        self._owns_temp = None


def _line(exc: BaseException) -> str:
    """The first line of an exception's message (Ray's can be pages long)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _reachable(address: str) -> str:
    """``address`` as Ray takes it, after checking that something listens there.

    Ray retries an unreachable GCS for minutes; a TCP connection with a short timeout
    turns that into an immediate one-line error. ``auto`` is resolved as Ray does (the
    latest local ``ray start``).
    """
    target = address
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address_or_die

        try:
            target = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError as exc:
            raise ClusterError(f"--ray-address auto: {_line(exc)}") from exc
    hostport = target.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise BadInputError(
            f"--ray-address {address!r}: expected HOST:PORT (the head's GCS, e.g. "
            "10.0.0.1:6379), ray://HOST:PORT or auto"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as exc:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); start it with "
            "`ray start --head` or check --ray-address"
        ) from exc
    return target


@contextmanager
def open_engine(
    spec: EngineSpec | None, threads: int, temp_root: str | None = None
) -> Iterator[Engine]:
    """The engine ``spec`` asks for, its tasks with ``threads`` threads (``--threads``),
    closed (a local runtime shut down) on exit."""
    engine: Engine
    if spec is None or not spec.distributed:
        engine = SerialEngine(threads)
    else:
        engine = RayEngine(spec.workers, spec.address, temp_root, threads)
    try:
        yield engine
    except BaseException:
        if isinstance(engine, RayEngine):
            engine._failed = True
        raise
    finally:
        engine.close()
