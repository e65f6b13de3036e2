"""``--layout flax|mlx|RULES.json|torch``: PyTorch state_dicts as parameter trees other frameworks
accept as they are, and back, bit for bit.

The proof is the frameworks themselves: the recipe ``Net`` and a model with an Embedding,
BatchNorm, LayerNorm and a list of blocks, written in ``flax.linen`` here, initialised from the
converted msgpack file with ``flax.serialization.from_bytes``, give torch's outputs on the same
inputs; the recipe ``Net`` in ``mlx.nn`` loads the mlx-layout safetensors file with
``load_weights`` (strict: names and shapes checked) and gives torch's outputs too. Outputs agree
within a float tolerance only (XLA's and MLX's convolution and matmul kernels sum in another order
than torch's oneDNN/BLAS ones; float32 over sums of at most 400 terms: measured differences are
~1e-7 on outputs ~0.1, so atol 1e-5 with rtol 1e-5 is two orders of magnitude of margin and still
fails on any wrong axis order, which gives differences ~1e-1). The parameter bytes themselves are
compared exactly with torch's ``tensor.permute(...).contiguous()`` bytes.
"""

from __future__ import annotations

import json
import tracemalloc
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_bit_identical, tensor_bytes
from torch import nn

import converters
from converters import cli
from converters.core.errors import CorruptFileError
from converters.core.sources import BufferSource, read_all
from converters.core.tree import Checkpoint, TensorRef
from converters.recipe import Net
from converters.transforms import (
    InvalidOptionError,
    KeyCollisionError,
    Layout,
    LayoutRules,
    NoMatchError,
    PermuteSource,
    TransformError,
)
from converters.transforms.layout import LAYOUT_KEY, inverse

ATOL = RTOL = 1e-5  # see the module docstring


def sdconvert(*args: object) -> int:
    return cli.main([str(arg) for arg in args])


def raw(ref: Any) -> bytes:
    assert type(ref) is TensorRef
    return bytes(read_all(ref.source))


def permuted(tensor: torch.Tensor, permute: tuple[int, ...] | None) -> bytes:
    """What a layout must store: torch's own permutation of the tensor, contiguous, as bytes."""
    return tensor_bytes(tensor if permute is None else tensor.permute(*permute).contiguous())


# ------------------------------------------------------------------------------ the models


class TorchBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.fc(self.norm(x)))


class TorchTagger(nn.Module):
    """Tokens → Embedding → Conv1d → BatchNorm1d → ReLU → mean → 2 blocks (ModuleList) → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 16, 3)
        self.bn = nn.BatchNorm1d(16)
        self.blocks = nn.ModuleList([TorchBlock(16), TorchBlock(16)])
        self.head = nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.embed(tokens).transpose(1, 2))
        x = F.relu(self.bn(x)).mean(dim=2)
        for block in self.blocks:
            x = block(x)
        out: torch.Tensor = self.head(x)
        return out


def trained_tagger() -> TorchTagger:
    """Some training steps, so that the BatchNorm statistics and every weight are far from their init."""
    torch.manual_seed(5)
    model = TorchTagger()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(6)
    for _ in range(5):
        tokens = torch.randint(0, 20, (8, 12), generator=generator)
        labels = torch.randint(0, 4, (8,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(tokens), labels).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return model.eval()


def flax_models() -> tuple[Any, Any]:
    import flax.linen as fnn
    import jax.numpy as jnp

    class FlaxNet(fnn.Module):
        """The recipe Net in flax.linen: NHWC convolutions, flattened in torch's (C, H, W) order."""

        @fnn.compact
        def __call__(self, x: Any) -> Any:
            x = jnp.transpose(x, (0, 2, 3, 1))
            x = fnn.max_pool(fnn.relu(fnn.Conv(6, (5, 5), padding="VALID", name="conv1")(x)), (2, 2), (2, 2))
            x = fnn.max_pool(fnn.relu(fnn.Conv(16, (5, 5), padding="VALID", name="conv2")(x)), (2, 2), (2, 2))
            x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
            x = fnn.relu(fnn.Dense(120, name="fc1")(x))
            x = fnn.relu(fnn.Dense(84, name="fc2")(x))
            return fnn.Dense(10, name="fc3")(x)

    class FlaxBlock(fnn.Module):
        @fnn.compact
        def __call__(self, x: Any) -> Any:
            return x + fnn.relu(fnn.Dense(16, name="fc")(fnn.LayerNorm(epsilon=1e-5, name="norm")(x)))

    class FlaxTagger(fnn.Module):
        def setup(self) -> None:
            self.embed = fnn.Embed(20, 8)
            self.conv = fnn.Conv(16, (3,), padding="VALID")
            self.bn = fnn.BatchNorm(use_running_average=True, epsilon=1e-5)
            self.blocks = [FlaxBlock(), FlaxBlock()]  # flax names them blocks_0, blocks_1
            self.head = fnn.Dense(4)

        def __call__(self, tokens: Any) -> Any:
            x = fnn.relu(self.bn(self.conv(self.embed(tokens)))).mean(axis=1)
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    return FlaxNet(), FlaxTagger()


