"""What the benchmarks against the naive path (legacy.py, transforms.py, flax_layout.py) share.

Peak RSS comes from GNU time's %M (the maximum resident set of the command): not from wait4() in
this process as in bench.py, because a child's ru_maxrss starts at its parent's peak (Linux
carries it over vfork/fork and exec), which would put this process's ~16 MiB under every figure.
Every command writes a new destination (the previous one deleted first) and starts after an
untimed `sync`; each round starts each group at the next command, so none always follows the same
one. "Above start-up" subtracts the median peak of the same interpreter doing only its start-up.
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # bench/bench.py: the shared conventions
from bench import CLI, ROOT, Samples, machine

GNU_TIME = "/usr/bin/time"
CHUNK = 4 << 20
TARGET = {"64M": 64 << 20, "256M": 256 << 20, "1G": 1 << 30}  # bytes each --size aims at


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


def start_round(results: dict[str, Measured], round_index: int, rounds: int, startup_naive: str) -> None:
    """Say which round this is and time both interpreters doing only their start-up: `cli.py --help`
    for ours, ``startup_naive`` (its imports) for the naive path."""
    print(f"  round {round_index + 1}/{rounds}", file=sys.stderr, flush=True)
    for label, command in (
        ("startup ours", [sys.executable, str(CLI), "--help"]),
        ("startup naive", [sys.executable, "-c", startup_naive]),
    ):
        results.setdefault(label, Measured()).record(*run(command))


def run_rotated(results: dict[str, Measured], jobs: list[tuple[str, list[str], Path]], round_index: int) -> None:
    """Time each (label, command, destination) of ``jobs``, starting at the next one each round."""
    shift = round_index % len(jobs)
    for label, command, out in jobs[shift:] + jobs[:shift]:
        out.unlink(missing_ok=True)  # a new destination each time
        # Nobody fsyncs here, so each command leaves up to 1 GiB of dirty pages behind: sync (not
        # timed) so that no command is timed while the previous one's pages are written back.
        os.sync()
        results.setdefault(label, Measured()).record(*run(command))


def startup_rss(results: dict[str, Measured]) -> dict[str, float]:
    """The median peak RSS (MiB) of start-up alone, for "ours" and "naive"."""
    return {kind: statistics.median(results[f"startup {kind}"].rss_mib) for kind in ("ours", "naive")}


def table(
    results: dict[str, Measured], rows: list[tuple[str, str, str, str | None]], startup_naive: str, cpu_column: bool
) -> list[str]:
    """The Markdown table: a row per (text, label, label of the sample the ratio is against, whose
    start-up ("ours", "naive" or None: none) "above start-up" subtracts), CPU times if
    ``cpu_column``, then start-up alone (``startup_naive`` the naive path's), ours / naive."""
    start_rss = startup_rss(results)
    cpu_head, cpu_rule, empty = ("CPU (median) | ", "---|", "| | | ") if cpu_column else ("", "", "| | ")
    lines = [
        f"| command | time (median) | range | ratio vs naive | {cpu_head}peak RSS | above start-up |",
        f"|---|---|---|---|{cpu_rule}---|---|",
    ]
    for text, label, against, kind in rows:
        sample = results[label]
        cpu = f"{sample.cpu_time:.2f} s | " if cpu_column else ""
        above = "" if kind is None else f"{sample.rss - start_rss[kind]:.0f} MiB"
        lines.append(
            f"| {text} | {sample.time:.2f} s | {min(sample.seconds):.2f}–{max(sample.seconds):.2f} s "
            f"| {sample.time / results[against].time:.2f}× | {cpu}{sample.rss:.0f} MiB | {above} |"
        )
    lines.append(
        f"| (start-up alone: ours `cli.py --help` / naive `{startup_naive}`) "
        f"| {results['startup ours'].time:.2f} s / {results['startup naive'].time:.2f} s {empty}"
        f"| {start_rss['ours']:.0f} / {start_rss['naive']:.0f} MiB | |"
    )
    return lines


def transformer_script(rotary_buffers: bool, legacy_file: bool) -> str:
    """Python that writes the float32 decoder-only transformer state_dict (sizes: ``layers_for``)
    of argv[1] hidden size and argv[2] layers to argv[3] with torch.save; with ``rotary_buffers``
    each layer's rotary `inv_freq` buffer (older Llama checkpoints carry it), with ``legacy_file``
    the file torch wrote before 1.6 (`_use_new_zipfile_serialization=False`)."""
    rotary = (
        '    sd[p + "self_attn.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, head, 2).float() / head)\n'
        if rotary_buffers
        else ""
    )
    return f"""
import sys, torch
hidden, layers, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
inter, vocab, head = -(-8 * hidden // 3 // 256) * 256, 16 * hidden, 64
torch.manual_seed(0)
sd = {{"model.embed_tokens.weight": torch.randn(vocab, hidden) * 0.02}}
for i in range(layers):
    p = f"model.layers.{{i}}."
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        sd[p + f"self_attn.{{name}}.weight"] = torch.randn(hidden, hidden) * 0.02
{rotary}    sd[p + "mlp.gate_proj.weight"] = torch.randn(inter, hidden) * 0.02
    sd[p + "mlp.up_proj.weight"] = torch.randn(inter, hidden) * 0.02
    sd[p + "mlp.down_proj.weight"] = torch.randn(hidden, inter) * 0.02
    sd[p + "input_layernorm.weight"] = 1 + torch.randn(hidden) * 0.1
    sd[p + "post_attention_layernorm.weight"] = 1 + torch.randn(hidden) * 0.1
sd["model.norm.weight"] = 1 + torch.randn(hidden) * 0.1
sd["lm_head.weight"] = torch.randn(vocab, hidden) * 0.02
torch.save(sd, path{", _use_new_zipfile_serialization=False" if legacy_file else ""})
"""


def layers_for(hidden: int, target: int) -> int:
    """Layers of the float32 decoder-only transformer (embedding and output layer [16h, h], per layer
    q/k/v/o [h, h], gate/up [8h/3, h], down [h, 8h/3], two norms [h]) that bring the checkpoint
    closest to ``target`` bytes, at least one."""
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
    """Stop unless ``a`` and ``b`` hold the same keys with the same dtype, shape and raw bytes;
    the number of tensor bytes compared."""
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


@contextmanager
def session(
    description: str | None, sizes: dict[str, int], name: str, default: str = "1G"
) -> Iterator[tuple[argparse.Namespace, Path]]:
    """Parse --size (one of ``sizes``), --rounds and --folder, check for GNU time, byte-compile the
    package and print the machine; the arguments and a temp folder, removed afterwards."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(sizes), default=default)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=None, help="where to put the files (default: a temp folder)")
    args = parser.parse_args()
    if not os.access(GNU_TIME, os.X_OK):
        raise SystemExit(f"{GNU_TIME} (GNU time) is needed for the peak RSS of each command")
    folder = Path(tempfile.mkdtemp(prefix=f"sdconvert-bench-{name}-", dir=args.folder))
    # Byte-compile first (see bench.py): no measured process compiles the package from source.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "converters")], check=False)
    try:
        print(f"machine: {machine()}")
        yield args, folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
