"""One conversion on many processes and machines, through ``torch.distributed`` (gloo or any backend).

    torchrun --nnodes=N --nproc-per-node=M [--rdzv-...] -m converters.distributed convert SRC DST \
        --max-shard-size 5GB [any other convert option]

Every rank reads the source's index and headers (never its tensor bytes beyond its own share) and
plans the destination's files from the checkpoint alone, so all ranks agree without talking; each
rank then writes the files ``core.parallel.assign`` gives it (largest first onto the least loaded
rank), on ``--workers`` threads. Rank 0 makes the staging folder beside DST and tells the others
its name; once every rank finished, it gathers their digests, writes the index and publishes the
folder atomically. The files are byte for byte those a one-process ``sdconvert convert`` writes.

The destination must be a folder format whose files can be split (safetensors with
``--max-shard-size``, ``dcp``) on a filesystem every rank sees at the same path. It helps where
the filesystem's aggregate bandwidth grows with its clients (Lustre, GPFS, a cloud parallel file
system); on one local disk, more processes only take turns at the same disk (README: "At 100 GB").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from . import cli
from .core.errors import ConverterError


class TorchGroup:
    """``core.parallel.Group`` over the default ``torch.distributed`` process group."""

    def __init__(self, dist: Any) -> None:
        self._dist = dist
        self.rank: int = dist.get_rank()
        self.size: int = dist.get_world_size()

    def all_gather(self, value: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.size
        with _lost_contact():
            self._dist.all_gather_object(gathered, value)
        return gathered

    def broadcast(self, value: Any) -> Any:
        box = [value]
        with _lost_contact():
            self._dist.broadcast_object_list(box, src=0)
        return box[0]


@contextmanager
def _lost_contact() -> Iterator[None]:
    """A collective fails when another rank died or left (its connections closed): one line."""
    try:
        yield
    except RuntimeError as exc:  # gloo/c10d report a lost peer as RuntimeError (DistBackendError)
        # gloo says "[.../pair.cc:553] Connection closed by peer [127.0.0.1]:150. This is typically...":
        # the words between the source location and the first full stop are the news.
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        cause = text.rsplit("] ", 1)[-1] if text.startswith("[") else text
        cause = cause.split(". ", 1)[0].split(" [", 1)[0]
        raise ConverterError(f"another rank of the job stopped, so this one stops too ({cause:.120})") from None


USAGE = "usage: torchrun [...] -m converters.distributed convert SRC DST [convert options]"


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or arguments[0] != "convert":
        print(f"{USAGE}\n(only convert runs distributed; see `sdconvert convert --help`)", file=sys.stderr)
        return cli.EXIT_BAD_INPUT
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print(f"converters.distributed: not started by torchrun (no RANK/WORLD_SIZE); {USAGE}", file=sys.stderr)
        return cli.EXIT_BAD_INPUT
    import torch.distributed as dist  # an edge module: torch is what carries the ranks' messages

    dist.init_process_group(backend=os.environ.get("SDCONVERT_DIST_BACKEND", "gloo"))
    group = TorchGroup(dist)
    if group.rank != 0 and "--quiet" not in arguments:
        arguments.append("--quiet")  # one progress bar and one "wrote" line: rank 0's
    code = cli.main(arguments, group=group)  # every error becomes an exit code and one line there
    if code != cli.EXIT_OK:
        # This rank stopped (it said why, in one line) at a point the others cannot know: leaving
        # at once closes its connections, so their next step fails instead of waiting forever.
        _leave(code)
    # Every rank leaves together: a gloo rank torn down while another still talks aborts.
    dist.barrier()
    dist.destroy_process_group()
    return code


def _leave(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