# ------------------------------------------------------------------------------ the rules table


@pytest.mark.parametrize(
    ("key", "ndim", "rule", "target", "permute"),
    [
        ("fc1.weight", 2, "linear", ("params", "fc1", "kernel"), (1, 0)),
        ("fc1.bias", 1, "bias", ("params", "fc1", "bias"), None),
        ("conv.weight", 3, "conv1d", ("params", "conv", "kernel"), (2, 1, 0)),
        ("layer1.0.conv1.weight", 4, "conv2d", ("params", "layer1_0", "conv1", "kernel"), (2, 3, 1, 0)),
        ("stem.weight", 5, "conv3d", ("params", "stem", "kernel"), (2, 3, 4, 1, 0)),
        ("model.embed_tokens.weight", 2, "embedding", ("params", "model", "embed_tokens", "embedding"), None),
        ("bert.embeddings.word_embeddings.weight", 2, "embedding", None, None),
        ("transformer.wte.weight", 2, "embedding", ("params", "transformer", "wte", "embedding"), None),
        ("Embedding.weight", 2, "embedding", ("params", "Embedding", "embedding"), None),
        ("bn1.weight", 1, "norm scale", ("params", "bn1", "scale"), None),
        ("ln_f.weight", 1, "norm scale", ("params", "ln_f", "scale"), None),
        ("bn1.running_mean", 1, "batchnorm mean", ("batch_stats", "bn1", "mean"), None),
        ("bn1.running_var", 1, "batchnorm var", ("batch_stats", "bn1", "var"), None),
        ("bn1.num_batches_tracked", 0, "batches tracked", ("torch_buffers", "bn1", "num_batches_tracked"), None),
        ("embeddings.position_ids", 2, "other", ("params", "embeddings", "position_ids"), None),
        ("0.weight", 2, "linear", ("params", "layers_0", "kernel"), (1, 0)),  # a Sequential at the root
        ("blocks.0.1.weight", 2, "linear", ("params", "blocks_0_1", "kernel"), (1, 0)),  # nested lists
        ("weight", 2, "linear", ("params", "kernel"), (1, 0)),  # a bare Linear's state_dict
    ],
)
def test_flax_rules_table(
    key: str, ndim: int, rule: str, target: tuple[str, ...] | None, permute: tuple[int, ...] | None
) -> None:
    rules = LayoutRules.load("flax")
    found = rules.match(key, ndim)
    assert found is not None
    assert (found[0].name, found[0].permute) == (rule, permute)
    if target is not None:
        assert rules.target(*found) == target


@pytest.mark.parametrize(
    ("key", "ndim", "permute"),
    [
        ("conv1.weight", 4, (0, 2, 3, 1)),  # OHWI
        ("conv.weight", 3, (0, 2, 1)),
        ("stem.weight", 5, (0, 2, 3, 4, 1)),
        ("fc1.weight", 2, None),  # Linear stays [out, in]
        ("embed.weight", 2, None),
        ("bn.running_mean", 1, None),
        ("layers.0.bias", 1, None),
    ],
)
def test_mlx_rules_table(key: str, ndim: int, permute: tuple[int, ...] | None) -> None:
    rules = LayoutRules.load("mlx")
    found = rules.match(key, ndim)
    assert found is not None and found[0].permute == permute
    assert rules.target(*found) == (key,)  # same keys: a flat layout


