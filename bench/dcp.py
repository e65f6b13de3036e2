"""Writing a torch.distributed.checkpoint folder: ours against torch's own dcp.save, in one interleaved run.

    python bench/dcp.py                      # 1 GiB, 3 rounds
    python bench/dcp.py --size 256M --rounds 5

The checkpoint is a float32 decoder-only transformer state_dict (embedding and output layer
[16h, h], per layer q/k/v/o [h, h], gate/up [8h/3, h], down [h, 8h/3] and two norms [h]; h = 1536
and 7 layers at 1G), saved by torch.save. Converted to a DCP folder by

- ours: `cli.py convert model.pt out --to dcp --quiet --no-fsync`, which reads the .pt without torch
  and copies each tensor's bytes into the .distcp files with the kernel (`copy_file_range`), hashing
  them on the way, then pickles .metadata itself;
- naive: `torch.load(f)` (every tensor into memory) then `dcp.save(state, storage_writer=
  FileSystemWriter(out, sync_files=False), no_dist=True)`, which `torch.save`s each tensor;

plus `cp` of the same file, for the disk's speed. Neither DCP writer fsyncs here (nor does `cp`).
Each command is its own process (start-up and imports included), starts after a `sync` (not
timed) and writes a new destination; each round starts at the next command, so none always
follows the same one; medians are printed, with the ratio against the naive path. After every
round the two folders are compared entry by entry: the same FQNs, dtypes and sizes in .metadata
(unpickled here with torch's classes) and the same raw bytes in each tensor's archive (its
`data/0` record, read with the standard library's zipfile, not by either tool); a difference stops
the benchmark. Peak RSS is GNU time's %M; "above start-up" subtracts the median peak of the same
interpreter doing only its start-up: `cli.py --help` for ours, `import torch,
torch.distributed.checkpoint` for the naive path.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from bench import CLI

SIZES = {"64M": 256, "256M": 768, "1G": 1536}  # hidden size h; layers are added up to about that many bytes

MAKE_CHECKPOINT = common.transformer_script(rotary_buffers=False, legacy_file=False)

NAIVE = """
import sys, warnings, torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemWriter
warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
dcp.save(torch.load(sys.argv[1]), storage_writer=FileSystemWriter(sys.argv[2], sync_files=False), no_dist=True)
"""
STARTUP_NAIVE = "import torch, torch.distributed.checkpoint"


def tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...], Path, int, int]]:
    """fqn -> (dtype, size, data file, offset, length) of every tensor entry of a DCP folder."""
    import torch  # noqa: F401  (.metadata holds torch's classes: unpickling it needs them)

    metadata = pickle.loads((folder / ".metadata").read_bytes())
    found = {}
    for index, info in metadata.storage_data.items():
        entry = metadata.state_dict_metadata[index.fqn]
        if hasattr(entry, "chunks"):
            dtype = str(entry.properties.dtype)
            found[index.fqn] = (dtype, tuple(entry.size), folder / info.relative_path, info.offset, info.length)
    return found


def storage_bytes(path: Path, offset: int, length: int) -> bytes:
    """The bytes of the one storage record (``*/data/0``) of the torch.save archive at ``offset``."""
    with path.open("rb") as handle:
        handle.seek(offset)
        archive = zipfile.ZipFile(io.BytesIO(handle.read(length)))
    (name,) = [n for n in archive.namelist() if n.endswith("/data/0")]
    return archive.read(name)


def assert_same_folders(a: Path, b: Path) -> int:
    """Stop unless ``a`` and ``b`` hold the same tensor entries with the same raw bytes; the bytes compared."""
    ta, tb = tensors(a), tensors(b)
    if sorted(ta) != sorted(tb):
        raise SystemExit(f"{a} and {b} hold different entries: {sorted(set(ta) ^ set(tb))[:5]}")
    compared = 0
    for fqn, (dtype, size, path, offset, length) in ta.items():
        other = tb[fqn]
        if (dtype, size) != other[:2]:
            raise SystemExit(f"{a} and {b} differ at {fqn!r}: {dtype}{list(size)} vs {other[0]}{list(other[1])}")
        data = storage_bytes(path, offset, length)
        if data != storage_bytes(*other[2:]):
            raise SystemExit(f"{a} and {b} differ at {fqn!r}: the bytes differ")
        compared += len(data)
    return compared


def measure(folder: Path, source: Path, rounds: int) -> dict[str, common.Measured]:
    results: dict[str, common.Measured] = {}
    ours_out, naive_out, copied = folder / "ours", folder / "naive", folder / "copy.pt"
    jobs = [
        (
            "ours",
            [sys.executable, str(CLI), "convert", str(source), str(ours_out), "--to", "dcp", "--quiet", "--no-fsync"],
        ),
        ("naive", [sys.executable, "-c", NAIVE, str(source), str(naive_out)]),
        ("cp", ["cp", str(source), str(copied)]),
    ]
    outputs = {"ours": ours_out, "naive": naive_out, "cp": copied}
    for round_index in range(rounds):
        common.start_round(results, round_index, rounds, STARTUP_NAIVE)
        shift = round_index % len(jobs)
        for label, command in jobs[shift:] + jobs[:shift]:
            out = outputs[label]
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
            os.sync()  # the previous command's dirty pages are written back untimed
            results.setdefault(label, common.Measured()).record(*common.run(command))
        compared = assert_same_folders(ours_out, naive_out)
        print(f"  outputs bit-identical ({compared / 2**20:.0f} MiB of tensors compared)", file=sys.stderr)
    return results


def table(results: dict[str, common.Measured], size_mib: float, count: int, files: int) -> list[str]:
    rows: list[tuple[str, str, str, str | None]] = [
        (
            f"pt → dcp, `convert --to dcp --no-fsync` ({size_mib:.0f} MiB, {count} tensors, {files} .distcp)",
            "ours",
            "naive",
            "ours",
        ),
        ("naive: `torch.load(f)` + `dcp.save(..., no_dist=True)`", "naive", "naive", "naive"),
        ("`cp` of the same file", "cp", "naive", None),
    ]
    return common.table(results, rows, STARTUP_NAIVE, cpu_column=True)


def main() -> None:
    with common.session(__doc__, SIZES, "dcp") as (args, folder):
        hidden = SIZES[args.size]
        layers = common.layers_for(hidden, common.TARGET[args.size])
        source = folder / "model.pt"
        common.run([sys.executable, "-c", MAKE_CHECKPOINT, str(hidden), str(layers), str(source)])
        size_mib = source.stat().st_size / 2**20
        probe = folder / "probe"
        common.run(
            [sys.executable, str(CLI), "convert", str(source), str(probe), "--to", "dcp", "--quiet", "--no-fsync"]
        )
        count, files = len(tensors(probe)), len(list(probe.glob("*.distcp")))
        shutil.rmtree(probe)
        print(
            f"checkpoint: {size_mib:.0f} MiB torch.save file, {count} float32 tensors (h={hidden}, {layers} layers), "
            f"{args.rounds} rounds, medians; outputs compared bit for bit each round\n"
        )
        results = measure(folder, source, args.rounds)
        print("\n".join(table(results, size_mib, count, files)), flush=True)
        ours, naive, start_rss = results["ours"], results["naive"], common.startup_rss(results)
        print(
            f"\nours / naive: {ours.time / naive.time:.2f}× the time ({naive.time / ours.time:.1f}× faster), "
            f"peak RSS above start-up {ours.rss - start_rss['ours']:.0f} vs {naive.rss - start_rss['naive']:.0f} MiB"
        )


if __name__ == "__main__":
    main()
