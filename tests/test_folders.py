"""Hugging Face folders as ``save_pretrained`` and the ``Trainer`` write them (issue 14, part 6):
a folder of one ``model.safetensors`` or ``pytorch_model.bin``, and a Trainer ``checkpoint-N/``
folder read as one checkpoint ``{"model", "optimizer", "scheduler", "rng_state", "trainer_state",
"training_args"}``, by every command; what an unrecognised folder or a wrong ``--from`` says; and
hostile folders (a symlinked, FIFO or folder part, a huge or duplicate-keyed trainer_state.json).

transformers is not installed here, so the folders are written the way it writes them: weights with
``safetensors.torch.save_file(..., metadata={"format": "pt"})`` or ``torch.save``, the optimizer's,
scheduler's and scaler's ``state_dict()`` with ``torch.save``, the RNG states as
``Trainer._save_rng_state`` gathers them, ``trainer_state.json`` as ``TrainerState.save_to_json``
dumps it (``indent=2, sort_keys=True``, a NaN ``grad_norm`` as Python writes it) and the arguments
dataclass with ``torch.save``. Each part is compared, raw bytes included, with what
``torch.load``/``safetensors.torch.load_file``/``json.loads`` give for that file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from helpers import tensor_bytes

import converters
from converters.core.errors import ConverterError, CorruptFileError, UnknownFormatError, UnsafeFileError
from converters.core.objects import ObjectRecord

CLI = Path(__file__).resolve().parent.parent / "cli.py"
TRAINER_KIND = "Hugging Face Trainer checkpoint folder"


class IntervalStrategy(str, enum.Enum):  # as transformers' trainer_utils.IntervalStrategy
    NO = "no"
    STEPS = "steps"


@dataclasses.dataclass
class TrainingArguments:  # the shape of transformers' TrainingArguments (a plain dataclass)
    output_dir: str = "out"
    learning_rate: float = 5e-5
    num_train_epochs: float = 3.0
    save_strategy: IntervalStrategy = IntervalStrategy.STEPS
    seed: int = 42
    report_to: list[str] = dataclasses.field(default_factory=lambda: ["none"])


class TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(20, 8)
        self.proj = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 20)
        self.scale = torch.nn.Parameter(torch.randn(4).to(torch.bfloat16))
        self.register_buffer("positions", torch.arange(6, dtype=torch.int64))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.proj(self.embed(ids)))).sum() + self.scale.float().sum()


# ------------------------------------------------------------------------------ writing the folders


def trained(seed: int = 0) -> tuple[TinyLM, torch.optim.Optimizer, Any, Any]:
    torch.manual_seed(seed)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=4)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(2):
        model(torch.randint(0, 20, (3, 5))).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler, scaler


def write_weights(folder: Path, state: dict[str, torch.Tensor], layout: str) -> None:
    """``save_pretrained``'s four layouts: one file, or two shards plus an index (weight_map in model order)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().contiguous() for key, value in state.items()}
    suffix = ".safetensors" if layout.startswith("safetensors") else ".bin"

    def save(tensors: dict[str, torch.Tensor], path: Path) -> None:
        if suffix == ".safetensors":
            safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
        else:
            torch.save(tensors, path)

    if not layout.endswith("index"):
        save(state, folder / ("model.safetensors" if suffix == ".safetensors" else "pytorch_model.bin"))
        return
    keys = list(state)
    stem = "model" if suffix == ".safetensors" else "pytorch_model"
    names = [f"{stem}-0000{i}-of-00002{suffix}" for i in (1, 2)]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    for name, half in zip(names, halves, strict=True):
        save({key: state[key] for key in half}, folder / name)
    weight_map = {key: name for name, half in zip(names, halves, strict=True) for key in half}
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}}
    (folder / f"{stem}{suffix}.index.json").write_text(json.dumps({**index, "weight_map": weight_map}, indent=2))


