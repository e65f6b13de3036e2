"""What one tree node and one tensor cost each reader, in memory and time: the numbers behind the
read budget (``converters/core/budget.py``: NODE_COST, TENSOR_COST) and the README's safety bounds.

    python bench/costs.py              # every reader, two sizes each, 3 rounds, medians
    python bench/costs.py --rounds 5
    python bench/costs.py --cli /tmp/base/cli.py     # another checkout's reader (e.g. an older version)

For each reader it writes inputs made of many small things (empty containers, tiny tensors) at two
sizes, reads each in a fresh process (``sdconvert inspect``: parse, validate, list) and reports the
slopes between the two sizes: peak RSS per node and per input byte, and CPU per node. The last
column is the bar every input must meet: peak RSS within 2 x input + 100 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / "cli.py"
sys.path.insert(0, str(ROOT))


def pickle_of_empty_dicts(count: int) -> bytes:
    """A torch zip archive whose data.pkl is a list of ``count`` empty dicts."""
    import io
    import pickle
    import zipfile

    body = pickle.dumps([{} for _ in range(count)], protocol=2)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", body)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    return buffer.getvalue()


def safetensors_of_tiny_tensors(count: int) -> bytes:
    header = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(count)}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + bytes(count)


def msgpack_of_empty_maps(count: int) -> bytes:
    import msgpack

    return bytes(msgpack.packb({"x": [{} for _ in range(count)]}))


def pt_of_tiny_tensors(count: int) -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({f"t{i}": torch.zeros(1, dtype=torch.uint8) for i in range(count)}, buffer)
    return buffer.getvalue()


# reader -> (suffix, builder, what one unit is, two sizes)
CASES: dict[str, tuple[str, Callable[[int], bytes], str, tuple[int, int]]] = {
    "pt: empty dicts": (".pt", pickle_of_empty_dicts, "node", (50_000, 200_000)),
    "pt: tiny tensors": (".pt", pt_of_tiny_tensors, "tensor", (5_000, 20_000)),
    "safetensors: tiny tensors": (".safetensors", safetensors_of_tiny_tensors, "tensor", (20_000, 80_000)),
    "msgpack: empty maps": (".msgpack", msgpack_of_empty_maps, "node", (50_000, 200_000)),
}


def measure(cli: Path, path: Path) -> tuple[float, float, int, int]:
    """(wall seconds, CPU seconds, peak RSS KiB, exit code) of ``sdconvert inspect path``."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, str(cli), "inspect", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(process.pid, 0)
    return (
        time.perf_counter() - started,
        usage.ru_utime + usage.ru_stime,
        usage.ru_maxrss,
        os.waitstatus_to_exitcode(status),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cli", type=Path, default=CLI, help="the cli.py to measure (default: this checkout's)")
    parser.add_argument("--build", nargs=3, metavar=("CASE", "COUNT", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        case, count, path = args.build
        Path(path).write_bytes(CASES[case][1](int(count)))
        return
    folder = Path(tempfile.mkdtemp(prefix="sdconvert-costs-"))
    try:
        print("| reader | units | input | peak RSS | CPU | exit | RSS per unit | CPU per unit | RSS ≤ 2×input+100 MB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, (suffix, _, unit, sizes) in CASES.items():
            rows = []
            for count in sizes:
                path = folder / f"input{suffix}"
                # Built in another process: a child forked from a process that imported torch
                # would report torch's pages as its own peak RSS.
                subprocess.run([sys.executable, __file__, "--build", name, str(count), str(path)], check=True)
                samples = [measure(args.cli, path) for _ in range(args.rounds)]
                cpu = statistics.median(s[1] for s in samples)
                rss = statistics.median(s[2] for s in samples) * 1024
                rows.append((count, path.stat().st_size, rss, cpu, samples[0][3]))
            (n1, _, rss1, cpu1, _), (n2, _, rss2, cpu2, _) = rows
            per_rss, per_cpu = (rss2 - rss1) / (n2 - n1), (cpu2 - cpu1) / (n2 - n1)
            for count, size, rss, cpu, code in rows:
                ok = "yes" if rss <= 2 * size + 100 * 2**20 else "NO"
                print(
                    f"| {name} | {count} {unit}s | {size / 2**20:.1f} MiB | {rss / 2**20:.0f} MiB | {cpu:.2f} s "
                    f"| {code} | {per_rss:.0f} B | {per_cpu * 1e6:.1f} µs | {ok} |",
                    flush=True,
                )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
