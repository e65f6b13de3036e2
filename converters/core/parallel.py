"""The files of one folder written side by side: by threads of one process (``--workers``) and by
the processes of a ``torch.distributed`` job (a :class:`Group`), with the bytes one writer gives.

A folder format plans its files from the checkpoint alone — never from the number of workers or
ranks, so every split writes the same files — and hands the write of each file to
:func:`write_files` as a function that returns what the rest of the folder needs to know about it
(the digests of its tensors, for the index). Each rank writes the files :func:`assign` gives it on
``workers`` threads: the bytes move by kernel copies and BLAKE3 hashing, both of which release the
GIL, so threads are enough. Every rank learns every file's result, so rank 0 can write the index.
Writers call :func:`stop_if_asked` between tensors, so a failure or an interruption stops the other
threads' files within one tensor.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from .errors import ConverterError

T = TypeVar("T")

# One disk serves a few concurrent streams well and more of them only by seeking between them.
MAX_DEFAULT_WORKERS = 4


@runtime_checkable
class Group(Protocol):
    """Processes that write one destination together (the ranks of a ``torch.distributed`` job).

    Both methods are collectives: every rank calls them, in the same order. Values are small
    picklable Python objects (digests, file names, one-line error texts)."""

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        ...

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank (the others' ``value`` is ignored)."""
        ...


class RankFailed(ConverterError):
    """Another rank of the group could not write its part; this rank stops too."""


def default_workers() -> int:
    """Threads for a folder's files when none is asked: the CPUs this process may run on, at most
    ``MAX_DEFAULT_WORKERS`` (see there)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cpus))


def check_workers(workers: int) -> int:
    if type(workers) is not int or workers < 1:
        raise ConverterError(f"workers must be a positive number, got {workers!r}")
    return workers


def assign(sizes: Sequence[int], ranks: int) -> list[list[int]]:
    """Which files each rank writes (indices into ``sizes``, in file order): the largest file
    first onto the least loaded rank, ties to the lowest rank — the same answer on every rank."""
    shares: list[list[int]] = [[] for _ in range(ranks)]
    loads = [0] * ranks
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(ranks), key=lambda r: (loads[r], r))
        shares[rank].append(index)
        loads[rank] += sizes[index]
    return [sorted(share) for share in shares]


def write_files(
    jobs: Sequence[Callable[[], T]], sizes: Sequence[int], *, workers: int, group: Group | None = None
) -> list[T]:
    """Run this rank's share of ``jobs`` (``jobs[i]`` writes file ``i``; ``sizes[i]`` is its byte
    count, for balancing) on ``workers`` threads; return every file's result, on every rank.

    The first failure stops the rest: files not yet started never start, running ones stop at
    their next tensor (``stop_if_asked``), and the exception is re-raised (an interruption —
    Ctrl-C, SIGTERM — as it came, after at most ``GRACE_SECONDS`` of waiting for them). With a group,
    every rank raises when any rank failed (``RankFailed`` names it), so none goes on to write an
    index or publish a folder.
    """
    mine = assign(sizes, group.size)[group.rank] if group is not None else list(range(len(jobs)))
    if group is None:
        results = _run(jobs, mine, check_workers(workers))
        return [results[index] for index in range(len(jobs))]
    results = {}
    failure: BaseException | None = None
    try:
        results = _run(jobs, mine, check_workers(workers))
    except BaseException as exc:  # even Ctrl-C: told to the other ranks first, or they would wait forever
        failure = exc
    reports = gather(group, "files", _failure_text(failure) if failure is not None else results)
    if failure is not None:
        raise failure
    for rank, report in enumerate(reports):
        if isinstance(report, str):
            raise RankFailed(f"rank {rank} of {group.size} failed: {report}")
    gathered: dict[int, T] = {}
    for report in reports:
        gathered.update(report)
    return [gathered[index] for index in range(len(jobs))]


def gather(group: Group, phase: str, value: Any) -> list[Any]:
    """``group.all_gather`` of ``value``, checked to come from the same step (``phase``) on every
    rank: ranks out of step (a bug, or a rank that failed between two steps) stop with an error
    instead of reading one step's values as another's."""
    return _check_phase(group.all_gather((phase, value)), phase)


def from_rank_0(group: Group, phase: str, value: Any) -> Any:
    """``group.broadcast`` of rank 0's ``value``, checked like :func:`gather`."""
    return _check_phase([group.broadcast((phase, value))], phase)[0]


def _check_phase(received: list[Any], phase: str) -> list[Any]:
    for item in received:
        if not (isinstance(item, tuple) and len(item) == 2 and item[0] == phase):
            raise RankFailed(f"the ranks are out of step: expected their {phase!r} step, received {item!r:.80}")
    return [value for _, value in received]


class Stopped(Exception):
    """A file's write stopped because another file failed or the job was interrupted."""


_THREAD = threading.local()  # .stop: the Event of the write_files call this thread works for
GRACE_SECONDS = 5.0  # how long an interruption waits for running files to notice it


def stop_if_asked() -> None:
    """Called by writers between tensors: raise :class:`Stopped` when this thread's files are no
    longer wanted (another file failed, or Ctrl-C/SIGTERM reached the main thread)."""
    stop = getattr(_THREAD, "stop", None)
    if stop is not None and stop.is_set():
        raise Stopped("stopped: another file failed or the write was interrupted")


def _run(jobs: Sequence[Callable[[], T]], indices: list[int], workers: int) -> dict[int, T]:
    if workers == 1 or len(indices) <= 1:
        return {index: jobs[index]() for index in indices}  # in this thread: an interruption lands here
    pending = collections.deque(indices)
    lock = threading.Lock()
    results: dict[int, T] = {}
    failures: dict[int, BaseException] = {}
    stop, finished = threading.Event(), threading.Event()
    running = [min(workers, len(indices))]

    def work() -> None:
        _THREAD.stop = stop
        try:
            while not stop.is_set():
                with lock:
                    if not pending:
                        return
                    index = pending.popleft()
                try:
                    result = jobs[index]()
                except BaseException as exc:  # handed to the caller's thread
                    with lock:
                        failures[index] = exc
                    stop.set()
                else:
                    with lock:
                        results[index] = result
        finally:
            with lock:
                running[0] -= 1
                if running[0] == 0:
                    finished.set()

    # Daemon threads, not a ThreadPoolExecutor: after an interruption the process must be able to
    # exit while a copy is still inside the kernel (the executor's threads are joined at exit).
    try:
        for number in range(running[0]):
            threading.Thread(target=work, name=f"sdconvert-file-{number}", daemon=True).start()
        finished.wait()
    except BaseException:  # Ctrl-C, SIGTERM: running files stop at their next tensor
        stop.set()
        finished.wait(GRACE_SECONDS)
        raise
    real = {index: exc for index, exc in failures.items() if not isinstance(exc, Stopped)}
    if real or failures:
        # the first failure in file order: the same bad input gives the same message whatever the timing
        raise (real or failures)[min(real or failures)]
    return results


def _failure_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ConverterError) else f"{type(exc).__name__}: {exc}"


def serialized(progress: Callable[[int], None] | None) -> Callable[[int], None] | None:
    """``progress`` made safe to call from several threads at once (a progress bar is not)."""
    if progress is None:
        return None
    lock = threading.Lock()

    def report(count: int) -> None:
        with lock:
            progress(count)

    return report
