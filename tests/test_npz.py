"""The npz format: NumPy's .npz archives and .npy arrays, read and written bit for bit.

Our files are read by ``numpy.load(f, allow_pickle=False)`` (every member byte for byte what
``numpy.save`` writes), by a JavaScript .npy parser (npm npyjs), and round-trip the exact tree
through every other format; files of ``numpy.savez``/``savez_compressed``/``numpy.save`` and JAX
exports are read bit-exactly (0-d, empty, Fortran order, big-endian); hostile files are refused
with one line naming what is wrong, within the memory bar.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import assert_bit_identical, builtin_formats, exotic_tree, tensor_bytes, within_resource_bounds

import converters
from converters.codecs import npy
from converters.core.errors import ConverterError, CorruptFileError, UnknownFormatError, UnsupportedValueError
from converters.core.sources import read_all

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / "cli.py"
JS = Path(__file__).resolve().parent / "js"
MB = 1 << 20
OTHER_FORMATS = {name: suffix for name, suffix in builtin_formats().items() if name != "npz"}
# Every dtype numpy names, by torch's name (the others are written as raw bytes: see below).
NUMPY_NAMED = {name: descr for name, descr in npy.DESCRS.items() if descr[1] != "V"}
RAW_BYTES = {name: descr for name, descr in npy.DESCRS.items() if descr[1] == "V"}


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bits (NaN payloads, subnormals, negative zeros), or 0/1 for bool."""
    generator = torch.Generator().manual_seed(seed)
    count = int(np.prod(shape, dtype=np.int64))
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (count * itemsize,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


def le_c_bytes(array: np.ndarray) -> bytes:
    """An array's elements as little-endian C-order bytes: what a tensor holds."""
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()


def array_bytes_in_file(path: Path, key: str) -> tuple[int, int]:
    """(offset of the array data of member ``key``.npy in the file, its .npy header's length)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(key + ".npy")
        member = archive.read(info)
    data = path.read_bytes()
    name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)
    header = npy.parse_header(lambda n: member[:n], len(member))
    return info.header_offset + 30 + name_length + extra_length + header.data_offset, header.data_offset


# ------------------------------------------------------------------------------ round trips


def test_recipe_checkpoint_through_npz_and_every_other_format(tmp_path: Path, recipe_pt: Path, trained: Any) -> None:
    npz = converters.convert(recipe_pt, tmp_path / "recipe.npz")
    original = trained[2]
    assert_bit_identical(original, converters.load(npz))
    for name, suffix in OTHER_FORMATS.items():
        there = converters.convert(npz, tmp_path / f"there-{name}{suffix}")
        back = converters.convert(there, tmp_path / f"back-{name}.npz")
        assert_bit_identical(original, converters.load(there))
        assert_bit_identical(original, converters.load(back))
        assert converters.verify(recipe_pt, back) == []
    # numpy reads it as numpy.savez would have written the same arrays: paths as keys
    with np.load(npz, allow_pickle=False) as loaded:
        assert loaded.files[0] == "__sdconvert__"
        weight = loaded["model_state_dict/conv1.weight"]
        state = loaded["optimizer_state_dict/state/0/momentum_buffer"]
    assert weight.tobytes() == tensor_bytes(original["model_state_dict"]["conv1.weight"])
    assert state.tobytes() == tensor_bytes(original["optimizer_state_dict"]["state"][0]["momentum_buffer"])


def test_exotic_tree_through_npz_and_every_other_format(tmp_path: Path) -> None:
    tree = exotic_tree()
    tree["array"] = np.arange(6, dtype=np.float32).reshape(2, 3)  # a numpy array stays one
    tree["tied"] = [tree["bf16"], tree["bf16"]]  # one tensor at three paths, stored once
    npz = tmp_path / "exotic.npz"
    converters.save(tree, npz)
    loaded = converters.load(npz)
    assert_bit_identical(tree, loaded)
    assert loaded["tied"][0] is loaded["tied"][1] is loaded["bf16"]
    for name, suffix in OTHER_FORMATS.items():
        there = converters.convert(npz, tmp_path / f"there-{name}{suffix}")
        back = converters.convert(there, tmp_path / f"back-{name}.npz")
        assert_bit_identical(tree, converters.load(back))
    with zipfile.ZipFile(npz) as archive:  # the tie is one member
        assert sum(name.startswith("bf16") or name.startswith("tied") for name in archive.namelist()) == 1


def test_bare_state_dict_keeps_its_keys_for_numpy_load(tmp_path: Path, trained: Any) -> None:
    state_dict = trained[0].state_dict()
    path = tmp_path / "net.npz"
    converters.save(state_dict, path)
    with np.load(path, allow_pickle=False) as loaded:
        assert loaded.files == ["__sdconvert__", *state_dict]  # as numpy.savez(**state_dict) names them
        arrays = {key: loaded[key] for key in state_dict}
        metadata = loaded["__sdconvert__"]  # our metadata: JSON text as a uint8 array
    assert metadata.dtype == np.uint8 and metadata.ndim == 1
    assert list(json.loads(metadata.tobytes())["blake3"]) == list(state_dict)
    net = type(trained[0])()
    net.load_state_dict({key: torch.from_numpy(array) for key, array in arrays.items()})
    assert_bit_identical(state_dict, net.state_dict())


def test_numpy_load_reads_every_member_bit_exactly_as_numpy_save_writes_it(tmp_path: Path) -> None:
    tensors = {
        f"{name}/{'x'.join(map(str, shape)) or 'scalar'}": random_tensor(getattr(torch, name), shape, seed)
        for seed, name in enumerate(NUMPY_NAMED)
        for shape in [(), (0,), (5,), (2, 3, 1), (0, 4)]
    }
    path = tmp_path / "dtypes.npz"
    converters.save(tensors, path)
    with np.load(path, allow_pickle=False) as loaded, zipfile.ZipFile(path) as archive:
        for key, tensor in tensors.items():
            array = loaded[key]
            assert array.dtype.str == NUMPY_NAMED[str(tensor.dtype).removeprefix("torch.")], key
            assert array.shape == tuple(tensor.shape) and array.tobytes() == tensor_bytes(tensor), key
            saved = io.BytesIO()
            np.save(saved, array)
            assert archive.read(key + ".npy") == saved.getvalue(), key  # byte for byte numpy.save's
            info = archive.getinfo(key + ".npy")
            assert info.compress_type == zipfile.ZIP_STORED
            offset, _ = array_bytes_in_file(path, key)
            assert offset % 64 == 0, key  # the array data starts 64-byte aligned in the file
    assert_bit_identical(tensors, converters.load(path))


NUMPY_LOAD_SCRIPT = """
import json, sys, numpy as np
with np.load(sys.argv[1], allow_pickle=False) as loaded:
    found = {key: [loaded[key].dtype.str, list(loaded[key].shape), loaded[key].tobytes().hex()]
             for key in loaded.files if key != "__sdconvert__"}
if sys.argv[2] == "with":
    import ml_dtypes
    with np.load(sys.argv[1], allow_pickle=False) as loaded:
        bf16 = loaded["bfloat16"].view(ml_dtypes.bfloat16)
    found["bf16_as_float32"] = bf16.astype(np.float32).tolist()
found["ml_dtypes_imported"] = "ml_dtypes" in sys.modules
print(json.dumps(found))
"""


@pytest.mark.parametrize("ml_dtypes", ["without", "with"])
def test_dtypes_numpy_cannot_name_are_their_raw_bytes_for_numpy_load(tmp_path: Path, ml_dtypes: str) -> None:
    tensors = {name: random_tensor(getattr(torch, name), (2, 3), seed) for seed, name in enumerate(RAW_BYTES)}
    tensors["bfloat16"] = torch.tensor([1.5, -2.25, 3.0e38, float("nan")], dtype=torch.bfloat16)
    path = tmp_path / "raw.npz"
    converters.save(tensors, path)
    result = subprocess.run(
        [sys.executable, "-c", NUMPY_LOAD_SCRIPT, str(path), ml_dtypes], capture_output=True, text=True, check=True
    )
    found = json.loads(result.stdout)
    assert found.pop("ml_dtypes_imported") is (ml_dtypes == "with")
    if ml_dtypes == "with":  # numpy.load still gives raw bytes; viewing them as bfloat16 gives the values
        values = found.pop("bf16_as_float32")
        assert values[:3] == [1.5, -2.25, float(torch.tensor(3.0e38, dtype=torch.bfloat16))] and values[3] != values[3]
    assert found == {
        name: ["|V" + descr[2:], list(tensor.shape), tensor_bytes(tensor).hex()]
        for name, tensor in tensors.items()
        for descr in [RAW_BYTES[name]]
    }
    assert_bit_identical(tensors, converters.load(path))  # our metadata names them


# ------------------------------------------------------------------------------ reading numpy's files


def numpy_arrays() -> dict[str, np.ndarray]:
    """Every numpy dtype a tensor can hold: 0-d, empty, 1-d and 3-d; Fortran order; big-endian."""
    rng = np.random.default_rng(7)
    arrays: dict[str, np.ndarray] = {}
    for name, descr in NUMPY_NAMED.items():
        dtype = np.dtype(descr)
        for shape in [(), (0,), (0, 3), (7,), (2, 3, 4)]:
            count = int(np.prod(shape, dtype=np.int64))
            if name == "bool":
                array = rng.integers(0, 2, size=shape).astype(bool)
            else:
                array = rng.integers(0, 256, size=count * dtype.itemsize, dtype=np.uint8).view(dtype).reshape(shape)
            label = "x".join(map(str, shape)) or "scalar"
            arrays[f"{name}.{label}"] = array
            if len(shape) > 1:
                arrays[f"{name}.{label}.fortran"] = np.asfortranarray(array)
            if dtype.itemsize > 1:
                swapped = array.astype(dtype.newbyteorder(">"))
                arrays[f"{name}.{label}.big"] = swapped
                if len(shape) > 1:
                    arrays[f"{name}.{label}.big.fortran"] = np.asfortranarray(swapped)
    return arrays


def assert_read_as(path: Path, arrays: dict[str, np.ndarray]) -> None:
    checkpoint = converters.read(path)
    assert list(checkpoint.tree) == list(arrays)
    for key, array in arrays.items():
        ref = checkpoint.tree[key]
        assert npy.DESCRS[ref.dtype][1:] == array.dtype.str[1:] and ref.shape == array.shape, key
        assert bytes(read_all(ref.source)) == le_c_bytes(array), key


@pytest.mark.parametrize("save", ["savez", "savez_compressed"])
def test_numpy_savez_files_are_read_bit_exactly(tmp_path: Path, save: str) -> None:
    arrays = numpy_arrays()
    assert any(a.flags.f_contiguous and not a.flags.c_contiguous for a in arrays.values())
    path = tmp_path / "numpy.npz"
    getattr(np, save)(path, **arrays)
    assert_read_as(path, arrays)
    # and through a conversion: safetensors holds what numpy gives
    out = converters.convert(path, tmp_path / "out.pt")
    loaded = torch.load(out, weights_only=True)
    for key, array in arrays.items():
        assert tensor_bytes(loaded[key]) == le_c_bytes(array), key


def test_fortran_arrays_are_reordered_in_bands_of_bounded_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    arrays = {
        "matrix": np.asfortranarray(rng.standard_normal((37, 53)).astype(np.float32)),
        "cube": np.asfortranarray(rng.integers(-100, 100, size=(9, 5, 11), dtype=np.int64)),
        "deep": np.asfortranarray(rng.standard_normal((3, 4, 2, 5)).astype(">c16")),
        "row_heavy": np.asfortranarray(rng.standard_normal((2, 1000)).astype(np.float16)),
    }
    for save in ("savez", "savez_compressed"):
        path = tmp_path / f"{save}.npz"
        getattr(np, save)(path, **arrays)
        for band in (1, 100, 1000, 1 << 20):  # one index of the first axis per pass ... all at once
            monkeypatch.setattr(npy, "FORTRAN_BAND", band)
            assert_read_as(path, arrays)


def test_numpy_save_npy_files_are_read_bit_exactly(tmp_path: Path) -> None:
    for key, array in numpy_arrays().items():
        path = tmp_path / f"{key}.npy"
        np.save(path, array)
        ref = converters.read(path).tree
        assert ref.shape == array.shape and bytes(read_all(ref.source)) == le_c_bytes(array), key
        assert converters.read(path).kind == "numpy .npy array"


def test_jax_exports_are_read_bfloat16_included(tmp_path: Path) -> None:
    import jax.numpy as jnp

    params = {
        "dense/kernel": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 7,
        "dense/bias": jnp.array([1.5, -0.25, 3.0], dtype=jnp.bfloat16),
        "step": jnp.array(3, dtype=jnp.int32),
    }
    arrays = {key: np.asarray(value) for key, value in params.items()}
    path = tmp_path / "params.npz"
    np.savez(path, **arrays)
    with zipfile.ZipFile(path) as archive:
        assert b"'descr': '<V2'" in archive.read("dense/bias.npy")  # what numpy.save writes for bfloat16
    checkpoint = converters.read(path)
    assert {key: ref.dtype for key, ref in checkpoint.tree.items()} == {
        "dense/kernel": "float32",
        "dense/bias": "bfloat16",
        "step": "int32",
    }
    assert checkpoint.notes == (
        "1 array(s) with descr '<V2' read as bfloat16 (what numpy.save writes for ml_dtypes' bfloat16 and "
        "mx.savez for MLX's; no other type is '<V2')",
    )
    loaded = converters.load(path)
    for key, array in arrays.items():
        assert tensor_bytes(loaded[key]) == array.tobytes(), key
    assert loaded["dense/bias"].tolist() == [1.5, -0.25, 3.0]


def test_members_that_are_not_arrays_are_their_bytes_as_numpy_load_gives_them(tmp_path: Path) -> None:
    path = tmp_path / "mixed.npz"
    with zipfile.ZipFile(path, "w") as archive:
        saved = io.BytesIO()
        np.save(saved, np.arange(3, dtype=np.int16))
        archive.writestr("w.npy", saved.getvalue())
        archive.writestr("README.txt", b"notes \x00\xff")
    with np.load(path) as loaded:
        assert loaded["README.txt"] == b"notes \x00\xff"
    tree = converters.load(path)
    assert list(tree) == ["w", "README.txt"] and tree["README.txt"] == b"notes \x00\xff"


def test_an_array_named_like_our_metadata_in_numpys_file_is_an_array(tmp_path: Path) -> None:
    path = tmp_path / "theirs.npz"
    arrays = {"__sdconvert__": np.arange(5, dtype=np.uint8), "w": np.ones(2, dtype=np.float32)}
    np.savez(path, **arrays)
    checkpoint = converters.read(path)
    assert checkpoint.kind == "numpy .npz archive" and list(checkpoint.tree) == list(arrays)
    for key, array in arrays.items():
        assert bytes(read_all(checkpoint.tree[key].source)) == array.tobytes()


def test_mlx_and_our_npz_read_each_other(tmp_path: Path) -> None:
    mx = pytest.importorskip("mlx.core")  # the test extra's mlx[cpu]; mx.load reads every member as an array
    tree = {
        "w": random_tensor(torch.float32, (4, 3)),
        "h": random_tensor(torch.float16, (5,)),
        "i": random_tensor(torch.int64, (2, 2)),
        "u": random_tensor(torch.uint8, (7,)),
        "b": random_tensor(torch.bool, (3,)),
        "bf": torch.tensor([[1.5, -2.25], [3.0e38, 0.0]], dtype=torch.bfloat16),  # '<V2' is MLX's bfloat16 too
    }
    for compress in (False, True):
        path = tmp_path / f"mlx-{compress}.npz"
        converters.save(tree, path, compress=compress)
        loaded = mx.load(str(path))
        assert sorted(loaded) == sorted([*tree, "__sdconvert__"])
        assert loaded["bf"].dtype == mx.bfloat16
        for key, tensor in tree.items():
            array = np.array(loaded[key].view(mx.uint16) if key == "bf" else loaded[key])
            assert array.shape == tuple(tensor.shape) and array.tobytes() == tensor_bytes(tensor), key
        metadata = json.loads(np.array(loaded["__sdconvert__"]).tobytes())
        assert list(metadata["blake3"]) == list(tree)
    # and mx.savez's files: bfloat16 as '<V2', a transposed array in Fortran order, "(2, 3, )" shapes
    a = mx.arange(6, dtype=mx.float32).reshape(2, 3)
    bf = mx.array([[1.5, 2.0, -0.5]], dtype=mx.bfloat16)
    path = tmp_path / "mlx.npz"
    mx.savez(str(path), a=a, t=a.T, bf=bf)
    with zipfile.ZipFile(path) as archive:
        assert b"'fortran_order': True" in archive.read("t.npy")
    loaded = converters.load(path)
    assert tensor_bytes(loaded["t"]) == np.ascontiguousarray(np.array(a).T).tobytes()
    assert loaded["bf"].dtype == torch.bfloat16 and tensor_bytes(loaded["bf"]) == np.array(bf.view(mx.uint16)).tobytes()


# ------------------------------------------------------------------------------ writing options and .npy


def test_compress_deflates_every_member_and_reads_back(tmp_path: Path, recipe_pt: Path, trained: Any) -> None:
    plain = converters.convert(recipe_pt, tmp_path / "plain.npz")
    result = subprocess.run(
        [sys.executable, str(CLI), "convert", str(recipe_pt), str(tmp_path / "small.npz"), "--compress"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    small = tmp_path / "small.npz"
    with zipfile.ZipFile(small) as archive:
        methods = {info.filename: info.compress_type for info in archive.infolist()}
    assert methods.pop("__sdconvert__.npy") == zipfile.ZIP_STORED
    assert set(methods.values()) == {zipfile.ZIP_DEFLATED} and len(methods) == 20
    assert_bit_identical(trained[2], converters.load(small))
    with np.load(small, allow_pickle=False) as compressed, np.load(plain, allow_pickle=False) as stored:
        for key in stored.files:
            if key != "__sdconvert__":
                assert compressed[key].tobytes() == stored[key].tobytes() and compressed[key].dtype == stored[key].dtype
    assert converters.verify(plain, small) == []
    deep = subprocess.run([sys.executable, str(CLI), "verify", "--deep", str(small)], capture_output=True, text=True)
    assert deep.returncode == 0, deep.stdout + deep.stderr
    # compressible arrays get smaller
    zeros = {"z": torch.zeros(256, 1024)}
    converters.save(zeros, tmp_path / "z.npz")
    converters.save(zeros, tmp_path / "zc.npz", compress=True)
    assert (tmp_path / "zc.npz").stat().st_size * 50 < (tmp_path / "z.npz").stat().st_size
    assert_bit_identical(zeros, converters.load(tmp_path / "zc.npz"))


def test_one_tensor_to_npy_and_back(tmp_path: Path, recipe_pt: Path, trained: Any) -> None:
    weight = trained[2]["model_state_dict"]["fc1.weight"]
    path = converters.convert(recipe_pt, tmp_path / "fc1.npy", select="model_state_dict/fc1.weight")
    array = np.load(path, allow_pickle=False)
    assert array.dtype == np.float32 and array.tobytes() == tensor_bytes(weight)
    assert_bit_identical(weight, converters.load(path))
    bf16 = torch.tensor([[1.5, -2.0]], dtype=torch.bfloat16)
    converters.save(bf16, tmp_path / "bf16.npy")
    assert np.load(tmp_path / "bf16.npy").dtype.str == "|V2"
    assert_bit_identical(bf16, converters.load(tmp_path / "bf16.npy"))


@pytest.mark.parametrize(
    ("tree", "options", "message"),
    [
        (
            "recipe",
            {},
            "a .npy file holds one array, and this checkpoint is a dict holding 20 tensor(s): select one "
            "(--select model_state_dict/conv1.weight) or write an .npz",
        ),
        (
            torch.zeros(2, dtype=torch.float8_e4m3fn),
            {},
            "a .npy file cannot name the dtype float8_e4m3fn (numpy has no such type; it would be read back as raw "
            "bytes): write an .npz, whose metadata names it",
        ),
        (
            torch.zeros(2),
            {"compress": True},
            "--compress deflates the members of an .npz; a .npy file is never compressed",
        ),
    ],
    ids=["tree", "float8", "compress"],
)
def test_what_a_npy_cannot_hold_is_refused(
    tmp_path: Path, trained: Any, tree: Any, options: dict[str, Any], message: str
) -> None:
    value = trained[2] if isinstance(tree, str) else tree
    with pytest.raises(UnsupportedValueError) as caught:
        converters.save(value, tmp_path / "x.npy", **options)
    assert str(caught.value) == f"{tmp_path / 'x.npy'}: {message}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("key", "member"),
    [
        ("../escape", "%2E%2E/escape.npy"),
        ("/etc/passwd", "%2Fetc/passwd.npy"),
        ("a\\..\\b", "a%5C..%5Cb.npy"),
        ("a\x00b%", "a%00b%25.npy"),
        ("lone \ud800", "lone %uD800.npy"),
        ("__sdconvert__", "%5F_sdconvert__.npy"),
    ],
)
def test_keys_unsafe_as_member_names_are_escaped_and_come_back(tmp_path: Path, key: str, member: str) -> None:
    # A bare state_dict's key names its member; one that would be unsafe to extract (outside the
    # folder, cut at a NUL), that is not UTF-8, or that numpy.load would confuse with our metadata
    # is escaped, and the metadata maps it back. The literal spelling of the escape is another key.
    literal = member.removesuffix(".npy")
    tree = {key: torch.arange(3.0), literal: torch.ones(2)}
    path = tmp_path / "x.npz"
    converters.save(tree, path)
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["__sdconvert__.npy", member.replace(".npy", "#2.npy"), member]
    assert_bit_identical(tree, converters.load(path))
    with np.load(path, allow_pickle=False) as loaded:
        assert loaded[member.replace(".npy", "#2")].tobytes() == tensor_bytes(tree[key])


def test_a_key_longer_than_a_member_name_can_be_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedValueError) as caught:
        converters.save({"k" * 70_000: torch.zeros(1)}, tmp_path / "x.npz")
    assert str(caught.value).endswith("is longer than a zip member name can be (65535 bytes); rename it (--rename)")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ sniffing and integrity


def test_npz_and_pt_zips_are_told_apart_by_their_contents(tmp_path: Path, recipe_pt: Path) -> None:
    ours = converters.convert(recipe_pt, tmp_path / "ours.npz")
    theirs = tmp_path / "theirs.npz"
    np.savez(theirs, w=np.zeros(3))
    registry = converters.registry
    for source in (ours, theirs):
        bare = tmp_path / (source.stem + "-noext")
        shutil.copy(source, bare)
        assert registry.resolve(bare).name == "npz"
        misnamed = tmp_path / (source.stem + ".pt")
        shutil.copy(source, misnamed)
        with pytest.raises(UnknownFormatError) as caught:
            converters.read(misnamed)
        assert str(caught.value) == (
            f"{misnamed}: the name says pt but the contents are npz; pass --from npz (format='npz') or rename the file"
        )
    torch_zip = tmp_path / "torch.npz"
    shutil.copy(recipe_pt, torch_zip)
    with pytest.raises(UnknownFormatError, match="the name says npz but the contents are pt"):
        converters.read(torch_zip)
    assert registry.resolve(recipe_pt).name == "pt"


def test_a_flipped_bit_in_an_array_is_named_not_laundered(tmp_path: Path) -> None:
    weights = {"w": torch.arange(4096, dtype=torch.float32), "b": torch.ones(3)}
    ours = tmp_path / "ours.npz"
    converters.save(weights, ours)
    theirs = tmp_path / "theirs.npz"
    np.savez(theirs, **{key: value.numpy() for key, value in weights.items()})
    for path in (ours, theirs):  # ours stores digests; numpy's does not: its zip CRC-32 catches it
        offset, _ = array_bytes_in_file(path, "w")
        data = bytearray(path.read_bytes())
        data[offset + 1000] ^= 0x04
        path.write_bytes(bytes(data))
        with pytest.raises(CorruptFileError) as caught:
            converters.convert(path, tmp_path / "out.safetensors")
        assert "zip record 'w.npy' (its array data) does not match its CRC-32" in str(caught.value)
        assert not (tmp_path / "out.safetensors").exists()
    deep = subprocess.run([sys.executable, str(CLI), "verify", "--deep", str(ours)], capture_output=True, text=True)
    assert deep.returncode == 1 and "w: tensor bytes do not match the stored BLAKE3 digest" in deep.stdout


def test_a_flipped_bit_in_a_header_is_found_too(tmp_path: Path) -> None:
    path = tmp_path / "ours.npz"
    converters.save({"w": torch.arange(8, dtype=torch.float32)}, path)
    offset, _ = array_bytes_in_file(path, "w")
    data = bytearray(path.read_bytes())
    data[offset - 2] ^= 0x29  # a padding space of the .npy header made a tab: still a valid header
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"zip record 'w\.npy' \(its array data\) does not match its CRC-32"):
        converters.convert(path, tmp_path / "out.safetensors")


# ------------------------------------------------------------------------------ hostile files


def npy_bytes(header: str, data: bytes = b"", version: tuple[int, int] = (1, 0), length: int | None = None) -> bytes:
    encoded = header.encode("latin1")
    size = len(encoded) if length is None else length
    packed = struct.pack("<H" if version == (1, 0) else "<I", size)
    return npy.NPY_MAGIC + bytes(version) + packed + encoded + data


def f4(shape: str, data: bytes = b"") -> bytes:
    return npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }\n", data)


def with_descr(descr: str, data: bytes = b"") -> bytes:
    return npy_bytes("{'descr': " + descr + ", 'fortran_order': False, 'shape': (2,), }\n", data)


def npz(*members: tuple[str, bytes], compress: bool = False) -> bytes:
    out = io.BytesIO()
    with (
        warnings.catch_warnings(),  # zipfile warns of a duplicate name, which one row is about
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as archive,
    ):
        warnings.simplefilter("ignore")
        for name, data in members:
            archive.writestr(name, data)
    return out.getvalue()


def raw_zip(name: str, deflated: bytes, declared: int, crc: int) -> bytes:
    """A zip of one deflated member that declares ``declared`` bytes inflated (lying or not)."""
    encoded = name.encode()
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(deflated), declared, len(encoded), 0)
    central = struct.pack(
        "<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc, len(deflated), declared, len(encoded),
        0, 0, 0, 0, 0, 0,
    )  # fmt: skip
    body = local + encoded + deflated
    directory = central + encoded
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 1, 1, len(directory), len(body), 0)
    return body + directory + end


def deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def bomb(declared: int) -> bytes:
    member = f4("(1000000,)", bytes(4_000_000))
    return raw_zip("w.npy", deflate(member), declared, zlib.crc32(member))


def lying_bomb() -> bytes:
    """A deflated member whose header and declared size agree (10 floats), whose stream goes on."""
    member = f4("(10,)", bytes(40))
    return raw_zip("w.npy", deflate(member + bytes(1_000_000)), len(member), zlib.crc32(member))


def ours_with(change: Callable[[dict[str, Any]], None]) -> bytes:
    """An .npz we wrote, its metadata member changed by ``change`` (rewritten by zipfile)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ours.npz"
        converters.save({"w": torch.ones(2, dtype=torch.bfloat16), "b": torch.zeros(3)}, path)
        with zipfile.ZipFile(path) as archive:
            members = [(name, archive.read(name)) for name in archive.namelist()]
    assert members[0][0] == "__sdconvert__.npy"
    meta = json.loads(np.load(io.BytesIO(members[0][1])).tobytes())
    change(meta)
    return npz(("__sdconvert__.npy", metadata_member(json.dumps(meta).encode())), *members[1:])


def metadata_member(text: bytes) -> bytes:
    """Our metadata member: JSON text as a 1-d uint8 .npy."""
    return npy.header_bytes("|u1", (len(text),)) + text


PICKLE = pickle.dumps({"w": [1, 2, 3]}, protocol=4)
OBJECT_NPY = npy_bytes("{'descr': '|O', 'fortran_order': False, 'shape': (2,), }\n", PICKLE)
NO_SUCH_KEY = "at b: the tree refers to tensor 'x', which the archive lacks"

# (name, file name, bytes, error, message after "<path>: ")
Case = tuple[str, str, Callable[[], bytes], type[ConverterError], str]
HOSTILE: list[Case] = [
    ("truncated-array", "x.npz", lambda: npz(("w.npy", f4("(10,)", bytes(8)))), CorruptFileError,
     "member 'w.npy': its header says <f4 [10]: 40 bytes of array data, and 8 follow the header"),
    ("lying-shape", "x.npz", lambda: npz(("w.npy", f4("(1099511627776,)", bytes(16)))), CorruptFileError,
     "member 'w.npy': its header says <f4 [1099511627776]: 4398046511104 bytes of array data, and 16 follow "
     "the header"),
    ("trailing-bytes", "x.npz", lambda: npz(("w.npy", f4("(2,)", bytes(12)))), CorruptFileError,
     "member 'w.npy': its header says <f4 [2]: 8 bytes of array data, and 12 follow the header"),
    ("header-too-long", "x.npz", lambda: npz(("w.npy", npy_bytes("{}", bytes(100), (2, 0), 1_000_000))),
     CorruptFileError,
     "member 'w.npy': the .npy header is 1000000 bytes, more than the 10000 numpy.load reads without allow_pickle"),
    ("header-past-member", "x.npz", lambda: npz(("w.npy", npy_bytes("{}", bytes(190), length=5000))), CorruptFileError,
     "member 'w.npy': the .npy header needs 5010 bytes; there are 202"),
    ("object-dtype", "x.npz", lambda: npz(("w.npy", OBJECT_NPY)), UnsupportedValueError,
     "member 'w.npy': descr '|O' holds Python objects (the data is a pickle, never unpickled here), not a "
     "tensor's numbers"),
    ("pickled-member", "x.npz", lambda: npz(("w.npy", PICKLE)), CorruptFileError,
     "member 'w.npy': not an .npy array (it is a pickle, never unpickled here)"),
    ("bad-descr", "x.npz", lambda: npz(("w.npy", with_descr("'<q9'"))), UnsupportedValueError,
     "member 'w.npy': descr '<q9' is not a numpy type code"),
    ("float128", "x.npz", lambda: npz(("w.npy", with_descr("'<f16'"))), UnsupportedValueError,
     "member 'w.npy': descr '<f16' is a size no tensor dtype has (float128?)"),
    ("structured", "x.npz", lambda: npz(("w.npy", with_descr("[('a', '<f4'), ('b', '<i8')]"))),
     UnsupportedValueError,
     "member 'w.npy': descr [('a', '<f4'), ('b', '<i8')] is a structured (record) dtype; only plain numeric "
     "arrays are read"),
    ("strings", "x.npz", lambda: npz(("w.npy", with_descr("'<U3'", bytes(24)))), UnsupportedValueError,
     "member 'w.npy': descr '<U3' holds unicode strings, not a tensor's numbers"),
    ("datetimes", "x.npz", lambda: npz(("w.npy", with_descr("'<M8[ns]'", bytes(16)))), UnsupportedValueError,
     "member 'w.npy': descr '<M8[ns]' holds datetimes, not a tensor's numbers"),
    ("void-float8", "x.npz", lambda: npz(("w.npy", with_descr("'<V1'", bytes(2)))), UnsupportedValueError,
     "member 'w.npy': descr '<V1' is raw bytes whose element type the file does not record (numpy.save writes "
     "ml_dtypes' float8 and int4 arrays so); of those only '<V2' (bfloat16) is read"),
    ("float8-e5m2", "x.npz", lambda: npz(("w.npy", with_descr("'<f1'", bytes(2)))), UnsupportedValueError,
     "member 'w.npy': descr '<f1' is what numpy.save writes for ml_dtypes.float8_e5m2 (numpy.load cannot read it "
     "either): its element type is not recorded"),
    ("no-byte-order", "x.npz", lambda: npz(("w.npy", with_descr("'|f4'", bytes(8)))), CorruptFileError,
     "member 'w.npy': descr '|f4' does not say its byte order ('<' or '>')"),
    ("code-in-header", "x.npz",
     lambda: npz(("w.npy", npy_bytes("{'descr': __import__('os').system('true'), 'shape': (1,)}"))), CorruptFileError,
     "member 'w.npy': the .npy header is not a dict literal: expected a value (a string, int, True, False, "
     "tuple or list) at char 10, found \"__import__('os').system('true'), 'shape'\""),
    ("not-a-dict", "x.npz", lambda: npz(("w.npy", npy_bytes("[1, 2]"))), CorruptFileError,
     "member 'w.npy': the .npy header is not a dict literal: expected '{' at char 0, found '[1, 2]'"),
    ("extra-key", "x.npz",
     lambda: npz(("w.npy", npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (), 'x': 1}", bytes(4)))),
     CorruptFileError,
     "member 'w.npy': the .npy header must have exactly the keys descr, fortran_order and shape, found descr, "
     "fortran_order, shape, x"),
    ("duplicate-key", "x.npz",
     lambda: npz(("w.npy", npy_bytes("{'descr': '<f4', 'descr': '<f8', 'shape': ()}"))), CorruptFileError,
     "member 'w.npy': the .npy header has the key 'descr' twice"),
    ("fortran-not-bool", "x.npz",
     lambda: npz(("w.npy", npy_bytes("{'descr': '<f4', 'fortran_order': 1, 'shape': ()}", bytes(4)))),
     CorruptFileError, "member 'w.npy': fortran_order must be True or False, found 1"),
    ("negative-dim", "x.npz", lambda: npz(("w.npy", f4("(3, -1)"))), CorruptFileError,
     "member 'w.npy': shape (3, -1) must hold ints in [0, 2**63)"),
    ("huge-int", "x.npz", lambda: npz(("w.npy", f4("(" + "9" * 50 + ",)"))), CorruptFileError,
     "member 'w.npy': the .npy header holds an integer of 50 digits"),
    ("too-many-dims", "x.npz", lambda: npz(("w.npy", f4("(" + "1, " * 65 + ")", bytes(4)))), UnsupportedValueError,
     "member 'w.npy': shape has 65 dims, at most 64 are supported"),
    ("version-4", "x.npz", lambda: npz(("w.npy", npy_bytes("{}", version=(4, 0)))), UnsupportedValueError,
     "member 'w.npy': .npy format version 4.0 is not one numpy writes (1.0, 2.0, 3.0)"),
    ("same-key-twice", "x.npz", lambda: npz(("w", f4("(1,)", bytes(4))), ("w.npy", f4("(1,)", bytes(4)))),
     CorruptFileError, "members 'w' and 'w.npy' both give the key 'w' (numpy.load would give one of them)"),
    ("duplicate-member", "x.npz",
     lambda: npz(("w.npy", f4("(1,)", bytes(4))), ("w.npy", f4("(1,)", bytes(4)))), CorruptFileError,
     "zip entry 'w.npy' appears twice"),
    ("bomb-past-the-output-limit", "x.npz", lambda: bomb(3_000_000_000), CorruptFileError,
     "names 3000000000 bytes of data inflated from zip record 'w.npy' from a 4079-byte input (more than 4x its "
     "size + 64 MiB: overlapping views or a compression bomb)"),
    ("bomb-header-disagrees", "x.npz", lambda: bomb(64 + 40_000), CorruptFileError,
     "member 'w.npy': its header says <f4 [1000000]: 4000000 bytes of array data, and 39990 follow the header"),
    ("bomb-inflates-past-its-size", "x.npz", lambda: lying_bomb(), CorruptFileError,
     "zip record 'w.npy' (deflated): it inflates to more than the 109 bytes it declares"),
    ("appended-garbage", "x.npz", lambda: npz(("w.npy", f4("(1,)", bytes(4)))) + b"junk", CorruptFileError,
     "4 bytes follow the end of the zip archive (its end-of-central-directory record and comment); refusing "
     "appended data"),
    ("npy-cut-in-header", "x.npy", lambda: npy_bytes("{'descr': '<f4', ", length=100), CorruptFileError,
     "the .npy header needs 110 bytes; there are 27"),
    ("npy-object", "x.npy", lambda: OBJECT_NPY, UnsupportedValueError,
     "descr '|O' holds Python objects (the data is a pickle, never unpickled here), not a tensor's numbers"),
    ("npy-trailing", "x.npy", lambda: f4("(1,)", bytes(8)), CorruptFileError,
     "its header says <f4 [1]: 4 bytes of array data, and 8 follow the header"),
    ("ours-tree-names-a-missing-array", "x.npz",
     lambda: ours_with(lambda m: m.update(tree=m["tree"].replace('"b"}', '"x"}'))), CorruptFileError, NO_SUCH_KEY),
    ("ours-version-2", "x.npz", lambda: ours_with(lambda m: m.update(version=2)), UnsupportedValueError,
     "__sdconvert__.npy has version 2; this reader knows version 1"),
    ("ours-digest-missing", "x.npz", lambda: ours_with(lambda m: m["blake3"].pop("b")), CorruptFileError,
     "__sdconvert__.npy's blake3 has no digest for array 'b'"),
    ("ours-dtype-mismatch", "x.npz", lambda: ours_with(lambda m: m.update(dtypes={"b": "bfloat16"})), CorruptFileError,
     "member 'b.npy': its descr is '<f4', but the metadata says bfloat16, stored as raw 2-byte elements"),
    ("ours-members-names-no-member", "x.npz", lambda: ours_with(lambda m: m.update(members={"w": "v.npy"})),
     CorruptFileError, "__sdconvert__.npy's members must map array keys to .npy members of the archive"),
    ("ours-not-json", "x.npz",
     lambda: npz(("__sdconvert__.npy", metadata_member(b"{tree")), ("w.npy", f4("(1,)", bytes(4)))),
     CorruptFileError,
     "__sdconvert__.npy is not valid JSON: Expecting property name enclosed in double quotes at char 1"),
]  # fmt: skip


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile-npz")
    paths = {}
    for name, file_name, build, _, _ in HOSTILE:
        (folder / name).mkdir()
        path = paths[name] = folder / name / file_name
        path.write_bytes(build())
    return paths


@pytest.mark.parametrize(
    ("name", "error", "message"), [(c[0], c[3], c[4]) for c in HOSTILE], ids=[c[0] for c in HOSTILE]
)
def test_hostile_file_is_refused_with_one_line(
    hostile: dict[str, Path], name: str, error: type[ConverterError], message: str
) -> None:
    path = hostile[name]
    with within_resource_bounds(path.stat().st_size), pytest.raises(error) as caught:
        converters.convert(path, path.parent / "out.safetensors")
    assert str(caught.value) == f"{path}{' ' if message.startswith('at ') else ': '}{message}"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


@pytest.mark.parametrize("name", ["bomb-past-the-output-limit", "object-dtype", "code-in-header", "pickled-member"])
def test_cli_exits_2_with_one_line_within_the_memory_bar(hostile: dict[str, Path], name: str) -> None:
    path = hostile[name]
    result = subprocess.run(
        [sys.executable, str(CLI), "convert", str(path), str(path.parent / "out.safetensors")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stdout == ""
    message = next(case[4] for case in HOSTILE if case[0] == name)
    assert result.stderr == f"sdconvert: {path}: {message}\n"


def test_a_bomb_within_the_output_limit_streams_in_bounded_memory(tmp_path: Path) -> None:
    member = f4(f"({48 * MB // 4},)", bytes(48 * MB))  # 48 MiB of zeros in a ~50 KB file
    path = tmp_path / "zeros.npz"
    path.write_bytes(raw_zip("w.npy", deflate(member), len(member), zlib.crc32(member)))
    assert path.stat().st_size < 100_000
    with within_resource_bounds(path.stat().st_size):  # peak RSS: +100 MB at most, not the 48 MiB twice
        converters.convert(path, tmp_path / "zeros.safetensors", fsync=False)
    assert converters.read(tmp_path / "zeros.safetensors").tree["w"].shape == (48 * MB // 4,)


# ------------------------------------------------------------------------------ another language


@pytest.fixture(scope="module")
def node() -> str:
    executable, npm = shutil.which("node"), shutil.which("npm")
    if executable is None or npm is None:
        if os.environ.get("CI"):
            pytest.fail("Node.js and npm are needed for the cross-language test in CI")
        pytest.skip("Node.js/npm not found on PATH")
    packages = ("@noble/hashes", "npyjs")
    if not all((JS / "node_modules" / package / "package.json").exists() for package in packages):
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--silent"], cwd=JS, check=True, timeout=300)
    return executable


def read_with_npyjs(node: str, path: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [node, str(JS / "read_npz.mjs"), str(path)], capture_output=True, text=True, check=True, timeout=120
    )
    found: list[dict[str, Any]] = json.loads(result.stdout)
    return found


@pytest.mark.parametrize("compress", [False, True])
def test_npyjs_reads_every_array_as_the_manifest_says(node: str, tmp_path: Path, compress: bool) -> None:
    tree: dict[str, Any] = {
        name: random_tensor(getattr(torch, name), (3, 2), seed) for seed, name in enumerate(NUMPY_NAMED)
    }
    tree["scalar"] = torch.tensor(0.25, dtype=torch.float64)
    tree["bfloat16"] = torch.ones(2, dtype=torch.bfloat16)
    path = tmp_path / "arrays.npz"
    converters.save(tree, path, compress=compress)
    found = {entry["key"]: entry for entry in read_with_npyjs(node, path)}
    manifest = converters.manifest(path)
    metadata = found.pop("__sdconvert__")  # our metadata: a uint8 array of JSON text, which npyjs reads too
    assert metadata["dtype"] == "u1" and metadata["metadata"]["blake3"] == {
        tensor["key"]: tensor["blake3"] for tensor in manifest["tensors"]
    }
    assert len(found) == len(manifest["tensors"]) == len(NUMPY_NAMED) + 2
    for tensor in manifest["tensors"]:
        seen = found[tensor["key"]]
        if tensor["dtype"] == "bfloat16":  # numpy has no name for it: npyjs says so, it does not misread it
            assert seen == {"name": "bfloat16.npy", "key": "bfloat16", "error": "Unsupported dtype: <V2"}
            continue
        assert (seen["dtype"], seen["shape"], seen["fortran"], seen["nbytes"], seen["blake3"]) == (
            npy.DESCRS[tensor["dtype"]][1:],
            tensor["shape"],
            False,
            tensor["nbytes"],
            tensor["blake3"],
        ), tensor["key"]


def test_npyjs_reads_the_recipe_and_a_single_npy(node: str, tmp_path: Path, recipe_pt: Path) -> None:
    path = converters.convert(recipe_pt, tmp_path / "recipe.npz")
    found = {entry["key"]: entry for entry in read_with_npyjs(node, path)}
    found.pop("__sdconvert__")
    manifest = converters.manifest(path)
    assert len(manifest["tensors"]) == len(found) == 20
    for tensor in manifest["tensors"]:
        seen = found[tensor["key"]]
        assert (seen["dtype"], seen["shape"], seen["blake3"]) == ("f4", tensor["shape"], tensor["blake3"])
    single = converters.convert(recipe_pt, tmp_path / "fc1.npy", select="model_state_dict/fc1.weight")
    (seen,) = read_with_npyjs(node, single)
    fc1 = next(t for t in manifest["tensors"] if t["path"] == ["model_state_dict", "fc1.weight"])
    assert (seen["shape"], seen["blake3"]) == (fc1["shape"], fc1["blake3"])


def test_the_format_is_listed_with_its_option() -> None:
    result = subprocess.run([sys.executable, str(CLI), "formats"], capture_output=True, text=True, check=True)
    assert re.search(r"^npz\b.*\.npz.*\.npy", result.stdout, re.MULTILINE), result.stdout
    assert "--compress" in result.stdout
