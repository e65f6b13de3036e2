"""Reading torch's legacy (non-zip) files, against torch itself, measured in one interleaved run.

    python bench/legacy.py                      # the README row: 1 GiB, 3 rounds
    python bench/legacy.py --size 256M --rounds 5

The checkpoint is a float32 decoder-only transformer state_dict (embedding and output layer
[16h, h], per layer q/k/v/o [h, h], gate/up [8h/3, h], down [h, 8h/3], two norms [h] and the
rotary `inv_freq` buffer older Llama checkpoints carry; h = 1024 and 18 layers at 1G: 183
tensors), saved with `torch.save(sd, f, _use_new_zipfile_serialization=False)`: the file torch
wrote before 1.6, a pickle followed by each storage's raw bytes. Converted to safetensors by

- ours: `cli.py convert legacy.pt out.safetensors --no-fsync` (neither the other path nor `cp`
  fsyncs), which reads the pickle without torch and copies each storage's bytes from the file with
  the kernel (`copy_file_range`), hashing them on the way;
- naive: `torch.load(f, weights_only=True)` (which reads every storage into memory) followed by
  `safetensors.torch.save_file`;

plus `cp` of the same file, for the disk's speed. Each command is its own process (start-up and
imports included), starts after a `sync` (not timed) and writes a new destination; each round
starts at the next command, so none always follows the same one; medians are printed, with the
ratio against the naive path of the same run. After every round the two outputs are compared
tensor by tensor (keys, dtype, shape, raw bytes, read straight from the files' headers and data,
not by either tool); a difference stops the benchmark. Peak RSS is GNU time's %M (not wait4()
here: a child's ru_maxrss starts at its parent's peak); "above start-up" subtracts the median peak of the same
interpreter doing only its start-up: `cli.py --help` for ours, `import torch, safetensors.torch`
for the naive path.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # bench/bench.py: the shared conventions
from bench import CLI, ROOT, Samples, machine

SIZES = {"64M": 256, "256M": 512, "1G": 1024}  # hidden size h; layers are added up to about that many bytes
TARGET = {"64M": 64 << 20, "256M": 256 << 20, "1G": 1 << 30}

MAKE_CHECKPOINT = """
import sys, torch
hidden, layers, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
inter, vocab, head = -(-8 * hidden // 3 // 256) * 256, 16 * hidden, 64
torch.manual_seed(0)
sd = {"model.embed_tokens.weight": torch.randn(vocab, hidden) * 0.02}
for i in range(layers):
    p = f"model.layers.{i}."
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        sd[p + f"self_attn.{name}.weight"] = torch.randn(hidden, hidden) * 0.02
    sd[p + "self_attn.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, head, 2).float() / head)
    sd[p + "mlp.gate_proj.weight"] = torch.randn(inter, hidden) * 0.02
    sd[p + "mlp.up_proj.weight"] = torch.randn(inter, hidden) * 0.02
    sd[p + "mlp.down_proj.weight"] = torch.randn(hidden, inter) * 0.02
    sd[p + "input_layernorm.weight"] = 1 + torch.randn(hidden) * 0.1
    sd[p + "post_attention_layernorm.weight"] = 1 + torch.randn(hidden) * 0.1
sd["model.norm.weight"] = 1 + torch.randn(hidden) * 0.1
sd["lm_head.weight"] = torch.randn(vocab, hidden) * 0.02
torch.save(sd, path, _use_new_zipfile_serialization=False)
"""

NAIVE = """
import sys, torch, safetensors.torch
safetensors.torch.save_file(torch.load(sys.argv[1], weights_only=True), sys.argv[2])
"""
STARTUP_NAIVE = "import torch, safetensors.torch"
GNU_TIME = "/usr/bin/time"
CHUNK = 4 << 20


def run(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one process, its RSS as GNU time measures it (%M: a
    child's ru_maxrss from wait4() in this process would start at this process's own peak)."""
    report = Path(tempfile.mkstemp(prefix="sdconvert-bench-rss-")[1])
    try:
        elapsed, _ = bench.run([GNU_TIME, "-f", "%M", "-o", str(report), *command])
        return elapsed, int(report.read_text().split()[-1])
    finally:
        report.unlink()


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
    with a.open("rb") as fa, b.open("rb") as fb:
        for key, (dtype, shape, start, end) in ta.items():
            other = tb[key]
            if (dtype, shape) != other[:2] or end - start != other[3] - other[2]:
                raise SystemExit(f"{a} and {b} differ at {key!r}: {dtype} {shape} vs {other[0]} {other[1]}")
            fa.seek(start)
            fb.seek(other[2])
            for offset in range(0, end - start, CHUNK):
                n = min(CHUNK, end - start - offset)
                if fa.read(n) != fb.read(n):
                    raise SystemExit(f"{a} and {b} differ at {key!r}: the bytes differ")
            compared += end - start
    return compared


def layers_for(hidden: int, target: int) -> int:
    """Layers that bring the checkpoint closest to ``target`` bytes (float32), at least one."""
    inter, vocab = -(-8 * hidden // 3 // 256) * 256, 16 * hidden
    fixed = 4 * (2 * vocab * hidden + hidden)
    per_layer = 4 * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden)
    return max(1, round((target - fixed) / per_layer))


def measure(folder: Path, source: Path, rounds: int) -> dict[str, Samples]:
    results: dict[str, Samples] = {}
    ours_out, naive_out, copied = folder / "ours.safetensors", folder / "naive.safetensors", folder / "copy.pt"
    jobs = [
        ("ours", [sys.executable, str(CLI), "convert", str(source), str(ours_out), "--quiet", "--no-fsync"], ours_out),
        ("naive", [sys.executable, "-c", NAIVE, str(source), str(naive_out)], naive_out),
        ("cp", ["cp", str(source), str(copied)], copied),
    ]
    for round_index in range(rounds):
        print(f"  round {round_index + 1}/{rounds}", file=sys.stderr, flush=True)
        for label, command in (
            ("startup ours", [sys.executable, str(CLI), "--help"]),
            ("startup naive", [sys.executable, "-c", STARTUP_NAIVE]),
        ):
            results.setdefault(label, Samples()).add(*run(command))
        shift = round_index % len(jobs)
        for label, command, out in jobs[shift:] + jobs[:shift]:
            out.unlink(missing_ok=True)  # a new destination each time
            os.sync()  # not timed: no command runs while the previous one's pages are written back
            results.setdefault(label, Samples()).add(*run(command))
        compared = assert_same_tensors(ours_out, naive_out)
        print(f"  outputs bit-identical ({compared / 2**20:.0f} MiB of tensors compared)", file=sys.stderr)
        for out in (ours_out, naive_out, copied):
            out.unlink()
    return results


def table(results: dict[str, Samples], size_mib: float, count: int) -> list[str]:
    start_rss = {kind: statistics.median(results[f"startup {kind}"].rss_mib) for kind in ("ours", "naive")}
    naive = results["naive"]
    rows = [
        (f"legacy .pt → safetensors, `convert --no-fsync` ({size_mib:.0f} MiB, {count} tensors)", "ours"),
        ("naive: `torch.load(f, weights_only=True)` + `save_file`", "naive"),
        ("`cp` of the same file", "cp"),
    ]
    lines = [
        "| command | time (median) | range | ratio vs naive | peak RSS | above start-up |",
        "|---|---|---|---|---|---|",
    ]
    for text, label in rows:
        sample = results[label]
        above = "" if label == "cp" else f"{sample.rss - start_rss[label]:.0f} MiB"
        lines.append(
            f"| {text} | {sample.time:.2f} s | {min(sample.seconds):.2f}–{max(sample.seconds):.2f} s "
            f"| {sample.time / naive.time:.2f}× | {sample.rss:.0f} MiB | {above} |"
        )
    ours_start, naive_start = results["startup ours"], results["startup naive"]
    lines.append(
        f"| (start-up alone: ours `cli.py --help` / naive `import torch, safetensors.torch`) "
        f"| {ours_start.time:.2f} s / {naive_start.time:.2f} s | | "
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
    folder = Path(tempfile.mkdtemp(prefix="sdconvert-bench-legacy-", dir=args.folder))
    # Byte-compile first (see bench.py): no measured process compiles the package from source.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "converters")], check=False)
    try:
        print(f"machine: {machine()}")
        hidden = SIZES[args.size]
        layers = layers_for(hidden, TARGET[args.size])
        source = folder / "legacy.pt"
        run([sys.executable, "-c", MAKE_CHECKPOINT, str(hidden), str(layers), str(source)])
        with source.open("rb") as handle:
            if handle.read(1) != b"\x80":  # a pickle, not a zip: the legacy file
                raise SystemExit(f"{source} is not a legacy (non-zip) torch file")
        size_mib = source.stat().st_size / 2**20
        probe = folder / "probe.safetensors"
        run([sys.executable, str(CLI), "convert", str(source), str(probe), "--quiet", "--no-fsync"])
        count = len(safetensors_tensors(probe))
        probe.unlink()
        print(
            f"checkpoint: {size_mib:.0f} MiB legacy torch.save file, {count} float32 tensors (h={hidden}, "
            f"{layers} layers), {args.rounds} rounds, medians; outputs compared bit for bit each round\n"
        )
        results = measure(folder, source, args.rounds)
        print("\n".join(table(results, size_mib, count)), flush=True)
        ours, naive = results["ours"], results["naive"]
        print(
            f"\nours / naive: {ours.time / naive.time:.2f}× the time ({naive.time / ours.time:.1f}× faster), "
            f"peak RSS above start-up {ours.rss - statistics.median(results['startup ours'].rss_mib):.0f} vs "
            f"{naive.rss - statistics.median(results['startup naive'].rss_mib):.0f} MiB"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
