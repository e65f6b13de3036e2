"""torch.export program archives (issue 14, part 8): ``torch.export.save(torch.export.export(model,
args), "m.pt2")`` is read for its weights, exactly what ``torch.export.load(f).state_dict`` gives
(ties, strided views, every dtype), and any other zip that is not a torch checkpoint is refused
saying what it is, never "expected one data.pkl record".
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from helpers import tensor_bytes

import converters
from converters.core.errors import CorruptFileError, UnsupportedValueError

CLI = Path(__file__).resolve().parent.parent / "cli.py"
KIND = "torch.export program archive (.pt2)"
CONFIG = "data/weights/model_weights_config.json"


class Exported(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.transposed = torch.nn.Parameter(torch.arange(12.0).reshape(3, 4).t())  # a strided view
        self.halved = torch.nn.Parameter(torch.randn(3).half())
        self.norm = torch.nn.BatchNorm1d(4)
        self.register_buffer("brain", torch.randn(2, 2).to(torch.bfloat16))
        self.register_buffer("steps", torch.tensor([3, -1], dtype=torch.int64))
        self.register_buffer("scratch", torch.ones(2), persistent=False)  # a constant, not a weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(self.embed(ids).reshape(-1, 4))
        extra = self.transposed.sum() + self.halved.float().sum() + self.brain.float().sum() + self.scratch.sum()
        return self.head(hidden).sum() + extra + self.steps.sum()


@pytest.fixture(scope="module")
def pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export") / "m.pt2"
    module = Exported()
    module.norm.running_mean.add_(0.25)  # not the default values
    program = torch.export.export(module, (torch.tensor([[1, 2], [3, 4]]),))
    with warnings.catch_warnings():  # "No complete tensor found in the group": the transposed view's
        warnings.simplefilter("ignore", UserWarning)
        torch.export.save(program, path)
    return path


def test_the_weights_are_what_torch_export_load_gives(pt2: Path) -> None:
    expected = torch.export.load(pt2).state_dict
    loaded = converters.load(pt2)
    assert list(loaded) == list(expected)
    assert "scratch" not in loaded and "transposed" in loaded and "brain" in loaded
    for key, tensor in expected.items():
        assert (loaded[key].dtype, loaded[key].shape) == (tensor.dtype, tensor.shape), key
        assert tensor_bytes(loaded[key]) == tensor_bytes(tensor), key
    checkpoint = converters.read(pt2)
    assert (checkpoint.format, checkpoint.kind) == ("pt", KIND)
    assert checkpoint.notes == (
        "the exported program (its graph, constants and sample inputs) is not carried: only its weights, "
        "as torch.export.load(f).state_dict gives them",
    )
    # The tied weight is one storage in the archive, viewed the same way twice: one tensor.
    assert checkpoint.tree["embed.weight"] is checkpoint.tree["head.weight"]
    assert expected["embed.weight"].data_ptr() == expected["head.weight"].data_ptr()


def test_a_pt2_converts_and_verifies_by_every_command(pt2: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(CLI), "inspect", str(pt2)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{pt2}: pt ({KIND}), ")
    assert "\nnote: the exported program" in done.stdout and "transposed  " in done.stdout
    out = tmp_path / "weights.safetensors"
    done = subprocess.run(
        [sys.executable, str(CLI), "convert", str(pt2), str(out)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    expected = torch.export.load(pt2).state_dict
    written = safetensors.torch.load_file(out)
    assert sorted(written) == sorted(k for k in expected if k != "head.weight")  # the tie stored once
    assert all(tensor_bytes(written[k]) == tensor_bytes(expected[k]) for k in written)
    assert converters.verify(pt2, out) == []
    assert json.loads(json.dumps(converters.manifest(pt2)["file"]))["kind"] == KIND


def test_several_programs_read_as_one_tree_by_name(tmp_path: Path) -> None:
    from torch.export.pt2_archive._package import package_pt2

    torch.manual_seed(0)
    encoder, decoder = torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)
    programs = {
        "encoder": torch.export.export(encoder, (torch.randn(1, 2),)),
        "decoder": torch.export.export(decoder, (torch.randn(1, 3),)),
    }
    path = tmp_path / "two.pt2"
    package_pt2(path, exported_programs=programs)
    loaded = converters.load(path)
    assert list(loaded) == ["encoder", "decoder"]
    for name, module in (("encoder", encoder), ("decoder", decoder)):
        assert list(loaded[name]) == ["weight", "bias"]
        assert all(tensor_bytes(loaded[name][k]) == tensor_bytes(v) for k, v in module.state_dict().items())


def test_a_pt2_recompressed_by_a_zip_tool_reads_the_same(pt2: Path, tmp_path: Path) -> None:
    deflated = tmp_path / "deflated.pt2"
    with zipfile.ZipFile(pt2) as old, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            new.writestr(info.filename, old.read(info))
    assert converters.verify(pt2, deflated) == []
    tree = converters.read(deflated).tree
    assert tree["embed.weight"] is tree["head.weight"]


# ------------------------------------------------------------------------------ what is refused


def rewritten(source: Path, target: Path, change: Callable[[str, bytes], bytes | None]) -> Path:
    """``source`` with each record through ``change`` (None drops it), stored as torch stores them."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            data = change(info.filename.split("/", 1)[1], old.read(info))
            if data is not None:
                new.writestr(info.filename, data)
    return target


