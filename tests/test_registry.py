"""The format registry: plugins register and unregister cleanly; choice is flag, suffix, sniffing."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from helpers import assert_bit_identical

import converters
from converters.core.atomic import atomic_output
from converters.core.contract import NoOptions, WriteContext
from converters.core.registry import FormatRegistry, registry
from converters.core.sources import BufferSource, read_all
from converters.core.tree import Checkpoint, TensorRef, map_leaves
from converters.formats import BUILTIN_MODULES


class HexJsonFormat:
    """A toy third-party format: the tree as JSON with tensors as hex strings (tests only)."""

    name = "hexjson"
    suffixes: tuple[str, ...] = (".hexjson",)
    folder = False
    description = "toy format for the registry tests"
    dtype_codes: ClassVar[Mapping[str, Any]] = {"float32": "f4"}
    Options = NoOptions

    def sniff(self, head: bytes) -> bool:
        return head.startswith(b'{"hexjson"')

    def reads_folder(self, path: Path) -> bool:
        return False

    def read(self, path: Path, budget: Any) -> Checkpoint:
        data = json.loads(Path(path).read_text())["hexjson"]
        tree = {
            k: TensorRef("float32", tuple(v["shape"]), BufferSource.of(bytes.fromhex(v["hex"])))
            for k, v in data.items()
        }
        return Checkpoint(tree, path)

    def write(self, checkpoint: Checkpoint, path: Path, context: WriteContext, options: NoOptions) -> None:
        def encode(_path: Any, leaf: Any) -> Any:
            return {"shape": list(leaf.shape), "hex": read_all(leaf.source).hex()}

        text = json.dumps({"hexjson": map_leaves(checkpoint.tree, encode)})
        with atomic_output(Path(path), fsync=context.fsync) as out:
            out.write(text.encode())


@pytest.fixture
def hexjson() -> Iterator[HexJsonFormat]:
    fmt = HexJsonFormat()
    registry.register(fmt)
    yield fmt
    registry.unregister(fmt.name)


def test_a_registered_plugin_converts_both_ways(tmp_path: Path, hexjson: HexJsonFormat) -> None:
    state = {"w": torch.randn(2, 3), "b": torch.randn(3)}
    converters.save(state, tmp_path / "a.pt")
    converters.convert(tmp_path / "a.pt", tmp_path / "a.hexjson")
    converters.convert(tmp_path / "a.hexjson", tmp_path / "b.safetensors")
    assert_bit_identical(state, converters.load(tmp_path / "b.safetensors"))
    # Sniffing finds it with no suffix to go by.
    (tmp_path / "noname").write_bytes((tmp_path / "a.hexjson").read_bytes())
    assert_bit_identical(state, converters.load(tmp_path / "noname"))


def test_unregister_removes_it(tmp_path: Path) -> None:
    fmt = registry.register(HexJsonFormat())
    registry.unregister(fmt.name)
    assert "hexjson" not in registry.names()
    known = ", ".join(BUILTIN_MODULES)  # the built-ins, in registration order
    with pytest.raises(converters.UnknownFormatError, match=rf"known formats: {known}$"):
        registry.get("hexjson")


def test_registering_a_taken_name_is_refused() -> None:
    with pytest.raises(converters.ConverterError, match="a format named 'pt' is already registered"):
        registry.register(HexJsonFormat.__new__(type("Pt", (HexJsonFormat,), {"name": "pt"})))


def test_choice_order_is_flag_then_suffix_then_sniffing(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    converters.save({"w": torch.ones(2)}, path)
    assert registry.resolve(path).name == "safetensors"
    assert registry.resolve(path, "pt").name == "pt"
    renamed = tmp_path / "weights.data"
    path.rename(renamed)
    assert registry.resolve(renamed).name == "safetensors"
    with pytest.raises(converters.UnknownFormatError, match="cannot write the format from the name"):
        registry.resolve(renamed, for_write=True)


def test_entry_point_plugins_are_discovered(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeEntryPoint:
        name = "hexjson"
        value = "tests.test_registry:HexJsonFormat"

        def load(self) -> type:
            return HexJsonFormat

    fresh = FormatRegistry()
    monkeypatch.setattr(
        "importlib.metadata.entry_points",
        lambda group: [FakeEntryPoint()] if group == "statedict_convert.formats" else [],
    )
    assert fresh.names() == ["hexjson"]


def test_a_broken_entry_point_warns_and_leaves_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    class BrokenEntryPoint:
        name = "broken"
        value = "nowhere:Nothing"

        def load(self) -> type:
            raise ImportError("no module named nowhere")

    fresh = FormatRegistry()
    fresh.register(HexJsonFormat())
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [BrokenEntryPoint()])
    with pytest.warns(UserWarning, match="format plugin 'broken' .* failed to load: no module named nowhere"):
        assert fresh.names() == ["hexjson"]