def test_rules_tables_are_the_documented_json(tmp_path: Path) -> None:
    """The built-in tables are the JSON files a user reads (and copies): loading a table's own
    JSON form gives the same table."""
    for name in ("flax", "mlx"):
        rules = LayoutRules.load(name)
        copy = tmp_path / f"{name}-copy.json"
        copy.write_text(json.dumps({**rules.as_dict(), "layout": f"my-{name}"}))
        again = LayoutRules.load(copy)
        assert again.as_dict() == {**rules.as_dict(), "layout": f"my-{name}"}
        assert again.origin == str(copy)
    documented = (Path(__file__).resolve().parent.parent / "schemas" / "layouts.md").read_text()
    for rule in LayoutRules.load("flax").rules + LayoutRules.load("mlx").rules:
        assert f"`{rule.name}`" in documented, rule.name


def test_a_rules_file_extends_and_overrides(tmp_path: Path) -> None:
    """flax.linen's nn.Sequential names its layers layers_0, layers_2 under the Sequential's own
    name, and a ConvTranspose2d weight is [in, out, kh, kw]: both are one line in a rules file,
    tried before the built-in table's rules."""
    rules_file = tmp_path / "seq.json"
    rules_file.write_text(
        json.dumps(
            {
                "layout": "flax-sequential",
                "extends": "flax",
                "index": "{name}/layers_{index}",
                "rules": [
                    {
                        "name": "conv transpose",
                        "key": r"(?P<module>(?:.*\.)?up[^.]*)\.weight",
                        "to": "params/{module}/kernel",
                        "permute": [2, 3, 0, 1],
                    }
                ],
            }
        )
    )
    rules = LayoutRules.load(rules_file)
    assert rules.layout == "flax-sequential" and rules.rules[0].name == "conv transpose"
    assert len(rules.rules) == 1 + len(LayoutRules.load("flax").rules)
    found = rules.match("decoder.up1.weight", 4)
    assert found is not None and found[0].name == "conv transpose"
    assert rules.target(*found) == ("params", "decoder", "up1", "kernel")
    found = rules.match("seq.2.weight", 2)
    assert found is not None and rules.target(*found) == ("params", "seq", "layers_2", "kernel")
    # through convert: the record names the user's layout, and the reverse needs no rules file
    torch.manual_seed(0)
    state = OrderedDict([("seq.0.weight", torch.randn(3, 4)), ("up1.weight", torch.randn(2, 5, 3, 3))])
    src, out, back = tmp_path / "s.pt", tmp_path / "o.msgpack", tmp_path / "b.pt"
    torch.save(state, src)
    assert sdconvert("convert", src, out, "--layout", rules_file, "--quiet") == 0
    tree = converters.read(out).tree
    assert raw(tree["params"]["seq"]["layers_0"]["kernel"]) == permuted(state["seq.0.weight"], (1, 0))
    assert raw(tree["params"]["up1"]["kernel"]) == permuted(state["up1.weight"], (2, 3, 0, 1))
    rules_file.unlink()
    assert sdconvert("convert", out, back, "--layout", "torch", "--quiet") == 0
    assert_bit_identical(torch.load(src), torch.load(back))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ([], "a rules table is a JSON object"),
        ({"layout": "x", "rules": [], "colour": 1}, "unknown field 'colour'"),
        ({"layout": "torch", "rules": [{"key": "a", "to": "b"}]}, "'layout' must name the layout"),
        ({"layout": "x", "rules": []}, "'rules' must be a non-empty list"),
        ({"layout": "x", "rules": [{"key": "a(", "to": "b"}]}, r"rule 1 \(rule 1\): invalid regex in 'key'"),
        ({"layout": "x", "rules": [{"key": "(?P<m>a)", "to": "{module}"}]}, r"'to' names \{module\}"),
        ({"layout": "x", "rules": [{"key": "a", "to": "b", "permute": [0, 0]}]}, "'permute' must list the axes"),
        ({"layout": "x", "rules": [{"key": "a", "to": "b", "permute": [1, 0], "ndim": 3}]}, "applies to rank 2"),
        ({"layout": "x", "rules": [{"key": "a", "to": "b", "ndim": "2"}]}, "'ndim' must be a rank"),
        ({"layout": "x", "tree": "flat", "rules": [{"key": "a", "to": "b/c"}]}, "a flat layout's target is one key"),
        ({"layout": "x", "tree": "wide", "rules": [{"key": "a", "to": "b"}]}, "'tree' must be one of nested, flat"),
        ({"layout": "x", "index": "_{index}", "rules": [{"key": "a", "to": "b"}]}, "'index' must start with"),
        ({"layout": "flax", "extends": "flax"}, "needs a name of its own"),
        ({"layout": "x", "version": 2, "rules": [{"key": "a", "to": "b"}]}, "'version' must be 1"),
    ],
)
def test_bad_rules_tables_are_refused_before_reading(tmp_path: Path, table: Any, message: str) -> None:
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(table))
    with pytest.raises(InvalidOptionError, match=message) as caught:
        converters.convert(tmp_path / "missing.pt", tmp_path / "out.msgpack", layout=str(path))
    assert str(caught.value).startswith(f"--layout {path}: ")