TRAINER_STATE = {
    "best_metric": None,
    "epoch": 0.5,
    "global_step": 2,
    "log_history": [
        {"epoch": 0.25, "grad_norm": float("nan"), "learning_rate": 0.0005, "loss": 3.0625, "step": 1},
        {"epoch": 0.5, "grad_norm": float("inf"), "learning_rate": 0.000625, "loss": 2.9375, "step": 2},
    ],
    "max_steps": 8,
    "stateful_callbacks": {"TrainerControl": {"args": {"should_save": True}, "attributes": {}}},
    "trial_name": None,
}


def write_trainer_folder(folder: Path, weights: str = "safetensors", *, ranks: int = 0) -> Path:
    """A Trainer ``checkpoint-N`` folder, written as ``Trainer._save_checkpoint`` writes one."""
    model, optimizer, scheduler, scaler = trained()
    if weights:
        write_weights(folder, model.state_dict(), weights)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    torch.save(scaler.state_dict(), folder / "scaler.pt")
    random.seed(1)
    np.random.seed(1)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if ranks:
        for rank in range(ranks):
            torch.save(rng, folder / f"rng_state_{rank}.pth")
    else:
        torch.save(rng, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps(TRAINER_STATE, indent=2, sort_keys=True) + "\n")
    torch.save(TrainingArguments(), folder / "training_args.bin")
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny"}))  # not a part: not read
    return folder


