"""``convert --layout flax`` against the naive path, measured in one interleaved run.

    python bench/flax_layout.py                    # the README rows: 1 GiB, 3 rounds
    python bench/flax_layout.py --size 256M --rounds 5

The checkpoint is a float32 state_dict saved by torch.save, with every kind of tensor the flax
table knows: an embedding [8w, w] (kept as it is), L blocks of Linear(w, w) + LayerNorm (kernels
transposed), 8 Conv2d(w/4, w/4, 3×3) + BatchNorm2d (kernels permuted to [3, 3, in, out], running
statistics to batch_stats, num_batches_tracked apart) and an output layer [8w, w] (transposed);
w = 2048 and L chosen for about 1 GiB (43 blocks): 87 % of its bytes are permuted.

Rows, each command its own process (start-up and imports included), interleaved round by round,
medians printed:

1. ours: ``cli.py convert source.pt out.msgpack --layout flax --no-fsync`` (the permutation streams
   through PermuteSource: one tensor at a time in memory);
2. the naive path in a subprocess: ``torch.load``, ``tensor.numpy().transpose(perm)`` into the same
   nested dict, ``flax.serialization.to_bytes``, written to a file;
3. ours without the layout (plain pt → msgpack), to show what the permutation itself costs.

Each command writes a new destination (the previous one deleted first) after an untimed ``sync``.
After every round the outputs of 1 and 2 are compared: both files are decoded by the msgpack
library (not by either tool) and every array's ext payload (shape, dtype, bytes) must be equal,
at the same path. Peak RSS comes from GNU time's %M; "above start-up" subtracts the median peak of
the same interpreter doing only its start-up (``cli.py --help`` for ours, ``import torch,
flax.serialization`` for the naive path). CPU is user + system.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

import bench  # bench/bench.py: the shared conventions
from bench import CLI

SIZES = {"64M": 512, "256M": 1024, "1G": 2048}  # width w

MAKE_CHECKPOINT = """
import sys, torch
width, blocks, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
channels, vocab = width // 4, 8 * width
torch.manual_seed(0)
sd = {"embed.weight": torch.randn(vocab, width) * 0.02}
for i in range(8):
    sd[f"convs.{i}.conv.weight"] = torch.randn(channels, channels, 3, 3) * 0.02
    sd[f"convs.{i}.conv.bias"] = torch.randn(channels) * 0.02
    sd[f"convs.{i}.bn.weight"] = 1 + torch.randn(channels) * 0.1
    sd[f"convs.{i}.bn.bias"] = torch.randn(channels) * 0.1
    sd[f"convs.{i}.bn.running_mean"] = torch.randn(channels) * 0.1
    sd[f"convs.{i}.bn.running_var"] = 1 + torch.rand(channels)
    sd[f"convs.{i}.bn.num_batches_tracked"] = torch.tensor(100)
for i in range(blocks):
    sd[f"blocks.{i}.fc.weight"] = torch.randn(width, width) * 0.02
    sd[f"blocks.{i}.fc.bias"] = torch.randn(width) * 0.02
    sd[f"blocks.{i}.norm.weight"] = 1 + torch.randn(width) * 0.1
    sd[f"blocks.{i}.norm.bias"] = torch.randn(width) * 0.1
sd["head.weight"] = torch.randn(vocab, width) * 0.02
sd["head.bias"] = torch.randn(vocab) * 0.02
torch.save(sd, path)
"""

# The naive path: what one writes without this tool, for this checkpoint's keys.
NAIVE = """
import sys, torch, flax.serialization
state = torch.load(sys.argv[1])
tree = {}
def put(path, value):
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
for key, tensor in state.items():
    parts = key.split(".")
    module, name = parts[:-1], parts[-1]
    merged = []
    for part in module:
        if part.isdigit():
            merged[-1] = f"{merged[-1]}_{part}"
        else:
            merged.append(part)
    array = tensor.numpy()
    if name == "weight" and module[-1] == "embed":
        put(["params", *merged, "embedding"], array)
    elif name == "weight" and array.ndim == 2:
        put(["params", *merged, "kernel"], array.transpose(1, 0))
    elif name == "weight" and array.ndim == 4:
        put(["params", *merged, "kernel"], array.transpose(2, 3, 1, 0))
    elif name == "weight":
        put(["params", *merged, "scale"], array)
    elif name == "bias":
        put(["params", *merged, "bias"], array)
    elif name == "running_mean":
        put(["batch_stats", *merged, "mean"], array)
    elif name == "running_var":
        put(["batch_stats", *merged, "var"], array)
    else:
        put(["torch_buffers", *merged, name], array)
