"""The torch and numpy readers over remote sources (fsspec's in-process ``memory://`` store): a zip
``.pt`` (torch's and ours), a re-deflated one, a legacy (non-zip) ``.pt``, a TorchScript archive, a
``.pt2``, an ``.npz`` (stored and compressed, numpy's and ours), an ``.npy`` and a ``.bin`` shard
folder each read remotely as the local copy reads, convert to the same bytes, and a read fetches
their layout (zip end records, central directory, local headers, pickles, .npy headers) by a few
range requests, never the 8 MiB tensor; a truncated remote object is an error naming its URL."""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import assert_bit_identical
from remote_fixtures import put

import converters
from converters.core import storage
from converters.core.errors import ConverterError

BIG = (2048, 1024)  # float32: 8 MiB, the tensor a read must not fetch
FETCH = storage.FIRST_FETCH


def total(ranges: list[tuple[str, int, int]]) -> int:
    return sum(end - start for _, start, end in ranges)


# ------------------------------------------------------------------------------ the files


def state(small: int = 3) -> dict[str, Any]:
    torch.manual_seed(0)
    tensors: dict[str, Any] = {"big": torch.randn(*BIG)}
    tensors.update({f"small.{index}": torch.randn(4, index + 1) for index in range(small)})
    tensors["ints"] = torch.arange(8, dtype=torch.int64)
    return {"model": tensors, "epoch": 3, "note": "remote"}


