"""Start-up cost: wall time of `sdconvert` on a small file against `python -c pass` (issue 16).

    python bench/startup.py                  # 41 interleaved rounds
    python bench/startup.py --runs 101       # more rounds on a noisy machine
    git worktree add /tmp/base HEAD~1 && python bench/startup.py --baseline /tmp/base/cli.py
                                             # the same commands from an earlier checkout, interleaved

Commands measured, each as its own process (wall time from start to exit, so Python's own start,
site-packages and every import are included), in interleaved rounds so that machine noise hits
them alike; the table gives the median and the minimum wall time, each median as a ratio of
`python -c pass`'s, and the median CPU time (user + system; less disturbed by a busy machine):

    python -c pass
    sdconvert inspect small.safetensors
    sdconvert convert small.safetensors out.safetensors      (out removed before each run)

`sdconvert` is the console script beside this Python (the installed entry point); with
`--baseline`, `python BASELINE/cli.py` runs the same two commands with that checkout's package.
small.safetensors has three tensors and is written by sdconvert itself (so it stores digests, as
our files do). The commands run with PYTHONDONTWRITEBYTECODE unset and after one warm-up round, so
every module loads from its compiled bytecode as from an installed wheel (a stale __pycache__
would otherwise be recompiled on every run). The target is 0.08 s for `inspect`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}


def _raw_safetensors(path: Path) -> None:
    """A three-tensor safetensors file written by hand (no library needed)."""
    tensors = {"a.bias": ("F32", [3], 12), "a.weight": ("F32", [3, 4], 48), "b": ("F16", [2, 2], 8)}
    header, offset = {}, 0
    for name, (dtype, shape, size) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(range(offset)))


def _cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def _once(command: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run."""
    cpu, start = _cpu(), time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=ROOT, env=ENV)
    return time.perf_counter() - start, _cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=41, help="interleaved rounds (default: 41)")
    parser.add_argument("--baseline", type=Path, metavar="CLI.py", help="an earlier checkout's cli.py to compare")
    args = parser.parse_args()
    entries = {"sdconvert": [str(Path(sys.executable).parent / "sdconvert")]}
    if args.baseline:
        entries["baseline"] = [sys.executable, str(args.baseline.resolve())]
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        raw, small, out = tmp / "raw.safetensors", tmp / "small.safetensors", tmp / "out.safetensors"
        _raw_safetensors(raw)
        subprocess.run([*entries["sdconvert"], "convert", raw, small, "--quiet"], check=True, cwd=ROOT, env=ENV)
        commands = {"python -c pass": [sys.executable, "-c", "pass"]}
        for label, entry in entries.items():
            commands[f"{label} inspect small.safetensors"] = [*entry, "inspect", str(small)]
            commands[f"{label} convert small.safetensors out.safetensors"] = [*entry, "convert", str(small), str(out)]
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for round in range(args.runs + 1):  # round 0 warms up (writes bytecode) and is not counted
            for name, command in commands.items():
                if out.exists():
                    os.remove(out)
                took = _once(command)
                if round:
                    times[name].append(took)
    base = statistics.median(wall for wall, _ in times["python -c pass"])
    width = max(map(len, commands))
    print(f"{args.runs} interleaved runs; ratio: median wall time to python -c pass's")
    print(f"{'command':<{width}}  median s  min s   ratio  cpu s")
    for name, found in times.items():
        walls = [wall for wall, _ in found]
        median, cpu = statistics.median(walls), statistics.median(used for _, used in found)
        print(f"{name:<{width}}  {median:8.4f}  {min(walls):6.4f}  {median / base:5.2f}  {cpu:6.4f}")


if __name__ == "__main__":
    main()