def reference_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights as the reference loaders give them, shard after shard."""
    found: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update(safetensors.torch.load_file(path))
    if not found:
        for path in sorted(p for p in folder.glob("*.bin") if p.name != "training_args.bin"):
            found.update(torch.load(path, weights_only=True))
    for index in folder.glob("*.index.json"):  # written in model order: the order the readers give
        return {key: found[key] for key in json.loads(index.read_text())["weight_map"]}
    return found


# ------------------------------------------------------------------------------ comparing


def assert_same(ours: Any, reference: Any, path: str = "<root>") -> None:
    """Exact types, key order, float bits, tensor dtype/shape/raw bytes, numpy dtype/shape/raw bytes."""
    if isinstance(reference, torch.Tensor):
        assert isinstance(ours, torch.Tensor), f"{path}: {type(ours).__name__}"
        assert (ours.dtype, ours.shape) == (reference.dtype, reference.shape), path
        assert tensor_bytes(ours) == tensor_bytes(reference), f"{path}: tensor bytes differ"
        return
    assert type(ours) is type(reference), f"{path}: {type(ours).__name__} vs {type(reference).__name__}"
    if isinstance(reference, np.ndarray):
        assert (ours.dtype, ours.shape) == (reference.dtype, reference.shape), path
        assert ours.tobytes() == reference.tobytes(), f"{path}: array bytes differ"
    elif isinstance(reference, dict):
        assert list(ours) == list(reference), f"{path}: keys {list(ours)} vs {list(reference)}"
        for key in reference:
            assert_same(ours[key], reference[key], f"{path}/{key}")
    elif isinstance(reference, (list, tuple)):
        assert len(ours) == len(reference), path
        for index, (a, b) in enumerate(zip(ours, reference, strict=True)):
            assert_same(a, b, f"{path}/{index}")
    elif isinstance(reference, float):
        assert struct.pack(">d", ours) == struct.pack(">d", reference), f"{path}: {ours!r} vs {reference!r}"
    else:
        assert ours == reference, f"{path}: {ours!r} vs {reference!r}"


def assert_same_tensors(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """The same tensors by key (safetensors.torch.load_file gives a file's keys in its own order)."""
    assert_same(dict(sorted(ours.items())), dict(sorted(reference.items())))


def assert_training_args(record: Any) -> None:
    """training_args.bin comes back as an inert record of the dataclass: its name and fields."""
    assert isinstance(record, ObjectRecord)
    assert record.name == f"{TrainingArguments.__module__}.TrainingArguments"
    state = record.state
    assert [k for k in state if k != "save_strategy"] == [
        "output_dir",
        "learning_rate",
        "num_train_epochs",
        "seed",
        "report_to",
    ]
    assert (state["output_dir"], state["learning_rate"], state["seed"], state["report_to"]) == (
        "out",
        5e-5,
        42,
        ["none"],
    )
    strategy = state["save_strategy"]
    assert isinstance(strategy, ObjectRecord) and strategy.name.endswith(".IntervalStrategy")
    assert strategy.args == ("steps",)


def cli(*args: object, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CLI), *map(str, args)], capture_output=True, text=True, check=False, timeout=timeout
    )


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""

    def expired(*_: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------ save_pretrained folders


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_a_model_folder_reads_its_one_file(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / "model"
    write_weights(folder, trained()[0].state_dict(), layout)
    (folder / "config.json").write_text("{}")
    expected = reference_weights(folder)
    assert_same(converters.load(folder), expected)
    checkpoint = converters.read(folder)
    assert checkpoint.format == ("safetensors" if layout == "safetensors" else "pt")
    file = "model.safetensors" if layout == "safetensors" else "pytorch_model.bin"
    assert checkpoint.kind is not None and checkpoint.kind.startswith(f"Hugging Face model folder: {file}")
    assert checkpoint.notes == ()  # config.json is not a checkpoint: nothing to say


def test_a_folder_with_both_files_reads_model_safetensors_and_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    state = trained()[0].state_dict()
    write_weights(folder, state, "safetensors")
    write_weights(folder, {key: value + 1 for key, value in state.items()}, "bin")  # tells them apart
    assert_same(converters.load(folder), safetensors.torch.load_file(folder / "model.safetensors"))
    assert converters.read(folder).notes == (
        "also holds pytorch_model.bin, not read: model.safetensors is read (transformers loads it first)",
    )
    # Asked for the .bin weights by name, it reads them, and says what it left.
    assert_same(converters.load(folder, format="pt"), torch.load(folder / "pytorch_model.bin", weights_only=True))
    assert converters.read(folder, format="pt").notes == (
        "also holds model.safetensors, not read: pytorch_model.bin is read (the pt format reads it)",
    )
    done = cli("inspect", folder)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{folder}: safetensors (Hugging Face model folder: model.safetensors), ")
    assert (
        lines[1]
        == "note: also holds pytorch_model.bin, not read: model.safetensors is read (transformers loads it first)"
    )


def test_save_model_output_is_the_weights_alone(tmp_path: Path) -> None:
    # trainer.save_model writes the weights, config.json and training_args.bin: a model folder.
    folder = tmp_path / "output"
    write_weights(folder, trained()[0].state_dict(), "safetensors")
    torch.save(TrainingArguments(), folder / "training_args.bin")
    checkpoint = converters.read(folder)
    assert checkpoint.format == "safetensors"
    assert checkpoint.notes == ("not read: training_args.bin",)
    assert_same(converters.load(folder), safetensors.torch.load_file(folder / "model.safetensors"))


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_every_command_takes_a_model_folder(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / "model"
    write_weights(folder, trained()[0].state_dict(), layout)
    done = cli("inspect", folder)
    assert done.returncode == 0 and "embed.weight  float32   [20, 8]" in done.stdout, done.stdout + done.stderr
    done = cli("schema", folder, "-o", tmp_path / "schema.json")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "schema.json").read_text())["file"]["kind"].startswith("Hugging Face model folder")
    done = cli("convert", folder, tmp_path / "one.safetensors")
    assert done.returncode == 0, done.stderr
    assert_same_tensors(safetensors.torch.load_file(tmp_path / "one.safetensors"), reference_weights(folder))
    done = cli("verify", folder, tmp_path / "one.safetensors")
    assert done.returncode == 0 and done.stdout.startswith("bit-identical"), done.stdout + done.stderr


# ------------------------------------------------------------------------------ Trainer checkpoint folders


@pytest.mark.parametrize("weights", ["safetensors", "bin", "safetensors-index", "bin-index"])
def test_a_trainer_folder_is_one_checkpoint(tmp_path: Path, weights: str) -> None:
    folder = write_trainer_folder(tmp_path / "checkpoint-2", weights)
    checkpoint = converters.read(folder)
    assert (checkpoint.format, checkpoint.kind) == ("pt", TRAINER_KIND)
    assert checkpoint.notes == ()
    loaded = converters.load(folder)
    assert list(loaded) == ["model", "optimizer", "scheduler", "scaler", "rng_state", "trainer_state", "training_args"]
    assert_same(loaded["model"], reference_weights(folder))
    for key, name in [("optimizer", "optimizer.pt"), ("scheduler", "scheduler.pt"), ("scaler", "scaler.pt")]:
        assert_same(loaded[key], torch.load(folder / name, weights_only=True), key)
    # The RNG states hold a numpy array (torch's safe loader refuses it; the Trainer loads them unsafely).
    assert_same(loaded["rng_state"], torch.load(folder / "rng_state.pth", weights_only=False), "rng_state")
    assert_same(loaded["trainer_state"], json.loads((folder / "trainer_state.json").read_text()), "trainer_state")
    assert_training_args(loaded["training_args"])


def test_a_trainer_folder_of_ranks_without_weights(tmp_path: Path) -> None:
    folder = write_trainer_folder(tmp_path / "checkpoint-9", "", ranks=2)
    (folder / "extra.pt").write_bytes(b"")  # checkpoint-like, not a part: named, not read
    (folder / "global_step9").mkdir()  # sub-folders are not entered
    checkpoint = converters.read(folder)
    assert list(checkpoint.tree) == [
        "optimizer", "scheduler", "scaler", "rng_state_0", "rng_state_1", "trainer_state", "training_args"
    ]  # fmt: skip
    assert checkpoint.notes == (
        "no model weights (model.safetensors, pytorch_model.bin or a shard index) in the folder",
        "not read: extra.pt",
        "sub-folders not read: global_step9/",
    )
    assert_same(converters.load(folder)["rng_state_1"], torch.load(folder / "rng_state_1.pth", weights_only=False))


def test_every_command_takes_a_trainer_folder(tmp_path: Path) -> None:
    folder = write_trainer_folder(tmp_path / "checkpoint-2")
    done = cli("inspect", folder)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{folder}: pt ({TRAINER_KIND}), ")
    assert "\nmodel:\n" in done.stdout and "\n  embed.weight  float32   [20, 8]\n" in done.stdout
    assert "\ntraining_args:\n" in done.stdout and "trainer_state:\n" in done.stdout
    done = cli("schema", folder, "-o", tmp_path / "schema.json")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "schema.json").read_text())
    assert manifest["file"]["kind"] == TRAINER_KIND
    for suffix in (".safetensors", ".msgpack"):
        out = tmp_path / f"all{suffix}"
        done = cli("convert", folder, out)
        assert done.returncode == 0, done.stderr
        done = cli("verify", folder, out)
        assert done.returncode == 0 and done.stdout.startswith("bit-identical"), done.stdout + done.stderr
    # .pt output: the arguments' record is re-created only when allowed; dropped here.
    done = cli("convert", folder, tmp_path / "all.pt", "--drop-objects")
    assert done.returncode == 0, done.stderr
    again = torch.load(tmp_path / "all.pt", weights_only=False)
    assert list(again) == ["model", "optimizer", "scheduler", "scaler", "rng_state", "trainer_state"]
    assert_same(again["optimizer"], torch.load(folder / "optimizer.pt", weights_only=True))
    assert_same(again["model"], reference_weights(folder))
    done = cli("convert", folder, tmp_path / "model.safetensors", "--select", "model")
    assert done.returncode == 0, done.stderr
    assert_same_tensors(safetensors.torch.load_file(tmp_path / "model.safetensors"), reference_weights(folder))


