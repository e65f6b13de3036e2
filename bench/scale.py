"""What memory and time grow with, besides bytes: the number of tensors and the number of shards.

    python bench/scale.py                  # the README's "At 100 GB" figures, 3 rounds
    python bench/scale.py --rounds 5

Two families, each measured at a small and a large count in the same interleaved run, so the
difference divided by the difference in counts is the cost of one more tensor (or shard):

- tensors: a flat safetensors file of N float32 tensors of 64 elements (N = 1,000 and 10,000),
  converted to safetensors, .pt and msgpack;
- shards: the same checkpoint (N = 100 and 1,000 tensors of 4 KiB) as a folder of one tensor per
  shard, converted to a folder of the same shards (`--workers 2`), and `inspect`ed.

Each command is its own process (start-up included), writes a new destination and starts after an
untimed `sync`; peak RSS is GNU time's %M. Figures are medians.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from bench import CLI

MAKE = """
import sys, torch
from safetensors.torch import save_file
count, elements, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
generator = torch.Generator().manual_seed(0)
save_file({f"blocks.{i}.weight": torch.randn(elements, generator=generator) for i in range(count)}, path)
"""
TENSOR_COUNTS = (1_000, 10_000)
SHARD_COUNTS = (100, 1_000)


def make(folder: Path, count: int, elements: int, name: str) -> Path:
    path = folder / f"{name}.safetensors"
    subprocess.run([sys.executable, "-c", MAKE, str(count), str(elements), str(path)], check=True)
    return path


def main() -> None:
    with common.session(__doc__, {"small": 0}, "scale", default="small") as (args, folder):
        jobs: list[tuple[str, list[str], Path]] = []
        for count in TENSOR_COUNTS:
            flat = make(folder, count, 64, f"tensors-{count}")
            for suffix in (".safetensors", ".pt", ".msgpack"):
                out = folder / f"out-{count}{suffix}"
                command = [sys.executable, str(CLI), "convert", str(flat), str(out), "--quiet"]
                jobs.append((f"{count} tensors → {suffix}", command, out))
        for count in SHARD_COUNTS:
            flat = make(folder, count, 1024, f"shards-{count}")
            source = folder / f"shards-{count}"
            subprocess.run(
                [sys.executable, str(CLI), "convert", str(flat), str(source), "--to", "safetensors",
                 "--max-shard-size", "4KiB", "--quiet"],
                check=True,
            )  # fmt: skip
            out = folder / f"out-shards-{count}"
            jobs.append((
                f"{count} shards → {count} shards",
                [sys.executable, str(CLI), "convert", str(source), str(out), "--to", "safetensors",
                 "--max-shard-size", "4KiB", "--workers", "2", "--quiet"],
                out,
            ))  # fmt: skip
            inspect = [sys.executable, str(CLI), "inspect", str(source)]
            jobs.append((f"inspect {count} shards", inspect, folder / "none"))
        results: dict[str, common.Measured] = {}
        for round_index in range(args.rounds):
            print(f"  round {round_index + 1}/{args.rounds}", file=sys.stderr, flush=True)
            results.setdefault("start-up", common.Measured()).record(*common.run([sys.executable, str(CLI), "--help"]))
            shift = round_index % len(jobs)
            for label, command, out in jobs[shift:] + jobs[:shift]:
                if out.is_dir():
                    shutil.rmtree(out)
                out.unlink(missing_ok=True)
                os.sync()
                results.setdefault(label, common.Measured()).record(*common.run(command))
        report(results)


def report(results: dict[str, common.Measured]) -> None:
    start = statistics.median(results["start-up"].rss_mib)
    print("\n| command | time (median) | peak RSS | above start-up |")
    print("|---|---|---|---|")
    for label, sample in results.items():
        print(f"| {label} | {sample.time:.2f} s | {sample.rss:.0f} MiB | {sample.rss - start:.0f} MiB |")
    small, large = TENSOR_COUNTS
    print("\nper tensor (from the difference between the two counts):")
    for suffix in (".safetensors", ".pt", ".msgpack"):
        a, b = results[f"{small} tensors → {suffix}"], results[f"{large} tensors → {suffix}"]
        print(
            f"  → {suffix}: {(b.rss - a.rss) * 2**20 / (large - small) / 1024:.2f} KiB, "
            f"{(b.time - a.time) / (large - small) * 1e6:.0f} µs"
        )
    small, large = SHARD_COUNTS
    print("per shard:")
    for what in ("{n} shards → {n} shards", "inspect {n} shards"):
        a, b = results[what.format(n=small)], results[what.format(n=large)]
        print(
            f"  {what.format(n='N')}: {(b.rss - a.rss) * 2**20 / (large - small) / 1024:.2f} KiB, "
            f"{(b.time - a.time) / (large - small) * 1e3:.2f} ms"
        )


if __name__ == "__main__":
    main()
