"""Readers over remote sources (fsspec's in-process ``memory://`` store): each format reads a remote
file or folder as it reads the local one, fetching its headers only (tensor bytes when used), and
a sharded folder converted with ``select`` fetches the tensor bytes of the shards holding the
selected tensors only (the other shards: their header's one request)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from remote_fixtures import put

import converters
from converters.core import storage
from converters.core.errors import ConverterError, CorruptFileError, UnsafeFileError

BIG = 1 << 20  # elements of the big tensor: 4 MiB of float32
HEADER_FETCH = storage.FIRST_FETCH


def total(ranges: list[tuple[str, int, int]], name: str | None = None) -> int:
    return sum(end - start for object_name, start, end in ranges if name is None or object_name == name)


def checkpoint() -> dict[str, Any]:
    """A general checkpoint with one big tensor among small ones and plain values."""
    torch.manual_seed(0)
    return {
        "model_state_dict": {
            "embed.weight": torch.randn(BIG // 256, 256),
            "fc.weight": torch.randn(8, 4),
            "fc.bias": torch.arange(8, dtype=torch.int64),
        },
        "epoch": 3,
        "note": "remote",
    }


@pytest.fixture
def source_pt(tmp_path: Path) -> Path:
    path = tmp_path / "source.pt"
    torch.save(checkpoint(), path)
    return path


def same_as_local(tmp_path: Path, local: Path, url: str, ranges: list[tuple[str, int, int]]) -> tuple[int, int]:
    """Checks a remote copy reads and converts as the local one does; (bytes, requests) of the read."""
    ranges.clear()
    remote = converters.read(url)
    read_bytes, read_requests = total(ranges), len(ranges)
    local_checkpoint = converters.read(local)
    assert [(p, r.dtype, r.shape) for p, r in remote.tensors()] == [
        (p, r.dtype, r.shape) for p, r in local_checkpoint.tensors()
    ]
    assert converters.verify(local, url) == []
    converters.convert(url, tmp_path / "from-remote.safetensors")
    converters.convert(local, tmp_path / "from-local.safetensors")
    assert (tmp_path / "from-remote.safetensors").read_bytes() == (tmp_path / "from-local.safetensors").read_bytes()
    return read_bytes, read_requests


def stored_size(local: Path) -> int:
    return sum(p.stat().st_size for p in local.iterdir()) if local.is_dir() else local.stat().st_size


# ------------------------------------------------------------------------------ one file per format


@pytest.mark.parametrize("suffix", [".safetensors", ".gguf", ".msgpack", ".onnx"])
def test_a_remote_file_reads_as_the_local_one_and_fetches_its_header_only(
    tmp_path: Path, store: Any, fetched: list[tuple[str, int, int]], source_pt: Path, suffix: str
) -> None:
    local = converters.convert(source_pt, tmp_path / f"model{suffix}")
    url = put(store, local, f"model{suffix}")
    read_bytes, requests = same_as_local(tmp_path, local, url, fetched)
    size = stored_size(local)
    # the sniffing's 64 KiB and the header's blocks: never the 4 MiB tensor
    assert read_bytes <= 3 * HEADER_FETCH < size // 20, (read_bytes, requests, size)
    assert requests <= 4, fetched


def test_a_flax_msgpack_file_is_read_remotely_without_its_tensor_bytes(
    tmp_path: Path, store: Any, fetched: list[tuple[str, int, int]]
) -> None:
    import numpy as np
    from flax import serialization as flax_serialization

    tree = {"params": {"dense": {"kernel": np.ones((1024, 1024), np.float32), "bias": np.zeros(7, np.float16)}}}
    local = tmp_path / "flax.msgpack"
    local.write_bytes(flax_serialization.to_bytes(tree))
    url = put(store, local, "flax.msgpack")
    read_bytes, _ = same_as_local(tmp_path, local, url, fetched)
    assert read_bytes <= 3 * HEADER_FETCH < local.stat().st_size // 20


def test_onnx_external_data_is_never_fetched_by_a_read(
    tmp_path: Path, store: Any, fetched: list[tuple[str, int, int]], source_pt: Path
) -> None:
    folder = tmp_path / "onnx"
    folder.mkdir()
    local = converters.convert(source_pt, folder / "model.onnx", external_data=True)
    assert (folder / "model.onnx.data").stat().st_size >= 4 * BIG
    url = put(store, folder, "onnx") + "/model.onnx"
    same_as_local(tmp_path, local, url, fetched)
    fetched.clear()
    converters.read(url)
    assert total(fetched, "model.onnx.data") == 0 and total(fetched) <= 2 * HEADER_FETCH


@pytest.mark.parametrize(
    ("location", "error", "message"),
    [
        ("/bucket/secret.bin", UnsafeFileError, "must be a relative path"),
        ("../secret.bin", UnsafeFileError, "must be a relative path"),
        ("sub/../../secret.bin", UnsafeFileError, "must be a relative path"),
        ("missing.bin", CorruptFileError, "external data file 'missing.bin' does not exist beside the model"),
        ("sub", UnsafeFileError, "external data location 'sub' is not a regular file"),
        ("short.bin", CorruptFileError, r"must hold exactly 8 bytes inside its 4 bytes"),
    ],
)
def test_remote_onnx_external_data_must_stay_in_the_folder(
    tmp_path: Path, store: Any, location: str, error: type[Exception], message: str
) -> None:
    from onnx import TensorProto, helper

    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": "8"}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([], "g", [], [helper.make_tensor_value_info("w", TensorProto.FLOAT, [2])], [tensor])
    store.pipe_file("/bucket/model/m.onnx", helper.make_model(graph).SerializeToString())
    store.pipe_file("/bucket/secret.bin", b"\x00" * 8)
    store.pipe_file("/bucket/model/sub/inner.bin", b"\x00" * 8)
    store.pipe_file("/bucket/model/short.bin", b"\x00" * 4)
    with pytest.raises(error, match=message):
        converters.read("memory://bucket/model/m.onnx")


# ------------------------------------------------------------------------------ sharded safetensors


def sharded_folder(tmp_path: Path) -> Path:
    """Four 256 KiB tensors, one per shard."""
    torch.manual_seed(1)
    state = {f"layer{i}.weight": torch.randn(256, 256) for i in range(4)}
    torch.save(state, tmp_path / "state.pt")
    return converters.convert(
        tmp_path / "state.pt", tmp_path / "sharded", dst_format="safetensors", max_shard_size="300KB"
    )


def test_a_remote_sharded_folder_reads_as_the_local_one(
    tmp_path: Path, store: Any, fetched: list[tuple[str, int, int]]
) -> None:
    local = sharded_folder(tmp_path)
    url = put(store, local, "sharded")
    read_bytes, requests = same_as_local(tmp_path, local, url, fetched)
    shards = [p.name for p in local.iterdir() if p.name.endswith(".safetensors")]
    assert len(shards) == 4
    # the index, and one request per shard for its length and header
    assert requests == 1 + len(shards) and read_bytes <= (1 + len(shards)) * HEADER_FETCH, fetched
    index = url + "/model.safetensors.index.json"
    assert converters.verify(local, index) == []


def test_converting_a_selection_fetches_the_data_of_its_shards_only(
    tmp_path: Path, store: Any, fetched: list[tuple[str, int, int]]
) -> None:
    local = sharded_folder(tmp_path)
    url = put(store, local, "sharded")
    index = converters.read(local)
    weight_map = json.loads((local / "model.safetensors.index.json").read_text())["weight_map"]
    wanted = weight_map["layer2.weight"]
    fetched.clear()
    out = converters.convert(url, tmp_path / "selected.safetensors", select="layer2.weight")
    assert converters.verify(local, out, select="layer2.weight") == []
    assert len(list(index.tensors())) == 4
    for name in set(weight_map.values()):
        ranges = [(start, end) for object_name, start, end in fetched if object_name == name]
        if name == wanted:
            assert total(fetched, name) >= 256 * 256 * 4  # its tensor's bytes
        else:  # a shard holding no selected tensor is never opened (the selection is pushed into the reader)
            assert not ranges, (name, ranges)


def test_a_missing_or_truncated_remote_shard_is_an_error_naming_it(tmp_path: Path, store: Any) -> None:
    local = sharded_folder(tmp_path)
    url = put(store, local, "sharded")
    shard = sorted(p.name for p in local.iterdir() if p.name.endswith(".safetensors"))[1]
    data = store.cat_file(f"/bucket/sharded/{shard}")
    store.pipe_file(f"/bucket/sharded/{shard}", data[: len(data) // 2])
    with pytest.raises(ConverterError, match=rf"memory://bucket/sharded/{shard}"):
        converters.read(url)
    store.rm_file(f"/bucket/sharded/{shard}")
    with pytest.raises(ConverterError, match=rf"memory://bucket/sharded/model.safetensors.index.json.*{shard}"):
        converters.read(url)


def test_a_shard_truncated_after_the_read_fails_the_conversion_naming_it(tmp_path: Path, store: Any) -> None:
    local = sharded_folder(tmp_path)
    url = put(store, local, "sharded")
    checkpoint = converters.read(url)
    shard = sorted(p.name for p in local.iterdir() if p.name.endswith(".safetensors"))[2]
    data = store.cat_file(f"/bucket/sharded/{shard}")
    store.pipe_file(f"/bucket/sharded/{shard}", data[:-1000])
    with pytest.raises(ConverterError, match=rf"memory://bucket/sharded/{shard}"):
        converters.write(checkpoint, tmp_path / "out.safetensors")


# ------------------------------------------------------------------------------ DCP folders


def test_a_remote_dcp_folder_of_ours_reads_as_the_local_one(
    tmp_path: Path, store: Any, fetched: list[tuple[str, int, int]], source_pt: Path
) -> None:
    local = converters.convert(source_pt, tmp_path / "dcp", dst_format="dcp")
    url = put(store, local, "dcp")
    read_bytes, _ = same_as_local(tmp_path, local, url, fetched)
    assert read_bytes < stored_size(local) // 4, fetched


def test_a_remote_dcp_folder_of_torch_reads_as_the_local_one(
    tmp_path: Path, store: Any, fetched: list[tuple[str, int, int]]
) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp

    local = tmp_path / "torch-dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(checkpoint()["model_state_dict"], checkpoint_id=local, no_dist=True)
    url = put(store, local, "torch-dcp")
    read_bytes, _ = same_as_local(tmp_path, local, url, fetched)
    assert read_bytes < stored_size(local) // 4, fetched


def test_remote_dcp_data_file_names_cannot_leave_the_folder(tmp_path: Path, store: Any, source_pt: Path) -> None:
    local = converters.convert(source_pt, tmp_path / "dcp", dst_format="dcp")
    url = put(store, local, "dcp")
    data = sorted(p.name for p in local.iterdir() if p.name.endswith(".distcp"))[0]
    store.rm_file(f"/bucket/dcp/{data}")
    with pytest.raises(CorruptFileError, match=f"data file '{data}' is not a regular file in the checkpoint folder"):
        converters.read(url)