# ------------------------------------------------------------------------------ what it says when it cannot


def test_an_unrecognised_folder_says_what_it_holds_and_what_is_accepted(tmp_path: Path) -> None:
    folder = tmp_path / "stuff"
    folder.mkdir()
    for name in ("config.json", "notes.txt", "vocab.txt", "tokenizer.json", "merges.txt", "z.json"):
        (folder / name).write_text("{}")
    (folder / "sub").mkdir()
    with pytest.raises(UnknownFormatError) as caught:
        converters.read(folder)
    message = str(caught.value)
    assert message.startswith(
        f"{folder}: cannot recognise the folder: it holds 'config.json', 'merges.txt', 'notes.txt', "
        "'sub/', 'tokenizer.json' and 2 more; a checkpoint folder holds model.safetensors or pytorch_model.bin, "
        "or a shard index (model.safetensors.index.json, pytorch_model.bin.index.json) beside its shards, "
        "with a Trainer checkpoint's optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json, or "
        "torch.distributed.checkpoint's .metadata; pass a format explicitly (known: "
    ), message
    done = cli("convert", folder, tmp_path / "out.safetensors")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "'notes.txt'" in done.stderr, done.stderr
    # Named, a format says the same about the folder instead of "Is a directory".
    for name in ("pt", "safetensors"):
        with pytest.raises(UnknownFormatError, match=r"the folder holds no (pytorch_model\.bin|model\.safetensors) "):
            converters.read(folder, format=name)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UnknownFormatError, match=r"cannot recognise the folder: it holds nothing; "):
        converters.read(empty)