def test_rules_files_extending_each_other_in_a_circle_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"layout": "a", "extends": str(tmp_path / "b.json")}))
    (tmp_path / "b.json").write_text(json.dumps({"layout": "b", "extends": str(tmp_path / "a.json")}))
    circle = r"'extends' goes round in a circle: .*a\.json → .*b\.json → .*a\.json"
    with pytest.raises(InvalidOptionError, match=circle):
        Layout(tmp_path / "a.json")


def test_unknown_layout_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match=r"--layout jax: expected flax, mlx, torch .* or a JSON rules file"):
        Layout("jax")


def test_a_key_no_rule_takes_is_an_error_naming_it(tmp_path: Path) -> None:
    strict = LayoutRules.from_dict(
        {"layout": "strict", "rules": [{"key": r"(?P<module>.*)\.weight", "to": "{module}/w"}]}
    )
    ref = TensorRef("float32", (2,), BufferSource.of(bytes(8)))
    with pytest.raises(NoMatchError, match=r"no rule of the 'strict' layout .* takes 'fc\.bias' \(float32\[2\]\)"):
        Layout(strict)(Checkpoint({"fc.weight": ref, "fc.bias": ref}))


def test_keys_that_would_collide_are_refused_naming_both() -> None:
    ref = TensorRef("float32", (2,), BufferSource.of(bytes(8)))
    with pytest.raises(
        KeyCollisionError, match=r"'layer_0\.bias' and 'layer\.0\.bias' would both be at 'params/layer_0/bias'"
    ):
        Layout("flax")(Checkpoint({"layer_0.bias": ref, "layer.0.bias": ref}))
    with pytest.raises(KeyCollisionError, match=r"'a\.bias' and 'a\.bias\.bias' would both be at 'params/a/bias'"):
        Layout("flax")(Checkpoint({"a.bias": ref, "a.bias.bias": ref}))


# ------------------------------------------------------------------------------ the byte source


