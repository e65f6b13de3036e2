"""GGUF (issue 15, part 2): our files are read by gguf-py's ``GGUFReader`` bit for bit (names, GGUF-order
dims, GGML types, raw bytes), files made by ``GGUFWriter`` are read with every metadata value type,
quantized tensors are refused by name, every tree goes through GGUF to every other format and back
exactly, and hostile files are refused with their exact one-line message within the resource bar."""

from __future__ import annotations

import dataclasses
import itertools
import json
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from helpers import assert_bit_identical, builtin_formats, exotic_tree, tensor_bytes, within_resource_bounds
from safetensors.torch import save_file

import converters
from converters import recipe
from converters.cli import main
from converters.core.errors import ConverterError, CorruptFileError, UnsupportedValueError
from converters.core.sources import read_all
from converters.formats import gguf as ours
from converters.torch_bridge import from_torch

CLI = Path(__file__).resolve().parent.parent / "cli.py"
OTHERS = {name: suffix for name, suffix in builtin_formats().items() if name != "gguf"}
GGUF_DTYPES = {  # torch dtype -> GGML type name, as the spec numbers them
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
}


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bits (NaN payloads and all) of ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    count = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (count,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


def every_dtype_tree() -> dict[str, Any]:
    shapes = [(), (0,), (5,), (2, 3, 1), (2, 1, 3, 1, 2)]  # a scalar, empty, and more dims than ggml's 4
    return {
        f"{str(dtype).removeprefix('torch.')}/{index}": random_tensor(dtype, shape, seed=index)
        for dtype in GGUF_DTYPES
        for index, shape in enumerate(shapes)
    }


# ---------------------------------------------------------------- round trips


def test_recipe_through_gguf_and_every_other_format_rebuilds_net_and_sgd(
    tmp_path: Path, recipe_pt: Path, trained: Any
) -> None:
    net, optimizer, original = trained
    first = converters.convert(recipe_pt, tmp_path / "ckpt.gguf")
    rebuilt_net, rebuilt_optimizer = recipe.rebuild(first)
    assert_bit_identical(net.state_dict(), rebuilt_net.state_dict())
    assert_bit_identical(optimizer.state_dict(), rebuilt_optimizer.state_dict())
    for name, suffix in OTHERS.items():
        middle = converters.convert(first, tmp_path / f"{name}{suffix}")
        back = converters.convert(middle, tmp_path / f"back-{name}.gguf")
        assert_bit_identical(original, converters.load(back))
        assert converters.verify(recipe_pt, back) == []
        assert converters.verify(back, deep=True) == []
    # our files into our files is a copy: the same bytes
    again = converters.convert(first, tmp_path / "again.gguf")
    assert again.read_bytes() == first.read_bytes()


@pytest.mark.parametrize("tree_name", ["exotic", "every-dtype"])
def test_trees_go_through_gguf_to_every_format_bit_exactly(tmp_path: Path, tree_name: str) -> None:
    tree = exotic_tree() if tree_name == "exotic" else every_dtype_tree()
    shared = tree.get("bf16", torch.ones(2))
    tree["tied"] = {"a": shared, "again": shared}
    source = tmp_path / "tree.gguf"
    converters.save(tree, source)
    loaded = converters.load(source)
    assert_bit_identical(tree, loaded)
    assert loaded["tied"]["a"] is loaded["tied"]["again"]
    for name, suffix in OTHERS.items():
        other = converters.convert(source, tmp_path / f"{name}{suffix}")
        assert_bit_identical(tree, converters.load(other))
        back = converters.convert(other, tmp_path / f"{name}-back.gguf")
        assert_bit_identical(tree, converters.load(back))
        assert converters.verify(source, back) == []


def test_a_cast_is_recorded_and_read_back(tmp_path: Path, recipe_pt: Path) -> None:
    out = converters.convert(recipe_pt, tmp_path / "bf16.gguf", dtype="bfloat16")
    checkpoint = converters.read(out)
    weight = checkpoint.tree["model_state_dict"]["fc1.weight"]
    assert weight.dtype == "bfloat16" and weight.cast_from is not None and weight.cast_from.dtype == "float32"
    assert converters.verify(out, deep=True) == []
    assert converters.verify(recipe_pt, out, cast_aware=True) == []
    fields = GGUFReader(out).fields
    casts = json.loads(fields["sdconvert.casts"].contents())
    assert casts["model_state_dict/fc1.weight"]["from"] == "float32"


def test_dtypes_gguf_cannot_hold_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    for dtype in (torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn, torch.uint32):
        with pytest.raises(UnsupportedValueError, match=rf"at m/x: gguf cannot hold dtype {str(dtype)[6:]};"):
            converters.save({"m": {"x": torch.zeros(2, dtype=dtype)}}, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []
    assert set(ours.FORMAT.dtype_codes) == {str(dtype).removeprefix("torch.") for dtype in GGUF_DTYPES}


# ---------------------------------------------------------------- gguf-py reads our files


def test_gguf_reader_reads_our_files_bit_for_bit(tmp_path: Path) -> None:
    state = every_dtype_tree()
    # GGUFReader views BF16 data as bytes of the last dim's width: a 0-dim BF16 tensor (valid GGUF,
    # which ggml reads) makes it fail with an IndexError (schemas/gguf.md says so). Every other one:
    del state["bfloat16/0"]
    path = tmp_path / "w.gguf"
    converters.save(state, path)
    reader = GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "sdconvert"
    assert reader.fields["general.alignment"].types == [GGUFValueType.UINT32]
    assert reader.fields["general.alignment"].contents() == 32
    assert [tensor.name for tensor in reader.tensors] == list(state)  # a bare state_dict keeps its keys
    for tensor in reader.tensors:
        original = state[tensor.name]
        assert tensor.tensor_type.name == GGUF_DTYPES[original.dtype]
        assert tensor.shape.tolist() == list(reversed(original.shape))  # GGUF order: torch's reversed
        assert tensor.data_offset % 32 == 0
        assert tensor.data.tobytes() == tensor_bytes(original)
    # the tensors sit in the infos' order, each at the padded end of the one before (what ggml requires)
    offsets = [tensor.data_offset - reader.data_offset for tensor in reader.tensors]
    sizes = [-(-tensor.n_bytes // 32) * 32 for tensor in reader.tensors]
    assert offsets == [sum(sizes[:i]) for i in range(len(sizes))]
    assert path.stat().st_size == reader.data_offset + sum(sizes)


def test_gguf_reader_reads_a_general_checkpoint_with_our_metadata(tmp_path: Path, recipe_pt: Path) -> None:
    path = converters.convert(recipe_pt, tmp_path / "ckpt.gguf", alignment=64)
    reader = GGUFReader(path)
    assert reader.alignment == 64 and all(t.data_offset % 64 == 0 for t in reader.tensors)
    stored = converters.read(recipe_pt)
    names = [tensor.name for tensor in reader.tensors]
    assert names[:2] == ["model_state_dict/conv1.weight", "model_state_dict/conv1.bias"]
    digests = json.loads(reader.fields["sdconvert.blake3"].contents())
    assert set(digests) == set(names)
    tree = json.loads(reader.fields["sdconvert.tree"].contents())
    assert [item[0] for item in tree["dict"]] == list(converters.load(recipe_pt))
    assert len(reader.fields["sdconvert.tree_blake3"].contents()) == 64
    momentum = next(t for t in reader.tensors if t.name == "optimizer_state_dict/state/0/momentum_buffer")
    expected = next(
        ref for path, ref in stored.tensors() if path == ("optimizer_state_dict", "state", 0, "momentum_buffer")
    )
    assert momentum.data.tobytes() == read_all(expected.source)


def test_keys_ggml_cannot_take_as_names_get_short_names(tmp_path: Path) -> None:
    long_key = "model.encoder.layers.11.attention.self_attention.query_key_value.weight.extra"
    state = {
        long_key: torch.arange(3.0),
        "with\x00nul": torch.ones(2),
        "ünïcödé." * 8: torch.zeros(1, dtype=torch.int64),
        "short": torch.ones(1),
    }
    path = tmp_path / "names.gguf"
    converters.save(state, path)
    assert_bit_identical(state, converters.load(path))
    reader = GGUFReader(path)
    names = [tensor.name for tensor in reader.tensors]
    assert all(len(name.encode()) <= 63 and "\x00" not in name for name in names)
    assert names[0].startswith("model.encoder.layers.11.attention.self_attention.query") and names[3] == "short"
    renamed = json.loads(reader.fields["sdconvert.names"].contents())
    assert renamed == {names[0]: long_key, names[1]: "with\x00nul", names[2]: "ünïcödé." * 8}
    # through another format and back: the same short names (they derive from the keys alone)
    back = converters.convert(converters.convert(path, tmp_path / "n.safetensors"), tmp_path / "back.gguf")
    assert [tensor.name for tensor in GGUFReader(back).tensors] == names
    assert_bit_identical(state, converters.load(back))


def test_the_alignment_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConverterError, match=r"^the GGUF alignment must be a power of two from 8 to 65536, got 48$"):
        converters.save({"w": torch.ones(1)}, tmp_path / "w.gguf", alignment=48)
    source = tmp_path / "s.safetensors"
    converters.save({"w": torch.ones(1), "b": torch.ones(3)}, source)
    out = tmp_path / "w.gguf"
    assert main(["convert", str(source), str(out), "--gguf-alignment", "x"]) == 2
    assert "--gguf-alignment takes a number, got 'x'" in capsys.readouterr().err
    assert main(["convert", str(source), str(out), "--gguf-alignment", "4096", "--quiet"]) == 0
    reader = GGUFReader(out)
    assert reader.alignment == 4096 and [t.data_offset for t in reader.tensors] == [4096, 8192]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["s.safetensors", "w.gguf"]


# ---------------------------------------------------------------- we read GGUFWriter's files


def writer_file(path: Path, *, alignment: int | None = None, endianess: Any = None) -> dict[str, Any]:
    """A GGUFWriter file with metadata of every value type and tensors of every unquantized type;
    the tensors it holds, as torch would see them."""
    extra = {} if endianess is None else {"endianess": endianess}
    writer = GGUFWriter(str(path), "llama", **extra)
    writer.add_name("tiny")
    writer.add_uint8("t.uint8", 200)
    writer.add_int8("t.int8", -100)
    writer.add_uint16("t.uint16", 65535)
    writer.add_int16("t.int16", -32768)
    writer.add_uint32("t.uint32", 4096)
    writer.add_int32("t.int32", -7)
    writer.add_float32("t.float32", 0.1)
    writer.add_uint64("t.uint64", 2**64 - 1)
    writer.add_int64("t.int64", -(2**63))
    writer.add_float64("t.float64", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_array("t.strings", ["<s>", "</s>", "ünï"])
    writer.add_array("t.int32s", [1, -2, 3])
    writer.add_array("t.float32s", [0.5, -0.25])
    writer.add_array("t.bools", [True, False])
    writer.add_array("t.nested", [[1, 2], [3]])
    writer.add_key_value("t.uint8s", [0, 255], GGUFValueType.ARRAY, sub_type=GGUFValueType.UINT8)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    tensors: dict[str, torch.Tensor] = {}
    for index, dtype in enumerate(GGUF_DTYPES):
        tensor = random_tensor(dtype, (3, 4) if index % 2 else (5,), seed=index)
        name = f"blk.{index}.{GGUF_DTYPES[dtype].lower()}"
        tensors[name] = tensor
        if dtype == torch.bfloat16:
            writer.add_tensor(name, tensor.view(torch.int16).numpy(), raw_dtype=GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


WRITER_METADATA = {
    "general.architecture": "llama",
    "general.name": "tiny",
    "t.uint8": 200,
    "t.int8": -100,
    "t.uint16": 65535,
    "t.int16": -32768,
    "t.uint32": 4096,
    "t.int32": -7,
    "t.float32": float(np.float32(0.1)),
    "t.uint64": 2**64 - 1,
    "t.int64": -(2**63),
    "t.float64": 0.1,
    "t.bool": True,
    "t.strings": ["<s>", "</s>", "ünï"],
    "t.int32s": [1, -2, 3],
    "t.float32s": [0.5, -0.25],
    "t.bools": [True, False],
    "t.nested": [[1, 2], [3]],
    "t.uint8s": [0, 255],
}


@pytest.mark.parametrize("alignment", [None, 64])
def test_we_read_gguf_writer_files_with_every_value_type(tmp_path: Path, alignment: int | None) -> None:
    path = tmp_path / "llama.gguf"
    tensors = writer_file(path, alignment=alignment)
    checkpoint = converters.read(path)
    assert not checkpoint.expects_tree_digest and checkpoint.tree_digest is None
    assert list(checkpoint.tree) == list(tensors)
    assert_bit_identical(tensors, converters.load(path))
    # every value with its exact Python type; general.alignment is a layout fact, not carried
    assert checkpoint.file_metadata == WRITER_METADATA
    assert [type(v) for v in checkpoint.file_metadata.values()] == [type(v) for v in WRITER_METADATA.values()]
    # carried to our own GGUF natively (general.architecture included) and through other formats
    ours_path = converters.convert(path, tmp_path / "ours.gguf")
    reader = GGUFReader(ours_path)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["t.strings"].contents() == ["<s>", "</s>", "ünï"]
    assert reader.fields["t.uint64"].types == [GGUFValueType.UINT64]
    assert reader.fields["t.int8"].types == [GGUFValueType.INT64]  # widened: our metadata holds values, not types
    assert "sdconvert.file_metadata" in reader.fields  # nested arrays ride as JSON (ggml reads none)
    assert converters.read(ours_path).file_metadata == WRITER_METADATA
    through = converters.convert(ours_path, tmp_path / "m.msgpack")
    back = converters.convert(through, tmp_path / "back.gguf")
    assert converters.read(back).file_metadata == WRITER_METADATA
    assert converters.verify(path, back) == []
    assert converters.verify(back, deep=True) == []
    assert back.read_bytes() == ours_path.read_bytes()


def test_inspect_shows_a_foreign_files_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "llama.gguf"
    writer_file(path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: gguf, " in out and "8 tensors" in out
    assert "file metadata general.architecture: llama" in out and "file metadata t.nested: [[1, 2], [3]]" in out
    assert main(["verify", "--deep", str(path)]) == 1  # no stored digests: never "intact"
    assert "no stored digests" in capsys.readouterr().out


@pytest.mark.parametrize("kind", [GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_K])
def test_quantized_tensors_are_refused_by_name(tmp_path: Path, kind: GGMLQuantizationType) -> None:
    path = tmp_path / "q.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.ones((2, 4), dtype=np.float32))
    block, size = gguf.GGML_QUANT_SIZES[kind]
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((2, size), dtype=np.uint8), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert GGUFReader(path).tensors[1].shape.tolist() == [block, 2]  # the file is what we think it is
    message = (
        f"{path}: tensor 'blk.0.attn_q.weight' is quantized (GGML type {kind.name}); only unquantized tensors "
        "(F32, F16, BF16, F64, I8, I16, I32, I64) are read: dequantize it first"
    )
    with pytest.raises(UnsupportedValueError) as raised:
        converters.read(path)
    assert str(raised.value) == message
    result = subprocess.run([sys.executable, str(CLI), "inspect", str(path)], capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (2, f"sdconvert: {message}\n")


def test_big_endian_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "be.gguf"
    writer_file(path, endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(
        CorruptFileError, match=r"be\.gguf: is a big-endian GGUF file; only little-endian files are read$"
    ):
        converters.read(path)


# ---------------------------------------------------------------- carried metadata


LORA = {"format": "pt", "ss_network_dim": "16", "modelspec.title": "x"}


def test_safetensors_metadata_survives_gguf_natively(tmp_path: Path) -> None:
    source = tmp_path / "lora.safetensors"
    save_file({"lora_up.weight": torch.randn(4, 2)}, str(source), metadata=LORA)
    middle = converters.convert(source, tmp_path / "lora.gguf")
    assert GGUFReader(middle).fields["ss_network_dim"].contents() == "16"
    assert converters.read(middle).carried_metadata() == LORA
    back = converters.convert(middle, tmp_path / "back.safetensors")
    assert converters.read(back).carried_metadata() == LORA
    assert converters.verify(source, back) == []


def test_metadata_gguf_has_no_type_for_rides_as_json(tmp_path: Path) -> None:
    metadata = {
        "nothing": None,
        "empty": [],
        "mixed": [1, "a"],
        "huge": 2**70,
        "nested": {"a": [1.5, {"b": None}]},
        "general.architecture": "sdconvert",  # the name an absent architecture reads as: kept apart
        "general.alignment": "8",  # ours is a layout fact; a carried one is only a value
        "sdconvert.tree": "not ours",
        "": "empty key",
        "plain": 3,
    }
    checkpoint = dataclasses.replace(from_torch({"w": torch.ones(2)}), file_metadata=metadata)
    path = tmp_path / "m.gguf"
    converters.write(checkpoint, path)
    assert converters.read(path).carried_metadata() == metadata
    assert converters.verify(path, deep=True) == []
    reader = GGUFReader(path)
    assert reader.fields["plain"].types == [GGUFValueType.INT64]
    assert reader.fields["general.architecture"].contents() == "sdconvert"
    assert json.loads(reader.fields["sdconvert.file_metadata"].contents())["sdconvert.tree"] == "not ours"
    checkpoint = dataclasses.replace(checkpoint, file_metadata={"raw": b"\x00"})
    with pytest.raises(UnsupportedValueError, match=r"^file metadata 'raw': a bytes value cannot be stored in GGUF$"):
        converters.write(checkpoint, tmp_path / "n.gguf")


def test_a_changed_value_in_our_header_is_found(tmp_path: Path) -> None:
    path = tmp_path / "e.gguf"
    converters.save({"w": torch.ones(2), "epoch": 3}, path)
    data = path.read_bytes()
    assert data.count(b'{"int":3}') == 1
    path.write_bytes(data.replace(b'{"int":3}', b'{"int":7}'))
    assert converters.load(path)["epoch"] == 7
    problems = converters.verify(path, deep=True)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: the tree (keys, types, values, dtypes, shapes, digests) does not match")


# ---------------------------------------------------------------- hostile files


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def info(name: str, dims: tuple[int, ...], code: int = 0, offset: int = 0) -> bytes:
    return s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, code, offset)


def file(
    kvs: list[bytes] | None = None,
    infos: list[bytes] | None = None,
    data: bytes = b"",
    *,
    version: int = 3,
    tensors: int | None = None,
    count: int | None = None,
    pad: bool = True,
) -> bytes:
    kvs, infos = kvs or [], infos or []
    counts = (len(infos) if tensors is None else tensors, len(kvs) if count is None else count)
    body = b"GGUF" + struct.pack("<IQQ", version, *counts) + b"".join(kvs) + b"".join(infos)
    if pad:
        body += bytes(-len(body) % 32)
    return body + data


U32 = 4
STRING, ARRAY, UINT64, BOOL, UINT8 = 8, 9, 10, 7, 0
W = info("w", (4,))  # float32 [4], 16 bytes at offset 0
W_DATA = bytes(16) + bytes(16)  # its bytes and their padding


def nested(levels: int) -> bytes:
    payload = struct.pack("<IQ", UINT8, 0)
    for _ in range(levels - 1):
        payload = struct.pack("<IQ", ARRAY, 1) + payload
    return payload


def ours_kv(name: str, text: str) -> bytes:
    return kv(f"sdconvert.{name}", STRING, s(text))


def byte_array(count: int) -> bytes:
    return struct.pack("<IQ", UINT8, count) + bytes(count)


Builder = Callable[[], bytes]
CASES: list[tuple[str, Builder, type[ConverterError], str]] = [
    ("truncated-header", lambda: b"GGUF\x03\x00\x00\x00", CorruptFileError,
     "file is 8 bytes; a GGUF file starts with a 24-byte header"),
    ("wrong-magic", lambda: b"GGUX" + file()[4:], CorruptFileError,
     "does not start with the GGUF magic (found b'GGUX')"),
    ("version-1", lambda: file(version=1), CorruptFileError, "GGUF version 1 is not read (versions 2 and 3 are)"),
    ("big-endian", lambda: b"GGUF" + struct.pack(">I", 3) + bytes(16), CorruptFileError,
     "is a big-endian GGUF file; only little-endian files are read"),
    ("lying-kv-count", lambda: file(count=2**40), CorruptFileError,
     "the header announces 1099511627776 key/values and 0 tensors, which need at least 14293651161112 bytes; "
     "the file has 32"),
    ("lying-tensor-count", lambda: file(tensors=2**63), CorruptFileError,
     "the header announces 0 key/values and 9223372036854775808 tensors, which need at least "
     "221360928884514619416 bytes; the file has 32"),
    ("huge-key-length", lambda: file([struct.pack("<Q", 2**63) + bytes(16)]), CorruptFileError,
     "the key of metadata entry 0 is 9223372036854775808 bytes long, past the end of the 64-byte file (at offset 32)"),
    ("huge-string-value", lambda: file([kv("a", STRING, struct.pack("<Q", 2**62) + b"abc")]), CorruptFileError,
     "metadata 'a' is 4611686018427387904 bytes long, past the end of the 64-byte file (at offset 45)"),
    ("key-past-the-spec-limit", lambda: file([kv("k" * 65536, UINT8, b"\x01")]), CorruptFileError,
     "the key of metadata entry 0 is 65536 bytes long; at most 65535 are allowed"),
    ("empty-key", lambda: file([kv("", UINT8, b"\x01")]), CorruptFileError, "the key of metadata entry 0 is empty"),
    ("key-not-utf8", lambda: file([kv(b"\xff", UINT8, b"\x01")]), CorruptFileError,
     "the key of metadata entry 0 is not valid UTF-8 (invalid start byte at byte 0)"),
    ("duplicate-key", lambda: file([kv("a", UINT8, b"\x01"), kv("a", UINT8, b"\x02")]), CorruptFileError,
     "metadata key 'a' appears twice"),
    ("unknown-value-type", lambda: file([kv("a", 13, b"\x00")]), CorruptFileError,
     "metadata 'a' has unknown value type 13"),
    ("unknown-array-type", lambda: file([kv("a", ARRAY, struct.pack("<IQ", 99, 1))]), CorruptFileError,
     "metadata 'a' is an array of unknown value type 99"),
    ("lying-array-length", lambda: file([kv("a", ARRAY, struct.pack("<IQ", UINT64, 2**40))]), CorruptFileError,
     "metadata 'a': an array of 1099511627776 uint64 values needs at least 8796093022208 bytes, 15 remain in the file"),
    ("lying-string-array", lambda: file([kv("a", ARRAY, struct.pack("<IQ", STRING, 10**12))]), CorruptFileError,
     "metadata 'a': an array of 1000000000000 string values needs at least 8000000000000 bytes, 15 remain in the file"),
    ("arrays-nested-too-deep", lambda: file([kv("a", ARRAY, nested(9))]), CorruptFileError,
     "metadata 'a': arrays nested deeper than 8 levels"),
    ("bool-not-0-or-1", lambda: file([kv("a", BOOL, b"\x02")]), CorruptFileError,
     "metadata 'a': a bool must be 0 or 1, found 2"),
    ("string-not-utf8", lambda: file([kv("a", STRING, s(b"\xc3("))]), CorruptFileError,
     "metadata 'a' is not valid UTF-8 (invalid continuation byte at byte 0)"),
    ("alignment-not-uint32", lambda: file([kv("general.alignment", UINT64, struct.pack("<Q", 32))]),
     CorruptFileError, "general.alignment must be a uint32, found a uint64"),
    ("alignment-not-a-power-of-two", lambda: file([kv("general.alignment", U32, struct.pack("<I", 24))]),
     CorruptFileError, "general.alignment 24 is not a power of two"),
    ("truncated-tensor-info", lambda: file(infos=[W[:-3]], pad=False), CorruptFileError,
     "the file ends inside the type and offset of tensor 'w' (12 bytes at offset 45, the file has 54)"),
    ("too-many-dims", lambda: file(infos=[info("w", (1,) * 65)]), CorruptFileError,
     "tensor 'w' has 65 dims; at most 64 are supported"),
    ("data-starts-past-the-end", lambda: file(infos=[W], pad=False), CorruptFileError,
     "the tensor data would start at offset 64, past the end of the 57-byte file"),
    ("dim-past-int64", lambda: file(infos=[info("w", (2**63, 0))], data=b""), CorruptFileError,
     "tensor 'w': a dimension is past 2**63 - 1: [9223372036854775808, 0]"),
    ("duplicate-tensor-name", lambda: file(infos=[W, info("w", (4,), offset=32)], data=W_DATA * 2), CorruptFileError,
     "tensor name 'w' appears twice"),
    ("unknown-ggml-type", lambda: file(infos=[info("w", (4,), code=99)], data=W_DATA), UnsupportedValueError,
     "tensor 'w' has unknown GGML type 99 (newer than this reader, or a corrupt file)"),
    ("quantized", lambda: file(infos=[info("w", (32,), code=8)], data=bytes(64)), UnsupportedValueError,
     "tensor 'w' is quantized (GGML type Q8_0); only unquantized tensors (F32, F16, BF16, F64, I8, I16, I32, I64) "
     "are read: dequantize it first"),
    ("tensor-past-the-end", lambda: file(infos=[info("w", (4,), offset=32)], data=W_DATA), CorruptFileError,
     "tensor 'w': its 16 bytes at data offset 32 run past the end of the 96-byte file"),
    ("huge-tensor", lambda: file(infos=[info("w", (2**40, 2**40))], data=W_DATA), CorruptFileError,
     "tensor 'w': its 4835703278458516698824704 bytes at data offset 0 run past the end of the 128-byte file"),
    ("misaligned", lambda: file(infos=[info("w", (4,), offset=4)], data=W_DATA), CorruptFileError,
     "tensor 'w': data offset 4 is not a multiple of the alignment 32"),
    ("overlap", lambda: file(infos=[W, info("v", (4,))], data=W_DATA), CorruptFileError,
     "tensor 'w': its data overlaps the tensor before it (starts at 0, expected 32)"),
    ("gap", lambda: file(infos=[info("w", (4,), offset=32)], data=W_DATA * 2), CorruptFileError,
     "tensor 'w': its data leaves a gap before it (starts at 32, expected 0)"),
    ("trailing-bytes", lambda: file(infos=[W], data=W_DATA + b"x"), CorruptFileError,
     "trailing bytes after the tensor data (it ends at offset 96, the file has 97 bytes)"),
    ("trailing-bytes-without-tensors", lambda: file([kv("a", UINT8, b"\x01")], data=b"xy"), CorruptFileError,
     "trailing bytes after the tensor data (it ends at offset 64, the file has 66 bytes)"),
    ("our-tree-not-a-string", lambda: file([kv("sdconvert.tree", U32, b"\x00" * 4)]), CorruptFileError,
     "metadata 'sdconvert.tree' must be a string, found a uint32"),
    ("our-tree-names-a-missing-tensor", lambda: file([ours_kv("tree", '{"dict":[["x",{"tensor":"y"}]]}')]),
     CorruptFileError, "at x: the tree refers to tensor 'y', which the file lacks"),
    ("our-tree-leaves-a-tensor-out", lambda: file([ours_kv("tree", '{"dict":[]}')], [W], W_DATA),
     CorruptFileError, "tensor 'w' is not part of the stored tree"),
    ("our-names-name-a-missing-tensor", lambda: file([ours_kv("names", '{"q":"k"}')], [W], W_DATA),
     CorruptFileError, "metadata 'sdconvert.names' names 'q', which is not a tensor of the file"),
    ("our-names-collide", lambda: file([ours_kv("names", '{"v":"w"}')], [W, info("v", (4,), offset=32)], W_DATA * 2),
     CorruptFileError, "metadata 'sdconvert.names' gives two tensors the key 'w'"),
    ("our-digests-malformed", lambda: file([ours_kv("blake3", '{"w":"0"}')], [W], W_DATA),
     CorruptFileError, "metadata 'sdconvert.blake3' must map str keys to 64-digit hex BLAKE3 digests"),
    ("our-file-metadata-clashes", lambda: file([kv("a", UINT8, b"\x01"), ours_kv("file_metadata", '{"a":2}')]),
     CorruptFileError, "metadata 'sdconvert.file_metadata' holds 'a', also a key/value of the file"),
    ("many-tiny-key-values", lambda: file([kv(f"{i:x}", UINT8, b"\x01") for i in range(400_000)]), CorruptFileError,
     "would need more than 77 MiB of memory to read (GGUF metadata key/values); the limit for a "
     "7130144-byte input is 2x its size + 64 MiB"),
    ("array-of-two-million-bytes", lambda: file([kv("a", ARRAY, byte_array(2_000_000))]),
     CorruptFileError, "would need more than 67 MiB of memory to read (the values of metadata 'a'); the limit for a "
     "2000064-byte input is 2x its size + 64 MiB"),
]  # fmt: skip


def case_ids() -> list[str]:
    return [case[0] for case in CASES]


def test_the_table_has_no_duplicate_names() -> None:
    assert len(set(case_ids())) == len(CASES)


@pytest.mark.parametrize(("name", "build", "error", "message"), CASES, ids=case_ids())
def test_hostile_file_is_refused_with_its_exact_error_within_bounds(
    tmp_path: Path, name: str, build: Builder, error: type[ConverterError], message: str
) -> None:
    path = tmp_path / "hostile.gguf"
    data = build()
    path.write_bytes(data)
    with within_resource_bounds(len(data)), pytest.raises(ConverterError) as raised:
        converters.read(path)
    assert type(raised.value) is error
    separator = " " if message.startswith("at ") else ": "  # a tree path follows the file name
    assert str(raised.value) == f"{path}{separator}{message}"


@pytest.mark.parametrize("name", ["huge-key-length", "many-tiny-key-values", "quantized"])
def test_hostile_file_through_the_cli_is_one_line_exit_2_nothing_written(tmp_path: Path, name: str) -> None:
    _, build, _, message = next(case for case in CASES if case[0] == name)
    path = tmp_path / "hostile.gguf"
    path.write_bytes(build())
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        [sys.executable, str(CLI), "convert", str(path), str(out / "x.safetensors")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (2, f"sdconvert: {path}: {message}\n")
    assert list(out.iterdir()) == []


def test_every_mutation_of_a_header_byte_is_refused_or_read_cleanly(tmp_path: Path) -> None:
    """Each single byte of our header set to 0xff: only ConverterError may come out, and what reads
    reads within the bar (the hypothesis fuzzer covers random edits; this covers every byte)."""
    source = tmp_path / "s.gguf"
    converters.save({"w": torch.arange(4.0), "epoch": 1, "b": torch.ones(2, dtype=torch.bfloat16)}, source)
    data = source.read_bytes()
    header_end = GGUFReader(source).data_offset
    refused = 0
    path = tmp_path / "m.gguf"
    for position in range(0, header_end, 3):
        mutated = bytearray(data)
        mutated[position] ^= 0xFF
        path.write_bytes(mutated)
        with within_resource_bounds(len(mutated)):
            try:
                converters.verify(path, deep=True)
                converters.read(path)
            except ConverterError:
                refused += 1
    assert refused > header_end // 6


def test_what_the_limits_allow_is_read(tmp_path: Path) -> None:
    """The edges of the hostile table, on the accepted side: 8 levels of arrays, a GGUF v2 file,
    a 65535-byte key, a file whose last tensor is not padded, one without tensors or padding."""
    path = tmp_path / "edge.gguf"
    cases = [
        (file([kv("a", ARRAY, nested(8))]), {"a": [[[[[[[[]]]]]]]]}),
        (file([kv("k" * 65535, UINT8, b"\x01")], version=2), {"k" * 65535: 1}),
        (file([kv("a", UINT8, b"\x01")], pad=False), {"a": 1}),
        (file(infos=[W], data=bytes(16)), None),
    ]
    for data, metadata in cases:
        path.write_bytes(data)
        checkpoint = converters.read(path)
        assert checkpoint.file_metadata == metadata
        assert list(checkpoint.tree) == ([] if metadata else ["w"])


def test_hostile_bombs_stay_within_the_bar_in_a_fresh_process(tmp_path: Path) -> None:
    peak_rss = (
        "import os, subprocess, sys\n"
        "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "_, status, usage = os.wait4(p.pid, 0)\n"
        "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)\n"
    )
    for name in ("many-tiny-key-values", "array-of-two-million-bytes"):
        _, build, _, _ = next(case for case in CASES if case[0] == name)
        path = tmp_path / f"{name}.gguf"
        data = build()
        path.write_bytes(data)
        command = [sys.executable, str(CLI), "inspect", str(path)]
        result = subprocess.run([sys.executable, "-c", peak_rss, *command], capture_output=True, text=True, timeout=120)
        code, peak_kib = (int(word) for word in result.stdout.split())
        assert code == 2
        assert peak_kib * 1024 <= 2 * len(data) + 100 * 2**20, f"{name}: peak RSS {peak_kib >> 10} MiB"


def test_legitimate_files_with_many_tensors_are_not_refused(tmp_path: Path) -> None:
    state = {f"layers.{i}.weight": torch.zeros(8) for i in range(5_000)}
    path = tmp_path / "many.gguf"
    converters.save(state, path)
    assert len(converters.read(path).tree) == 5_000
    for first, second in itertools.pairwise(GGUFReader(path).tensors[:3]):
        assert second.data_offset - first.data_offset == 32