def wrong_from_cases(tmp_path: Path) -> list[tuple[Path, str, str]]:
    state = {key: value for key, value in trained()[0].state_dict().items() if key != "positions"}
    write_weights(tmp_path / "st", state, "safetensors")
    write_weights(tmp_path / "st-index", state, "safetensors-index")
    write_weights(tmp_path / "bin", state, "bin")
    write_weights(tmp_path / "bin-index", state, "bin-index")
    trainer = write_trainer_folder(tmp_path / "checkpoint-2")
    return [
        (
            tmp_path / "bin",
            "safetensors",
            "a Hugging Face model folder of pytorch_model.bin, not safetensors weights: "
            "pass --from pt (format='pt') or no --from",
        ),
        (
            tmp_path / "bin-index",
            "safetensors",
            "a Hugging Face model folder of pytorch_model.bin.index.json, not safetensors weights: "
            "pass --from pt (format='pt') or no --from",
        ),
        (
            tmp_path / "bin-index" / "pytorch_model.bin.index.json",
            "safetensors",
            "the shard index of .bin files, not of safetensors shards: pass --from pt (format='pt') or no --from",
        ),
        (
            tmp_path / "st",
            "pt",
            "a Hugging Face model folder of model.safetensors, not pt weights: "
            "pass --from safetensors (format='safetensors') or no --from",
        ),
        (
            tmp_path / "st-index",
            "pt",
            "a Hugging Face model folder of model.safetensors.index.json, not pt weights: "
            "pass --from safetensors (format='safetensors') or no --from",
        ),
        (
            tmp_path / "st-index" / "model.safetensors.index.json",
            "pt",
            "the shard index of .safetensors files, not of pt shards: "
            "pass --from safetensors (format='safetensors') or no --from",
        ),
        (
            trainer,
            "safetensors",
            f"a {TRAINER_KIND} (model.safetensors, optimizer.pt, scheduler.pt, scaler.pt, rng_state.pth, "
            "trainer_state.json, training_args.bin), not safetensors weights: pass --from pt (format='pt') or no "
            "--from; for the weights alone pass its model.safetensors",
        ),
    ]


