"""`sdconvert convert --ties keep|materialize|drop-aliases` through the real command line, from
several source formats to every destination format, read back with ``converters.read`` (the tree:
which paths hold a tensor, which paths hold the *same* tensor object, raw bytes) and with each
format's own reference reader (what is stored: safetensors headers, the shard index, the zip's
storage records and torch.load, msgpack ext codes, ONNX initializers, DCP's metadata).

What each destination documents for a tied tensor (schemas/*.md) and what is asserted here:

- safetensors, sharded safetensors, pt, onnx: stored once; read back as one tensor at every path.
  A bare state_dict's tied duplicate key is absent from the safetensors header (as
  ``save_pretrained`` writes it), the pt file has one storage record that ``torch.load`` shares, the
  ONNX file one initializer.
- msgpack: an ext 1 array at every path (the bytes again at the alias, so flax reads an array
  there), with the metadata tree naming one storage key at both: read back as one tensor.
- dcp: ``.metadata`` names every FQN (the alias too, as ``dcp.load`` asks for it), but the tied
  bytes are stored once: both FQNs' ``_StorageInfo`` name the very same range of a data file, and
  ``sdconvert.json`` gives back the tree with one tensor at both paths.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tensor_bytes
from torch import nn

import converters
from converters import cli
from converters.core.sources import read_all
from converters.core.tree import TensorRef

CLI = Path(__file__).resolve().parent.parent / "cli.py"
TIED, ALIAS = "embed.weight", "lm_head.weight"  # the alias comes after the tensor in tree order
UNTIED = ["fc.weight", "fc.bias"]
MODES = ("keep", "materialize", "drop-aliases")
# destination -> (output name, extra flags); the sharded folder gets a shard per tensor or so
DESTINATIONS: dict[str, tuple[str, list[str]]] = {
    "safetensors": ("out.safetensors", []),
    "sharded": ("out-sharded", ["--max-shard-size", "150B"]),
    "pt": ("out.pt", []),
    "msgpack": ("out.msgpack", []),
    "onnx": ("out.onnx", []),
    "dcp": ("out-dcp", ["--to", "dcp"]),
}
SOURCES = ("pt", "safetensors", "sharded", "msgpack", "onnx")


class TiedLM(nn.Module):
    """An embedding tied to the output layer (as GPT-2 and T5 tie them), and an untied layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.fc = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 8, bias=False)
        self.lm_head.weight = self.embed.weight


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(13)
    sd: dict[str, torch.Tensor] = TiedLM().state_dict()
    assert list(sd) == [TIED, *UNTIED, ALIAS]
    assert sd[TIED].untyped_storage().data_ptr() == sd[ALIAS].untyped_storage().data_ptr()  # tied
    return sd


def sdconvert(*args: object) -> int:
    """The real command line, in this process (``converters.cli.main``): its exit code."""
    return cli.main([str(arg) for arg in args])


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, state: dict[str, torch.Tensor]) -> dict[str, Path]:
    """The tied state_dict in each source format: pt by torch.save, the others converted from it."""
    folder = tmp_path_factory.mktemp("tied-sources")
    paths = {"pt": folder / "tied.pt"}
    torch.save(state, paths["pt"])
    for kind in SOURCES[1:]:
        name, extra = DESTINATIONS[kind]
        paths[kind] = folder / f"tied-{name}"
        assert sdconvert("convert", paths["pt"], paths[kind], "--quiet", "--no-fsync", *extra) == 0
    for kind, path in paths.items():  # every source holds the tie: one tensor object at both paths
        tree = converters.read(path).tree
        assert list(tree) == [TIED, *UNTIED, ALIAS] and tree[TIED] is tree[ALIAS], kind
    assert len(list(paths["sharded"].glob("*.safetensors"))) > 1
    return paths


def raw(ref: Any) -> bytes:
    assert type(ref) is TensorRef
    return bytes(read_all(ref.source))


