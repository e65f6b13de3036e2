"""A leading ``--select`` is pushed down into the reader of a shard folder (``api.read`` →
``read_selected``): only the shards holding selected tensors are opened, locally or remotely (a
remote shard without one gets no range request at all, not even for its header), and the output
is byte for byte what selecting from the whole read gives.

``Select.covers`` is the predicate the readers get: it must agree with what ``Select`` keeps.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import torch
from remote_fixtures import put

import converters
from converters.core.sources import BufferSource
from converters.core.tree import Checkpoint, TensorRef
from converters.transforms import Exclude, NoMatchError, Select, apply
from converters.transforms.paths import format_path

INDEX = "model.safetensors.index.json"
Fetch = tuple[str, int, int]


# ------------------------------------------------------------------------------ Select.covers


def leaf(n: int) -> TensorRef:
    return TensorRef("uint8", (n,), BufferSource.of(bytes(n)))


def varied_trees() -> list[Any]:
    """Trees with tensors under str and int keys, in lists and tuples, OrderedDicts, keys holding
    the characters patterns escape, and one tensor tied at two paths."""
    tied = leaf(3)
    state = OrderedDict([("fc1.weight", leaf(1)), ("fc1.bias", leaf(2)), ("fc2.weight", leaf(4)), ("bn.x?", leaf(5))])
    state._metadata = OrderedDict([("", {"version": 1})])  # type: ignore[attr-defined]
    return [
        {
            "model_state_dict": state,
            "optimizer_state_dict": {
                "state": {0: {"momentum_buffer": leaf(6), "step": 3}, 1: {"momentum_buffer": leaf(7)}},
                "param_groups": [{"lr": 0.1, "params": [0, 1]}],
            },
            "epoch": 3,
        },
        {"a/b": {"w*": leaf(8), "w": leaf(9), "x\\y": leaf(10)}, "a": {"b": leaf(11)}, "0": leaf(12), "t": tied},
        {"layers": [leaf(13), {"w": leaf(14), "b": leaf(15)}, (leaf(16), leaf(17))], "same": tied, "n": None},
        {"x": {"y": {"z": leaf(18), "zz": leaf(19)}, "yy": leaf(20)}, "xx": leaf(21)},
    ]


PATTERNS = [
    "model_state_dict",
    "model_state_dict/fc*",
    "model_state_dict/fc1.?eight",
    "model_state_dict/bn.x\\?",
    "**/momentum_buffer",
    "optimizer_state_dict/state/0",
    "optimizer_state_dict/state/*/momentum_buffer",
    "**",
    "",
    "*",
    "epoch",
    "a\\/b",
    "a\\/b/w\\*",
    "a\\/b/w*",
    "a\\/b/x\\\\y",
    "a/b",
    "0",
    "t",
    "layers/1",
    "layers/2/0",
    "layers/*/w",
    "layers/**",
    "same",
    "x/**/z*",
    "x/y/z",
    "**/y",
    "?x",
]


def kept_ids(checkpoint: Checkpoint) -> set[int]:
    return {id(ref) for _, ref in checkpoint.tensors()}


@pytest.mark.parametrize("tree", varied_trees(), ids=range(len(varied_trees())))
def test_covers_agrees_with_what_select_keeps(tree: Any) -> None:
    checkpoint = Checkpoint(tree)
    paths = [path for path, _ in checkpoint.tensors()]
    tried = 0
    for count in (1, 2):
        for patterns in itertools.combinations(PATTERNS, count):
            select = Select(*patterns)
            try:
                kept = kept_ids(select(checkpoint))
            except NoMatchError:
                continue
            tried += 1
            covered = {id(ref) for path, ref in checkpoint.tensors() if select.covers(path)}
            assert covered == kept, (patterns, [format_path(p) for p in paths if select.covers(p)])
            # a tied tensor is kept when one of its paths is covered
            for path, ref in checkpoint.tensors():
                assert select.covers(path) <= (id(ref) in kept)
    assert tried > 10


def test_covers_agrees_with_select_on_random_trees_and_patterns() -> None:
    rng = random.Random(7)
    alphabet = ["a", "b", "a/b", "w*", "x?", "\\", "0", "1", "ab"]

    def tree(depth: int) -> Any:
        if depth == 0 or rng.random() < 0.3:
            return leaf(rng.randrange(1, 9))
        if rng.random() < 0.2:
            return [tree(depth - 1) for _ in range(rng.randrange(1, 4))]
        keys = rng.sample(alphabet, rng.randrange(1, 4)) + ([rng.randrange(3)] if rng.random() < 0.3 else [])
        return {key: tree(depth - 1) for key in keys}

    def pattern_for(path: tuple[Any, ...]) -> str:
        segments = []
        for key in path:
            text = format_path((key,))
            roll = rng.random()
            segments.append("*" if roll < 0.15 else "**" if roll < 0.25 else text[:-1] + "?" if roll < 0.35 else text)
        return "/".join(segments[: rng.randrange(len(segments) + 1)])

    compared = 0
    for _ in range(300):
        checkpoint = Checkpoint({"root": tree(4), "other": leaf(1)})
        paths = [path for path, _ in checkpoint.tensors()]
        select = Select(*(pattern_for(rng.choice(paths)) for _ in range(rng.randrange(1, 3))))
        try:
            kept = kept_ids(select(checkpoint))
        except NoMatchError:
            continue
        compared += 1
        assert {id(ref) for path, ref in checkpoint.tensors() if select.covers(path)} == kept, select.arguments
    assert compared > 100


# ------------------------------------------------------------------------------ fixtures


def sharded(tmp_path: Path, tree: Any, name: str = "sharded") -> Path:
    """``tree`` as a sharded safetensors folder, one tensor per shard (each is 1 KiB or more)."""
    torch.save(tree, tmp_path / f"{name}.pt")
    return converters.convert(tmp_path / f"{name}.pt", tmp_path / name, dst_format="safetensors", max_shard_size="1KB")


def shard_of(folder: Path, index: str = INDEX) -> dict[str, str]:
    weight_map: dict[str, str] = json.loads((folder / index).read_text())["weight_map"]
    return weight_map


def selected_before(source: Path, out: Path, *patterns: str, exclude: tuple[str, ...] = ()) -> bytes:
    """What a selection wrote before the pushdown: the whole folder read, then the steps applied."""
    steps: list[Any] = [Select(*patterns)] + ([Exclude(*exclude)] if exclude else [])
    converters.write(apply(converters.read(source), steps), out)
    return out.read_bytes()


def fetched_objects(ranges: list[Fetch]) -> set[str]:
    return {name for name, _, _ in ranges}


def training_tree() -> dict[str, Any]:
    torch.manual_seed(3)
    model = OrderedDict((name, torch.randn(16, 16)) for name in ("fc1.weight", "fc1.bias", "fc2.weight", "head.w"))
    return {
        "model_state_dict": model,
        "optimizer_state_dict": {
            "state": {i: {"step": torch.tensor(float(i)), "exp_avg": torch.randn(16, 16)} for i in range(2)},
            "param_groups": [{"lr": 0.001, "params": [0, 1]}],
        },
        "layers": [torch.randn(16, 16), torch.randn(16, 16)],  # tensors in a list: never left out
        "epoch": 7,
    }


# ------------------------------------------------------------------------------ flat folders


def test_a_remote_selection_fetches_nothing_from_shards_without_selected_tensors(
    tmp_path: Path, store: Any, fetched: list[Fetch]
) -> None:
    torch.manual_seed(1)
    local = sharded(tmp_path, {f"layer{i}.weight": torch.randn(16, 16) for i in range(6)})
    weight_map = shard_of(local)
    assert len(set(weight_map.values())) == 6
    url = put(store, local, "sharded")
    patterns = ("layer2.weight", "layer4.*")
    fetched.clear()
    out = converters.convert(url, tmp_path / "remote.safetensors", select=list(patterns))
    wanted = {weight_map["layer2.weight"], weight_map["layer4.weight"]}
    assert fetched_objects(fetched) == {INDEX, *wanted}, fetched
    local_out = converters.convert(local, tmp_path / "local.safetensors", select=list(patterns))
    assert (
        out.read_bytes() == local_out.read_bytes() == selected_before(local, tmp_path / "before.safetensors", *patterns)
    )
    # through the index file too
    fetched.clear()
    converters.convert(f"{url}/{INDEX}", tmp_path / "by-index.safetensors", select=list(patterns))
    assert fetched_objects(fetched) == {INDEX, *wanted}
    assert (tmp_path / "by-index.safetensors").read_bytes() == out.read_bytes()


def test_a_local_selection_opens_only_the_selected_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from converters.formats.safetensors import FORMAT

    torch.manual_seed(2)
    local = sharded(tmp_path, {f"w{i}": torch.randn(16, 16) for i in range(4)})
    opened: list[str] = []
    original = FORMAT.read_file

    def read_file(path: Path, budget: Any) -> Checkpoint:
        opened.append(path.name)
        return original(path, budget)

    monkeypatch.setattr(FORMAT, "read_file", read_file)
    checkpoint = converters.read(local, transforms=[Select("w3")])
    assert opened == [shard_of(local)["w3"]]
    assert [path for path, _ in checkpoint.tensors()] == [()]  # one literal path: the tensor itself
    opened.clear()
    assert len(list(converters.read(local).tensors())) == 4 and len(opened) == 4  # no selection: all of them


# ------------------------------------------------------------------------------ nested trees


@pytest.mark.parametrize(
    ("patterns", "exclude"),
    [
        (("model_state_dict/fc1*",), ()),
        (("model_state_dict",), ("head.w",)),  # the selection is rooted at the state_dict
        (("optimizer_state_dict/state/1",), ()),
        (("**/exp_avg",), ()),
        (("model_state_dict/fc2.weight", "epoch"), ()),
        (("layers/1",), ()),
        (("optimizer_state_dict/param_groups", "epoch"), ()),  # no tensor at all: no shard read
        (("model_state_dict/fc1.weight", "optimizer_state_dict"), ("optimizer_state_dict/state/0",)),
    ],
)
def test_a_training_checkpoint_selection_reads_its_shards_only(
    tmp_path: Path, store: Any, fetched: list[Fetch], patterns: tuple[str, ...], exclude: tuple[str, ...]
) -> None:
    tree = training_tree()
    local = sharded(tmp_path, tree)
    url = put(store, local, "sharded")
    select = Select(*patterns)
    whole = converters.read(local)
    # the shards of tensors selected, and those of tensors in a list (kept so the list keeps its indices)
    weight_map = shard_of(local)
    expected = set()
    for path, _ in whole.tensors():
        key = "/".join(str(part) for part in path)
        if select.covers(path) or type(path[-1]) is int:
            expected.add(weight_map[key])
    fetched.clear()
    out = converters.convert(url, tmp_path / "remote.safetensors", select=list(patterns), exclude=list(exclude) or None)
    assert fetched_objects(fetched) - {INDEX} == expected, (fetched, expected)
    assert len(expected) < len(set(weight_map.values()))
    local_out = converters.convert(
        local, tmp_path / "local.safetensors", select=list(patterns), exclude=list(exclude) or None
    )
    before = selected_before(local, tmp_path / "before.safetensors", *patterns, exclude=exclude)
    assert out.read_bytes() == local_out.read_bytes() == before


def test_a_tied_tensor_is_read_when_one_of_its_paths_is_selected(tmp_path: Path, store: Any) -> None:
    torch.manual_seed(4)
    shared = torch.randn(16, 16)
    tree = {"encoder": {"embed": shared, "w": torch.randn(16, 16)}, "decoder": {"embed": shared}}
    local = sharded(tmp_path, tree)
    url = put(store, local, "tied")
    out = converters.convert(url, tmp_path / "remote.safetensors", select="decoder")
    assert out.read_bytes() == selected_before(local, tmp_path / "before.safetensors", "decoder")


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "patterns",
    [("model_state_dict/fc9.weight",), ("model_state_dict/fc1.weight", "model_state_dict/nope*"), ("exp_avg",)],
)
def test_a_selection_matching_nothing_fails_as_before(tmp_path: Path, store: Any, patterns: tuple[str, ...]) -> None:
    local = sharded(tmp_path, training_tree())
    url = put(store, local, "sharded")
    with pytest.raises(NoMatchError) as before:
        Select(*patterns)(converters.read(local))
    for source in (local, url):
        with pytest.raises(NoMatchError) as now:
            converters.convert(source, tmp_path / "out.safetensors", select=list(patterns))
        assert str(now.value).replace(url, str(local)) == str(before.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_an_exclude_matching_nothing_after_a_pushed_down_select_fails_as_before(tmp_path: Path) -> None:
    local = sharded(tmp_path, training_tree())
    with pytest.raises(NoMatchError) as before:
        apply(converters.read(local), [Select("model_state_dict"), Exclude("nothing*")])
    with pytest.raises(NoMatchError) as now:
        converters.convert(local, tmp_path / "out.safetensors", select="model_state_dict", exclude="nothing*")
    assert str(now.value) == str(before.value)


def test_a_corrupt_unselected_shard_is_not_read(tmp_path: Path) -> None:
    torch.manual_seed(5)
    local = sharded(tmp_path, {"a": torch.randn(16, 16), "b": torch.randn(16, 16)})
    (local / shard_of(local)["b"]).write_bytes(b"not a safetensors file")
    out = converters.convert(local, tmp_path / "a.safetensors", select="a")
    assert out.exists()
    with pytest.raises(converters.ConverterError):
        converters.convert(local, tmp_path / "b.safetensors", select="b")


# ------------------------------------------------------------------------------ foreign folders


def hf_folder(folder: Path) -> dict[str, str]:
    """A folder as Hugging Face tools write it: shards of a flat dict, an index with a weight_map only."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    shards = {
        "model-00001-of-00003.safetensors": {"embed.weight": rng.standard_normal((8, 4), dtype=np.float32)},
        "model-00002-of-00003.safetensors": {
            "layers.0.w": rng.standard_normal((4, 4), dtype=np.float32),
            "layers.0.b": np.arange(4, dtype=np.int64),
        },
        "model-00003-of-00003.safetensors": {"head.weight": rng.standard_normal((4, 8), dtype=np.float32)},
    }
    weight_map = {}
    for name, tensors in shards.items():
        safetensors.numpy.save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"total_size": 0}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2))
    return weight_map


