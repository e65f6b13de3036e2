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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from bench import CLI

SIZES = {"64M": 256, "256M": 768, "1G": 1536}  # hidden size h; layers are added up to about that many bytes
EXCLUDE = "module.model.layers.*.input_layernorm.weight"  # a glob within one key
RENAMES = [r"^model\.layers\.=blocks.", r"^lm_head\.=output."]

MAKE_CHECKPOINT = common.transformer_script(rotary_buffers=False, legacy_file=False)

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


def measure(folder: Path, pt: Path, ddp: Path, rounds: int) -> dict[str, common.Measured]:
    ours = [sys.executable, str(CLI), "convert"]
    rename_flags = ["--strip-prefix", "auto", "--exclude", EXCLUDE]
    for rule in RENAMES:
        rename_flags += ["--rename", rule]
    naive_exclude = EXCLUDE.replace(".", r"\.").replace("*", r"[^/]*")
    results: dict[str, common.Measured] = {}
    for round_index in range(rounds):
        common.start_round(results, round_index, rounds, STARTUP_NAIVE)
        for dtype in ("bfloat16", "float16"):
            mine, theirs = folder / f"ours-{dtype}.safetensors", folder / f"naive-{dtype}.safetensors"
            casts = [
                (f"ours {dtype}", [*ours, str(pt), str(mine), "--dtype", dtype, "--quiet", "--no-fsync"], mine),
                (f"naive {dtype}", [sys.executable, "-c", NAIVE_CAST, str(pt), str(theirs), dtype], theirs),
            ]
            common.run_rotated(results, casts, round_index)
            common.assert_same_tensors(mine, theirs)
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
        common.run_rotated(results, copies, round_index)
        common.assert_same_tensors(plain, copied)
        common.assert_same_tensors(renamed, naive_renamed)
        for out in (plain, renamed, naive_renamed, copied):
            out.unlink()
    return results


def table(results: dict[str, common.Measured], size_mib: float) -> list[str]:
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
    kind = {label: None if label == "cp" else "naive" if label.startswith("naive") else "ours" for _, label, _ in rows}
    return common.table(results, [(*row, kind[row[1]]) for row in rows], STARTUP_NAIVE, cpu_column=True)


def main() -> None:
    with common.session(__doc__, SIZES, "transforms") as (args, folder):
        hidden = SIZES[args.size]
        layers = common.layers_for(hidden, common.TARGET[args.size])
        pt, ddp = folder / "source.pt", folder / "ddp.safetensors"
        common.run([sys.executable, "-c", MAKE_CHECKPOINT, str(hidden), str(layers), str(pt)])
        common.run(
            [sys.executable, str(CLI), "convert", str(pt), str(ddp), "--rename", "^=module.", "--quiet", "--no-fsync"]
        )
        size_mib = pt.stat().st_size / 2**20
        count = len(common.safetensors_tensors(ddp))
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


if __name__ == "__main__":
    main()