@pytest.mark.parametrize(
    ("dtype", "shape", "permute"),
    [
        ("float32", (7, 5), (1, 0)),
        ("float32", (6, 3, 5, 5), (2, 3, 1, 0)),
        ("bfloat16", (4, 3, 2, 3, 2), (2, 3, 4, 1, 0)),
        ("uint8", (3, 1, 4), (0, 2, 1)),
        ("bool", (2, 3), (1, 0)),
        ("complex128", (3, 2), (1, 0)),  # 16-byte elements
        ("float64", (0, 5), (1, 0)),  # no bytes
        ("int64", (), ()),  # a 0-d tensor
        ("float32", (70, 130), (1, 0)),  # output rows longer than a tile: copied tile by tile
        ("float16", (200, 3, 3, 2), (2, 3, 1, 0)),
    ],
)
# blocks smaller than an element, than a row, a few rows, everything
@pytest.mark.parametrize("block_bytes", [1, 16, 4096, 1 << 20])
def test_permute_source_is_numpy_transpose(
    dtype: str, shape: tuple[int, ...], permute: tuple[int, ...], block_bytes: int
) -> None:
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    data = np.random.default_rng(3).integers(0, 256, size=int(np.prod(shape)) * itemsize, dtype=np.uint8).tobytes()
    source = PermuteSource(BufferSource.of(data), dtype, shape, permute, block_bytes=block_bytes)
    element = np.dtype(f"V{itemsize}")
    expected = np.ascontiguousarray(np.frombuffer(data, dtype=element).reshape(shape).transpose(permute)).tobytes()
    chunks = [bytes(chunk) for chunk in source.chunks(chunk_size=8)]
    assert b"".join(chunks) == expected == bytes(read_all(source))
    assert all(len(chunk) <= 8 for chunk in chunks)
    back = PermuteSource(BufferSource.of(expected), dtype, source.shape_after, inverse(permute))
    assert bytes(read_all(back)) == data  # the inverse gives the same bytes back


def test_permute_source_checks_the_zip_crc_before_handing_out_bytes(tmp_path: Path) -> None:
    """A flipped bit in a torch.save record is refused, never permuted into fresh digests."""
    src = tmp_path / "flipped.pt"
    torch.save({"fc.weight": torch.arange(12.0).reshape(3, 4)}, src)
    with zipfile.ZipFile(src) as archive:
        info = next(item for item in archive.infolist() if item.filename.endswith("/data/0"))
    data = bytearray(src.read_bytes())
    local = info.header_offset  # the local header's own name and extra lengths (torch pads the extra)
    start = local + 30 + int.from_bytes(data[local + 26 : local + 28], "little")
    start += int.from_bytes(data[local + 28 : local + 30], "little")
    assert bytes(data[start : start + 4]) == tensor_bytes(torch.tensor([0.0]))
    data[start + 5] ^= 0x01
    src.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="CRC-32"):
        converters.convert(src, tmp_path / "out.msgpack", layout="flax")
    assert not (tmp_path / "out.msgpack").exists()


