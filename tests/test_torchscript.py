"""TorchScript archives (issue 14, part 2): ``torch.jit.save`` / ``scripted.save`` / traced modules
read as the state_dict ``torch.jit.load(f).state_dict()`` gives, bit for bit, without running any
of their code and without torch; every destination format round-trips; hostile archives are
refused with one line.

torch is the oracle here only: the reader never imports it (checked in a subprocess where
``import torch`` fails).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import safetensors.torch
import torch
from helpers import assert_bit_identical, tensor_bytes
from torch import nn

import converters
from converters.codecs import torchscript
from converters.codecs.torch_archive import read_archive
from converters.codecs.torch_pickle import PickleWriter
from converters.core.errors import ConverterError, CorruptFileError, UnsafeFileError, UnsupportedValueError
from converters.core.objects import ObjectRecord
from converters.core.sources import BufferSource, FileRange, read_all
from converters.core.tree import TensorRef
from converters.recipe import Net

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / "cli.py"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


# ------------------------------------------------------------------------------ models


class Block(nn.Module):
    """Submodules registered before a buffer and a parameter (TorchScript declares the tensors first)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.register_buffer("scale", torch.arange(4.0))
        self.register_buffer("scratch", torch.ones(2), persistent=False)  # jit.load keeps it in the state_dict
        self.register_buffer("absent", None)
        self.gain = nn.Parameter(torch.full((4,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))) * self.gain.view(1, 4, 1, 1) + self.scratch.sum()


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("first", torch.zeros(3, dtype=torch.int64))
        self.layer1 = nn.Sequential(Block(), Block())
        self.heads = nn.ModuleDict({"b": nn.Linear(4, 2), "a": nn.Linear(4, 3)})
        self.extra = nn.ParameterList([nn.Parameter(torch.ones(1)), nn.Parameter(torch.zeros(2))])
        self.blocks = nn.ModuleList([nn.Identity(), nn.Linear(2, 2)])
        self.top = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer1(x).mean() * self.top


class SharedParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.head = nn.Linear(4, 4)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class SharedModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(2, 2)
        self.right = self.left

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.right(self.left(x))


class Color(Enum):
    RED = 1
    GREEN = 2


class Pair(NamedTuple):
    a: torch.Tensor
    b: int


with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated: still what we read

    @torch.jit.script
    class Holder:
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t


