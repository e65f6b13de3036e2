"""Conversion speed and memory against `cp`, measured in one interleaved run (machines are noisy).

    python bench/bench.py                      # the README table: 1 GiB, every pair, 3 rounds
    python bench/bench.py --size 256M --rounds 5
    python bench/bench.py --pairs 'pt:*,safetensors:gguf' --split
                                               # some pairs only, and where their time goes
    python bench/bench.py --scaling            # 64 MiB, 256 MiB, 1 GiB for pt -> safetensors
    git worktree add /tmp/base HEAD~5 && python bench/bench.py --size 256M --baseline /tmp/base/cli.py
                                               # every pair against an earlier version, interleaved

Every measured command runs as its own process, so its wall time includes start-up and imports,
and its peak RSS comes from wait4(). Rounds interleave all commands (each pair's commands start at
the next one each round), and the tables give medians. The checkpoint is a stack of 32 Linear(w, w)
layers plus SGD momentum buffers: 128 float32 tensors, in every single-file format (FORMATS).
Baselines: `cp` (no fsync), `cp` + `sync FILE` (as durable as our default), and the naive path,
torch.load + safetensors.torch.save_file.

Every command writes a NEW destination file: the previous output is deleted before each command.
On ext4, replacing an existing file (cp's truncate, our rename over it) makes the kernel flush the
new data at close/rename (`auto_da_alloc`), a sync that both sides would then pay and that would
hide the converter's own overhead; a new file measures the copy itself.

`--split` also runs each conversion once per round in one instrumented process that times its
phases (bench-only: PHASES wraps functions of converters.core.transfer and os.fsync): kernel copy,
hashing, the time the copying thread waits for the hashing thread, waiting for writeback, fsync.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / "cli.py"
FORMATS = {
    "pt": ".pt",
    "safetensors": ".safetensors",
    "msgpack": ".msgpack",
    "onnx": ".onnx",
    "gguf": ".gguf",
    "npz": ".npz",
}
SIZES = {"64M": 512, "256M": 1024, "1G": 2048}  # layer width w for about that many bytes
LAYERS = 32

MAKE_CHECKPOINT = f"""
import sys, torch
from torch import nn, optim
width, path = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(width, width) for _ in range({LAYERS})])
optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
for p in model.parameters():
    p.grad = torch.full_like(p, 0.01)