def test_a_wrong_from_on_a_folder_or_an_index_names_what_it_is(tmp_path: Path) -> None:
    for source, name, message in wrong_from_cases(tmp_path):
        with pytest.raises(UnknownFormatError) as caught:
            converters.convert(source, tmp_path / "out.msgpack", src_format=name)
        assert str(caught.value) == f"{source}: {message}"
        assert not (tmp_path / "out.msgpack").exists()
        assert list(converters.read(source).tensors())  # and without --from it reads
    done = cli(
        "convert", tmp_path / "bin-index" / "pytorch_model.bin.index.json", tmp_path / "o.pt", "--from", "safetensors"
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "the shard index of .bin files, not of safetensors shards: pass --from pt" in done.stderr


# ------------------------------------------------------------------------------ hostile folders


def symlinked(name: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        (folder / name).rename(folder.parent / f"elsewhere-{name}")
        (folder / name).symlink_to(folder.parent / f"elsewhere-{name}")

    return damage


def replaced(name: str, make: Callable[[Path], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        (folder / name).unlink()
        make(folder / name)

    return damage


HOSTILE: list[tuple[str, Callable[[Path], None], str, str]] = [
    (
        "optimizer-symlink",
        symlinked("optimizer.pt"),
        "optimizer.pt",
        r"optimizer\.pt is a symbolic link, not a regular file in the folder; refusing to follow it "
        r"\(pass the file it points to itself\)",
    ),
    (
        "weights-symlink",
        symlinked("model.safetensors"),
        "model.safetensors",
        r"model\.safetensors is a symbolic link, not a regular file in the folder; refusing to follow it",
    ),
    (
        "trainer-state-symlink",
        symlinked("trainer_state.json"),
        "trainer_state.json",
        r"trainer_state\.json is a symbolic link, not a regular file in the folder",
    ),
    (
        "scheduler-fifo",
        replaced("scheduler.pt", lambda path: os.mkfifo(path)),
        "scheduler.pt",
        r"scheduler\.pt is a FIFO, not a regular file; refusing to read it",
    ),
    (
        "optimizer-folder",
        replaced("optimizer.pt", lambda path: path.mkdir()),
        "optimizer.pt",
        r"optimizer\.pt is a folder, not a regular file; refusing to read it",
    ),
    (
        "trainer-state-too-big",
        lambda folder: os.truncate(folder / "trainer_state.json", 100_000_001),  # sparse: refused by its size
        "trainer_state.json",
        r"trainer_state\.json is larger than 100000000 bytes",
    ),
    (
        "trainer-state-duplicate-key",
        lambda folder: (folder / "trainer_state.json").write_text('{"global_step": 2, "global_step": 3}'),
        "trainer_state.json",
        r"trainer_state\.json has the key 'global_step' twice",
    ),
    (
        "trainer-state-past-the-budget",  # 3 MB of empty lists: a million values, charged before parsing
        lambda folder: (folder / "trainer_state.json").write_text("[" + "[]," * 1_000_000 + "[]]"),
        ".",  # the budget is the folder's: the error names the folder, the message the part
        r"would need more than \d+ MiB of memory to read \(values in trainer_state\.json\)",
    ),
    (
        "trainer-state-not-json",
        lambda folder: (folder / "trainer_state.json").write_text('{"global_step": 2,'),
        "trainer_state.json",
        r"trainer_state\.json is not valid JSON: Expecting property name enclosed in double quotes",
    ),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_trainer_folder(tmp_path_factory.mktemp("trainer") / "checkpoint-2")


@pytest.mark.parametrize(("name", "damage", "part", "message"), HOSTILE, ids=[row[0] for row in HOSTILE])
def test_a_hostile_trainer_folder_is_refused(
    tmp_path: Path, pristine: Path, name: str, damage: Callable[[Path], None], part: str, message: str
) -> None:
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(pristine, folder)
    damage(folder)
    assert converters.registry.resolve(folder).name == "pt"  # still recognised by its names
    with deadline(30), pytest.raises(CorruptFileError, match=message) as caught:
        converters.convert(folder, tmp_path / "out.safetensors")
    assert str(caught.value).startswith(f"{folder / part}: ")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_exits_2_on_a_fifo_part(tmp_path: Path, pristine: Path) -> None:
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(pristine, folder)
    replaced("optimizer.pt", lambda path: os.mkfifo(path))(folder)
    for verb in ("inspect", "schema"):
        done = cli(verb, folder, timeout=60)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "optimizer.pt is a FIFO, not a regular file" in done.stderr and "Traceback" not in done.stderr


class RunsCode:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_a_part_that_would_run_code_is_refused(tmp_path: Path, pristine: Path) -> None:
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(pristine, folder)
    torch.save({"state": RunsCode()}, folder / "rng_state.pth")
    with pytest.raises(
        UnsafeFileError, match=r"asks for the global posix\.system at byte \d+, which can run code"
    ) as e:
        converters.read(folder)
    assert str(e.value).startswith(f"{folder / 'rng_state.pth'}: ")


def test_a_corrupt_part_is_named(tmp_path: Path, pristine: Path) -> None:
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(pristine, folder)
    (folder / "scheduler.pt").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ConverterError) as caught:
        converters.read(folder)
    assert str(caught.value).startswith(f"{folder / 'scheduler.pt'}: ")