def test_one_tensor_at_a_time_in_memory(tmp_path: Path) -> None:
    """16 MiB of Linear weights laid out with at most about two tensors' worth of memory (the
    tensor read, its permuted block): never the checkpoint."""
    torch.manual_seed(0)
    state = {f"layers.{i}.weight": torch.randn(512, 512) for i in range(16)}  # 1 MiB each
    src = tmp_path / "big.safetensors"
    converters.save(state, src)
    tracemalloc.start()
    try:
        converters.convert(src, tmp_path / "big.msgpack", layout="flax", fsync=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB for 16 MiB of tensors"
    tree = converters.read(tmp_path / "big.msgpack").tree
    assert raw(tree["params"]["layers_7"]["kernel"]) == permuted(state["layers.7.weight"], (1, 0))


# ------------------------------------------------------------------------------ records, round trips, refusals


@pytest.mark.parametrize("middle", ["msgpack", "safetensors", "pt"])
def test_round_trip_gives_back_the_exact_checkpoint(tmp_path: Path, recipe_pt: Path, middle: str) -> None:
    """pt → flax layout (in any container that carries the record) → pt: bit-identical to the
    source (tensor bytes, key order, OrderedDict and _metadata, the optimizer, the epoch)."""
    laid, back = tmp_path / f"flax.{middle}", tmp_path / "back.pt"
    converters.convert(recipe_pt, laid, layout="flax")
    source = torch.load(recipe_pt)
    tree = converters.read(laid).tree["model_state_dict"]
    for key, value in source["model_state_dict"].items():
        module, name = key.rsplit(".", 1)
        leaf = {"weight": "kernel"}.get(name, name)
        permute = {4: (2, 3, 1, 0), 2: (1, 0)}.get(value.ndim) if name == "weight" else None
        assert raw(tree["params"][module][leaf]) == permuted(value, permute), key
    converters.convert(laid, back, layout="torch")
    assert converters.verify(recipe_pt, back) == []
    assert_bit_identical(source, torch.load(back))


def test_the_layout_is_recorded_inspected_and_refused_twice(
    tmp_path: Path, recipe_pt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    laid = tmp_path / "net.msgpack"
    assert sdconvert("convert", recipe_pt, laid, "--select", "model_state_dict", "--layout", "flax", "--quiet") == 0
    manifest = converters.manifest(laid)
    record = json.loads(manifest["file"]["metadata"][LAYOUT_KEY])
    assert record["layout"] == "flax" and record["state_dicts"][0]["path"] == []
    assert record["state_dicts"][0]["tensors"][0] == ["conv1.weight", ["params", "conv1", "kernel"], [2, 3, 1, 0]]
    assert converters.verify(laid, deep=True) == []  # the stored digests and tree digest (record included) hold
    capsys.readouterr()
    assert sdconvert("inspect", laid) == 0
    shown = capsys.readouterr().out
    assert "layout: flax (rules flax): 10 tensor(s) of 1 state_dict(s), 5 permuted" in shown
    assert LAYOUT_KEY not in shown  # the record is described, not dumped
    # the double transpose: refused, naming the recorded layout, whatever the second layout
    for again in ("flax", "mlx"):
        assert sdconvert("convert", laid, tmp_path / f"twice-{again}.msgpack", "--layout", again) == 2
        error = capsys.readouterr().err
        assert f"--layout {again}: the checkpoint is already in the 'flax' layout" in error
        assert "would permute its tensors a second time" in error
        assert not (tmp_path / f"twice-{again}.msgpack").exists()
    # the record travels: flax layout in safetensors is refused as well
    moved = tmp_path / "net.safetensors"
    assert sdconvert("convert", laid, moved, "--quiet") == 0
    assert sdconvert("convert", moved, tmp_path / "x.msgpack", "--layout", "flax") == 2
    assert "already in the 'flax' layout" in capsys.readouterr().err
    # and nothing to undo on a file that records none
    assert sdconvert("convert", recipe_pt, tmp_path / "y.pt", "--layout", "torch") == 2
    assert "records no layout" in capsys.readouterr().err


def test_dry_run_lists_where_each_tensor_goes(
    tmp_path: Path, recipe_pt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    args = ("convert", recipe_pt, tmp_path / "o.msgpack", "--select", "model_state_dict", "--layout", "flax")
    assert sdconvert(*args, "--dry-run", "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    first = plan["tensors"][0]
    assert (first["path"], first["shape"], first["from"]["path"]) == (
        "params/conv1/kernel",
        [5, 5, 3, 6],
        "model_state_dict/conv1.weight",
    )
    (step,) = [record for record in plan["transforms"] if record["transform"] == "layout"]
    assert step["tensors"][0]["rule"] == "conv2d" and step["tensors"][0]["permute"] == [2, 3, 1, 0]
    assert "5 permuted: conv2d 2, linear 3; 5 as they are" in step["summary"]
    assert not (tmp_path / "o.msgpack").exists()


def test_an_edited_layout_tree_is_not_undone_silently(tmp_path: Path, recipe_pt: Path) -> None:
    laid, pruned = tmp_path / "flax.msgpack", tmp_path / "pruned.msgpack"
    converters.convert(recipe_pt, laid, select="model_state_dict", layout="flax")
    converters.convert(laid, pruned, exclude="params/fc3/kernel")  # the record is carried, the tree changed
    with pytest.raises(
        TransformError, match=r"params/fc3/kernel holds no tensor \(the layout put 'fc3\.weight' there\)"
    ):
        converters.convert(pruned, tmp_path / "back.pt", layout="torch")


def test_ties_separated_by_a_permutation_come_back_tied(tmp_path: Path) -> None:
    """An embedding tied to the output layer: flax stores the embedding as it is and the output
    kernel transposed (two tensors); the reverse ties them again (their bytes agree). mlx leaves
    both as they are, so the tie stays a tie."""
    torch.manual_seed(2)
    embed = torch.randn(8, 4)
    state = OrderedDict([("embed.weight", embed), ("fc.bias", torch.zeros(4)), ("lm_head.weight", embed)])
    src = tmp_path / "tied.pt"
    torch.save(state, src)
    flax_file, mlx_file = tmp_path / "tied.msgpack", tmp_path / "tied.safetensors"
    converters.convert(src, flax_file, layout="flax")
    params = converters.read(flax_file).tree["params"]
    assert raw(params["embed"]["embedding"]) == tensor_bytes(embed)
    assert raw(params["lm_head"]["kernel"]) == permuted(embed, (1, 0))
    back = tmp_path / "back.pt"
    converters.convert(flax_file, back, layout="torch")
    loaded = torch.load(back)
    assert loaded["embed.weight"].untyped_storage().data_ptr() == loaded["lm_head.weight"].untyped_storage().data_ptr()
    assert converters.verify(src, back) == []
    converters.convert(src, mlx_file, layout="mlx")
    tree = converters.read(mlx_file).tree
    assert tree["embed.weight"] is tree["lm_head.weight"]
    # a kernel that changed since (fine-tuned untied in flax) is kept as it is, never overwritten
    laid = Layout("flax")(converters.read(src))
    kernel = laid.tree["params"]["lm_head"]["kernel"]
    laid.tree["params"]["lm_head"]["kernel"] = TensorRef("float32", kernel.shape, BufferSource.of(bytes(kernel.nbytes)))
    undo = Layout("torch")
    restored = undo(laid).tree
    assert restored["lm_head.weight"] is not restored["embed.weight"] and raw(restored["lm_head.weight"]) == bytes(128)
    assert "1 no longer equal to what they were tied to" in undo.summary()


# ------------------------------------------------------------------------------ the frameworks themselves


def test_flax_linen_net_runs_on_the_converted_file(tmp_path: Path, recipe_pt: Path, trained: Any) -> None:
    import jax
    import jax.numpy as jnp
    from flax import serialization

    net: Net = trained[0]
    out = tmp_path / "net.msgpack"
    assert sdconvert("convert", recipe_pt, out, "--select", "model_state_dict", "--layout", "flax", "--quiet") == 0
    flax_net, _ = flax_models()
    target = flax_net.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 32, 32)))
    variables = serialization.from_bytes(target, out.read_bytes())
    # the bytes flax holds are torch's tensors, permuted, exactly
    state = net.state_dict()
    for name in ("conv1", "conv2", "fc1", "fc2", "fc3"):
        weight = state[f"{name}.weight"]
        permute = (2, 3, 1, 0) if weight.ndim == 4 else (1, 0)
        kernel = np.asarray(variables["params"][name]["kernel"])
        assert kernel.dtype == np.float32 and kernel.tobytes() == permuted(weight, permute), name
        assert np.asarray(variables["params"][name]["bias"]).tobytes() == tensor_bytes(state[f"{name}.bias"])
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = net(images).numpy()
    got = np.asarray(flax_net.apply(variables, jnp.asarray(images.numpy())))
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL)
    # a wrong layout is caught by the same comparison: the kernels as torch stores them, reshaped
    wrong = jax.tree_util.tree_map(lambda a: a, variables)
    fc1 = state["fc1.weight"].numpy()
    wrong["params"]["fc1"]["kernel"] = jnp.asarray(fc1.reshape(400, 120))
    assert np.abs(np.asarray(flax_net.apply(wrong, jnp.asarray(images.numpy()))) - expected).max() > 100 * ATOL