optimizer.step()
torch.save({{"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1}}, path)
"""

NAIVE = """
import sys, torch, safetensors.torch
checkpoint = torch.load(sys.argv[1])
flat = {{f"model/{{k}}": v for k, v in checkpoint["model"].items()}}
flat.update({{f"optimizer/{{k}}": s["momentum_buffer"] for k, s in checkpoint["optimizer"]["state"].items()}})
safetensors.torch.save_file(flat, sys.argv[2])
""".format()

# Runs `cli.py ARGS...` in-process with the phases of a conversion timed, and writes them as JSON.
# argv: the checkout's root, the report's path, then the command's arguments. A renamed function
# fails here (getattr) rather than silently timing nothing.
PHASES = """
import json, os, sys, threading, time
started = time.perf_counter()
root, report, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, root)
from converters import cli
from converters.core import transfer
lock, totals = threading.Lock(), {}
def timed(owner, name, phase):
    original = getattr(owner, name)
    def wrapper(*args, **kwargs):
        begun = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            with lock:
                totals[phase] = totals.get(phase, 0.0) + time.perf_counter() - begun
    setattr(owner, name, wrapper)
timed(transfer, "_kernel_copy", "copy")  # the kernel copies (durable: with their writeback waits)
timed(transfer, "_copy_file_range", "copy_and_join")  # the same plus waiting for the hashing thread
timed(transfer, "_feed", "hash")  # reading and hashing ranges (the hashing thread; blake3_hex)
if hasattr(transfer, "Writeback"):  # absent before writeback existed (--baseline)
    # the writer handing pieces to the writeback thread (waiting while `lag` are queued), then
    # waiting for the thread to finish before the fsync
    timed(transfer.Writeback, "advance", "writeback_wait")
    timed(transfer.Writeback, "close", "writeback_wait")
timed(os, "fsync", "fsync")
imported = time.perf_counter()
code = cli.main(argv)
totals["imports"] = imported - started
totals["in_process"] = time.perf_counter() - imported
with open(report, "w") as handle:
    json.dump(totals, handle)
sys.exit(code)
"""
SPLIT_PHASES = ("copy", "hash", "hash_wait", "writeback_wait", "fsync")


@dataclass
class Samples:
    seconds: list[float] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)

    def add(self, seconds: float, rss_kib: int) -> None:
        self.seconds.append(seconds)
        self.rss_mib.append(rss_kib / 1024)

    @property
    def time(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rss(self) -> float:
        return max(self.rss_mib)


@dataclass
class Split:
    """The phases of instrumented runs (seconds each, one list per phase) and their wall times."""

    wall: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)

    def add(self, wall: float, totals: dict[str, float]) -> None:
        self.wall.append(wall)
        derived = dict(totals)
        derived["startup"] = wall - totals["in_process"]
        derived["hash_wait"] = max(0.0, totals.get("copy_and_join", 0.0) - totals.get("copy", 0.0))
        for phase, seconds in derived.items():
            self.phases.setdefault(phase, []).append(seconds)

    def median(self, phase: str) -> float:
        values = self.phases.get(phase, [])
        return statistics.median(values + [0.0] * (len(self.wall) - len(values))) if self.wall else 0.0


def run(command: list[str], cwd: Path | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{process.stderr.read().decode() if process.stderr else ''}")
    return elapsed, usage.ru_maxrss


def prepare(folder: Path, width: int, cli: Path = CLI, names: set[str] | None = None) -> dict[str, Path]:
    """The checkpoint in every format (or those ``names``, pt always); written by ``cli`` (with
    --baseline: the older version, whose readers may not know fields newer writers add, while newer
    readers read older files)."""
    sources = {"pt": folder / "source.pt"}
    run([sys.executable, "-c", MAKE_CHECKPOINT, str(width), str(sources["pt"])])
    for name, suffix in FORMATS.items():
        if name != "pt" and (names is None or name in names):
            sources[name] = folder / f"source{suffix}"
            run([sys.executable, str(cli), "convert", str(sources["pt"]), str(sources[name]), "--quiet", "--no-fsync"])
    return sources


def python() -> list[str]:
    return [sys.executable, str(CLI)]


def select_pairs(spec: str | None) -> list[tuple[str, str]]:
    """The pairs ``spec`` names ("src:dst,...", either side may be "*"), in FORMATS order; all without one."""
    every = [(a, b) for a in FORMATS for b in FORMATS if a != b]
    if not spec:
        return every
    chosen: list[tuple[str, str]] = []
    for item in spec.split(","):
        src, _, dst = item.strip().partition(":")
        unknown = [name for name in (src, dst) if name != "*" and name not in FORMATS]
        if unknown or not dst:
            raise SystemExit(f"--pairs: {item!r} is not SRC:DST with SRC, DST in {', '.join(FORMATS)} or *")
        chosen += [p for p in every if src in ("*", p[0]) and dst in ("*", p[1]) and p not in chosen]
    return [p for p in every if p in chosen]


def run_split(command: list[str], folder: Path) -> tuple[float, dict[str, float]]:
    """Wall seconds of ``command`` (arguments of cli.py) run under PHASES, and its phases."""
    report = folder / "phases.json"
    elapsed, _ = run([sys.executable, "-c", PHASES, str(ROOT), str(report), *command])
    totals: dict[str, float] = json.loads(report.read_text())
    report.unlink()
    return elapsed, totals


def measure_pairs(
    folder: Path,
    sources: dict[str, Path],
    rounds: int,
    pairs: list[tuple[str, str]],
    baseline: Path | None = None,
    splits: dict[str, Split] | None = None,
) -> dict[str, Samples]:
    """Time every pair's commands (and, given ``splits``, its instrumented runs) over ``rounds``."""
    results: dict[str, Samples] = {}
    out = folder / "out"
    for round_index in range(rounds):
        print(f"  round {round_index + 1}/{rounds}", file=sys.stderr)
        for src, dst in pairs:
            source, target = sources[src], out.with_suffix(FORMATS[dst])
            convert = ["convert", str(source), str(target), "--quiet", "--force"]
            commands = {
                f"cp {src}": ["cp", str(source), str(target)],
                f"cp+sync {src}": ["sh", "-c", f'cp "{source}" "{target}" && sync "{target}"'],
                f"ours {src}->{dst}": [*python(), *convert],
                f"ours-nofsync {src}->{dst}": [*python(), *convert, "--no-fsync"],
            }
            if baseline is not None:  # the same commands run by another version of the converter
                commands[f"baseline {src}->{dst}"] = [sys.executable, str(baseline), *convert]
                commands[f"baseline-nofsync {src}->{dst}"] = [sys.executable, str(baseline), *convert, "--no-fsync"]
            if splits is not None:
                commands[f"split ours {src}->{dst}"] = convert
                commands[f"split ours-nofsync {src}->{dst}"] = [*convert, "--no-fsync"]
            labels = list(commands)
            shift = round_index % len(labels)  # no command always follows the same one
            for label in labels[shift:] + labels[:shift]:
                for leftover in folder.glob("out*"):
                    leftover.unlink()  # a new destination every time (see the module's docstring)
                if label.startswith("split "):
                    assert splits is not None
                    splits.setdefault(label.removeprefix("split "), Split()).add(*run_split(commands[label], folder))
                else:
                    results.setdefault(label, Samples()).add(*run(commands[label]))
        if ("pt", "safetensors") in pairs:
            target = out.with_suffix(".safetensors")
            results.setdefault("naive pt->safetensors", Samples()).add(
                *run([sys.executable, "-c", NAIVE, str(sources["pt"]), str(target)])
            )
    for leftover in folder.glob("out*"):
        leftover.unlink()
    return results


def measure_inspect(sources: dict[str, Path], rounds: int) -> dict[str, Samples]:
    results: dict[str, Samples] = {}
    for _ in range(rounds):
        for name, source in sources.items():
            for verb in ("inspect", "schema"):
                results.setdefault(f"{verb} {name}", Samples()).add(*run([*python(), verb, str(source)]))
        results.setdefault("python -c pass", Samples()).add(*run([sys.executable, "-c", "pass"]))
    return results


def pair_table(results: dict[str, Samples], pairs: list[tuple[str, str]]) -> list[str]:
    lines = [
        "| conversion | ours (fsync) | cp + sync | ratio | ours --no-fsync | cp | ratio | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for src, dst in pairs:
        ours, durable_cp = results[f"ours {src}->{dst}"], results[f"cp+sync {src}"]
        fast, cp = results[f"ours-nofsync {src}->{dst}"], results[f"cp {src}"]
        lines.append(
            f"| {src} → {dst} | {ours.time:.2f} s | {durable_cp.time:.2f} s | {ours.time / durable_cp.time:.2f}× "
            f"| {fast.time:.2f} s | {cp.time:.2f} s | {fast.time / cp.time:.2f}× | {max(ours.rss, fast.rss):.0f} MiB |"
        )
    if "naive pt->safetensors" in results:
        naive, cp = results["naive pt->safetensors"], results["cp pt"]
        lines.append(
            f"| naive torch.load + save_file, pt → safetensors | | | | {naive.time:.2f} s | {cp.time:.2f} s "
            f"| {naive.time / cp.time:.2f}× | {naive.rss:.0f} MiB |"
        )
    return lines


def split_table(splits: dict[str, Split], pairs: list[tuple[str, str]]) -> list[str]:
    """Where an instrumented conversion's time goes (medians; phases overlap: the kernel copy and
    the hashing thread run side by side, and only the wait for the latter adds to the time)."""
    lines = [
        "| conversion | mode | wall | start-up + imports | convert | kernel copy | hash (thread) "
        "| waiting for hash | waiting for writeback | fsync |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for src, dst in pairs:
        for mode, label in (("fsync", f"ours {src}->{dst}"), ("--no-fsync", f"ours-nofsync {src}->{dst}")):
            split = splits[label]
            cells = " | ".join(f"{split.median(phase):.2f} s" for phase in ("startup", "in_process", *SPLIT_PHASES))
            lines.append(f"| {src} → {dst} | {mode} | {statistics.median(split.wall):.2f} s | {cells} |")
    return lines


def baseline_table(results: dict[str, Samples], pairs: list[tuple[str, str]]) -> list[str]:
    lines = [
        "| conversion | this version (fsync) | baseline | ratio | this version --no-fsync | baseline | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for src, dst in pairs:
        cells = []
        for ours_label, base_label in (("ours", "baseline"), ("ours-nofsync", "baseline-nofsync")):
            ours, base = results[f"{ours_label} {src}->{dst}"], results[f"{base_label} {src}->{dst}"]
            cells.append(f"{ours.time:.2f} s | {base.time:.2f} s | {ours.time / base.time:.2f}×")
        lines.append(f"| {src} → {dst} | {' | '.join(cells)} |")
    return lines


def inspect_table(results: dict[str, Samples], names: list[str]) -> list[str]:
    lines = ["| file | inspect | schema (manifest with digests) | peak RSS |", "|---|---|---|---|"]
    for name in names:
        a, b = results[f"inspect {name}"], results[f"schema {name}"]
        lines.append(f"| {name} | {a.time:.2f} s | {b.time:.2f} s | {max(a.rss, b.rss):.0f} MiB |")
    start = results["python -c pass"]
    lines.append(f"| (python start-up alone) | {start.time:.2f} s | | |")
    return lines


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB RAM, Python {sys.version.split()[0]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="1G")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--scaling", action="store_true", help="64M, 256M, 1G for pt -> safetensors and msgpack -> onnx"
    )
    parser.add_argument("--folder", type=Path, default=None, help="where to put the files (default: a temp folder)")
    parser.add_argument(
        "--baseline", type=Path, default=None, help="cli.py of another checkout: its conversions are timed alongside"
    )
    parser.add_argument("--pairs", default=None, help="only these pairs: 'src:dst,...', '*' for any (default: all)")
    parser.add_argument("--split", action="store_true", help="also time the phases of each conversion (see above)")
    args = parser.parse_args()
    pairs = select_pairs(args.pairs)
    folder = Path(tempfile.mkdtemp(prefix="sdconvert-bench-", dir=args.folder))
    # Byte-compile both checkouts first: where PYTHONDONTWRITEBYTECODE is set (it is on some
    # machines), every measured process would otherwise compile its modules from source, which
    # users of an installed package (pip compiles at install) never pay.
    for tree in {ROOT, (args.baseline or CLI).resolve().parent}:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "converters")], check=False)
    try:
        print(f"machine: {machine()}")
        if args.scaling:
            pairs = [("pt", "safetensors"), ("msgpack", "onnx")]
            for size in SIZES:
                print(f"\n### {size} checkpoint ({LAYERS * 4} tensors)\n", flush=True)
                sources = prepare(folder, SIZES[size], names={"msgpack"})
                print(f"source: {sources['pt'].stat().st_size / 2**20:.0f} MiB; new destination files\n")
                print("\n".join(pair_table(measure_pairs(folder, sources, args.rounds, pairs), pairs)), flush=True)
                for source in sources.values():
                    source.unlink()
            return
        sources = prepare(folder, SIZES[args.size], args.baseline or CLI, {name for pair in pairs for name in pair})
        mib = sources["pt"].stat().st_size / 2**20
        print(f"checkpoint: {mib:.0f} MiB, {LAYERS * 4} float32 tensors, {args.rounds} rounds, medians")
        print("destinations: a new file for every command (the previous output deleted first), never replaced\n")
        splits: dict[str, Split] | None = {} if args.split else None
        results = measure_pairs(folder, sources, args.rounds, pairs, args.baseline, splits)
        print("\n".join(pair_table(results, pairs)), flush=True)
        if splits is not None:
            print("\nwhere the time goes (instrumented runs, medians; see --split):\n")
            print("\n".join(split_table(splits, pairs)), flush=True)
        if args.baseline is not None:
            print(f"\nagainst {args.baseline} (same rounds, interleaved):\n")
            print("\n".join(baseline_table(results, pairs)), flush=True)
        if args.pairs is None:  # the full run: the README's second table too
            print()
            print("\n".join(inspect_table(measure_inspect(sources, args.rounds), list(FORMATS))))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