with open(sys.argv[2], "wb") as out:
    out.write(flax.serialization.to_bytes(tree))
"""

STARTUP_NAIVE = "import torch, flax.serialization"


def blocks_for(width: int, target: int) -> int:
    """Linear blocks that bring the checkpoint closest to ``target`` bytes, at least one."""
    channels, vocab = width // 4, 8 * width
    fixed = 4 * (2 * vocab * width + vocab + 8 * (channels * channels * 9 + 5 * channels))
    per_block = 4 * (width * width + 3 * width)
    return max(1, round((target - fixed) / per_block))


def arrays(path: Path) -> dict[tuple[str, ...], bytes]:
    """path -> ext 1 payload (shape, dtype, bytes) of every array in a msgpack file, decoded by the
    msgpack library; our metadata key left out."""
    import msgpack

    root = msgpack.unpackb(path.read_bytes(), strict_map_key=False, ext_hook=lambda code, data: (code, data))
    root.pop("__sdconvert__", None)
    found: dict[tuple[str, ...], bytes] = {}

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, (*prefix, key))
        elif isinstance(node, tuple) and node[0] == 1:
            found[prefix] = node[1]
        else:
            raise SystemExit(f"{path}: unexpected value at {'/'.join(prefix)}: {type(node).__name__}")

    walk(root, ())
    return found


def assert_same_arrays(a: Path, b: Path) -> int:
    ours, theirs = arrays(a), arrays(b)
    if sorted(ours) != sorted(theirs):
        raise SystemExit(f"{a} and {b} hold different paths: {sorted(set(ours) ^ set(theirs))[:5]}")
    for path, payload in ours.items():
        if payload != theirs[path]:
            raise SystemExit(f"{a} and {b} differ at {'/'.join(path)}")
    return sum(len(payload) for payload in ours.values())


def measure(folder: Path, pt: Path, rounds: int) -> dict[str, common.Measured]:
    results: dict[str, common.Measured] = {}
    ours = [sys.executable, str(CLI), "convert", str(pt)]
    mine, theirs, plain = folder / "ours.msgpack", folder / "naive.msgpack", folder / "plain.msgpack"
    jobs = [
        ("ours layout", [*ours, str(mine), "--layout", "flax", "--quiet", "--no-fsync"], mine),
        ("naive", [sys.executable, "-c", NAIVE, str(pt), str(theirs)], theirs),
        ("ours plain", [*ours, str(plain), "--quiet", "--no-fsync"], plain),
    ]
    for round_index in range(rounds):
        common.start_round(results, round_index, rounds, STARTUP_NAIVE)
        common.run_rotated(results, jobs, round_index)
        compared = assert_same_arrays(mine, theirs)
        print(f"    ours and naive: {compared / 2**20:.0f} MiB of arrays identical", file=sys.stderr, flush=True)
        for out in (mine, theirs, plain):
            out.unlink()
    return results


def table(results: dict[str, common.Measured], size_mib: float) -> list[str]:
    rows: list[tuple[str, str, str, str | None]] = [
        (f"pt → flax msgpack, `convert --layout flax` ({size_mib:.0f} MiB)", "ours layout", "naive", "ours"),
        ("naive: torch.load + `.numpy().transpose` + `flax.serialization.to_bytes`", "naive", "naive", "naive"),
        ("pt → msgpack, plain `convert` (no layout)", "ours plain", "naive", "ours"),
    ]
    return common.table(results, rows, STARTUP_NAIVE, cpu_column=True)


def main() -> None:
    with common.session(__doc__, SIZES, "flax") as (args, folder):
        width = SIZES[args.size]
        blocks = blocks_for(width, common.TARGET[args.size])
        pt = folder / "source.pt"
        bench.run([sys.executable, "-c", MAKE_CHECKPOINT, str(width), str(blocks), str(pt)])
        size_mib = pt.stat().st_size / 2**20
        print(
            f"checkpoint: {size_mib:.0f} MiB float32 state_dict (w={width}, {blocks} Linear blocks, 8 conv+BN, "
            f"embedding and head [{8 * width}, {width}]), {args.rounds} rounds, medians; outputs of ours and the "
            "naive path compared array by array each round\n"
        )
        results = measure(folder, pt, args.rounds)
        print("\n".join(table(results, size_mib)), flush=True)
        layout, plain = results["ours layout"], results["ours plain"]
        print(
            f"\nthe permutation's own cost: {layout.time - plain.time:.2f} s wall, "
            f"{layout.cpu_time - plain.cpu_time:.2f} s CPU over the plain conversion"
        )


if __name__ == "__main__":
    main()