with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)

    @torch.jit.interface
    class ModuleLike(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pass


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.factor = nn.Parameter(torch.full((2,), 3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def _hook(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    return output


class Attributes(nn.Module):
    """Attributes that are not parameters, buffers or submodules: none is in the state_dict. And a
    submodule typed by an interface, and a forward hook (its code is not carried)."""

    def __init__(self) -> None:
        super().__init__()
        self.interface = Scale()
        self.register_forward_hook(_hook)
        self.holder = Holder(torch.ones(2))
        self.table = {"k": torch.ones(1)}
        self.tensors = [torch.ones(1), torch.zeros(1)]
        self.sizes = [1, 2, 3]
        self.color = Color.RED
        self.ratio = 1.5
        self.nothing = None
        self.plain = torch.full((2,), 7.0)  # a tensor attribute, neither parameter nor buffer
        self.w = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pair = Pair(x, self.sizes[0])
        if self.color == Color.RED:
            x = x + self.ratio
        x = self.interface(x)
        return pair.a + x * self.w + self.holder.t + self.table["k"] + self.tensors[0] + self.plain


class Dtypes(nn.Module):
    """Every dtype TorchScript saves, and views: transposed, offset, empty, 0-d."""

    DTYPES = (
        *(torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int16, torch.int32),
        *(torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128, torch.uint16, torch.uint32),
        *(torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex32, torch.float8_e4m3fnuz),
        torch.float8_e5m2fnuz,
    )

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        for index, dtype in enumerate(self.DTYPES):
            bits = torch.randint(0, 256, (3, 2 * dtype.itemsize), dtype=torch.uint8, generator=generator)
            self.register_buffer(f"b{index}", bits.view(dtype) if dtype != torch.bool else bits % 2 == 1)
        self.register_buffer("transposed", torch.arange(12.0).reshape(3, 4).t())
        self.register_buffer("offset", torch.arange(12.0)[2:7])
        self.register_buffer("empty", torch.ones(0, 3))
        self.register_buffer("zero_d", torch.tensor(3.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


Attributes.__annotations__["interface"] = ModuleLike  # the class itself: this file's annotations are strings


def _conv_bn_relu() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model(torch.randn(2, 3, 8, 8))  # training mode: running stats and num_batches_tracked move
    return model.eval()


def _recipe_net() -> nn.Module:
    torch.manual_seed(0)
    return Net()


MODELS: dict[str, Callable[[], Any]] = {
    "recipe_net": lambda: torch.jit.script(_recipe_net()),
    "conv_bn_relu": lambda: torch.jit.script(_conv_bn_relu()),
    "nested": lambda: torch.jit.script(Nested()),
    "shared_parameter": lambda: torch.jit.script(SharedParameter()),
    "shared_module": lambda: torch.jit.script(SharedModule()),
    "traced": lambda: torch.jit.trace(_recipe_net().eval(), torch.zeros(1, 3, 32, 32)),
    "attributes": lambda: torch.jit.script(Attributes()),
    "dtypes": lambda: torch.jit.script(Dtypes()),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each model scripted (or traced) and saved with torch.jit.save; the recipe Net with .save()."""
    folder = tmp_path_factory.mktemp("jit")
    paths = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, make in MODELS.items():
            paths[name] = folder / f"{name}.jit.pt"
            if name == "recipe_net":
                make().save(str(paths[name]))
            else:
                torch.jit.save(make(), paths[name])
    return paths


def jit_state_dict(path: Path) -> OrderedDict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(path).state_dict()  # type: ignore[no-any-return]


def assert_is_jit_state_dict(path: Path, tree: Any) -> None:
    """``tree`` (ours, neutral) is ``torch.jit.load(path).state_dict()``: type, keys, order,
    ``_metadata``, dtypes, shapes, raw bytes, and the same tensor objects where torch's are tied."""
    expected = jit_state_dict(path)
    assert type(tree) is OrderedDict
    assert list(tree) == list(expected)
    assert tree._metadata == expected._metadata  # type: ignore[attr-defined]
    assert list(tree._metadata) == list(expected._metadata)  # type: ignore[attr-defined]
    for key, tensor in expected.items():
        ref = tree[key]
        assert type(ref) is TensorRef
        assert (f"torch.{ref.dtype}", ref.shape) == (str(tensor.dtype), tuple(tensor.shape)), key
        assert bytes(read_all(ref.source)) == tensor_bytes(tensor), key
    for key, tensor in expected.items():
        for other, other_tensor in expected.items():
            same = tensor.numel() > 0 and (tensor.data_ptr(), tensor.stride()) == (
                other_tensor.data_ptr(),
                other_tensor.stride(),
            )
            if tensor.numel():
                assert (tree[key] is tree[other]) == same, (key, other)


# ------------------------------------------------------------------------------ what is read


@pytest.mark.parametrize("name", list(MODELS))
def test_tree_is_what_torch_jit_load_state_dict_gives(saved: dict[str, Path], name: str) -> None:
    checkpoint = converters.read(saved[name])
    assert (checkpoint.format, checkpoint.kind) == ("pt", "TorchScript archive")
    assert checkpoint.notes == (torchscript.NOTE,) and "not carried" in checkpoint.notes[0]
    assert checkpoint.tree_digest is None
    assert_is_jit_state_dict(saved[name], checkpoint.tree)


def test_a_frozen_module_is_its_empty_state_dict_with_a_note_saying_why(tmp_path: Path) -> None:
    frozen = torch.jit.freeze(torch.jit.script(_conv_bn_relu()))
    path = tmp_path / "frozen.jit.pt"
    torch.jit.save(frozen, path)
    checkpoint = converters.read(path)
    assert_is_jit_state_dict(path, checkpoint.tree)
    assert list(checkpoint.tree) == [] and checkpoint.notes == (torchscript.NOTE, torchscript.FROZEN_NOTE)


def test_the_order_rule_on_real_models(saved: dict[str, Path]) -> None:
    """Per module: parameters, then buffers, in declaration order, then submodules, recursively;
    None tensors left out, non-persistent buffers kept (as jit.load's state_dict has them)."""
    tree = converters.read(saved["nested"]).tree
    block = ["gain", "scale", "scratch", "conv.weight", "bn.weight", "bn.bias"]
    block += ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    assert list(tree) == [
        "top",
        "first",
        *(f"layer1.{index}.{key}" for index in (0, 1) for key in block),
        *("heads.b.weight", "heads.b.bias", "heads.a.weight", "heads.a.bias", "extra.0", "extra.1"),
        *("blocks.1.weight", "blocks.1.bias"),
    ]
    shared = converters.read(saved["shared_module"]).tree
    assert list(shared) == ["left.weight", "left.bias", "right.weight", "right.bias"]
    assert shared["left.weight"] is shared["right.weight"]
    assert list(shared._metadata) == ["", "left", "right"]


def test_contiguous_tensors_stay_byte_ranges_of_the_archive(saved: dict[str, Path]) -> None:
    tree = converters.read(saved["dtypes"]).tree
    assert type(tree["b1"].source) is FileRange  # read in place, streamed by every conversion
    assert type(tree["transposed"].source) is BufferSource  # gathered into C order
    assert tree["transposed"].shape == (4, 3)


def test_cli_convert_then_load_state_dict_gives_identical_outputs(tmp_path: Path, trained: Any) -> None:
    net = trained[0]
    scripted = torch.jit.script(net)
    source = tmp_path / "model.jit.pt"
    scripted.save(str(source))
    destination = tmp_path / "model.safetensors"
    done = subprocess.run(
        [sys.executable, str(CLI), "convert", str(source), str(destination)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    fresh = Net()
    fresh.load_state_dict(safetensors.torch.load_file(destination), strict=True)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(fresh(images), scripted(images))
        assert torch.equal(fresh(images), net(images))


def test_conv_bn_running_stats_load_into_a_fresh_model(saved: dict[str, Path], tmp_path: Path) -> None:
    converters.convert(saved["conv_bn_relu"], tmp_path / "cbr.safetensors")
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    fresh.load_state_dict(safetensors.torch.load_file(tmp_path / "cbr.safetensors"), strict=True)
    assert int(fresh[1].num_batches_tracked) == 1
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(fresh(images), torch.jit.load(saved["conv_bn_relu"])(images))


@pytest.mark.parametrize("destination", ["out.safetensors", "out.pt", "out.msgpack", "out.onnx", "dcp"])
@pytest.mark.parametrize("name", ["nested", "shared_parameter", "dtypes"])
def test_every_destination_format_round_trips(
    saved: dict[str, Path], tmp_path: Path, name: str, destination: str
) -> None:
    source, out = saved[name], tmp_path / destination
    fmt = "dcp" if destination == "dcp" else converters.registry.get(out.suffix[1:]).name
    state_dict = jit_state_dict(source)
    # Not every format holds every dtype (the dtypes model has them all): those it cannot are left out.
    held = converters.registry.get(fmt).dtype_codes
    dropped = [key for key, value in state_dict.items() if str(value.dtype).removeprefix("torch.") not in held]
    assert not dropped or name == "dtypes"
    converters.convert(source, out, dst_format=fmt, exclude=dropped or None)
    expected = OrderedDict((key, value.contiguous()) for key, value in state_dict.items() if key not in dropped)
    expected._metadata = state_dict._metadata  # type: ignore[attr-defined]
    # every format, DCP included (sdconvert.json): the OrderedDict, its _metadata, exact tensors
    assert converters.verify(source, out, exclude=dropped or None) == []
    assert_bit_identical(expected, converters.load(out))
    if name == "shared_parameter":  # the tied parameter is read back as one tensor at both paths
        tree = converters.read(out).tree
        assert tree["embed.weight"] is tree["head.weight"]
    if destination == "out.pt":  # torch's own safe loader reads our .pt
        assert_bit_identical(expected, torch.load(out))


def test_inspect_names_torchscript_and_what_is_not_carried(saved: dict[str, Path]) -> None:
    done = subprocess.run(
        [sys.executable, str(CLI), "inspect", str(saved["conv_bn_relu"])], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    first, note = done.stdout.splitlines()[:2]
    assert "pt (TorchScript archive)" in first and "7 tensors" in first
    assert note == f"note: {torchscript.NOTE}"
    assert re.search(r"^1\.num_batches_tracked +int64 +\[\]$", done.stdout, re.M), done.stdout
    done = subprocess.run(
        [sys.executable, str(CLI), "inspect", "--json", str(saved["conv_bn_relu"])], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    assert manifest["file"]["kind"] == "TorchScript archive" and manifest["file"]["notes"] == [torchscript.NOTE]


# ------------------------------------------------------------------------------ hand-built archives


def _module(cls: str, **attributes: Any) -> ObjectRecord:
    """A TorchScript module object as torch pickles it: ``NEWOBJ`` of its class, a dict state."""
    return ObjectRecord(f"__torch__.{cls}", "new", (), state={"training": True, **attributes}, built=True)


def _tensor(*values: float) -> TensorRef:
    return TensorRef(
        "float32", (len(values),), BufferSource.of(torch.tensor(values, dtype=torch.float32).numpy().tobytes())
    )


def _class_code(
    name: str,
    attributes: dict[str, str],
    parameters: tuple[str, ...] = (),
    buffers: tuple[str, ...] = (),
    *,
    base: str = "Module",
) -> str:
    """A class's code as torch prints it: its lists, then ``name : Type`` lines, then a method."""
    listed = [
        "  __parameters__ = [" + "".join(f'"{item}", ' for item in parameters) + "]",
        "  __buffers__ = [" + "".join(f'"{item}", ' for item in buffers) + "]",
    ]
    lines = [f"class {name}({base}):", *listed, "  training : bool"]
    lines += [f"  {attribute} : {kind}" for attribute, kind in attributes.items()]
    lines += [f"  def forward(self: __torch__.{name},", "    x: Tensor) -> Tensor:", "    return x"]
    return "\n".join(lines) + "\n"


def _archive(
    path: Path, root: Any, code: Mapping[str, str | bytes], *, pickle: Callable[[bytes], bytes] | None = None
) -> Path:
    """A TorchScript archive: data.pkl pickled by our writer (records as NEWOBJ + BUILD, tensors as
    storages), one data/<n> record per tensor, constants.pkl, the code files, version."""
    keys: dict[int, str] = {}
    refs: list[TensorRef] = []

    def key(_path: Any, ref: TensorRef) -> str:
        if id(ref) not in keys:
            keys[id(ref)] = str(len(keys))
            refs.append(ref)
        return keys[id(ref)]

    data = PickleWriter(key, lambda _record: True).dumps(root)  # hostile archives: any record, on purpose
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickle(data) if pickle else data)
        for ref in refs:
            archive.writestr(f"archive/data/{keys[id(ref)]}", bytes(read_all(ref.source)))
        archive.writestr("archive/constants.pkl", b"\x80\x02).")
        for name, text in code.items():
            archive.writestr(f"archive/code/{name}", text.encode() if isinstance(text, str) else text)
        archive.writestr("archive/version", b"3\n")
    return path


def test_order_follows_the_class_declarations_not_the_lists_nor_the_pickle(tmp_path: Path) -> None:
    """The oracle (torch.jit.load) agrees: __parameters__ order and the pickled dict's order do
    not decide; the order the class declares its attributes in does."""
    leaf = _module("Leaf", weight=_tensor(1, 2), bias=_tensor(3))
    state = {"sub": leaf, "b": _tensor(4), "a": _tensor(5), "running": _tensor(6), "extra": 9}
    root = _module("Top", **state)
    code = _class_code(
        "Top", {"a": "Tensor", "running": "Tensor", "b": "Tensor", "sub": "__torch__.Leaf"}, ("b", "a"), ("running",)
    )
    code += _class_code("Leaf", {"bias": "Tensor", "weight": "Tensor"}, ("weight", "bias"))
    path = _archive(tmp_path / "order.pt", root, {"__torch__.py": code})
    tree = converters.read(path).tree
    assert list(tree) == ["a", "b", "running", "sub.bias", "sub.weight"]
    assert_is_jit_state_dict(path, tree)


def test_mangled_class_names_are_found_in_their_code_files(tmp_path: Path) -> None:
    inner = _module("___torch_mangle_3.Linear", weight=_tensor(1, 2))
    root = _module("___torch_mangle_7.Net", fc=inner, scale=_tensor(0.5))
    code = {
        "__torch__/___torch_mangle_7.py": _class_code(
            "Net", {"scale": "Tensor", "fc": "__torch__.___torch_mangle_3.Linear"}, ("scale",)
        ),
        "__torch__/___torch_mangle_3.py": _class_code("Linear", {"weight": "Tensor"}, ("weight",)),
    }
    path = _archive(tmp_path / "mangled.pt", root, code)
    tree = converters.read(path).tree
    assert list(tree) == ["scale", "fc.weight"]
    assert_is_jit_state_dict(path, tree)


def test_parse_code_reads_declarations_only(tmp_path: Path) -> None:
    text = (
        "def helper(x: Tensor) -> Tensor:\n  return x\n"
        "class Box(Module):\n"
        '  __parameters__ = ["0", "w", ]\n'
        "  __buffers__ = []\n"
        '  __forward_hooks__ = ["hook", ]\n'
        "  __annotations__ = []\n"
        '  __annotations__["0"] = Tensor\n'
        "  w : Tensor\n"
        "  k : Final[int] = 3\n"
        "  def forward(self: __torch__.Box,\n"
        "    x: Tensor) -> Tensor:\n"
        "    y : Tensor = x\n"
        "    return y\n"
        "class Holder:\n"
        "  t : Tensor\n"
        "class Color(Enum):\n"
        "  RED = 1\n"
    )
    classes = torchscript.parse_code(text, "__torch__.m", tmp_path / "x.pt")
    assert list(classes) == ["__torch__.m.Box", "__torch__.m.Holder", "__torch__.m.Color"]
    box = classes["__torch__.m.Box"]
    assert (box.module, box.attributes, box.parameters, box.buffers) == (True, ["0", "w"], {"0", "w"}, set())
    assert not classes["__torch__.m.Holder"].module and classes["__torch__.m.Color"].enum


# ------------------------------------------------------------------------------ no code runs


EVIL_CODE = """import os
os.system("touch {marker}")
exec("open('{marker}', 'w')")
class Evil(Module):
  __parameters__ = ["w", ]
  __buffers__ = []
  w : Tensor
  training : bool
  def __init__(self: __torch__.Evil) -> NoneType:
    _0 = open("{marker}", "w")
    return None
  def forward(self: __torch__.Evil,
    x: Tensor) -> Tensor:
    _1 = os.system("touch {marker}")
    return x
"""

NO_TORCH = """
import builtins, sys
sys.modules["torch"] = None  # import torch fails from here on
sys.path.insert(0, sys.argv[1])
import encodings.cp437  # zip names without the UTF-8 flag (our hand-built archive's)
import converters
converters.read(sys.argv[2])  # warm: every lazily imported module of the reader is imported
def refuse(*args, **kwargs):
    raise AssertionError("code was compiled or run")
builtins.exec = builtins.eval = builtins.compile = refuse
for path in sys.argv[2:]:
    checkpoint = converters.read(path)
    print(checkpoint.kind, list(checkpoint.tree))
assert sys.modules["torch"] is None
"""


def test_no_code_runs_and_torch_is_never_imported(saved: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    root = _module("Evil", w=_tensor(1.0))
    evil = _archive(tmp_path / "evil.pt", root, {"__torch__.py": EVIL_CODE.format(marker=marker)})
    paths = [saved["nested"], saved["traced"], evil]
    done = subprocess.run([sys.executable, "-c", NO_TORCH, str(ROOT), *map(str, paths)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"TorchScript archive {list(jit_state_dict(saved['nested']))}"
    assert lines[1] == f"TorchScript archive {list(jit_state_dict(saved['traced']))}"
    assert lines[2] == "TorchScript archive ['w']"
    assert not marker.exists()


# ------------------------------------------------------------------------------ hostile archives


def _with(cls_code: str, **attributes: Any) -> tuple[Any, dict[str, str | bytes]]:
    return _module("M", **attributes), {"__torch__.py": cls_code}


def _cycle() -> tuple[Any, dict[str, str | bytes]]:
    root = _module("M", w=_tensor(1))
    root.state["me"] = root  # the pickle's memo makes it the same object
    return root, {"__torch__.py": _class_code("M", {"w": "Tensor", "me": "__torch__.M"}, ("w",))}


def _doubling(levels: int) -> tuple[Any, dict[str, str | bytes]]:
    """Each level holds the next one twice (one object, by the memo): 2**levels paths."""
    node = _module("M", w=_tensor(1), a=None, b=None)
    for _ in range(levels):
        node = _module("M", w=_tensor(1), a=node, b=node)
    code = _class_code("M", {"w": "Tensor", "a": "Optional[__torch__.M]", "b": "Optional[__torch__.M]"}, ("w",))
    return node, {"__torch__.py": code}


def _nested(levels: int) -> tuple[Any, dict[str, str | bytes]]:
    node = _module("M", w=_tensor(1), sub=None)
    for _ in range(levels):
        node = _module("M", w=_tensor(1), sub=node)
    return node, {"__torch__.py": _class_code("M", {"w": "Tensor", "sub": "Optional[__torch__.M]"}, ("w",))}


ONE_W = _class_code("M", {"w": "Tensor"}, ("w",))

HOSTILE: dict[str, tuple[Callable[[], tuple[Any, dict[str, str | bytes]]], type[ConverterError], str]] = {
    "code not UTF-8": (
        lambda: _with(b"\xff\xfe" + ONE_W.encode(), w=_tensor(1)),  # type: ignore[arg-type]
        CorruptFileError,
        r"code record code/__torch__\.py is not UTF-8",
    ),
    "parameter names a missing attribute": (
        lambda: _with(_class_code("M", {"w": "Tensor"}, ("w", "ghost")), w=_tensor(1)),
        CorruptFileError,
        r"lists 'ghost' in __parameters__ of class M, which the class does not declare",
    ),
    "parameter that is not a tensor": (
        lambda: _with(ONE_W, w=[1, 2]),
        UnsupportedValueError,
        r"the parameter 'w' \(class '__torch__\.M'\) is a list, not a tensor",
    ),
    "buffer that is a module": (
        lambda: _with(
            _class_code("M", {"w": "Tensor", "sub": "__torch__.M"}, ("w",), ("sub",)), w=_tensor(1), sub=_module("M")
        ),
        UnsupportedValueError,
        r"the buffer 'sub' .* is a __torch__\.M object, not a tensor",
    ),
    "malformed parameter list": (
        lambda: _with(ONE_W.replace('["w", ]', '["w" "v"]'), w=_tensor(1)),
        CorruptFileError,
        r"__parameters__ list of class M that is not a list of names",
    ),
    "parameter list without brackets": (
        lambda: _with(ONE_W.replace('["w", ]', '"w"'), w=_tensor(1)),
        CorruptFileError,
        r"__parameters__ or __buffers__ line of class M it cannot read",
    ),
    "module class without its lists": (
        lambda: _with(ONE_W.replace("  __buffers__ = []\n", ""), w=_tensor(1)),
        CorruptFileError,
        r"module class M without __parameters__ and __buffers__",
    ),
    "class declared twice": (
        lambda: _with(ONE_W + ONE_W, w=_tensor(1)),
        CorruptFileError,
        r"declares the class M twice",
    ),
    "declared attribute missing from the pickle": (
        lambda: _with(_class_code("M", {"w": "Tensor", "sub": "__torch__.M"}, ("w",)), w=_tensor(1)),
        CorruptFileError,
        r"declares the attribute 'sub', which data\.pkl does not give it",
    ),
    "module state that is not a dict": (
        lambda: (ObjectRecord("__torch__.M", "new", (), state=[1, 2], built=True), {"__torch__.py": ONE_W}),
        CorruptFileError,
        r"the module at '<root>' \(class '__torch__\.M'\) has a list; a TorchScript module is made",
    ),
    "module without state": (
        lambda: (ObjectRecord("__torch__.M", "new", ()), {"__torch__.py": ONE_W}),
        CorruptFileError,
        r"has no state",
    ),
    "module that contains itself": (_cycle, CorruptFileError, r"the module at 'me' contains itself"),
    "class no code declares": (
        lambda: (_module("Ghost", w=_tensor(1)), {"__torch__.py": ONE_W}),
        CorruptFileError,
        r"an object of class '__torch__\.Ghost', which no code record of the archive declares",
    ),
    "root that is not a module": (
        lambda: ({"w": _tensor(1)}, {"__torch__.py": ONE_W}),
        CorruptFileError,
        r"data\.pkl holds a dict where a TorchScript archive holds its module",
    ),
    "root of a class that is not a module": (
        lambda: (_module("M", w=_tensor(1)), {"__torch__.py": ONE_W.replace("(Module)", "")}),
        CorruptFileError,
        r"holds a __torch__\.M object where a TorchScript archive holds its module",
    ),
    "dangerous global": (
        lambda: _with(ONE_W, w=_tensor(1), hook=ObjectRecord("os.system", "global")),
        UnsafeFileError,
        r"asks for the global os\.system .*which can run code",
    ),
    "jit global that is not a list builder": (
        lambda: _with(ONE_W, w=_tensor(1), x=ObjectRecord("torch.jit._pickle.build_tensor_from_id", "call", (0,))),
        UnsafeFileError,
        r"torch\.jit\._pickle\.build_tensor_from_id .*which can run code",
    ),
    "list builder given a number": (
        lambda: _with(ONE_W, w=_tensor(1), x=ObjectRecord("torch.jit._pickle.build_intlist", "call", (5,))),
        CorruptFileError,
        r"a TorchScript list builder must be given one list",
    ),
    "type tag without a type name": (
        lambda: _with(ONE_W, w=_tensor(1), x=ObjectRecord("torch.jit._pickle.restore_type_tag", "call", ({}, 3))),
        CorruptFileError,
        r"restore_type_tag must be given a value and a type name",
    ),
    "shared modules doubling at each level": (lambda: _doubling(60), ConverterError, r"limit|more than"),
    "modules nested too deep": (lambda: _nested(130), CorruptFileError, r"nests containers deeper than 256 levels"),
    "a name in both lists": (
        lambda: _with(_class_code("M", {"w": "Tensor"}, ("w",), ("w",)), w=_tensor(1)),
        CorruptFileError,
        r"names 'w' twice, or not in printable ASCII, in the lists of class M",
    ),
    "annotation line not in torch's form": (
        lambda: _with(ONE_W + '  __annotations__["a"b"] = Tensor\n', w=_tensor(1)),
        CorruptFileError,
        r"__annotations__ line of class M it cannot read",
    ),
    "module made with arguments": (
        lambda: (
            ObjectRecord("__torch__.M", "new", (1,), state={"training": True, "w": _tensor(1)}, built=True),
            {"__torch__.py": ONE_W},
        ),
        CorruptFileError,
        r"has a dict; a TorchScript module is made without arguments",
    ),
}


def _build(tmp_path: Path, name: str) -> Path:
    make = HOSTILE[name][0]
    root, code = make()
    return _archive(tmp_path / "hostile.pt", root, code)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_archive_is_refused_naming_the_file(tmp_path: Path, name: str) -> None:
    path = _build(tmp_path, name)
    _, error, message = HOSTILE[name]
    with pytest.raises(error, match=message) as caught:
        converters.read(path)
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


def test_an_enum_member_is_one_value_only_for_an_enum_class(tmp_path: Path) -> None:
    """TorchScript pickles an enum member as REDUCE(class, value) with a bare value: read for a
    class the code declares as an Enum, refused for any other."""
    for base, refused in (("Enum", False), ("Module", True)):
        member = ObjectRecord("__torch__.Color", "call", (7,))
        code = ONE_W + _class_code("Color", {}, base=base)
        path = _archive(
            tmp_path / f"{base}.pt",
            _module("M", w=_tensor(1), color=member),
            {"__torch__.py": code},
            pickle=lambda data: data.replace(b"c__torch__\nColor\n(K\x07tR", b"c__torch__\nColor\nK\x07R"),
        )
        if refused:
            with pytest.raises(CorruptFileError, match=r"calls __torch__\.Color with an int as arguments"):
                converters.read(path)
        else:
            assert list(converters.read(path).tree) == ["w"]


def test_a_quantized_torchscript_module_is_refused_naming_what_to_do(tmp_path: Path) -> None:
    model = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(4, 4)), {nn.Linear}, dtype=torch.qint8)
    path = tmp_path / "quantized.jit.pt"
    torch.jit.save(torch.jit.script(model), path)
    with pytest.raises(UnsupportedValueError, match=r"a quantized tensor\) is not read: save tensor\.dequantize\(\)"):
        converters.read(path)


def test_a_huge_code_file_is_refused_before_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _archive(tmp_path / "big.pt", _module("M", w=_tensor(1)), {"__torch__.py": ONE_W + "#" * 500})
    monkeypatch.setattr(torchscript, "MAX_CODE_BYTES", 400)
    with pytest.raises(UnsupportedValueError, match=r"code/__torch__\.py holds \d+ bytes; .* only up to 400 bytes"):
        converters.read(path)


def test_a_torch_save_reader_still_refuses_a_torchscript_archive(saved: dict[str, Path]) -> None:
    """DCP data files hold torch.save archives only: the plain archive reader refuses TorchScript."""
    with pytest.raises(UnsupportedValueError, match=r"TorchScript archive .* where a torch\.save archive was expected"):
        read_archive(saved["shared_parameter"])


@pytest.mark.parametrize("name", ["parameter that is not a tensor", "module that contains itself", "dangerous global"])
def test_cli_exits_2_with_one_line(tmp_path: Path, name: str) -> None:
    path = _build(tmp_path, name)
    destination = tmp_path / "out.safetensors"
    for command in (["convert", str(path), str(destination)], ["inspect", str(path)]):
        done = subprocess.run([sys.executable, str(CLI), *command], capture_output=True, text=True)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and str(path) in done.stderr and "Traceback" not in done.stderr
    assert not destination.exists()
