"""Casting and key transformations against the naive torch path, measured in one interleaved run.

    python bench/transforms.py                    # the README rows: 1 GiB, 3 rounds
    python bench/transforms.py --size 256M --rounds 5

The checkpoint is a float32 decoder-only transformer state_dict (embedding and output layer
[16h, h], per layer q/k/v/o [h, h], gate/up [8h/3, h], down [h, 8h/3] and two norms [h]; h = 1536
and 7 layers at 1G), saved by torch.save. Rows, each command its own process (start-up and
imports included), all interleaved round by round, medians printed:

1. pt → bfloat16 safetensors: `cli.py convert --dtype bfloat16` against the naive path in a
   subprocess (torch.load, {k: v.to(torch.bfloat16)}, safetensors.torch.save_file);
2. the same to float16;
3. safetensors → safetensors from a DDP-prefixed (`module.`) file we wrote: plain convert, and
   with --strip-prefix auto + --rename + --exclude, against the naive load_file + renamed dict +
   save_file (and plain `cp`): renames change the header, the bytes are still a kernel copy.

Every command writes a new destination (the previous one is deleted first) and starts after a
`sync` (not timed), so none is timed while the previous one's pages are written back; each round
starts each group at the next command, so none always follows the same one. Ours run with
--no-fsync, since neither the naive path nor `cp` fsyncs. After every round the outputs of ours
and of the naive path (of the plain convert: and of `cp`) are compared tensor by tensor (dtype,
shape and raw bytes, read straight from the files' headers and data, not by either tool): a
difference stops the benchmark.
Peak RSS comes from GNU time's %M (the maximum resident set of the command): not from wait4() in
this process as in bench.py, because a child's ru_maxrss starts at its parent's peak (Linux
carries it over vfork/fork and exec), which would put this process's ~16 MiB under every figure.
"Above start-up" subtracts the median peak of the same interpreter doing only its start-up:
`cli.py --help` for ours (interpreter + the CLI), `import torch, safetensors.torch` for the naive
path.
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
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # bench/bench.py: the shared conventions
from bench import CLI, ROOT, Samples, machine

SIZES = {"64M": 256, "256M": 768, "1G": 1536}  # hidden size h; layers are added up to about that many bytes
TARGET = {"64M": 64 << 20, "256M": 256 << 20, "1G": 1 << 30}
EXCLUDE = "module.model.layers.*.input_layernorm.weight"  # a glob within one key
RENAMES = [r"^model\.layers\.=blocks.", r"^lm_head\.=output."]

MAKE_CHECKPOINT = """
import sys, torch
hidden, layers, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
inter, vocab = -(-8 * hidden // 3 // 256) * 256, 16 * hidden
torch.manual_seed(0)
sd = {"model.embed_tokens.weight": torch.randn(vocab, hidden) * 0.02}
for i in range(layers):
    p = f"model.layers.{i}."
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        sd[p + f"self_attn.{name}.weight"] = torch.randn(hidden, hidden) * 0.02
    sd[p + "mlp.gate_proj.weight"] = torch.randn(inter, hidden) * 0.02
    sd[p + "mlp.up_proj.weight"] = torch.randn(inter, hidden) * 0.02
    sd[p + "mlp.down_proj.weight"] = torch.randn(hidden, inter) * 0.02
    sd[p + "input_layernorm.weight"] = 1 + torch.randn(hidden) * 0.1
    sd[p + "post_attention_layernorm.weight"] = 1 + torch.randn(hidden) * 0.1
sd["model.norm.weight"] = 1 + torch.randn(hidden) * 0.1
sd["lm_head.weight"] = torch.randn(vocab, hidden) * 0.02
torch.save(sd, path)
"""

NAIVE_CAST = """
import sys, torch, safetensors.torch
dtype = getattr(torch, sys.argv[3])
state = torch.load(sys.argv[1])
safetensors.torch.save_file({k: v.to(dtype) for k, v in state.items()}, sys.argv[2])
"""

NAIVE_RENAME = """
import re, sys, safetensors.torch
state = safetensors.torch.load_file(sys.argv[1])
exclude, renames = re.compile(sys.argv[3]), [rule.split("=", 1) for rule in sys.argv[4:]]
out = {}
for key, value in state.items():
    if exclude.fullmatch(key):
        continue
    key = key.removeprefix("module.")
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    out[key] = value
safetensors.torch.save_file(out, sys.argv[2])
"""

STARTUP_NAIVE = "import torch, safetensors.torch"
CHUNK = 4 << 20
GNU_TIME = "/usr/bin/time"


@dataclass
class Measured(Samples):
    """bench.py's samples (wall seconds, peak RSS) plus CPU seconds (user + system): on a shared,
    noisy machine the CPU time shows what a command costs when its wall time is disturbed."""

    cpu: list[float] = field(default_factory=list)

    def record(self, seconds: float, rss_kib: int, cpu: float) -> None:
        self.add(seconds, rss_kib)
        self.cpu.append(cpu)

    @property
    def cpu_time(self) -> float:
        return statistics.median(self.cpu)


def run(command: list[str], cwd: Path | None = None) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (KiB) and CPU seconds of one process, as GNU time measures the last two."""
    report = Path(tempfile.mkstemp(prefix="sdconvert-bench-rss-")[1])
    try:
        elapsed, _ = bench.run([GNU_TIME, "-f", "%M %U %S", "-o", str(report), *command], cwd)
        rss, user, system = report.read_text().split("\n")[-2].split()
        return elapsed, int(rss), float(user) + float(system)
    finally:
        report.unlink()


def layout(hidden: int, target: int) -> int:
    """Layers that bring the checkpoint closest to ``target`` bytes (float32), at least one."""
    inter, vocab = -(-8 * hidden // 3 // 256) * 256, 16 * hidden
    fixed = 4 * (2 * vocab * hidden + hidden)
    per_layer = 4 * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden)
    return max(1, round((target - fixed) / per_layer))


def safetensors_tensors(path: Path) -> dict[str, tuple[str, list[int], int, int]]:
    """key -> (dtype, shape, start, end) from a safetensors header, parsed here (not by either tool)."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    base = 8 + length
    header.pop("__metadata__", None)
    return {
        key: (entry["dtype"], entry["shape"], base + entry["data_offsets"][0], base + entry["data_offsets"][1])
        for key, entry in header.items()
    }


def assert_same_tensors(a: Path, b: Path) -> int:
    """Raise unless ``a`` and ``b`` hold the same keys with the same dtype, shape and raw bytes;
    return the number of tensor bytes compared."""
    ta, tb = safetensors_tensors(a), safetensors_tensors(b)
    if sorted(ta) != sorted(tb):
        raise SystemExit(f"{a} and {b} hold different keys: {sorted(set(ta) ^ set(tb))[:5]}")
    compared = 0
    piece_a, piece_b = bytearray(CHUNK), bytearray(CHUNK)
    with a.open("rb", buffering=0) as fa, b.open("rb", buffering=0) as fb:
        for key, (dtype, shape, start, end) in ta.items():
            other = tb[key]
            if (dtype, shape) != other[:2] or end - start != other[3] - other[2]:
                raise SystemExit(f"{a} and {b} differ at {key!r}: {dtype} {shape} vs {other[0]} {other[1]}")
            fa.seek(start)
            fb.seek(other[2])
            left = end - start
            while left:
                n = min(left, CHUNK)
                view_a, view_b = memoryview(piece_a)[:n], memoryview(piece_b)[:n]
                if fa.readinto(view_a) != n or fb.readinto(view_b) != n:
                    raise SystemExit(f"{a} or {b}: short read at {key!r}")
                if (piece_a != piece_b) if n == CHUNK else (piece_a[:n] != piece_b[:n]):  # memcmp
                    raise SystemExit(f"{a} and {b} differ at {key!r}: the bytes differ")
                left -= n
            compared += end - start
    return compared


def measure(folder: Path, pt: Path, ddp: Path, rounds: int) -> dict[str, Measured]:
    ours = [sys.executable, str(CLI), "convert"]
    rename_flags = ["--strip-prefix", "auto", "--exclude", EXCLUDE]
    for rule in RENAMES:
        rename_flags += ["--rename", rule]
    naive_exclude = EXCLUDE.replace(".", r"\.").replace("*", r"[^/]*")
    results: dict[str, Measured] = {}

    def timed(label: str, command: list[str], out: Path) -> None:
        out.unlink(missing_ok=True)  # a new destination each time
        # Nobody fsyncs here, so each command leaves up to 1 GiB of dirty pages behind: sync (not
        # timed) so that no command is timed while the previous one's pages are written back.
        os.sync()
        results.setdefault(label, Measured()).record(*run(command))

    def rotated(jobs: list[tuple[str, list[str], Path]], round_index: int) -> list[tuple[str, list[str], Path]]:
        """Each round starts the group at the next command: no command always follows the same one."""
        shift = round_index % len(jobs)
        return jobs[shift:] + jobs[:shift]

    for round_index in range(rounds):
        print(f"  round {round_index + 1}/{rounds}", file=sys.stderr, flush=True)
        for label, command in (
            ("startup ours", [sys.executable, str(CLI), "--help"]),
            ("startup naive", [sys.executable, "-c", STARTUP_NAIVE]),
        ):
            results.setdefault(label, Measured()).record(*run(command))
        for dtype in ("bfloat16", "float16"):
            mine, theirs = folder / f"ours-{dtype}.safetensors", folder / f"naive-{dtype}.safetensors"
            casts = [
                (f"ours {dtype}", [*ours, str(pt), str(mine), "--dtype", dtype, "--quiet", "--no-fsync"], mine),
                (f"naive {dtype}", [sys.executable, "-c", NAIVE_CAST, str(pt), str(theirs), dtype], theirs),
            ]
            for job in rotated(casts, round_index):
                timed(*job)
            assert_same_tensors(mine, theirs)
            mine.unlink()
            theirs.unlink()
        plain, renamed = folder / "ours-plain.safetensors", folder / "ours-renamed.safetensors"
        naive_renamed, copied = folder / "naive-renamed.safetensors", folder / "cp.safetensors"
        copies = [
            ("cp", ["cp", str(ddp), str(copied)], copied),
            ("ours plain", [*ours, str(ddp), str(plain), "--quiet", "--no-fsync"], plain),
            ("ours renamed", [*ours, str(ddp), str(renamed), *rename_flags, "--quiet", "--no-fsync"], renamed),
            (
                "naive renamed",
                [sys.executable, "-c", NAIVE_RENAME, str(ddp), str(naive_renamed), naive_exclude, *RENAMES],
                naive_renamed,
            ),
        ]
        for job in rotated(copies, round_index):
            timed(*job)
        assert_same_tensors(plain, copied)
        assert_same_tensors(renamed, naive_renamed)
        for out in (plain, renamed, naive_renamed, copied):
            out.unlink()
    return results


def table(results: dict[str, Measured], size_mib: float) -> list[str]:
    start = {"ours": results["startup ours"].time, "naive": results["startup naive"].time}
    start_rss = {"ours": statistics.median(results["startup ours"].rss_mib)}
    start_rss["naive"] = statistics.median(results["startup naive"].rss_mib)
    rows = [
        (f"pt → bf16 safetensors, `convert --dtype bfloat16` ({size_mib:.0f} MiB)", "ours bfloat16", "naive bfloat16"),
        ("naive: torch.load + `.to(torch.bfloat16)` + save_file", "naive bfloat16", "naive bfloat16"),
        (f"pt → fp16 safetensors, `convert --dtype float16` ({size_mib:.0f} MiB)", "ours float16", "naive float16"),
        ("naive: torch.load + `.to(torch.float16)` + save_file", "naive float16", "naive float16"),
        ("safetensors → safetensors, plain `convert`", "ours plain", "naive renamed"),
        ("… with `--strip-prefix auto --rename ×2 --exclude`", "ours renamed", "naive renamed"),
        ("naive: load_file + renamed dict + save_file", "naive renamed", "naive renamed"),
        ("`cp` of the same file", "cp", "naive renamed"),
    ]
    lines = [
        "| command | time (median) | range | ratio vs naive | CPU (median) | peak RSS | above start-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for text, label, naive in rows:
        sample, base = results[label], results[naive]
        kind = "naive" if label.startswith("naive") else "ours"
        above = "" if label == "cp" else f"{sample.rss - start_rss[kind]:.0f} MiB"
        lines.append(
            f"| {text} | {sample.time:.2f} s | {min(sample.seconds):.2f}–{max(sample.seconds):.2f} s "
            f"| {sample.time / base.time:.2f}× | {sample.cpu_time:.2f} s | {sample.rss:.0f} MiB | {above} |"
        )
    lines.append(
        f"| (start-up alone: ours `cli.py --help` / naive `import torch, safetensors.torch`) "
        f"| {start['ours']:.2f} s / {start['naive']:.2f} s | | | "
        f"| {start_rss['ours']:.0f} / {start_rss['naive']:.0f} MiB | |"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="1G")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=None, help="where to put the files (default: a temp folder)")
    args = parser.parse_args()
    if not os.access(GNU_TIME, os.X_OK):
        raise SystemExit(f"{GNU_TIME} (GNU time) is needed for the peak RSS of each command")
    folder = Path(tempfile.mkdtemp(prefix="sdconvert-bench-transforms-", dir=args.folder))
    # Byte-compile first (see bench.py): no measured process compiles the package from source.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "converters")], check=False)
    try:
        print(f"machine: {machine()}")
        hidden = SIZES[args.size]
        layers = layout(hidden, TARGET[args.size])
        pt, ddp = folder / "source.pt", folder / "ddp.safetensors"
        run([sys.executable, "-c", MAKE_CHECKPOINT, str(hidden), str(layers), str(pt)])
        run([sys.executable, str(CLI), "convert", str(pt), str(ddp), "--rename", "^=module.", "--quiet", "--no-fsync"])
        size_mib = pt.stat().st_size / 2**20
        count = len(safetensors_tensors(ddp))
        print(
            f"checkpoint: {size_mib:.0f} MiB, {count} float32 tensors (h={hidden}, {layers} layers), "
            f"{args.rounds} rounds, medians; outputs of ours and the naive path compared bit for bit each round\n"
        )
        results = measure(folder, pt, ddp, args.rounds)
        print("\n".join(table(results, size_mib)), flush=True)
        plain, renamed = results["ours plain"], results["ours renamed"]
        print(
            f"\nrenamed / plain convert: {renamed.time / plain.time:.2f}× wall, "
            f"{renamed.cpu_time / plain.cpu_time:.2f}× CPU (the same byte copy under other keys)"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
