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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from bench import CLI

SIZES = {"64M": 256, "256M": 512, "1G": 1024}  # hidden size h; layers are added up to about that many bytes

MAKE_CHECKPOINT = common.transformer_script(rotary_buffers=True, legacy_file=True)

NAIVE = """
import sys, torch, safetensors.torch
safetensors.torch.save_file(torch.load(sys.argv[1], weights_only=True), sys.argv[2])
"""
STARTUP_NAIVE = "import torch, safetensors.torch"


def measure(folder: Path, source: Path, rounds: int) -> dict[str, common.Measured]:
    results: dict[str, common.Measured] = {}
    ours_out, naive_out, copied = folder / "ours.safetensors", folder / "naive.safetensors", folder / "copy.pt"
    jobs = [
        ("ours", [sys.executable, str(CLI), "convert", str(source), str(ours_out), "--quiet", "--no-fsync"], ours_out),
        ("naive", [sys.executable, "-c", NAIVE, str(source), str(naive_out)], naive_out),
        ("cp", ["cp", str(source), str(copied)], copied),
    ]
    for round_index in range(rounds):
        common.start_round(results, round_index, rounds, STARTUP_NAIVE)
        common.run_rotated(results, jobs, round_index)
        compared = common.assert_same_tensors(ours_out, naive_out)
        print(f"  outputs bit-identical ({compared / 2**20:.0f} MiB of tensors compared)", file=sys.stderr)
        for out in (ours_out, naive_out, copied):
            out.unlink()
    return results


def table(results: dict[str, common.Measured], size_mib: float, count: int) -> list[str]:
    rows: list[tuple[str, str, str, str | None]] = [
        (
            f"legacy .pt → safetensors, `convert --no-fsync` ({size_mib:.0f} MiB, {count} tensors)",
            "ours",
            "naive",
            "ours",
        ),
        ("naive: `torch.load(f, weights_only=True)` + `save_file`", "naive", "naive", "naive"),
        ("`cp` of the same file", "cp", "naive", None),
    ]
    return common.table(results, rows, STARTUP_NAIVE, cpu_column=False)


def main() -> None:
    with common.session(__doc__, SIZES, "legacy") as (args, folder):
        hidden = SIZES[args.size]
        layers = common.layers_for(hidden, common.TARGET[args.size])
        source = folder / "legacy.pt"
        common.run([sys.executable, "-c", MAKE_CHECKPOINT, str(hidden), str(layers), str(source)])
        with source.open("rb") as handle:
            if handle.read(1) != b"\x80":  # a pickle, not a zip: the legacy file
                raise SystemExit(f"{source} is not a legacy (non-zip) torch file")
        size_mib = source.stat().st_size / 2**20
        probe = folder / "probe.safetensors"
        common.run([sys.executable, str(CLI), "convert", str(source), str(probe), "--quiet", "--no-fsync"])
        count = len(common.safetensors_tensors(probe))
        probe.unlink()
        print(
            f"checkpoint: {size_mib:.0f} MiB legacy torch.save file, {count} float32 tensors (h={hidden}, "
            f"{layers} layers), {args.rounds} rounds, medians; outputs compared bit for bit each round\n"
        )
        results = measure(folder, source, args.rounds)
        print("\n".join(table(results, size_mib, count)), flush=True)
        ours, naive, start_rss = results["ours"], results["naive"], common.startup_rss(results)
        print(
            f"\nours / naive: {ours.time / naive.time:.2f}× the time ({naive.time / ours.time:.1f}× faster), "
            f"peak RSS above start-up {ours.rss - start_rss['ours']:.0f} vs {naive.rss - start_rss['naive']:.0f} MiB"
        )


if __name__ == "__main__":
    main()