def test_flax_linen_model_with_batchnorm_embedding_and_blocks(tmp_path: Path) -> None:
    import jax
    import jax.numpy as jnp
    from flax import serialization

    model = trained_tagger()
    state = model.state_dict()
    src, out = tmp_path / "tagger.pt", tmp_path / "tagger.msgpack"
    torch.save(state, src)
    assert sdconvert("convert", src, out, "--layout", "flax", "--quiet") == 0
    _, flax_tagger = flax_models()
    tokens = torch.randint(0, 20, (6, 12), generator=torch.Generator().manual_seed(9))
    target = flax_tagger.init(jax.random.PRNGKey(0), jnp.zeros((1, 12), jnp.int32))
    restored = serialization.msgpack_restore(out.read_bytes())
    # the file holds exactly the collections and names flax's init makes, plus torch's count apart
    shapes = jax.tree_util.tree_map(lambda a: tuple(a.shape), target)
    assert jax.tree_util.tree_map(lambda a: tuple(a.shape), {k: restored[k] for k in shapes}) == shapes
    assert set(restored) == {"__sdconvert__", "params", "batch_stats", "torch_buffers"}
    assert int(restored["torch_buffers"]["bn"]["num_batches_tracked"]) == 5
    params, stats = restored["params"], restored["batch_stats"]
    exact = {
        "embed.weight": (params["embed"]["embedding"], None),
        "conv.weight": (params["conv"]["kernel"], (2, 1, 0)),
        "bn.weight": (params["bn"]["scale"], None),
        "bn.running_mean": (stats["bn"]["mean"], None),
        "bn.running_var": (stats["bn"]["var"], None),
        "blocks.1.norm.weight": (params["blocks_1"]["norm"]["scale"], None),
        "blocks.1.fc.weight": (params["blocks_1"]["fc"]["kernel"], (1, 0)),
        "head.weight": (params["head"]["kernel"], (1, 0)),
    }
    for key, (array, permute) in exact.items():
        assert np.asarray(array).tobytes() == permuted(state[key], permute), key
    variables = serialization.from_bytes(target, out.read_bytes())
    with torch.no_grad():
        expected = model(tokens).numpy()
    got = np.asarray(flax_tagger.apply(variables, jnp.asarray(tokens.numpy(), dtype=jnp.int32)))
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL)
    # and back: the state_dict torch saved, bit for bit (num_batches_tracked and _metadata included)
    back = tmp_path / "back.pt"
    assert sdconvert("convert", out, back, "--layout", "torch", "--quiet") == 0
    assert_bit_identical(torch.load(src), torch.load(back))