def test_a_foreign_index_without_a_tree_is_read_by_its_weight_map(
    tmp_path: Path, store: Any, fetched: list[Fetch]
) -> None:
    weight_map = hf_folder(tmp_path / "hf")
    url = put(store, tmp_path / "hf", "hf")
    fetched.clear()
    out = converters.convert(url, tmp_path / "remote.safetensors", select="layers.0.*")
    assert fetched_objects(fetched) == {INDEX, weight_map["layers.0.w"]}, fetched
    local_out = converters.convert(tmp_path / "hf", tmp_path / "local.safetensors", select="layers.0.*")
    before = selected_before(tmp_path / "hf", tmp_path / "before.safetensors", "layers.0.*")
    assert out.read_bytes() == local_out.read_bytes() == before
    with pytest.raises(NoMatchError, match=r"keys: 'embed\.weight', 'head\.weight', 'layers\.0\.b', 'layers\.0\.w'\)"):
        converters.convert(url, tmp_path / "none.safetensors", select="layers.1.w")


def test_a_bin_shard_folder_reads_its_selected_shards_only(tmp_path: Path, store: Any, fetched: list[Fetch]) -> None:
    torch.manual_seed(6)
    folder = tmp_path / "bin"
    folder.mkdir()
    weight_map = {}
    for i in range(3):
        name = f"pytorch_model-0000{i + 1}-of-00003.bin"
        shard = {f"layer{i}.weight": torch.randn(8, 8), f"layer{i}.bias": torch.randn(8)}
        torch.save(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": 0}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    url = put(store, folder, "bin")
    fetched.clear()
    out = converters.convert(url, tmp_path / "remote.safetensors", select="layer1.*")
    assert fetched_objects(fetched) == {"pytorch_model.bin.index.json", weight_map["layer1.weight"]}, fetched
    local_out = converters.convert(folder, tmp_path / "local.safetensors", select="layer1.*")
    assert (
        out.read_bytes()
        == local_out.read_bytes()
        == selected_before(folder, tmp_path / "before.safetensors", "layer1.*")
    )
