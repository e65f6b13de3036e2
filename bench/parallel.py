"""Shards in parallel: one process with `--workers 1` and `--workers 2`, and `torchrun` with 2 and 3
ranks, against `cp -r` of the same folder, measured in one interleaved run.

    python bench/parallel.py                     # the README table: 2 GiB in 32 shards, 3 rounds
    python bench/parallel.py --size 256M --rounds 5

The source is a sharded safetensors folder written by sdconvert (32 shards of 64 MiB at 2G: 128
float32 tensors of 16 MiB; the shards store BLAKE3 digests, so the conversion copies and does not
hash); the destination is the same checkpoint in shards of half the size (64 at 2G), so each shard
of the source feeds two of the destination. Every command writes a new destination folder and
starts after an untimed `sync`; each round starts at the next command. Durable commands are
compared with `cp -r SRC DST && sync -f DST` (as durable as our default: every file fsynced) and
`--no-fsync` ones with plain `cp -r`. The torchrun rows include torch's import and the gloo
rendezvous (a fixed ~4 s here); their peak RSS is each rank's own (resource.getrusage in the rank,
the largest rank shown), since GNU time around torchrun would measure only its launcher.

After every round each output is compared with the first command's, file by file and byte for
byte: any difference stops the benchmark.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from bench import CLI, ROOT

SIZES = {"256M": 256 << 20, "1G": 1 << 30, "2G": 2 << 30}
TENSOR = 16 << 20
RANK_RSS = Path(__file__).resolve().parent / "rank_rss.py"

MAKE = """
import sys, torch
from safetensors.torch import save_file
total, tensor, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
generator = torch.Generator().manual_seed(0)
rows = tensor // 4 // 1024
save_file({f"layers.{i}.weight": torch.randn(rows, 1024, generator=generator) for i in range(total // tensor)}, path)
"""


def make_source(folder: Path, size: int) -> Path:
    flat = folder / "flat.safetensors"
    subprocess.run([sys.executable, "-c", MAKE, str(size), str(TENSOR), str(flat)], check=True)
    source = folder / "source"
    subprocess.run(
        [sys.executable, str(CLI), "convert", str(flat), str(source), "--to", "safetensors",
         "--max-shard-size", str(size // 32), "--quiet"],
        check=True,
    )  # fmt: skip
    flat.unlink()
    return source


def make_tiny(folder: Path) -> Path:
    """A 1 MiB checkpoint in 4 shards: what a torchrun rank costs before any real work."""
    flat = folder / "tiny.safetensors"
    subprocess.run([sys.executable, "-c", MAKE, str(1 << 20), str(1 << 18), str(flat)], check=True)
    tiny = folder / "tiny"
    subprocess.run(
        [sys.executable, str(CLI), "convert", str(flat), str(tiny), "--to", "safetensors", "--max-shard-size",
         str(1 << 18), "--quiet"],
        check=True,
    )  # fmt: skip
    return tiny


def torchrun(ranks: int, arguments: list[str], rss_folder: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
        str(RANK_RSS), str(rss_folder), *arguments,
    ]  # fmt: skip


def main() -> None:
    with common.session(__doc__, SIZES, "parallel", default="2G") as (args, folder):
        size = SIZES[args.size]
        source = make_source(folder, size)
        tiny = make_tiny(folder)
        shards = len(list(source.glob("*.safetensors")))
        half = str(size // 64)
        convert = [str(CLI), "convert", str(source)]
        rss_folder = folder / "rss"
        jobs: dict[str, list[str]] = {
            "cp -r && sync": ["sh", "-c", 'cp -r "$0" "$1" && sync -f "$1"', str(source)],
            "ours --workers 1": [sys.executable, *convert, "", "--workers", "1"],
            "ours --workers 2": [sys.executable, *convert, "", "--workers", "2"],
            "torchrun 2 ranks": torchrun(2, ["convert", str(source), "", "--workers", "1"], rss_folder),
            "torchrun 3 ranks": torchrun(3, ["convert", str(source), "", "--workers", "1"], rss_folder),
            "torchrun 2 ranks, 1 MiB checkpoint": torchrun(2, ["convert", str(tiny), "", "--workers", "1"], rss_folder),
            "cp -r": ["cp", "-r", str(source)],
            "ours --workers 1 --no-fsync": [sys.executable, *convert, "", "--workers", "1", "--no-fsync"],
            "ours --workers 2 --no-fsync": [sys.executable, *convert, "", "--workers", "2", "--no-fsync"],
        }
        results: dict[str, common.Measured] = {}
        rank_rss: dict[str, list[float]] = {}
        labels = list(jobs)
        for round_index in range(args.rounds):
            print(f"  round {round_index + 1}/{args.rounds}", file=sys.stderr, flush=True)
            shift = round_index % len(labels)
            outputs: dict[str, Path] = {}
            for label in labels[shift:] + labels[:shift]:
                out = folder / f"out-{labels.index(label)}"
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(rss_folder, ignore_errors=True)
                rss_folder.mkdir()
                command = [part if part else str(out) for part in jobs[label]]
                if label.startswith(("ours", "torchrun")):
                    command += ["--to", "safetensors", "--max-shard-size", half, "--quiet"]
                else:
                    command.append(str(out))
                os.sync()
                if label.startswith("torchrun"):
                    start = time.perf_counter()
                    subprocess.run(command, check=True, capture_output=True)
                    elapsed = time.perf_counter() - start
                    peaks = [int(p.read_text()) / 1024 for p in rss_folder.iterdir()]
                    rank_rss.setdefault(label, []).append(max(peaks))
                    results.setdefault(label, common.Measured()).record(elapsed, int(max(peaks) * 1024), 0.0)
                else:
                    results.setdefault(label, common.Measured()).record(*common.run(command))
                outputs[label] = out
            same_as(outputs, exclude=("cp -r && sync", "cp -r", "torchrun 2 ranks, 1 MiB checkpoint"))
            for out in outputs.values():
                shutil.rmtree(out, ignore_errors=True)
        print_table(results, size, shards, int(half))


def same_as(outputs: dict[str, Path], exclude: tuple[str, ...]) -> None:
    """Every converter output holds the same files with the same bytes as the first one."""
    labels = [label for label in outputs if label not in exclude]
    first = outputs[labels[0]]
    names = sorted(p.name for p in first.iterdir())
    for label in labels[1:]:
        other = outputs[label]
        if sorted(p.name for p in other.iterdir()) != names:
            raise SystemExit(f"{label}: different files than {labels[0]}")
        _, mismatch, errors = filecmp.cmpfiles(first, other, names, shallow=False)
        if mismatch or errors:
            raise SystemExit(f"{label}: {mismatch or errors} differ from {labels[0]}'s")
    print(f"  outputs byte-identical ({len(labels)} conversions, {len(names)} files each)", file=sys.stderr)


def print_table(results: dict[str, common.Measured], size: int, shards: int, half: int) -> None:
    gib = size / 2**30
    print(
        f"\n{size >> 20} MiB in {shards} shards → {size // half} shards of {half >> 20} MiB, new destination folder "
        f"each time (medians of {len(results['cp -r'].seconds)} interleaved rounds)\n"
    )
    print("| command | time (median) | range | vs `cp -r && sync` | vs `cp -r` | GiB/s | CPU | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    durable, plain = results["cp -r && sync"].time, results["cp -r"].time
    for label, sample in results.items():
        cpu = f"{statistics.median(sample.cpu):.2f} s" if any(sample.cpu) else "(per rank)"
        print(
            f"| `{label}` | {sample.time:.2f} s | {min(sample.seconds):.2f}–{max(sample.seconds):.2f} s "
            f"| {sample.time / durable:.2f}× | {sample.time / plain:.2f}× | {gib / sample.time:.2f} "
            f"| {cpu} | {sample.rss:.0f} MiB |"
        )
    print(f"\nrepository: {ROOT}")


if __name__ == "__main__":
    main()