def stored_tensors(dst: str, out: Path) -> tuple[int, set[str] | None]:
    """How many tensor byte blocks the written file(s) hold, read by each format's own reference
    reader (not ours), and their names where the format names them (DCP: every tensor FQN of
    ``.metadata``, several of which may name one block)."""
    if dst == "safetensors":
        from safetensors import safe_open

        with safe_open(str(out), "pt") as handle:
            keys = set(handle.keys())
        return len(keys), keys
    if dst == "sharded":
        from safetensors import safe_open

        index = json.loads((out / "model.safetensors.index.json").read_text())
        in_shards: list[str] = []
        for shard in sorted(set(index["weight_map"].values())):
            with safe_open(str(out / shard), "pt") as handle:
                in_shards += handle.keys()
        assert sorted(in_shards) == sorted(index["weight_map"])  # every stored tensor is in the map
        return len(in_shards), set(in_shards)
    if dst == "pt":
        with zipfile.ZipFile(out) as archive:
            records = [name for name in archive.namelist() if "/data/" in name and not name.endswith("/")]
        return len(records), None
    if dst == "msgpack":
        import msgpack

        codes: list[int] = []
        msgpack.unpackb(out.read_bytes(), ext_hook=lambda code, _: codes.append(code), strict_map_key=False)
        assert set(codes) <= {1, 80}  # arrays and our metadata: no ext 82 references any more
        return codes.count(1), None
    if dst == "onnx":
        import onnx

        names = [init.name for init in onnx.load(str(out), load_external_data=False).graph.initializer]
        assert len(names) == len(set(names))
        return len(names), set(names)
    assert dst == "dcp"
    ranges = dcp_tensor_ranges(out)
    return len(set(ranges.values())), set(ranges)


def dcp_tensor_ranges(out: Path) -> dict[str, tuple[str, int, int]]:
    """Per tensor FQN of a DCP folder, the (data file, offset, length) its one chunk is stored at,
    as torch's own ``FileSystemReader`` reads ``.metadata``."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(out)).read_metadata()
    ranges: dict[str, tuple[str, int, int]] = {}
    for index, info in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata[index.fqn], TensorStorageMetadata):
            assert index.fqn not in ranges  # one chunk per tensor: the whole tensor
            ranges[index.fqn] = (info.relative_path, info.offset, info.length)
    return ranges


def dcp_loads(out: Path) -> dict[str, Any]:
    """The folder as torch's ``dcp_to_torch_save`` gives it (torch's own reader, in one process)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    saved = out.parent / (out.name + ".torch.pt")
    dcp_to_torch_save(str(out), str(saved))
    loaded: dict[str, Any] = torch.load(saved)
    saved.unlink()
    return loaded


def msgpack_tied_keys(out: Path) -> tuple[str, str]:
    """The storage keys our metadata tree (ext 80) names at the tied tensor's two paths."""
    import msgpack

    metadata: list[Any] = []

    def hook(code: int, payload: bytes) -> Any:
        if code == 80:
            metadata.append(msgpack.unpackb(payload, strict_map_key=False))
        return None

    msgpack.unpackb(out.read_bytes(), ext_hook=hook, strict_map_key=False)
    (tree,) = [value for kind, value in metadata[0]["tree"].items() if kind in ("dict", "odict")]
    keys = {key: node.get("tensor") for key, node in tree}
    return keys[TIED], keys[ALIAS]


def dry_run_json(capsys: pytest.CaptureFixture[str], *args: object) -> dict[str, Any]:
    capsys.readouterr()
    assert sdconvert(*args, "--dry-run", "--json") == 0
    plan: dict[str, Any] = json.loads(capsys.readouterr().out)
    return plan