def test_mlx_net_runs_on_the_converted_safetensors(tmp_path: Path, recipe_pt: Path, trained: Any) -> None:
    """The second layout: the same keys in a safetensors file, conv weights [out, kh, kw, in]
    (MLX's channels-last convolutions), Linear weights as torch has them."""
    import mlx.core as mx
    import mlx.nn as mnn

    class MlxNet(mnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = mnn.Conv2d(3, 6, 5), mnn.Conv2d(6, 16, 5)
            self.fc1, self.fc2, self.fc3 = mnn.Linear(400, 120), mnn.Linear(120, 84), mnn.Linear(84, 10)
            self.pool = mnn.MaxPool2d(2, 2)

        def __call__(self, x: Any) -> Any:
            x = mx.transpose(x, (0, 2, 3, 1))
            x = self.pool(mnn.relu(self.conv1(x)))
            x = self.pool(mnn.relu(self.conv2(x)))
            x = mx.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
            return self.fc3(mnn.relu(self.fc2(mnn.relu(self.fc1(x)))))

    net: Net = trained[0]
    out = tmp_path / "net.safetensors"
    assert sdconvert("convert", recipe_pt, out, "--select", "model_state_dict", "--layout", "mlx", "--quiet") == 0
    model = MlxNet()
    model.load_weights(str(out))  # strict: every name and shape checked
    state = net.state_dict()
    loaded = dict(mx.load(str(out)))
    assert np.array(loaded["conv1.weight"]).tobytes() == permuted(state["conv1.weight"], (0, 2, 3, 1))
    assert np.array(loaded["fc1.weight"]).tobytes() == tensor_bytes(state["fc1.weight"])
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = net(images).numpy()
    got = np.array(model(mx.array(images.numpy())))
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL)
    back = tmp_path / "back.pt"
    assert sdconvert("convert", out, back, "--layout", "torch", "--quiet") == 0
    assert_bit_identical(torch.load(recipe_pt)["model_state_dict"], torch.load(back))
