"""atheris target: every reader on arbitrary bytes; a finding is anything but ConverterError, or an
input that costs more memory or time than the read budget allows (2 x its size + 100 MB of peak
RSS, a few seconds of CPU per MiB: see tests/helpers.py `within_resource_bounds`).

    make fuzz                                   # 10 minutes, seeds from valid files
    .venv/bin/python fuzz/fuzz_readers.py -max_total_time=3600 fuzz/corpus

The first input byte picks the format, the rest is the file.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path
from typing import Any

import atheris

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
with atheris.instrument_imports():
    import converters
    import converters.api
    from converters.core import manifests
    from converters.core.sources import read_all
    from converters.formats import BUILTIN_MODULES

    # Formats are imported on first use; import them here so that their code is instrumented.
    for _module in BUILTIN_MODULES.values():
        importlib.import_module(_module)
from helpers import within_resource_bounds  # noqa: E402

FORMATS = list(BUILTIN_MODULES)
BUILTIN_FORMATS = [converters.registry.get(name) for name in FORMATS]
FOLDER = Path(tempfile.mkdtemp(prefix="sdconvert-fuzz-"))


def test_one_input(data: bytes) -> None:
    if not data:
        return
    fmt = FORMATS[data[0] % len(FORMATS)]
    path = FOLDER / "input"
    path.write_bytes(data[1:])
    with within_resource_bounds(len(data) - 1):
        try:
            checkpoint = converters.read(path, fmt)
            for _, ref in checkpoint.unique_tensors():
                read_all(ref.source)
            manifests.build(checkpoint)
        except converters.ConverterError:
            pass


def write_seeds(corpus: Path) -> None:
    """Valid files of every format, as starting points for mutation."""
    import torch

    corpus.mkdir(parents=True, exist_ok=True)
    tree = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 1, "betas": (0.9, 0.99)}
    for index, fmt in enumerate(BUILTIN_FORMATS):
        if fmt.folder:  # the fuzzer writes one file per input; folder formats have their own tests
            continue
        path = FOLDER / f"seed{fmt.suffixes[0]}"
        converters.save(tree, path)
        (corpus / f"seed-{fmt.name}").write_bytes(bytes([index]) + path.read_bytes())
    # torch's legacy (non-zip) layout, read by the pt format too: magic, sys_info and object pickles,
    # the storage keys, raw storages (a view sharing one of them, and a strided one)
    legacy = FOLDER / "seed-legacy.pt"
    base = torch.arange(12.0).reshape(3, 4)
    torch.save({**tree, "row": base[1], "t": base.t()}, legacy, _use_new_zipfile_serialization=False)
    (corpus / "seed-pt-legacy").write_bytes(bytes([FORMATS.index("pt")]) + legacy.read_bytes())
    # objects beyond the tree: recorded (Namespace, defaultdict, deque, a parent pointer through
    # omegaconf-like state), numpy values made exact, bytes and sets
    import argparse
    import collections

    import numpy as np

    objects = FOLDER / "seed-objects.pt"
    namespace = argparse.Namespace(lr=0.1, layers=[1, 2], name="x")
    torch.save(
        {
            **tree,
            "args": namespace,
            "counts": collections.defaultdict(list, {"a": [1]}),
            "queue": collections.deque([1, 2], maxlen=3),
            "array": np.arange(6, dtype=np.float32).reshape(2, 3),
            "scalar": np.float64(0.5),
            "raw": b"\x00\xff",
            "ids": {1, 2},
        },
        objects,
    )
    (corpus / "seed-pt-objects").write_bytes(bytes([FORMATS.index("pt")]) + objects.read_bytes())
    # a TorchScript archive: pickled modules, their code files (parsed as text, never run)
    scripted = FOLDER / "seed-torchscript.pt"
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Linear(2, 2))
    torch.jit.save(torch.jit.script(model), str(scripted))
    (corpus / "seed-pt-torchscript").write_bytes(bytes([FORMATS.index("pt")]) + scripted.read_bytes())


def write_hostile_seeds(corpus: Path, limit: int = 1 << 20) -> None:
    """The hostile tables of the test suite as seeds (each under ``limit`` bytes), so mutation starts
    from the shapes that once cost gigabytes or crashed: bombs, lying counts, inert-object abuse."""
    import test_bad_inputs
    import test_gguf
    import test_hostile_pt
    import test_hostile_writes
    import test_legacy_pt
    import test_npz

    tables: list[tuple[str, str, Any]] = [("pt", f"pt-{row[0]}", row[1]) for row in test_hostile_pt.CASES]
    tables += [("pt", f"pt-legacy-{row[0]}", row[1]) for row in test_legacy_pt.CASES]
    tables += [("onnx", f"onnx-{name}", build) for name, build in test_hostile_writes.HOSTILE_ONNX.items()]
    tables += [("gguf", f"gguf-{row[0]}", row[1]) for row in test_gguf.CASES]
    tables += [("npz", f"npz-{row[0]}", row[2]) for row in test_npz.HOSTILE]
    for row in test_bad_inputs.CASES:
        fmt = converters.registry.for_suffix(Path(row[1]))
        if fmt is not None:
            tables.append((fmt.name, f"bad-{row[0]}", row[2]))
    for fmt_name, name, build in tables:
        try:
            data = build()
        except Exception:  # a row that needs a test fixture: not a seed
            continue
        if isinstance(data, bytes) and len(data) < limit:
            (corpus / f"hostile-{name}").write_bytes(bytes([FORMATS.index(fmt_name)]) + data)


if __name__ == "__main__":
    corpora = [Path(arg) for arg in sys.argv[1:] if not arg.startswith("-")]
    for corpus in corpora:
        write_seeds(corpus)
        write_hostile_seeds(corpus)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