# ------------------------------------------------------------------------------ every source, every destination


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dst", list(DESTINATIONS))
@pytest.mark.parametrize("src", SOURCES)
def test_ties_choice_from_source_to_destination(
    tmp_path: Path,
    sources: dict[str, Path],
    state: dict[str, torch.Tensor],
    capsys: pytest.CaptureFixture[str],
    src: str,
    dst: str,
    mode: str,
) -> None:
    name, extra = DESTINATIONS[dst]
    out = tmp_path / name
    args = ("convert", sources[src], out, "--ties", mode, *extra)
    plan = dry_run_json(capsys, *args)
    assert not out.exists() and plan["destination"]["path"] == str(out)
    assert sdconvert(*args, "--quiet", "--no-fsync") == 0
    tree = converters.read(out).tree
    embed_bytes = tensor_bytes(state[TIED])
    for key in UNTIED:
        assert raw(tree[key]) == tensor_bytes(state[key]), key
    assert raw(tree[TIED]) == embed_bytes
    count, names = stored_tensors(dst, out)
    untied_count = 1 + len(UNTIED)
    if mode == "drop-aliases":
        assert list(tree) == [TIED, *UNTIED]  # only the first path is left
        assert count == untied_count and names in (None, {TIED, *UNTIED})
    else:
        assert list(tree) == [TIED, *UNTIED, ALIAS]
        assert raw(tree[ALIAS]) == embed_bytes
        if mode == "keep":
            assert tree[TIED] is tree[ALIAS]  # one tensor, stored once (msgpack: again at the alias, for flax)
            assert count == untied_count + (dst == "msgpack")
            # DCP's .metadata names the alias's FQN too, pointing at the tied tensor's bytes
            assert names in (None, {TIED, *UNTIED, ALIAS} if dst == "dcp" else {TIED, *UNTIED})
        else:  # materialize: each path its own tensor and its own bytes
            assert tree[TIED] is not tree[ALIAS]
            assert count == untied_count + 1 and names in (None, {TIED, *UNTIED, ALIAS})
    if dst == "msgpack" and mode != "drop-aliases":
        first, alias = msgpack_tied_keys(out)
        assert (first == alias) is (mode == "keep")
    if dst == "pt":  # torch itself: the tie is shared storage
        loaded = torch.load(out)
        if mode != "drop-aliases":
            shared = loaded[TIED].untyped_storage().data_ptr() == loaded[ALIAS].untyped_storage().data_ptr()
            assert shared is (mode == "keep")
    if dst == "sharded":
        index = json.loads((out / "model.safetensors.index.json").read_text())
        stored = sum(len(tensor_bytes(state[key])) for key in [TIED, *UNTIED])
        assert index["metadata"]["total_size"] == stored + (len(embed_bytes) if mode == "materialize" else 0)
    if dst == "dcp":  # torch itself: every FQN loads, a tie's FQNs read one stored range
        ranges = dcp_tensor_ranges(out)
        assert sorted(ranges) == sorted(tree)
        if mode != "drop-aliases":
            assert (ranges[TIED] == ranges[ALIAS]) is (mode == "keep")
        loaded = dcp_loads(out)
        assert sorted(loaded) == sorted(tree)
        assert all(tensor_bytes(loaded[key]) == raw(tree[key]) for key in tree)
    # the dry run listed exactly what was written
    assert [item["path"] for item in plan["tensors"]] == list(tree)
    aliases = {item["path"]: item.get("alias_of") for item in plan["tensors"]}
    assert aliases == {key: (TIED if key == ALIAS and tree[key] is tree[TIED] else None) for key in tree}
    assert plan["totals"]["tensors"] == count - (dst == "msgpack" and mode == "keep")  # the copy is no tensor


# ------------------------------------------------------------------------------ the dry run


