"""The transformation library: paths and globs, Select/Exclude, StripPrefix, Rename, Cast, Ties and
the dry-run plan; each keeps ties, and each works from and to every format (checked against torch
by raw bytes, dtypes, shapes and exact Python types)."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_bit_identical, tensor_bytes
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

import converters
from converters.core.errors import ConverterError
from converters.core.sources import BufferSource, read_all
from converters.core.tree import Checkpoint, TensorRef
from converters.transforms import (
    Cast,
    CastSource,
    Exclude,
    InvalidOptionError,
    KeyCollisionError,
    NoMatchError,
    PathPattern,
    Rename,
    Select,
    StripPrefix,
    Ties,
    TransformError,
    apply,
    describe_plan,
    escape_key,
    format_path,
    plan_lines,
    split_rule,
)


def ref(dtype: str = "float32", count: int = 2, fill: int = 0) -> TensorRef:
    size = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int64": 8, "bool": 1}.get(dtype, 1)
    return TensorRef(dtype, (count,), BufferSource.of(bytes([fill]) * (count * size)))


def sd(*keys: str, metadata: dict[str, Any] | None = None) -> OrderedDict[str, Any]:
    out: OrderedDict[str, Any] = OrderedDict((key, ref(fill=index)) for index, key in enumerate(keys))
    if metadata is not None:
        out._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
    return out


def ckpt(tree: Any) -> Checkpoint:
    return Checkpoint(tree, Path("in.pt"), "pt")


# ------------------------------------------------------------------------------ paths


def test_paths_escape_every_key_so_any_key_is_addressable() -> None:
    keys: list[str | int] = ["a/b", "w*", "q?", "back\\slash", "plain.key", 0]
    text = format_path(tuple(keys))
    assert text == "a\\/b/w\\*/q\\?/back\\\\slash/plain.key/0"
    pattern = PathPattern.parse(text, "--select")
    assert pattern.is_literal and pattern.matches(tuple(keys))
    assert [segment.text for segment in pattern.segments] == ["a/b", "w*", "q?", "back\\slash", "plain.key", "0"]
    assert escape_key("x/y") == "x\\/y"
    tree = {"a/b": {"w*": 1, "wx": 2}}
    assert Select("a\\/b/w\\*")(ckpt(tree)).tree == 1  # the literal star: not a glob
    assert Select("a\\/b/w*")(ckpt(tree)).tree == {"w*": 1, "wx": 2}  # the glob


def test_globs_stay_inside_one_key_and_double_star_spans_any_depth() -> None:
    p = PathPattern.parse
    assert p("fc*", "-").matches(("fc1.weight",)) and not p("fc*", "-").matches(("m", "fc1.weight"))
    assert p("*.num_batches_tracked", "-").matches(("bn.num_batches_tracked",))
    assert not p("*", "-").matches(("a", "b"))
    assert p("**/*.bias", "-").matches(("a", "b", "fc.bias")) and p("**/*.bias", "-").matches(("fc.bias",))
    assert p("a/**", "-").matches(("a",)) and p("a/**", "-").matches(("a", "b", "c"))
    assert p("state/?", "-").matches(("state", 3)) and not p("state/?", "-").matches(("state", 12))
    assert p("state/1", "-").matches(("state", 1)) and p("state/1", "-").matches(("state", "1"))
    assert p("a/**/b", "-").matches_within(("a", "x", "b", "c"))
    with pytest.raises(InvalidOptionError, match=r"^--exclude 'a\\x': '\\x' is not an escape"):
        p("a\\x", "--exclude")


# ------------------------------------------------------------------------------ select / exclude


TRAINING = {
    "model_state_dict": sd("fc1.weight", "fc1.bias", "conv.weight", metadata={"": {"version": 1}}),
    "optimizer_state_dict": {
        "state": {0: {"momentum_buffer": ref()}, 1: {"momentum_buffer": ref()}},
        "param_groups": [{"lr": 0.1, "params": [0, 1]}],
    },
    "epoch": 3,
}


def test_select_one_literal_path_gives_that_sub_tree_as_before() -> None:
    out = Select("model_state_dict")(ckpt(TRAINING)).tree
    assert out is TRAINING["model_state_dict"]
    assert Select("optimizer_state_dict/state/0")(ckpt(TRAINING)).tree is TRAINING["optimizer_state_dict"]["state"][0]
    assert Select("optimizer_state_dict/param_groups/0/lr")(ckpt(TRAINING)).tree == 0.1


def test_select_with_globs_and_several_paths_keeps_the_original_containers() -> None:
    out = Select("model_state_dict/fc*")(ckpt(TRAINING)).tree
    assert type(out) is OrderedDict and list(out) == ["fc1.weight", "fc1.bias"]
    assert out._metadata is TRAINING["model_state_dict"]._metadata  # type: ignore[attr-defined]
    assert out["fc1.bias"] is TRAINING["model_state_dict"]["fc1.bias"]
    both = Select("epoch", "model_state_dict")(ckpt(TRAINING)).tree
    assert type(both) is dict and list(both) == ["model_state_dict", "epoch"]  # tree order, not argument order
    assert both["model_state_dict"] is TRAINING["model_state_dict"]
    # several literal paths under one container: rooted at their common prefix
    two = Select(["model_state_dict/fc1.bias", "model_state_dict/conv.weight"])(ckpt(TRAINING)).tree
    assert list(two) == ["fc1.bias", "conv.weight"]
    deep = Select("optimizer_state_dict/state/*/momentum_buffer")(ckpt(TRAINING)).tree
    assert list(deep) == [0, 1] and list(deep[0]) == ["momentum_buffer"]
    lists = Select("a/1", "a/3")(ckpt({"a": [10, 11, 12, 13]})).tree
    assert lists == [11, 13]  # a list keeps its selected items, closing up
    tuples = Select("t/*")(ckpt({"t": (1, 2)})).tree
    assert tuples == (1, 2) and type(tuples) is tuple


def test_select_reports_what_it_kept_and_dropped() -> None:
    select = Select("model_state_dict/fc*")
    select(ckpt(TRAINING))
    record = select.describe()
    assert record["selected"] == ["model_state_dict/fc1.weight", "model_state_dict/fc1.bias"]
    dropped = {item["path"]: item["tensors"] for item in record["dropped"]}
    assert dropped == {"optimizer_state_dict": 2, "epoch": 0, "model_state_dict/conv.weight": 1}
    json.dumps(record)


def test_select_refuses_what_matches_nothing_naming_the_option() -> None:
    with pytest.raises(NoMatchError, match=r"^in.pt: --select 'model_state_dict/fx\*': matches nothing"):
        Select("model_state_dict/fx*")(ckpt(TRAINING))
    with pytest.raises(NoMatchError, match=r"at model_state_dict: no key 'nope' \(keys: 'fc1.weight'.*--select"):
        Select("model_state_dict/nope")(ckpt(TRAINING))
    with pytest.raises(NoMatchError, match="index 7 out of range"):
        Select("optimizer_state_dict/param_groups/7")(ckpt(TRAINING))
    with pytest.raises(InvalidOptionError, match="needs at least one path"):
        Select()


def test_exclude_drops_every_match_and_records_it() -> None:
    tree = {
        "model": sd("bn.weight", "bn.num_batches_tracked", "layer.0.bn.num_batches_tracked", "fc.weight"),
        "optimizer_state_dict": TRAINING["optimizer_state_dict"],
    }
    exclude = Exclude("optimizer_state_dict", "**/*.num_batches_tracked")
    out = exclude(ckpt(tree)).tree
    assert list(out) == ["model"] and list(out["model"]) == ["bn.weight", "fc.weight"]
    assert type(out["model"]) is OrderedDict
    dropped = exclude.describe()["dropped"]
    assert [(item["path"], item["by"], item["tensors"]) for item in dropped] == [
        ("model/bn.num_batches_tracked", "**/*.num_batches_tracked", 1),
        ("model/layer.0.bn.num_batches_tracked", "**/*.num_batches_tracked", 1),
        ("optimizer_state_dict", "optimizer_state_dict", 2),
    ]
    assert Exclude("a/1")(ckpt({"a": [1, 2, 3]})).tree == {"a": [1, 3]}
    assert tree["model"]["bn.num_batches_tracked"] is not None  # the input is never mutated


def test_exclude_errors_name_the_option_and_hint_at_double_star() -> None:
    tree = {"model": sd("bn.num_batches_tracked", "fc.weight")}
    with pytest.raises(NoMatchError, match=r"--exclude '\*.num_batches_tracked': matches nothing \(patterns start at"):
        Exclude("*.num_batches_tracked")(ckpt(tree))
    with pytest.raises(InvalidOptionError, match=r"--exclude '\*\*': matches the root"):
        Exclude("**")(ckpt(tree))


# ------------------------------------------------------------------------------ strip-prefix


def test_strip_prefix_auto_removes_ddp_and_compile_prefixes_where_every_key_has_them() -> None:
    tree = {
        "compiled": sd("_orig_mod.module.a", "_orig_mod.module.b"),
        "ddp": sd("module.a", "module.b"),
        "mixed": sd("module.a", "b"),  # not every key: left alone
        "optimizer_state_dict": TRAINING["optimizer_state_dict"],
        "module.x": 1,  # not a tensor mapping's key
    }
    strip = StripPrefix.auto()
    out = strip(ckpt(tree)).tree
    assert list(out["compiled"]) == ["a", "b"] and list(out["ddp"]) == ["a", "b"]
    assert out["mixed"] is tree["mixed"] and out["optimizer_state_dict"] is tree["optimizer_state_dict"]
    assert "module.x" in out
    assert out["ddp"]["a"] is tree["ddp"]["module.a"]
    assert strip.describe()["removed"] == [
        {"path": "compiled", "prefix": "_orig_mod.module.", "keys": 2},
        {"path": "ddp", "prefix": "module.", "keys": 2},
    ]
    assert "removed '_orig_mod.module.' from 2 keys of compiled" in strip.describe()["summary"]
    nothing = StripPrefix.auto()
    assert nothing(ckpt({"w": ref()})).tree == {"w": nothing(ckpt({"w": ref()})).tree["w"]}
    assert "nothing removed" in nothing.describe()["summary"]


def test_strip_prefix_renames_metadata_as_torch_does() -> None:
    model = nn.DataParallel(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    state = model.state_dict()
    checkpoint = converters.torch_bridge.from_torch(state)
    out = StripPrefix("module.")(checkpoint).tree
    consume_prefix_in_state_dict_if_present(state, "module.")
    assert list(out) == list(state)
    assert out._metadata == state._metadata and list(out._metadata) == list(state._metadata)


def test_strip_prefix_explicit_errors() -> None:
    tree = {"m": sd("module.a", "module.b", "c")}
    with pytest.raises(KeyCollisionError, match=r"^in.pt at m: --strip-prefix module.: 'module.a' and 'a' would both"):
        StripPrefix("module.")(ckpt({"m": sd("module.a", "a")}))
    with pytest.raises(NoMatchError, match=r"^in.pt: --strip-prefix modul_: no key of a state_dict starts with it"):
        StripPrefix(["module.", "modul_"])(ckpt(tree))
    with pytest.raises(InvalidOptionError, match=r"--strip-prefix module: would turn 'module.a' into '.a'; did you"):
        StripPrefix("module")(ckpt(tree))
    with pytest.raises(InvalidOptionError, match=r"would leave the key 'module\.' empty"):
        StripPrefix("module.")(ckpt({"m": sd("module.", "module.x")}))
    with pytest.raises(InvalidOptionError, match="non-empty"):
        StripPrefix("")
    only = StripPrefix.from_options(["auto", "x."])
    assert list(only(ckpt({"m": sd("module.x.a", "module.x.b")})).tree["m"]) == ["a", "b"]


# ------------------------------------------------------------------------------ rename


def test_rename_rules_split_on_the_first_unescaped_equals() -> None:
    assert split_rule(r"^module\.=") == (r"^module\.", "")
    assert split_rule(r"a\=b=c=d") == (r"a\=b", "c=d")  # \= is a literal '=' to re as well
    assert split_rule(r"a\\=b") == ("a\\\\", "b")  # an escaped backslash does not escape the '='
    with pytest.raises(InvalidOptionError, match=r"^--rename abc: expected REGEX=REPLACEMENT"):
        split_rule("abc")


def test_rename_applies_rules_in_order_keeps_order_metadata_and_ties() -> None:
    tied = ref()
    mapping: OrderedDict[str, Any] = OrderedDict([("enc.fc1.w", ref()), ("embed", tied), ("lm_head", tied)])
    mapping._metadata = OrderedDict([("", {"version": 1})])  # type: ignore[attr-defined]
    rename = Rename([r"^enc\.=encoder.", r"fc(\d)=linear\1", ("^lm_head$", "output")])
    out = rename(ckpt({"m": mapping, "opt": TRAINING["optimizer_state_dict"]})).tree
    assert list(out["m"]) == ["encoder.linear1.w", "embed", "output"]
    assert out["m"]["embed"] is out["m"]["output"] is tied
    assert out["m"]._metadata is mapping._metadata  # type: ignore[attr-defined]
    assert out["opt"] is TRAINING["optimizer_state_dict"]  # optimizer fields are never renamed
    record = rename.describe()
    assert [rule["matched"] for rule in record["rules"]] == [1, 1, 1]
    assert record["renamed"][0] == {"path": "m/enc.fc1.w", "to": "m/encoder.linear1.w"}


def test_rename_errors_name_the_rule() -> None:
    with pytest.raises(InvalidOptionError, match=r"^--rename 'a\(=b': invalid regex: missing \)"):
        Rename("a(=b")
    with pytest.raises(InvalidOptionError, match=r"^--rename 'a=\\2': invalid replacement: invalid group reference"):
        Rename(r"a=\2")
    with pytest.raises(InvalidOptionError, match=r"empty regex \(to add a prefix to every key, use '\^=PREFIX'\)"):
        Rename("=x")
    with pytest.raises(
        NoMatchError, match=r"^in.pt: --rename fc9=x: matches no key \(after the rules before it\) \(keys of m: 'fc1.w'"
    ):
        Rename(["fc1=fc2", "fc9=x"])(ckpt({"m": sd("fc1.w")}))
    with pytest.raises(KeyCollisionError, match=r"^in.pt at m: --rename 'a|b=c': 'a' and 'b' would both become 'c'"):
        Rename("a|b=c")(ckpt({"m": sd("a", "b")}))
    with pytest.raises(KeyCollisionError, match=r"'x' and 'y' would both become 'x'"):
        Rename("y=x")(ckpt({"m": sd("x", "y")}))
    with pytest.raises(InvalidOptionError, match="would leave the key 'abc' empty"):
        Rename("abc=")(ckpt({"m": sd("abc")}))
    with pytest.raises(NoMatchError, match="no state_dict in the checkpoint"):
        Rename("a=b")(ckpt({"m": {"a": 1}}))


# ------------------------------------------------------------------------------ cast


def test_cast_casts_floating_tensors_only_and_records_sources() -> None:
    stored = ref("float32").with_stored_digest("ab" * 32)
    tree = {
        "w": stored,
        "h": ref("float16"),
        "already": ref("bfloat16"),
        "steps": ref("int64"),
        "mask": ref("bool"),
        "f8": TensorRef("float8_e4m3fn", (2,), BufferSource.of(bytes(2))),
        "z": TensorRef("complex64", (1,), BufferSource.of(bytes(8))),
    }
    cast = Cast("bfloat16")
    out = cast(ckpt(tree)).tree
    assert (out["w"].dtype, out["w"].shape, out["w"].digest) == ("bfloat16", (2,), None)
    assert isinstance(out["w"].source, CastSource) and out["w"].source.source_digest == "ab" * 32
    assert out["h"].dtype == "bfloat16"
    for name in ("already", "steps", "mask", "f8", "z"):
        assert out[name] is tree[name]
    record = cast.describe()
    assert [(item["path"], item["from_dtype"], item["source_digest"]) for item in record["cast"]] == [
        ("w", "float32", "ab" * 32),
        ("h", "float16", None),
    ]
    reasons = {item["path"]: item["reason"] for item in record["skipped"]}
    assert reasons == {
        "already": "already bfloat16",
        "steps": "not floating-point",
        "mask": "not floating-point",
        "f8": "float8 is not cast",
        "z": "not floating-point",
    }
    assert cast.origin_of(out["w"]) is stored
    json.dumps(record)


def test_cast_include_exclude_and_ties() -> None:
    tied = ref()
    tree = {"m": sd("fc.weight", "bn.running_mean", "bn.weight"), "embed": tied, "head": tied}
    out = Cast("float16", exclude="**/bn.running_*")(ckpt(tree)).tree
    assert [out["m"][k].dtype for k in out["m"]] == ["float16", "float32", "float16"]
    assert out["embed"] is out["head"] and out["embed"].dtype == "float16"  # one tensor, cast once
    out = Cast("float16", include=["m/fc.*"])(ckpt(tree)).tree
    assert [out["m"][k].dtype for k in out["m"]] == ["float16", "float32", "float32"]
    assert out["embed"] is tied
    with pytest.raises(TransformError, match=r"^in.pt: --dtype float16: the tensor at 'embed' is tied to 'head'"):
        Cast("float16", exclude="head")(ckpt(tree))
    with pytest.raises(NoMatchError, match=r"^in.pt: --dtype-include 'nope/\*': matches no tensor"):
        Cast("float16", include="nope/*")(ckpt(tree))
    with pytest.raises(
        NoMatchError, match=r"^in.pt: --dtype bfloat16: no floating-point tensor to cast \(dtypes found"
    ):
        Cast("bfloat16")(ckpt({"steps": ref("int64")}))
    with pytest.raises(InvalidOptionError, match=r"^--dtype int8: can cast to float64, float32, float16, bfloat16"):
        Cast("int8")


def test_cast_bytes_are_torch_s() -> None:
    values = torch.tensor([1.0, -0.0, 3.3e38, 1e-40, float("inf"), float("nan"), 65520.0, 2.0**-25])
    checkpoint = converters.torch_bridge.from_torch({"w": values})
    for target in ("bfloat16", "float16", "float64"):
        out = Cast(target)(checkpoint).tree["w"]
        assert bytes(read_all(out.source)) == tensor_bytes(values.to(getattr(torch, target)))


# ------------------------------------------------------------------------------ ties


def test_ties_keep_materialize_drop_aliases() -> None:
    tied = ref().with_stored_digest("cd" * 32)
    tree = {"embed": tied, "m": {"head": tied, "x": ref()}, "l": [tied]}
    keep = Ties()
    assert keep(ckpt(tree)).tree is tree
    assert keep.describe()["tied"] == [{"path": "embed", "aliases": ["m/head", "l/0"], "bytes": 8}]
    materialize = Ties("materialize")
    out = materialize(ckpt(tree)).tree
    assert out["embed"] is tied and out["m"]["head"] is not tied and out["l"][0] is not out["m"]["head"]
    assert out["m"]["head"].source is tied.source and out["m"]["head"].digest == "cd" * 32
    assert materialize.origin_of(out["m"]["head"]) is tied
    dropped = Ties("drop-aliases")(ckpt(tree)).tree
    assert dropped == {"embed": tied, "m": {"x": tree["m"]["x"]}, "l": []}
    with pytest.raises(InvalidOptionError, match=r"^--ties copy: expected one of keep, materialize, drop-aliases"):
        Ties("copy")


# ------------------------------------------------------------------------------ ties survive every transform


TRANSFORMS: dict[str, Callable[[], Any]] = {
    "select": lambda: Select("*/module.*"),
    "exclude": lambda: Exclude("model/module.other"),
    "strip-prefix": lambda: StripPrefix.auto(),
    "strip-prefix-explicit": lambda: StripPrefix("module."),
    "rename": lambda: Rename(r"^module\.=net."),
    "cast": lambda: Cast("bfloat16"),
    "ties-keep": lambda: Ties("keep"),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_a_tied_pair_stays_one_tensor_through(name: str) -> None:
    tied = ref()
    tree = {"model": OrderedDict([("module.embed", tied), ("module.head", tied), ("module.other", ref())])}
    model = TRANSFORMS[name]()(Checkpoint(tree)).tree["model"]
    values = [value for key, value in model.items() if key.endswith(("embed", "head"))]
    assert len(values) == 2 and values[0] is values[1]


# ------------------------------------------------------------------------------ the plan


def test_describe_plan_lists_what_would_be_written_and_dropped() -> None:
    tied = ref()
    tree = {
        "model_state_dict": OrderedDict(
            [("module.embed", tied), ("module.head", tied), ("module.bn.num_batches_tracked", ref("int64"))]
        ),
        "optimizer_state_dict": TRAINING["optimizer_state_dict"],
        "epoch": 1,
    }
    before = ckpt(tree)
    transforms = [
        StripPrefix.auto(),
        Exclude("optimizer_state_dict"),
        Rename("^head$=lm_head"),
        Cast("bfloat16"),
        Ties("drop-aliases"),
    ]
    after = apply(before, transforms)
    plan = describe_plan(before, after, transforms)
    json.dumps(plan)
    assert [(t["path"], t["dtype"], t["bytes"], t.get("from")) for t in plan["tensors"]] == [
        ("model_state_dict/embed", "bfloat16", 4, {"path": "model_state_dict/module.embed", "dtype": "float32"}),
        (
            "model_state_dict/bn.num_batches_tracked",
            "int64",
            16,
            {"path": "model_state_dict/module.bn.num_batches_tracked", "dtype": "int64"},
        ),
    ]
    assert plan["totals"]["tensors"] == 2 and plan["totals"]["bytes"] == 20
    assert plan["totals"]["by_dtype"]["bfloat16"] == {"tensors": 1, "parameters": 2, "bytes": 4}
    assert plan["before"]["tensors"] == 4 and plan["before"]["paths"] == 5
    assert [(item["path"], item["by"]) for item in plan["dropped"]] == [
        ("optimizer_state_dict", "--exclude optimizer_state_dict"),
        ("model_state_dict/lm_head", "--ties drop-aliases"),
    ]
    assert [record["transform"] for record in plan["transforms"]] == [
        "strip-prefix",
        "exclude",
        "rename",
        "cast",
        "ties",
    ]
    text = "\n".join(plan_lines(plan))
    assert text.startswith("would write 2 tensor(s) at 2 path(s), 20 B (before: 4 tensor(s), 40 B)")
    assert (
        "model_state_dict/embed                   bfloat16  [2]  4 B   from float32, was model_state_dict/module.embed"
        in text
    )
    assert "  optimizer_state_dict  2 tensor(s), 16 B  (--exclude optimizer_state_dict)" in text
    assert "  model_state_dict/lm_head  alias of model_state_dict/embed  (--ties drop-aliases)" in text
    assert "  --strip-prefix auto: removed 'module.' from 3 keys of model_state_dict" in text


def test_plan_lines_show_tied_aliases_and_escape_hostile_keys() -> None:
    tied = ref()
    before = ckpt({"a\nforged line": tied, "b": tied})
    plan = describe_plan(before, before, [Ties("keep")])
    text = plan_lines(plan)
    assert all("\n" not in line for line in text)
    assert any("tied to a\\nforged line" in line for line in text)


# ------------------------------------------------------------------------------ every format, against torch


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight


@pytest.fixture(scope="module")
def source_tree() -> dict[str, Any]:
    """A torch.compile'd DataParallel model (keys '_orig_mod.module.*'), tied embed/head, BatchNorm
    statistics, an Adam state, and a few plain values."""
    torch.manual_seed(0)
    model = Tied()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    loss = model.head(model.fc(model.bn(model.embed(torch.tensor([1, 2, 3]))))).sum()
    loss.backward()
    optimizer.step()
    compiled = nn.Module()  # what torch.compile returns holds the module as _orig_mod (without importing inductor)
    compiled._orig_mod = nn.DataParallel(model)
    state = compiled.state_dict()
    assert next(iter(state)) == "_orig_mod.module.embed.weight"
    return {"model_state_dict": state, "optimizer_state_dict": optimizer.state_dict(), "epoch": 3, "note": "x"}


def expected_weights(tree: dict[str, Any], cast_to: torch.dtype) -> OrderedDict[str, Any]:
    """What the chain in test_every_format does, done in torch: strip, rename, cast (BN stats kept)."""
    state = OrderedDict(tree["model_state_dict"])
    state._metadata = OrderedDict(tree["model_state_dict"]._metadata)  # type: ignore[attr-defined]
    consume_prefix_in_state_dict_if_present(state, "_orig_mod.")
    consume_prefix_in_state_dict_if_present(state, "module.")
    out: OrderedDict[str, Any] = OrderedDict()
    for key, value in state.items():
        new = "lm_head.weight" if key == "head.weight" else key
        keep = not value.is_floating_point() or "running_" in key
        out[new] = value if keep else value.to(cast_to)
    out._metadata = state._metadata  # type: ignore[attr-defined]
    return out


DESTINATIONS = {"safetensors": ".safetensors", "pt": ".pt", "msgpack": ".msgpack", "onnx": ".onnx", "sharded": ""}


def write_source(tree: dict[str, Any], kind: str, folder: Path) -> Path:
    if kind == "pt":
        path = folder / "source.pt"
        torch.save(tree, path)
    elif kind == "sharded":
        path = folder / "source-sharded"
        staging = folder / "staging.pt"
        torch.save(tree, staging)
        converters.convert(staging, path, dst_format="safetensors", max_shard_size="300B")
        assert len(list(path.glob("*.safetensors"))) > 1
    else:
        path = folder / f"source{DESTINATIONS[kind]}"
        converters.save(tree, path)
    return path


def convert_to(source: Path, kind: str, folder: Path, transforms: list[Any]) -> Path:
    if kind == "sharded":
        out = folder / "out-sharded"
        converters.convert(source, out, dst_format="safetensors", max_shard_size="300B", transforms=transforms)
        return out
    out = folder / f"out{DESTINATIONS[kind]}"
    converters.convert(source, out, transforms=transforms)
    return out


@pytest.mark.parametrize("src", list(DESTINATIONS))
@pytest.mark.parametrize("dst", list(DESTINATIONS))
def test_every_format_to_every_format_through_the_whole_chain(
    tmp_path: Path, source_tree: dict[str, Any], src: str, dst: str
) -> None:
    source = write_source(source_tree, src, tmp_path)
    transforms = [
        StripPrefix.auto(),
        Exclude("optimizer_state_dict", "note"),
        Rename(r"^head\.weight$=lm_head.weight"),
        Cast("bfloat16", exclude="**/*running_*"),
    ]
    out = convert_to(source, dst, tmp_path, transforms)
    loaded = converters.load(out)
    expected = {"model_state_dict": expected_weights(source_tree, torch.bfloat16), "epoch": 3}
    assert_bit_identical(loaded, expected)
    weights = loaded["model_state_dict"]
    assert weights["embed.weight"] is weights["lm_head.weight"]  # still one tensor
    assert weights["embed.weight"].dtype == torch.bfloat16
    assert weights["bn.running_var"].dtype == torch.float32 and weights["bn.num_batches_tracked"].dtype == torch.int64
    assert converters.verify(out, deep=True) == []  # fresh digests of the cast bytes


@pytest.mark.parametrize("dst", list(DESTINATIONS))
def test_every_format_from_a_float16_source_to_float32(tmp_path: Path, dst: str) -> None:
    torch.manual_seed(1)
    tree = {"w": torch.randn(33, 7).to(torch.float16), "b": torch.randn(17).to(torch.bfloat16), "n": torch.tensor(3)}
    source = tmp_path / "half.safetensors"
    converters.save(tree, source)
    out = convert_to(source, dst, tmp_path, [Cast("float32")])
    assert_bit_identical(
        converters.load(out), {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tree.items()}
    )


@pytest.mark.parametrize("dst", ["safetensors", "pt", "msgpack", "onnx"])
def test_ties_options_through_a_conversion(tmp_path: Path, dst: str) -> None:
    shared = torch.arange(6, dtype=torch.float32)
    source = tmp_path / "tied.safetensors"
    converters.save({"embed": shared, "head": shared, "x": torch.ones(2)}, source)
    out = convert_to(source, dst, tmp_path, [Ties("materialize")])
    loaded = converters.load(out)
    assert loaded["embed"] is not loaded["head"]
    assert_bit_identical(loaded, {"embed": shared, "head": shared, "x": torch.ones(2)})
    out.unlink()
    out = convert_to(source, dst, tmp_path, [Ties("drop-aliases")])
    assert_bit_identical(converters.load(out), {"embed": shared, "x": torch.ones(2)})


def test_a_bare_state_dict_out_loads_with_safetensors_and_into_a_fresh_model(
    tmp_path: Path, source_tree: dict[str, Any]
) -> None:
    import safetensors.torch

    source = write_source(source_tree, "pt", tmp_path)
    out = tmp_path / "weights.safetensors"
    transforms = [Select("model_state_dict"), StripPrefix.auto(), Ties("drop-aliases")]
    converters.convert(source, out, transforms=transforms)
    flat = safetensors.torch.load_file(out)
    assert "head.weight" not in flat and "embed.weight" in flat
    model = Tied()
    missing, unexpected = model.load_state_dict(flat, strict=False)
    assert missing == ["head.weight"] and unexpected == []  # the tied weight save_pretrained leaves out
    assert torch.equal(model.head.weight, source_tree["model_state_dict"]["_orig_mod.module.embed.weight"])
    # and the full state (ties kept) loads strictly
    converters.convert(source, out, transforms=[Select("model_state_dict"), StripPrefix.auto()], fsync=False)
    fresh = Tied()
    fresh.load_state_dict(converters.load(out))


def test_transforms_never_touch_the_files_and_errors_write_nothing(tmp_path: Path, source_tree: dict[str, Any]) -> None:
    source = write_source(source_tree, "safetensors", tmp_path)
    out = tmp_path / "out.pt"
    with pytest.raises(ConverterError, match="--rename"):
        converters.convert(source, out, transforms=[Rename("nothing_like_this=x")])
    assert not out.exists()


def test_plan_traces_each_path_of_a_tied_tensor_to_its_own_source_path() -> None:
    tied = ref()
    before = ckpt({"a": tied, "b": tied, "c": ref()})
    for transforms, expected in (
        ([Ties("materialize")], [("a", None), ("b", None), ("c", None)]),
        ([Exclude("a"), Cast("float16")], [("b", "b"), ("c", "c")]),
        ([Rename("^(.)$=x_\\1"), Cast("float16")], [("x_a", "a"), ("x_b", "b"), ("x_c", "c")]),
    ):
        plan = describe_plan(before, apply(before, transforms), transforms)
        got = [(item["path"], (item.get("from") or {}).get("path")) for item in plan["tensors"]]
        assert got == expected, transforms


def test_describe_before_the_first_call_gives_the_options() -> None:
    record = Rename("a=b").describe()
    assert record == {
        "transform": "rename",
        "option": "--rename",
        "arguments": ["a=b"],
        "applied": False,
        "summary": "--rename a=b",
    }
    assert Cast("float16", option="dtype").describe()["summary"] == "dtype float16"  # the library's own wording


def test_to_and_from_dcp(tmp_path: Path) -> None:
    """DCP keeps tensors exactly (its containers are what dcp.load gives), so tensors are compared."""
    torch.manual_seed(2)
    tree = {"model": {"module.w": torch.randn(5, 3), "module.b": torch.randn(3).half(), "module.n": torch.tensor(4)}}
    source = tmp_path / "src.pt"
    torch.save(tree, source)
    folder = tmp_path / "out_dcp"
    converters.convert(source, folder, dst_format="dcp", transforms=[StripPrefix.auto(), Cast("bfloat16")])
    out = converters.load(folder)["model"]
    for key in ("w", "b"):
        assert out[key].dtype == torch.bfloat16
        assert tensor_bytes(out[key]) == tensor_bytes(tree["model"][f"module.{key}"].to(torch.bfloat16))
    assert tensor_bytes(out["n"]) == tensor_bytes(tree["model"]["module.n"])
    again = tmp_path / "again.safetensors"
    converters.convert(folder, again, transforms=[Rename("^w$=weight"), Cast("float32")])
    back = converters.load(again)["model"]
    assert list(back) == ["weight", "b", "n"] and back["weight"].dtype == torch.float32
    assert tensor_bytes(back["weight"]) == tensor_bytes(out["w"].to(torch.float32))


def test_container_types_are_kept_when_pruned_counter_included() -> None:
    from collections import Counter

    tree = {"counts": Counter({"a": 3, "b": 1}), "steps": (1, 2, 3), "w": ref()}
    out = Exclude("counts/b", "steps/1")(ckpt(tree)).tree
    assert type(out["counts"]) is Counter and out["counts"] == Counter({"a": 3})
    assert type(out["steps"]) is tuple and out["steps"] == (1, 3)
    kept = Select("counts/*", "w")(ckpt(tree)).tree
    assert type(kept["counts"]) is Counter and list(kept["counts"].items()) == [("a", 3), ("b", 1)]
