"""Conversion speed and memory against `cp`, measured in one interleaved run (machines are noisy).

    python bench/bench.py                      # the README table: 1 GiB, every pair, 3 rounds
    python bench/bench.py --size 256M --rounds 5
    python bench/bench.py --scaling            # 64 MiB, 256 MiB, 1 GiB for pt -> safetensors
    git worktree add /tmp/base HEAD~5 && python bench/bench.py --size 256M --baseline /tmp/base/cli.py
                                               # every pair against an earlier version, interleaved

Every measured command runs as its own process, so its wall time includes start-up and imports,
and its peak RSS comes from wait4(). Rounds interleave all commands, and the tables give medians.
The checkpoint is a stack of 32 Linear(w, w) layers plus SGD momentum buffers: 128 float32 tensors.
Baselines: `cp` (no fsync), `cp` + `sync FILE` (as durable as our default), and the naive path,
torch.load + safetensors.torch.save_file.
"""

from __future__ import annotations

import argparse
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
FORMATS = {"pt": ".pt", "safetensors": ".safetensors", "msgpack": ".msgpack", "onnx": ".onnx"}
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


def run(command: list[str], cwd: Path | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{process.stderr.read().decode() if process.stderr else ''}")
    return elapsed, usage.ru_maxrss


def prepare(folder: Path, width: int, cli: Path = CLI) -> dict[str, Path]:
    """The checkpoint in every format; written by ``cli`` (with --baseline: the older version, whose
    readers may not know fields newer writers add, while newer readers read older files)."""
    sources = {"pt": folder / "source.pt"}
    run([sys.executable, "-c", MAKE_CHECKPOINT, str(width), str(sources["pt"])])
    for name, suffix in FORMATS.items():
        if name != "pt":
            sources[name] = folder / f"source{suffix}"
            run([sys.executable, str(cli), "convert", str(sources["pt"]), str(sources[name]), "--quiet", "--no-fsync"])
    return sources


def python() -> list[str]:
    return [sys.executable, str(CLI)]


def measure_pairs(
    folder: Path, sources: dict[str, Path], rounds: int, pairs: list[tuple[str, str]], baseline: Path | None = None
) -> dict[str, Samples]:
    results: dict[str, Samples] = {}
    out = folder / "out"
    for round_index in range(rounds):
        print(f"  round {round_index + 1}/{rounds}", file=sys.stderr)
        for src, dst in pairs:
            source, target = sources[src], out.with_suffix(FORMATS[dst])
            commands = {
                f"cp {src}": ["cp", str(source), str(target)],
                f"cp+sync {src}": ["sh", "-c", f'cp "{source}" "{target}" && sync "{target}"'],
                f"ours {src}->{dst}": [*python(), "convert", str(source), str(target), "--quiet", "--force"],
                f"ours-nofsync {src}->{dst}": [
                    *python(),
                    "convert",
                    str(source),
                    str(target),
                    "--quiet",
                    "--force",
                    "--no-fsync",
                ],
            }
            if baseline is not None:  # the same command run by another version of the converter
                commands[f"baseline {src}->{dst}"] = [
                    sys.executable, str(baseline), "convert", str(source), str(target), "--quiet", "--force"
                ]  # fmt: skip
            for label, command in commands.items():
                for leftover in folder.glob("out*"):
                    leftover.unlink()
                results.setdefault(label, Samples()).add(*run(command))
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


def baseline_table(results: dict[str, Samples], pairs: list[tuple[str, str]]) -> list[str]:
    lines = ["| conversion | this version | baseline | ratio |", "|---|---|---|---|"]
    for src, dst in pairs:
        ours, base = results[f"ours {src}->{dst}"], results[f"baseline {src}->{dst}"]
        lines.append(f"| {src} → {dst} | {ours.time:.2f} s | {base.time:.2f} s | {ours.time / base.time:.2f}× |")
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
    args = parser.parse_args()
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
                sources = prepare(folder, SIZES[size])
                print(f"source: {sources['pt'].stat().st_size / 2**20:.0f} MiB\n")
                print("\n".join(pair_table(measure_pairs(folder, sources, args.rounds, pairs), pairs)), flush=True)
                for source in sources.values():
                    source.unlink()
            return
        sources = prepare(folder, SIZES[args.size], args.baseline or CLI)
        size = sources["pt"].stat().st_size / 2**20
        print(f"checkpoint: {size:.0f} MiB, {LAYERS * 4} float32 tensors, {args.rounds} rounds, medians\n")
        pairs = [(a, b) for a in FORMATS for b in FORMATS if a != b]
        results = measure_pairs(folder, sources, args.rounds, pairs, args.baseline)
        print("\n".join(pair_table(results, pairs)), flush=True)
        if args.baseline is not None:
            print(f"\nagainst {args.baseline} (both with fsync, same rounds, interleaved):\n")
            print("\n".join(baseline_table(results, pairs)), flush=True)
        print()
        print("\n".join(inspect_table(measure_inspect(sources, args.rounds), list(FORMATS))))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
