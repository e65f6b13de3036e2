"""Folders written side by side: ``--workers`` threads and the ranks of a ``torch.distributed`` job.

Whatever the split — one process, N threads, N ranks (simulated here by threads with a shared
in-memory group, and for real by ``torchrun`` on gloo) — the destination's files are the same
bytes, the folder appears atomically, and a failure anywhere leaves nothing behind on any rank.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_bit_identical
from safetensors.torch import save_file

import converters
from converters.core import parallel
from converters.core.errors import ConverterError, DestinationError
from converters.formats.safetensors import FORMAT as SAFETENSORS

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / "cli.py"
SHARD = "16KB"


class SharedGroup:
    """The collectives of ``core.parallel.Group`` between threads of this process (one per rank).
    Values go through pickle, as they do between processes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._barrier = threading.Barrier(size, timeout=60)
        self._slots: list[bytes] = [b""] * size

    def member(self, rank: int) -> Member:
        return Member(self, rank)

    def exchange(self, rank: int, value: Any) -> list[Any]:
        self._slots[rank] = pickle.dumps(value)
        self._barrier.wait()
        gathered = [pickle.loads(slot) for slot in self._slots]
        self._barrier.wait()  # nobody overwrites a slot before everyone read it
        return gathered


class Member:
    def __init__(self, shared: SharedGroup, rank: int) -> None:
        self._shared, self.rank, self.size = shared, rank, shared.size

    def all_gather(self, value: Any) -> list[Any]:
        return self._shared.exchange(self.rank, value)

    def broadcast(self, value: Any) -> Any:
        return self._shared.exchange(self.rank, value)[0]


def on_ranks(size: int, job: Callable[[Member], Any]) -> list[Any]:
    """``job(group member)`` on ``size`` threads at once; each rank's result or exception."""
    shared = SharedGroup(size)
    outcomes: list[Any] = [None] * size

    def run(rank: int) -> None:
        try:
            outcomes[rank] = job(shared.member(rank))
        except BaseException as exc:  # kept and looked at by the test
            outcomes[rank] = exc

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return outcomes


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """Twelve tensors of uneven sizes (so shards are uneven), some without stored digests."""
    torch.manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(16 * (1 + i % 5), 64) for i in range(12)}
    tensors["scale"] = torch.tensor(2.5, dtype=torch.bfloat16)
    path = tmp_path / "source.safetensors"
    save_file(tensors, path)  # written by safetensors itself: no digests, so every one is computed
    return path


@pytest.fixture
def reference(tmp_path: Path, source: Path) -> dict[str, bytes]:
    out = converters.convert(source, tmp_path / "one", max_shard_size=SHARD, workers=1)
    assert len(list(out.iterdir())) > 5
    return folder_bytes(out)


def no_leftovers(folder: Path) -> None:
    assert [p.name for p in folder.iterdir() if ".partial" in p.name] == []


# ----------------------------------------------------------------------------- the split