def edit_config(edit: Callable[[dict[str, Any]], None]) -> Callable[[str, bytes], bytes | None]:
    def change(name: str, data: bytes) -> bytes:
        if name != CONFIG:
            return data
        config = json.loads(data)
        edit(config["config"])
        return json.dumps(config).encode()

    return change


REFUSED: list[tuple[str, Callable[[str, bytes], bytes | None], type[Exception], str]] = [
    (
        "pickled-weight",
        edit_config(lambda c: c["halved"].update(use_pickle=True)),
        UnsupportedValueError,
        r"data/weights/model_weights_config\.json: weight 'halved' is pickled inside the archive \(a tensor subclass\)",
    ),
    (
        "symbolic-size",
        edit_config(lambda c: c["halved"]["tensor_meta"].update(sizes=[{"as_expr": {"expr_str": "s0"}}])),
        UnsupportedValueError,
        r"weight 'halved': sizes holds \{'as_expr': \{'expr_str': 's0'\}\}, not a concrete int",
    ),
    (
        "view-past-its-storage",
        edit_config(lambda c: c["halved"]["tensor_meta"].update(sizes=[{"as_int": 1000}])),
        CorruptFileError,
        r"a float16\[1000\] tensor needs 2000 bytes of storage 'weight_\d+', which holds 6",
    ),
    (
        "record-missing",
        edit_config(lambda c: c["halved"].update(path_name="weight_99")),
        CorruptFileError,
        r"weight 'halved' names the record data/weights/weight_99, which the archive lacks",
    ),
    (
        "record-outside-weights",
        edit_config(lambda c: c["halved"].update(path_name="../models/model.json")),
        CorruptFileError,
        r"weight 'halved' names the record '\.\./models/model\.json', not a plain file name",
    ),
    (
        "unknown-dtype",
        edit_config(lambda c: c["halved"]["tensor_meta"].update(dtype=99)),
        UnsupportedValueError,
        r"weight 'halved' has the unknown dtype number 99",
    ),
    (
        "sparse-layout",
        edit_config(lambda c: c["halved"]["tensor_meta"].update(layout=1)),
        UnsupportedValueError,
        r"weight 'halved' is not a strided \(dense\) tensor \(layout 1\)",
    ),
    (
        "config-duplicate-key",
        lambda name, data: b'{"config": {}, "config": {}}' if name == CONFIG else data,
        CorruptFileError,
        r"data/weights/model_weights_config\.json has the key 'config' twice",
    ),
    (
        "no-weights-config",
        lambda name, data: None if name == CONFIG else data,
        UnsupportedValueError,
        r"a torch\.export \(\.pt2\) archive whose program 'model' has no weights config; load it with "
        r"torch\.export\.load and save ep\.state_dict with torch\.save",
    ),
    (
        "aoti-package",  # compiled code, no program: the weights are not in a form we read
        lambda name, data: None if name.startswith(("models/", "data/")) else data,
        UnsupportedValueError,
        r"a PT2 archive without an exported program \(an AOTInductor package",
    ),
]