def test_dry_run_lists_what_each_choice_would_write(
    tmp_path: Path, sources: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "w.safetensors"
    size = 8 * 4 * 4  # embed.weight: 8 x 4 float32
    base = ("convert", sources["pt"], out)

    keep = dry_run_json(capsys, *base, "--ties", "keep")
    assert [(item["path"], item.get("alias_of")) for item in keep["tensors"]] == [
        (TIED, None),
        ("fc.weight", None),
        ("fc.bias", None),
        (ALIAS, TIED),
    ]
    assert (keep["totals"]["paths"], keep["totals"]["tensors"]) == (4, 3)
    assert keep["totals"]["bytes"] == keep["before"]["bytes"] and keep["dropped"] == []
    assert keep["transforms"] == []  # keep is the default: nothing to do

    materialize = dry_run_json(capsys, *base, "--ties", "materialize")
    assert [(item["path"], item.get("alias_of")) for item in materialize["tensors"]] == [
        (TIED, None),
        ("fc.weight", None),
        ("fc.bias", None),
        (ALIAS, None),
    ]
    assert (materialize["totals"]["paths"], materialize["totals"]["tensors"]) == (4, 4)
    assert materialize["totals"]["bytes"] == keep["totals"]["bytes"] + size
    [record] = materialize["transforms"]
    assert (record["transform"], record["mode"]) == ("ties", "materialize")
    assert record["tied"] == [{"path": TIED, "aliases": [ALIAS], "bytes": size}]

    drop = dry_run_json(capsys, *base, "--ties", "drop-aliases")
    assert [item["path"] for item in drop["tensors"]] == [TIED, "fc.weight", "fc.bias"]
    assert (drop["totals"]["paths"], drop["totals"]["tensors"]) == (3, 3)
    assert drop["totals"]["bytes"] == keep["totals"]["bytes"]
    assert drop["dropped"] == [{"path": ALIAS, "by": "--ties drop-aliases", "tensors": 0, "bytes": 0, "alias_of": TIED}]

    texts = {}
    for mode in MODES:
        capsys.readouterr()
        assert sdconvert(*base, "--ties", mode, "--dry-run") == 0
        texts[mode] = capsys.readouterr().out
    assert "would write 3 tensor(s) at 4 path(s), 208 B (before: 3 tensor(s), 208 B)" in texts["keep"]
    assert f"  {ALIAS}  float32  [8, 4]  -      tied to {TIED}" in texts["keep"]
    assert "would write 4 tensor(s) at 4 path(s), 336 B (before: 3 tensor(s), 208 B)" in texts["materialize"]
    assert f"  {ALIAS}  float32  [8, 4]  128 B" in texts["materialize"]
    assert "--ties materialize: 1 tied tensor(s), 1 alias path(s) materialized" in texts["materialize"]
    assert "would write 3 tensor(s) at 3 path(s), 208 B (before: 3 tensor(s), 208 B)" in texts["drop-aliases"]
    assert f"  {ALIAS}  alias of {TIED}  (--ties drop-aliases)" in texts["drop-aliases"]
    assert f"  {ALIAS} " not in texts["drop-aliases"].split("dropped:")[0]
    assert list(tmp_path.iterdir()) == []  # nothing written


# ------------------------------------------------------------------------------ with --rename and --dtype


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dst", list(DESTINATIONS))
def test_a_tie_through_rename_and_cast_stays_one_tensor(
    tmp_path: Path,
    sources: dict[str, Path],
    state: dict[str, torch.Tensor],
    capsys: pytest.CaptureFixture[str],
    dst: str,
    mode: str,
) -> None:
    name, extra = DESTINATIONS[dst]
    out = tmp_path / name
    changes = ("--rename", r"^lm_head\.=output.", "--rename", r"^embed\.=tok.", "--dtype", "bfloat16")
    args = ("convert", sources["pt"], out, *changes, "--ties", mode, *extra)
    plan = dry_run_json(capsys, *args)
    tree = converters.read(_converted(out, args)).tree
    expected = {key: tensor_bytes(value.to(torch.bfloat16)) for key, value in state.items()}
    first, alias = "tok.weight", "output.weight"
    assert raw(tree[first]) == expected[TIED] and tree[first].dtype == "bfloat16"
    assert all(raw(tree[key]) == expected[key] and tree[key].dtype == "bfloat16" for key in UNTIED)
    count, names = stored_tensors(dst, out)
    if mode == "drop-aliases":
        assert list(tree) == [first, *UNTIED] and count == 3 and names in (None, {first, *UNTIED})
    else:
        assert list(tree) == [first, *UNTIED, alias] and raw(tree[alias]) == expected[TIED]
        one = mode == "keep"
        assert (tree[first] is tree[alias]) is one
        assert count == (3 if one else 4) + (one and dst == "msgpack")  # msgpack: the bytes again at the alias
        # DCP: .metadata names every FQN, the tie's two at one stored range (module docstring)
        assert names in (None, {first, *UNTIED} if one and dst != "dcp" else {first, *UNTIED, alias})
        if dst == "dcp":
            ranges = dcp_tensor_ranges(out)
            assert (ranges[first] == ranges[alias]) is one
    planned = {item["path"]: item for item in plan["tensors"]}
    assert list(planned) == list(tree)
    assert planned[first]["from"] == {"path": TIED, "dtype": "float32"} and planned[first]["dtype"] == "bfloat16"
    if mode == "keep":
        assert planned[alias]["alias_of"] == first
        [cast] = [record for record in plan["transforms"] if record["transform"] == "cast"]
        assert len(cast["cast"]) == 3  # the tied tensor is cast once


def _converted(out: Path, args: tuple[object, ...]) -> Path:
    assert sdconvert(*args, "--quiet", "--no-fsync") == 0
    return out


# ------------------------------------------------------------------------------ edges and the reference readers


def test_drop_aliases_keeps_the_first_path_in_tree_order_whichever_it_is(
    tmp_path: Path, state: dict[str, torch.Tensor]
) -> None:
    source = tmp_path / "alias-first.pt"
    reordered = OrderedDict([(ALIAS, state[ALIAS]), *((key, state[key]) for key in [TIED, *UNTIED])])
    torch.save(reordered, source)
    out = tmp_path / "out.safetensors"
    assert sdconvert("convert", source, out, "--ties", "drop-aliases", "--quiet", "--no-fsync") == 0
    tree = converters.read(out).tree
    assert list(tree) == [ALIAS, *UNTIED] and raw(tree[ALIAS]) == tensor_bytes(state[TIED])


def test_a_tie_cut_by_exclude_is_no_tie_for_the_ties_option(
    tmp_path: Path, sources: dict[str, Path], state: dict[str, torch.Tensor]
) -> None:
    out = tmp_path / "out.safetensors"
    args = ("convert", sources["pt"], out, "--exclude", TIED, "--ties", "drop-aliases", "--quiet", "--no-fsync")
    assert sdconvert(*args) == 0
    tree = converters.read(out).tree
    assert list(tree) == [*UNTIED, ALIAS] and raw(tree[ALIAS]) == tensor_bytes(state[TIED])


def test_each_choice_through_cli_py_in_its_own_process_loads_as_documented(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    """``python cli.py`` in its own process, and the result as transformers-style consumers load it
    (safetensors.torch.load_file + load_state_dict)."""
    import safetensors.torch

    loaded = {}
    for mode in MODES:
        out = tmp_path / f"{mode}.safetensors"
        result = subprocess.run(
            [sys.executable, str(CLI), "convert", str(sources["pt"]), str(out), "--ties", mode, "--no-fsync"],
            capture_output=True,
            text=True,
        )
        assert (result.returncode, result.stdout, result.stderr) == (0, f"wrote {out}\n", "")
        loaded[mode] = safetensors.torch.load_file(out)
    # keep: the bare state_dict's tied duplicate key is absent from the header (as save_pretrained)
    assert list(loaded["keep"]) == [TIED, *UNTIED] and list(loaded["drop-aliases"]) == [TIED, *UNTIED]
    assert sorted(loaded["materialize"]) == sorted([TIED, *UNTIED, ALIAS])
    strict = TiedLM()
    strict.load_state_dict(loaded["materialize"])  # every key present: a strict load works
    for mode in ("keep", "drop-aliases"):
        model = TiedLM()
        missing, unexpected = model.load_state_dict(loaded[mode], strict=False)
        assert (missing, unexpected) == ([ALIAS], [])  # the tied weight, filled by the tie itself
        assert model.lm_head.weight is model.embed.weight
        assert tensor_bytes(model.lm_head.weight) == tensor_bytes(strict.lm_head.weight)


def test_materialize_unties_before_a_cast_of_one_path_as_the_cast_error_advises(
    tmp_path: Path, sources: dict[str, Path], state: dict[str, torch.Tensor]
) -> None:
    out = tmp_path / "out.safetensors"
    args = ("convert", sources["pt"], out, "--dtype", "bfloat16", "--dtype-include", TIED, "--ties", "materialize")
    assert sdconvert(*args, "--quiet", "--no-fsync") == 0
    tree = converters.read(out).tree
    assert tree[TIED].dtype == "bfloat16" and tree[ALIAS].dtype == "float32"
    assert raw(tree[ALIAS]) == tensor_bytes(state[TIED])