@pytest.mark.parametrize("ranks", [1, 2, 3, 5, 13])
def test_every_file_goes_to_exactly_one_rank(ranks: int) -> None:
    sizes = [5, 1, 9, 9, 3, 0, 7, 2, 8, 4, 6]
    shares = parallel.assign(sizes, ranks)
    assert len(shares) == ranks
    assert sorted(i for share in shares for i in share) == list(range(len(sizes)))
    assert shares == parallel.assign(list(sizes), ranks)  # every rank computes the same
    loads = [sum(sizes[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(sizes)  # greedy largest-first: within one file


def test_default_workers_follow_the_cpus_this_process_may_use() -> None:
    expected = min(parallel.MAX_DEFAULT_WORKERS, len(os.sched_getaffinity(0)))
    assert parallel.default_workers() == expected


def test_thread_results_come_back_in_file_order() -> None:
    gate = threading.Event()

    def job(index: int) -> Callable[[], int]:
        def run() -> int:
            if index == 0:
                gate.wait(10)  # the first file finishes last
            else:
                gate.set()
            return index * 10

        return run

    assert parallel.write_files([job(i) for i in range(6)], [1] * 6, workers=3) == [0, 10, 20, 30, 40, 50]


def test_a_failing_file_is_raised_after_the_running_ones_finish() -> None:
    finished: list[int] = []

    def job(index: int) -> Callable[[], int]:
        def run() -> int:
            if index == 1:
                raise ConverterError("shard 1 is broken")
            finished.append(index)
            return index

        return run

    with pytest.raises(ConverterError, match="shard 1 is broken"):
        parallel.write_files([job(i) for i in range(2)], [1, 1], workers=2)
    assert finished == [0]


def test_a_failure_stops_the_other_threads_at_their_next_tensor() -> None:
    seen: list[BaseException] = []
    started = threading.Event()

    def failing() -> None:
        started.wait(10)
        raise ConverterError("file 0 is broken")

    def long_file() -> None:
        started.set()
        try:
            for _ in range(10_000):  # a file of many tensors: the writer asks before each one
                parallel.stop_if_asked()
                threading.Event().wait(0.001)
        except parallel.Stopped as exc:
            seen.append(exc)
            raise

    with pytest.raises(ConverterError, match="file 0 is broken"):
        parallel.write_files([failing, long_file], [1, 1], workers=2)
    assert len(seen) == 1  # stopped, not run to its end


def test_an_interruption_does_not_wait_for_a_copy_stuck_in_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    import _thread

    monkeypatch.setattr(parallel, "GRACE_SECONDS", 0.05)
    released = threading.Event()

    def stuck() -> None:
        released.wait(60)  # as a copy_file_range that takes long: no tensor boundary to stop at

    def interrupting() -> None:
        _thread.interrupt_main()  # Ctrl-C, delivered to the caller's thread as KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        parallel.write_files([stuck, interrupting], [1, 1], workers=2)
    assert not released.is_set()  # write_files returned while the stuck file was still running
    released.set()


@pytest.mark.parametrize("workers", [0, -1, "2"])
def test_workers_must_be_a_positive_number(tmp_path: Path, source: Path, workers: Any) -> None:
    with pytest.raises(ConverterError, match="workers must be a positive number"):
        converters.convert(source, tmp_path / "out", max_shard_size=SHARD, workers=workers)


def test_the_cli_refuses_a_bad_worker_count(tmp_path: Path, source: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(CLI), "convert", str(source), str(tmp_path / "out"), "--to", "safetensors",
         "--max-shard-size", SHARD, "--workers", "0"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--workers: expected a positive whole number, got '0'" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- threads


@pytest.mark.parametrize("workers", [2, 3, 8])
def test_threads_write_the_same_bytes_as_one_writer(
    tmp_path: Path, source: Path, reference: dict[str, bytes], workers: int
) -> None:
    out = converters.convert(source, tmp_path / f"w{workers}", max_shard_size=SHARD, workers=workers)
    assert folder_bytes(out) == reference
    assert converters.verify(source, out) == []
    assert converters.verify(out, None, deep=True) == []


def test_progress_from_threads_adds_up(tmp_path: Path, source: Path) -> None:
    reports: list[tuple[int, int]] = []
    converters.convert(
        source, tmp_path / "out", max_shard_size=SHARD, workers=4, progress=lambda *report: reports.append(report)
    )
    total = reports[-1][1]
    assert (
        sum(done for done, _ in reports)
        == total
        == source.stat().st_size - 8 - int.from_bytes(source.read_bytes()[:8], "little")
    )


def test_a_failing_shard_leaves_no_folder(tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = SAFETENSORS.write_file

    def failing(checkpoint: Any, path: Path, *args: Any, **kwargs: Any) -> None:
        if path.name.startswith("model-00003-"):
            raise OSError(28, "No space left on device", str(path))
        original(checkpoint, path, *args, **kwargs)

    monkeypatch.setattr(SAFETENSORS, "write_file", failing)
    with pytest.raises(DestinationError, match="no space left"):
        converters.convert(source, tmp_path / "out", max_shard_size=SHARD, workers=3)
    assert not (tmp_path / "out").exists()
    no_leftovers(tmp_path)


def test_a_worker_still_writing_after_ctrl_c_puts_nothing_back(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while a worker thread is inside the fsync of a shard (a slow disk): the caller gives
    up waiting, removes the staging folder, and the worker, when it wakes, must not rename its
    finished shard back into it."""
    import _thread

    monkeypatch.setattr(parallel, "GRACE_SECONDS", 0.05)
    real_fsync, woken, done = os.fsync, threading.Event(), threading.Event()
    main = threading.main_thread()

    def slow_fsync(fd: int) -> None:
        if threading.current_thread() is not main and not woken.is_set():
            woken.set()
            _thread.interrupt_main()
            done.wait(30)  # the caller has cleaned up by now
        real_fsync(fd)

    from converters.core import atomic

    published_late: list[str] = []
    real_publish = atomic._publish

    def publish(pairs: Any, *args: Any) -> None:
        if done.is_set():  # renaming into a staging folder that may be being deleted: the race
            published_late.extend(target.name for _, target in pairs)
        real_publish(pairs, *args)

    monkeypatch.setattr(atomic, "_publish", publish)
    monkeypatch.setattr(os, "fsync", slow_fsync)
    with pytest.raises(KeyboardInterrupt):
        converters.convert(source, tmp_path / "out", max_shard_size=SHARD, workers=2)
    done.set()
    for thread in threading.enumerate():
        if thread.name.startswith("sdconvert-file"):
            thread.join(30)
    assert published_late == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.safetensors"]


@pytest.mark.parametrize("destination", ["safetensors", "dcp"])
def test_rank_0_does_not_reread_what_other_ranks_cast(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch, destination: str
) -> None:
    from converters.core import transfer

    rehashed: list[int] = []
    real = transfer.blake3_hex
    monkeypatch.setattr(transfer, "blake3_hex", lambda src: rehashed.append(src.nbytes) or real(src))
    _, options = split(destination, SHARD)
    outcomes = on_ranks(2, lambda group: converters.convert(
        source, tmp_path / "out", dst_format=destination, dtype="bfloat16", group=group, **options
    ))  # fmt: skip
    assert outcomes == [tmp_path / "out"] * 2
    assert rehashed == []  # every source digest was learnt while casting, by the rank that cast it
    one = converters.convert(source, tmp_path / "one", dst_format=destination, dtype="bfloat16", workers=1, **options)
    assert folder_bytes(tmp_path / "out") == folder_bytes(one)


# ----------------------------------------------------------------------------- ranks (simulated)


@pytest.mark.parametrize(("ranks", "workers"), [(2, 1), (3, 1), (3, 2), (7, 1)])
def test_ranks_write_the_same_bytes_as_one_process(
    tmp_path: Path, source: Path, reference: dict[str, bytes], ranks: int, workers: int
) -> None:
    target = tmp_path / "ranks"
    outcomes = on_ranks(ranks, lambda group: converters.convert(
        source, target, max_shard_size=SHARD, workers=workers, group=group
    ))  # fmt: skip
    assert outcomes == [target] * ranks
    assert folder_bytes(target) == reference
    no_leftovers(tmp_path)


def test_each_rank_copies_only_its_own_share(tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written: dict[int, list[str]] = {}
    original = SAFETENSORS.write_file
    rank_of = threading.local()

    def counting(checkpoint: Any, path: Path, *args: Any, **kwargs: Any) -> None:
        written.setdefault(rank_of.rank, []).append(path.name)
        original(checkpoint, path, *args, **kwargs)

    monkeypatch.setattr(SAFETENSORS, "write_file", counting)

    def job(group: Member) -> Path:
        rank_of.rank = group.rank
        return converters.convert(source, tmp_path / "out", max_shard_size=SHARD, workers=1, group=group)

    on_ranks(3, job)
    shards = [name for name in written.values() for name in name]
    assert sorted(shards) == sorted(p.name for p in (tmp_path / "out").glob("model-*"))  # each once
    assert all(written.get(rank) for rank in range(3))  # and every rank had work


def test_a_failure_on_one_rank_stops_every_rank(tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = SAFETENSORS.write_file

    def failing(checkpoint: Any, path: Path, *args: Any, **kwargs: Any) -> None:
        if path.name.startswith("model-00002-"):
            raise ConverterError("simulated failure", file=path)
        original(checkpoint, path, *args, **kwargs)

    monkeypatch.setattr(SAFETENSORS, "write_file", failing)
    target = tmp_path / "out"
    outcomes = on_ranks(3, lambda group: converters.convert(source, target, max_shard_size=SHARD, group=group))
    assert all(isinstance(outcome, ConverterError) for outcome in outcomes), outcomes
    assert sum("of 3 failed" not in str(outcome) for outcome in outcomes) == 1  # the rank that failed
    assert all("simulated failure" in str(outcome) for outcome in outcomes)
    assert not target.exists()
    no_leftovers(tmp_path)


def test_an_existing_destination_stops_every_rank(tmp_path: Path, source: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    outcomes = on_ranks(
        2, lambda group: converters.convert(source, target, max_shard_size=SHARD, overwrite=False, group=group)
    )
    assert all(isinstance(outcome, DestinationError) and "exists" in str(outcome) for outcome in outcomes)
    assert (target / "keep.txt").read_text() == "mine"
    no_leftovers(tmp_path)


def test_when_rank_0_cannot_make_the_staging_folder_every_rank_stops(tmp_path: Path) -> None:
    from converters.core.atomic import atomic_folder

    def job(group: Member) -> None:
        with atomic_folder(tmp_path / "missing" / "out", lambda _: True, group=group) as staging:
            raise AssertionError(f"rank {group.rank} was given {staging}")

    first, second = on_ranks(2, job)
    assert isinstance(first, DestinationError) and "no such folder" in str(first)
    assert isinstance(second, ConverterError) and "rank 0 could not start the folder" in str(second)
    assert "no such folder" in str(second)


def test_ranks_replace_a_folder_atomically(tmp_path: Path, source: Path, reference: dict[str, bytes]) -> None:
    target = tmp_path / "out"
    converters.convert(source, target, max_shard_size="1MB")
    on_ranks(2, lambda group: converters.convert(source, target, max_shard_size=SHARD, group=group))
    assert folder_bytes(target) == reference
    no_leftovers(tmp_path)


def test_a_single_file_destination_is_refused_on_several_ranks(tmp_path: Path, source: Path) -> None:
    outcomes = on_ranks(2, lambda group: converters.convert(source, tmp_path / "out.safetensors", group=group))
    for outcome in outcomes:
        assert isinstance(outcome, ConverterError)
        assert "splits the files of a folder between ranks" in str(outcome)
    assert not (tmp_path / "out.safetensors").exists()


# ----------------------------------------------------------------------------- torchrun on gloo


def torchrun(ranks: int, *arguments: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "converters.distributed", *map(str, arguments)]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=environment)


@pytest.fixture(scope="module")
def sharded_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sharded")
    torch.manual_seed(1)
    tensors = {f"block{i}.{part}": torch.randn(32 * (1 + i % 3), 48) for i in range(9) for part in ("w", "m")}
    save_file(tensors, folder / "flat.safetensors")
    return converters.convert(folder / "flat.safetensors", folder / "src", max_shard_size="50KB")


def split(destination: str, size: str) -> tuple[list[str], dict[str, str]]:
    """The option that splits a folder destination into files, as CLI flags and as library keywords."""
    name = {"safetensors": "max_shard_size", "dcp": "max_file_size"}[destination]
    return ["--" + name.replace("_", "-"), size], {name: size}


@pytest.fixture(scope="module")
def two_rank_dcp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The DCP folder tests/jobs/dcp_job.py writes with 2 ranks (FSDP2-sharded Net + SGD)."""
    folder = tmp_path_factory.mktemp("dcp")
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "jobs" / "dcp_job.py"), "save", str(folder / "checkpoint"),
         str(folder / "reference.pt")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "checkpoint"


# A 2-rank and a 3-rank job from each kind of source, to each folder destination.
TORCHRUN_CASES = [
    ("sharded_source", 2, "safetensors", "20KB"),
    ("sharded_source", 3, "dcp", "20KB"),
    ("two_rank_dcp", 2, "dcp", "8KB"),
    ("two_rank_dcp", 3, "safetensors", "8KB"),
]


@pytest.mark.parametrize(("source_name", "ranks", "destination", "size"), TORCHRUN_CASES)
def test_torchrun_converts_like_one_process(
    request: pytest.FixtureRequest, tmp_path: Path, source_name: str, ranks: int, destination: str, size: str
) -> None:
    source: Path = request.getfixturevalue(source_name)
    flags, options = split(destination, size)
    one = converters.convert(source, tmp_path / "one", dst_format=destination, workers=1, **options)
    assert len(list(one.iterdir())) > ranks + 1
    result = torchrun(ranks, "convert", source, tmp_path / "many", "--to", destination, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote") == 1  # rank 0 speaks for the job
    assert folder_bytes(tmp_path / "many") == folder_bytes(one)
    assert_bit_identical(converters.load(source), converters.load(tmp_path / "many"))
    no_leftovers(tmp_path)


def test_torchrun_refuses_an_existing_destination_on_every_rank(tmp_path: Path, sharded_source: Path) -> None:
    (tmp_path / "taken").mkdir()
    result = torchrun(2, "convert", sharded_source, tmp_path / "taken", "--max-shard-size", "30KB", "--to",
                      "safetensors")  # fmt: skip
    assert result.returncode != 0
    assert "exists; pass --force to replace it" in result.stderr
    # torchrun reports a failed worker with its own traceback; none comes from our code
    assert "converters/" not in result.stderr
    assert result.stderr.count("sdconvert: ") == 2  # one line per rank
    assert list((tmp_path / "taken").iterdir()) == []


@pytest.mark.parametrize(
    ("scenario", "says"),
    [
        ("read", "rank 1 cannot read the source"),
        ("interrupt", "rank 1 of 2 failed: KeyboardInterrupt"),
        ("killed", "another rank of the job stopped, so this one stops too"),
    ],
)
def test_a_rank_that_fails_anywhere_stops_the_job_and_leaves_nothing(
    tmp_path: Path, sharded_source: Path, scenario: str, says: str
) -> None:
    job = ROOT / "tests" / "jobs" / "failing_rank.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(job),
               scenario, "convert", str(sharded_source), str(tmp_path / "out"), "--to", "safetensors",
               "--max-shard-size", "20KB", "--workers", "1"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode != 0
    if scenario != "killed":  # when a rank is killed, torchrun may stop rank 0 before it notices
        assert says in result.stderr, result.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []  # no folder, no staging folder, no shard


def test_the_entry_point_says_it_needs_torchrun(tmp_path: Path) -> None:
    environment = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE")}
    result = subprocess.run(
        [sys.executable, "-m", "converters.distributed", "convert", "a", "b"],
        capture_output=True, text=True, cwd=ROOT, env=environment,
    )  # fmt: skip
    assert result.returncode == 2
    assert "not started by torchrun" in result.stderr