@pytest.mark.parametrize(("name", "change", "error", "message"), REFUSED, ids=[row[0] for row in REFUSED])
def test_a_damaged_pt2_is_refused_naming_the_weight(
    pt2: Path, tmp_path: Path, name: str, change: Callable[[str, bytes], bytes | None], error: type, message: str
) -> None:
    bad = rewritten(pt2, tmp_path / "bad.pt2", change)
    with pytest.raises(error, match=message) as caught:
        converters.convert(bad, tmp_path / "out.safetensors")
    assert str(caught.value).startswith(f"{bad}: ") and "\n" not in str(caught.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_the_rewritten_pt2_itself_reads(pt2: Path, tmp_path: Path) -> None:
    # The rewriting above keeps everything else as it was: unchanged, the archive reads the same.
    same = rewritten(pt2, tmp_path / "same.pt2", lambda name, data: data)
    assert converters.verify(pt2, same) == []


OTHER_ZIPS: list[tuple[str, dict[str, bytes], str]] = [
    (
        "plain-zip",
        {"readme.txt": b"hi", "data/values.json": b"{}", "a/b/c.bin": b"x", "z.txt": b"", "y.txt": b""},
        "a zip archive, not a torch checkpoint: it holds 'a/b/c.bin', 'data/values.json', 'readme.txt', "
        "'y.txt' and 1 more, and no <archive>/data.pkl (what torch.save writes); a .pt2 program archive is "
        "read when torch.export.save wrote it",
    ),
    ("empty-zip", {}, "a zip archive, not a torch checkpoint: it is empty, and no <archive>/data.pkl"),
    (
        "two-archives",
        {"a/data/0": b"", "a/data.pkl": b"\x80\x02N.", "b/data.pkl": b"\x80\x02N."},
        "a zip holding 2 torch archives ('a/data.pkl', 'b/data.pkl'), not one torch.save checkpoint: "
        "extract them and convert each",
    ),
    (
        "old-export-layout",
        {"serialized_exported_program.json": b"{}", "serialized_state_dict.pt": b"", "version": b"1"},
        "a torch.export archive in the layout of torch < 2.7: load it with torch.export.load and save "
        "ep.state_dict with torch.save",
    ),
]


@pytest.mark.parametrize(("name", "records", "message"), OTHER_ZIPS, ids=[row[0] for row in OTHER_ZIPS])
def test_another_zip_is_refused_saying_what_it_is(
    tmp_path: Path, name: str, records: dict[str, bytes], message: str
) -> None:
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as archive:
        for record, data in records.items():
            archive.writestr(record, data)
    with pytest.raises(UnsupportedValueError) as caught:
        converters.read(path)
    assert str(caught.value).startswith(f"{path}: {message}")
    assert "expected one" not in str(caught.value)
    done = subprocess.run([sys.executable, str(CLI), "inspect", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message[:40] in done.stderr, done.stderr


class Looked(Exception):
    pass


def test_a_torch_save_file_goes_straight_to_the_archive_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.save writes <archive>/data.pkl first: such a file is not looked at for a .pt2 first.
    from converters.codecs import torch_export

    path = tmp_path / "sd.pt"
    torch.save({"w": torch.ones(3)}, path)

    def looked(*_: object) -> None:
        raise Looked

    monkeypatch.setattr(torch_export, "read_if_exported", looked)
    assert list(converters.load(path)) == ["w"]
    moved = rewritten(path, tmp_path / "moved.pt", lambda name, data: data if name != "data.pkl" else None)
    with pytest.raises(Looked):  # a zip that does not start so is
        converters.read(moved)