class Module(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(BIG[1], BIG[0])  # its weight is the 8 MiB tensor
        self.norm = torch.nn.LayerNorm(BIG[0])
        self.register_buffer("steps", torch.tensor([3, -1], dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin(x)) + self.steps.sum()


def zip_pt(folder: Path) -> Path:
    torch.save(state(), folder / "zip.pt")
    return folder / "zip.pt"


def legacy_pt(folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(state(), folder / "legacy.pt", _use_new_zipfile_serialization=False)
    return folder / "legacy.pt"


def deflated_pt(folder: Path) -> Path:
    """torch's archive re-deflated by a zip tool: torch.load reads it, so do we."""
    source = zip_pt(folder)
    buffer = io.BytesIO()
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as out:
        for info in archive.infolist():
            out.writestr(info.filename, archive.read(info.filename))
    (folder / "deflated.pt").write_bytes(buffer.getvalue())
    return folder / "deflated.pt"


def ours_pt(folder: Path) -> Path:
    """Our own .pt: its digests, tree digest and metadata records are read too."""
    return converters.convert(zip_pt(folder), folder / "ours.pt")


def script_pt(folder: Path) -> Path:
    torch.jit.script(Module()).save(str(folder / "script.pt"))
    return folder / "script.pt"


def export_pt2(folder: Path) -> Path:
    program = torch.export.export(Module(), (torch.randn(2, BIG[1]),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.export.save(program, folder / "m.pt2")
    return folder / "m.pt2"


def arrays() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {"big": rng.standard_normal(BIG).astype(np.float32), "w": np.arange(12.0), "i": np.arange(5)}


def npz(folder: Path) -> Path:
    np.savez(folder / "a.npz", **arrays())
    return folder / "a.npz"


def npz_compressed(folder: Path) -> Path:
    np.savez_compressed(folder / "c.npz", **arrays())
    return folder / "c.npz"


def ours_npz(folder: Path) -> Path:
    return converters.convert(zip_pt(folder), folder / "ours.npz")


def npy(folder: Path) -> Path:
    np.save(folder / "s.npy", arrays()["big"])
    return folder / "s.npy"


def bin_folder(folder: Path) -> Path:
    """A save_pretrained .bin shard folder: its index, a big shard, a small legacy one."""
    model = folder / "model"
    model.mkdir()
    shards = {"pytorch_model-00001-of-00002.bin": state()["model"], "pytorch_model-00002-of-00002.bin": {}}
    torch.manual_seed(1)
    shards["pytorch_model-00002-of-00002.bin"] = {"head.weight": torch.randn(3, 5), "head.bias": torch.randn(3)}
    weight_map = {}
    for number, (name, tensors) in enumerate(shards.items()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save(tensors, model / name, _use_new_zipfile_serialization=number == 0)
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (model / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return model


MAKERS: dict[str, Callable[[Path], Path]] = {
    "zip.pt": zip_pt,
    "deflated.pt": deflated_pt,
    "ours.pt": ours_pt,
    "legacy.pt": legacy_pt,
    "script.pt": script_pt,
    "m.pt2": export_pt2,
    "a.npz": npz,
    "c.npz": npz_compressed,
    "ours.npz": ours_npz,
    "s.npy": npy,
    "model": bin_folder,
}
TORCH_LOADS = ("zip.pt", "deflated.pt", "ours.pt", "legacy.pt", "script.pt", "m.pt2", "ours.npz", "model")


def stored_size(local: Path) -> int:
    return sum(p.stat().st_size for p in local.iterdir()) if local.is_dir() else local.stat().st_size


# ------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("name", list(MAKERS))
def test_a_remote_file_reads_and_converts_as_the_local_one_fetching_its_layout_only(
    tmp_path: Path, store: Any, fetched: list[tuple[str, int, int]], name: str
) -> None:
    local = MAKERS[name](tmp_path)
    url = put(store, local, name)
    fetched.clear()
    remote = converters.read(url)
    read_bytes, requests = total(fetched), len(fetched)
    local_checkpoint = converters.read(local)
    assert remote.kind == local_checkpoint.kind
    assert [(p, r.dtype, r.shape) for p, r in remote.tensors()] == [
        (p, r.dtype, r.shape) for p, r in local_checkpoint.tensors()
    ]
    assert converters.verify(local, url) == []
    assert converters.verify(remote, local_checkpoint) == []
    # The sniffing's 64 KiB, then the reader's: first bytes, zip tail, local headers and records
    # (a few hundred bytes each, batched), the legacy pickles' first block: never the tensor.
    size = stored_size(local)
    assert read_bytes <= 4 * FETCH < size // 20, (read_bytes, fetched)
    assert requests <= (9 if name == "model" else 5), fetched

    converters.convert(url, tmp_path / "from-remote.safetensors")
    converters.convert(local, tmp_path / "from-local.safetensors")
    assert (tmp_path / "from-remote.safetensors").read_bytes() == (tmp_path / "from-local.safetensors").read_bytes()


@pytest.mark.parametrize("name", TORCH_LOADS)
def test_a_remote_file_loads_as_the_local_one(tmp_path: Path, store: Any, name: str) -> None:
    local = MAKERS[name](tmp_path)
    url = put(store, local, name)
    expected = converters.load(local)
    assert_bit_identical(converters.load(url), expected)
    # a remote file cannot be mapped: mmap=True reads its tensors into memory instead
    assert_bit_identical(converters.load(url, mmap=True), expected)


@pytest.mark.parametrize("name", ["a.npz", "c.npz", "s.npy"])
def test_remote_numpy_arrays_load_as_the_local_ones(tmp_path: Path, store: Any, name: str) -> None:
    local = MAKERS[name](tmp_path)
    url = put(store, local, name)
    remote, expected = converters.load(url), converters.load(local)
    flat_remote = remote if isinstance(remote, dict) else {"": remote}
    flat_expected = expected if isinstance(expected, dict) else {"": expected}
    assert list(flat_remote) == list(flat_expected)
    for key, value in flat_expected.items():
        other = flat_remote[key]
        if isinstance(value, torch.Tensor):
            assert_bit_identical(other, value, key)
        elif isinstance(value, np.ndarray):
            assert type(other) is np.ndarray and other.dtype == value.dtype and other.shape == value.shape
            assert other.tobytes() == value.tobytes(), key
        else:
            assert other == value, key


@pytest.mark.parametrize("kind", ["zip.pt", "legacy.pt", "a.npz"])
def test_many_small_tensors_cost_a_few_requests_not_one_each(
    tmp_path: Path, store: Any, fetched: list[tuple[str, int, int]], kind: str
) -> None:
    """The local headers of 300 records (the element counts of 300 legacy storages, the .npy headers
    of 300 members) lie between their tensors: fetched together, not one request each."""
    torch.manual_seed(0)
    tensors = {f"layer.{index}.weight": torch.randn(16, 16) for index in range(300)}
    local = tmp_path / kind
    if kind == "a.npz":
        np.savez(local, **{key: value.numpy() for key, value in tensors.items()})
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save(tensors, local, _use_new_zipfile_serialization=kind == "zip.pt")
    url = put(store, local, kind)
    fetched.clear()
    remote = converters.read(url)
    assert len(fetched) <= 6, [(start, end - start) for _, start, end in fetched]
    assert converters.verify(remote, local) == []


def test_a_big_pickle_is_fetched_in_growing_blocks(
    tmp_path: Path, store: Any, fetched: list[tuple[str, int, int]]
) -> None:
    """A legacy file's object pickle of several MiB (many tensors, long names): a few requests."""
    tensors = {f"{'block' * 40}.{index}": torch.zeros(1) for index in range(20000)}
    local = tmp_path / "legacy.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(tensors, local, _use_new_zipfile_serialization=False)
    url = put(store, local, "legacy.pt")
    fetched.clear()
    remote = converters.read(url)
    assert len(fetched) <= 12, [(start, end - start) for _, start, end in fetched]
    assert total(fetched) <= 3 * local.stat().st_size, total(fetched)
    assert converters.verify(remote, local) == []


# ------------------------------------------------------------------------------ broken objects


@pytest.mark.parametrize("name", [name for name in MAKERS if name != "model"])
def test_a_truncated_remote_object_is_an_error_naming_its_url(tmp_path: Path, store: Any, name: str) -> None:
    local = MAKERS[name](tmp_path)
    data = local.read_bytes()
    url = put(store, local, name, data[: len(data) * 3 // 4])
    with pytest.raises(ConverterError) as caught:
        converters.read(url)
    assert url in str(caught.value)


def test_a_truncated_remote_shard_is_an_error_naming_it(tmp_path: Path, store: Any) -> None:
    local = bin_folder(tmp_path)
    url = put(store, local, "model")
    shard = "pytorch_model-00001-of-00002.bin"
    data = (local / shard).read_bytes()
    store.pipe_file(f"/bucket/model/{shard}", data[: len(data) // 2])
    with pytest.raises(ConverterError) as caught:
        converters.read(url)
    assert f"{url}/{shard}" in str(caught.value)


@pytest.mark.parametrize("name", ["zip.pt", "legacy.pt", "c.npz"])
def test_an_object_truncated_after_the_read_fails_the_conversion_naming_it(
    tmp_path: Path, store: Any, name: str
) -> None:
    local = MAKERS[name](tmp_path)
    url = put(store, local, name)
    checkpoint = converters.read(url)
    data = local.read_bytes()
    store.pipe_file(f"/bucket/{name}", data[: len(data) // 2])
    with pytest.raises(ConverterError) as caught:
        converters.write(checkpoint, tmp_path / "out.safetensors")
    assert url in str(caught.value)
    assert not (tmp_path / "out.safetensors").exists()
