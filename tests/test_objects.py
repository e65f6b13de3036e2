"""Checkpoints holding objects beyond the tree types (issue 14, parts 4, 5 and 8).

Each class family is made the way its library makes it (``torch.save`` of the real object; for
Lightning's ``AttributeDict`` a stand-in class registered under Lightning's module name, because
Lightning itself is too heavy to install for a test: the pickle stream is the same, a dict subclass
rebuilt by NEWOBJ + SETITEMS). The oracle is torch: ``torch.load(weights_only=False)`` of the
original and of the ``.pt`` written back after a trip through every other format give equal objects.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import enum
import io
import pathlib
import pickle
import pickletools
import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import tensor_bytes
from omegaconf import DictConfig, ListConfig, OmegaConf

import converters
from converters.cli import main
from converters.codecs import pickle_objects
from converters.codecs.torch_pickle import ALLOWED_GLOBALS, _global_allowed
from converters.core.errors import UnsafeFileError, UnsupportedValueError
from converters.core.objects import NumpyScalar, ObjectRecord

THROUGH = ["x.safetensors", "x.msgpack", "x.onnx", "shards", "dcp"]


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@dataclasses.dataclass
class Hyper:
    lr: float
    layers: list[int]


class WithState:
    def __init__(self, value: int) -> None:
        self.value = value

    def __getstate__(self) -> dict[str, int]:
        return {"v": self.value}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.value = state["v"]

    def __eq__(self, other: object) -> bool:
        return type(other) is WithState and other.value == self.value


def _lightning_attribute_dict() -> type:
    """Lightning's ``AttributeDict`` (a dict subclass with attribute access), registered under the
    module name Lightning pickles it with."""
    name = "pytorch_lightning.utilities.parsing"
    if name not in sys.modules:
        module = types.ModuleType(name)

        class AttributeDict(dict):  # type: ignore[type-arg]
            def __getattr__(self, key: str) -> Any:
                return self[key]

        AttributeDict.__module__ = name
        AttributeDict.__qualname__ = "AttributeDict"
        module.AttributeDict = AttributeDict  # type: ignore[attr-defined]
        for parent in ("pytorch_lightning", "pytorch_lightning.utilities"):
            sys.modules.setdefault(parent, types.ModuleType(parent))
        sys.modules[name] = module
    return sys.modules[name].AttributeDict  # type: ignore[no-any-return]


def _families() -> dict[str, Any]:
    attribute_dict = _lightning_attribute_dict()
    return {
        "namespace": argparse.Namespace(lr=0.1, arch="resnet", layers=[2, 2], flag=True, none=None),
        "posix_path": pathlib.PurePosixPath("/data/imagenet"),
        "path": pathlib.Path("runs/exp1"),
        "datetime": datetime.datetime(2024, 3, 1, 12, 30, 5, 123),
        "date": datetime.date(2020, 2, 29),
        "timedelta": datetime.timedelta(days=2, seconds=5),
        "set": {1, 2, 3},
        "frozenset": frozenset({"a", "b"}),
        "bytes": b"\x00\xff raw",
        "bytearray": bytearray(b"abc"),
        "complex": 1.5 - 2j,
        "size": torch.Size([3, 4]),
        "device": torch.device("cpu"),
        "dtype": torch.bfloat16,
        "defaultdict": collections.defaultdict(list, {"a": [1], "b": []}),
        "deque": collections.deque([1, 2, 3], maxlen=5),
        "ordered": collections.OrderedDict(b=1, a=2),
        "numpy_f32": np.arange(12, dtype=np.float32).reshape(3, 4),
        "numpy_i64": np.array([-1, 2**40], dtype=np.int64),
        "numpy_bool": np.array([True, False]),
        "numpy_f64_scalar": np.float64(0.75),
        "numpy_i32_scalar": np.int32(-7),
        "numpy_bool_scalar": np.bool_(True),
        "omegaconf": OmegaConf.create({"lr": 0.1, "model": {"layers": [1, 2], "name": "x"}, "opt": None}),
        "omegaconf_list": OmegaConf.create([1, {"a": 2}]),
        "lightning_hparams": attribute_dict(lr=0.01, batch_size=32),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return type(b) is torch.Tensor and a.dtype == b.dtype and tensor_bytes(a) == tensor_bytes(b)
    if isinstance(a, np.ndarray):
        return type(b) is np.ndarray and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, np.generic):
        return type(a) is type(b) and a.tobytes() == b.tobytes()
    if isinstance(a, (DictConfig, ListConfig)):
        return type(a) is type(b) and OmegaConf.to_container(a) == OmegaConf.to_container(b)
    if isinstance(a, collections.deque):
        return type(b) is collections.deque and list(a) == list(b) and a.maxlen == b.maxlen
    if isinstance(a, collections.defaultdict):
        return type(b) is collections.defaultdict and a == b and a.default_factory is b.default_factory
    return type(a) is type(b) and a == b


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("objects") / "a.pt"
    torch.save({"w": torch.randn(3, 2), **_families()}, path)
    return path


@pytest.mark.parametrize("through", THROUGH)
def test_every_family_survives_every_format_and_comes_back_as_the_object(
    tmp_path: Path, original: Path, through: str
) -> None:
    middle, back = tmp_path / through, tmp_path / "back.pt"
    extra = {"shards": ["--max-shard-size", "1000"], "dcp": ["--to", "dcp"]}.get(through, [])
    assert main(["convert", str(original), str(middle), "--quiet", *extra]) == 0
    assert main(["convert", str(middle), str(back), "--quiet"]) == 0
    assert converters.verify(original, back) == []
    assert converters.verify(middle, deep=True) == []
    expected = torch.load(original, weights_only=False)
    got = torch.load(back, weights_only=False)
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert _same(value, got[key]), key
    # parent pointers come back as parent pointers
    assert got["omegaconf"].model._get_parent() is got["omegaconf"]
    if through == "dcp":  # torch's own DCP reader gives every object back too (each value is a torch.save pickle)
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(str(middle), str(tmp_path / "torch.pt"))
        by_torch = torch.load(tmp_path / "torch.pt", weights_only=False)
        assert list(by_torch) == list(expected)
        for key, value in expected.items():  # dcp.load rebuilds a mapping of the tree as a dict
            assert _same(dict(value) if type(value) is collections.OrderedDict else value, by_torch[key]), key


def test_load_gives_numpy_values_and_torch_safe_values_and_inert_records(original: Path) -> None:
    tree = converters.load(original)
    assert type(tree["numpy_f32"]) is np.ndarray and tree["numpy_f32"].dtype == np.float32
    assert tree["numpy_f32"].tobytes() == np.arange(12, dtype=np.float32).tobytes()
    assert type(tree["numpy_f64_scalar"]) is np.float64 and tree["numpy_f64_scalar"] == 0.75
    assert type(tree["numpy_i32_scalar"]) is np.int32
    assert tree["size"] == torch.Size([3, 4]) and type(tree["size"]) is torch.Size
    assert tree["dtype"] is torch.bfloat16 and tree["device"] == torch.device("cpu")
    assert tree["set"] == {1, 2, 3} and tree["complex"] == 1.5 - 2j and tree["bytes"] == b"\x00\xff raw"
    namespace = tree["namespace"]
    assert type(namespace) is ObjectRecord and namespace.name == "argparse.Namespace" and namespace.how == "new"
    assert namespace.state == {"lr": 0.1, "arch": "resnet", "layers": [2, 2], "flag": True, "none": None}
    read = converters.read(original)
    assert read.tree["numpy_f64_scalar"] == NumpyScalar("<f8", np.float64(0.75).tobytes())
    assert read.tree["numpy_f32"].numpy


def test_inspect_lists_records_with_their_classes(original: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(original)]) == 0
    text = capsys.readouterr().out
    assert "namespace: argparse.Namespace(lr=0.1, arch='resnet', layers=[2, 2], flag=True, none=None)" in text
    assert "numpy_f64_scalar: numpy.float64(0.75)" in text
    assert re.search(r"^numpy_f32 +float32   \[3, 4\]  \(numpy array\)$", text, re.M)
    assert "records:" in text and "  omegaconf: omegaconf.dictconfig.DictConfig" in text
    assert "  set: builtins.set" in text


def test_user_classes_need_allow_class_to_be_written_back(tmp_path: Path) -> None:
    source = tmp_path / "user.pt"
    torch.save({"mode": Mode.FAST, "hyper": Hyper(0.1, [1, 2]), "state": WithState(5)}, source)
    middle = tmp_path / "user.safetensors"
    assert main(["convert", str(source), str(middle), "--quiet"]) == 0
    tree = converters.read(middle).tree
    assert tree["mode"].name == f"{__name__}.Mode" and tree["mode"].args == ("fast",)
    assert tree["state"].state == {"v": 5}
    refused = converters.DestinationError, UnsupportedValueError
    with pytest.raises(refused, match=rf"at mode: the recorded object of class {__name__}.Mode is not on the list"):
        converters.convert(middle, tmp_path / "no.pt")
    assert not (tmp_path / "no.pt").exists()
    back = tmp_path / "back.pt"
    allow = [f"{__name__}.{name}" for name in ("Mode", "Hyper", "WithState")]
    converters.convert(middle, back, allow_class=tuple(allow))
    got = torch.load(back, weights_only=False)
    assert got["mode"] is Mode.FAST and got["hyper"] == Hyper(0.1, [1, 2]) and got["state"] == WithState(5)
    # the CLI flag, repeatable
    flags = [arg for name in allow for arg in ("--allow-class", name)]
    assert main(["convert", str(middle), str(tmp_path / "cli.pt"), "--quiet", *flags]) == 0


def test_drop_objects_keeps_weights_and_torch_safe_values(tmp_path: Path, original: Path) -> None:
    out = tmp_path / "weights.pt"
    assert main(["convert", str(original), str(out), "--quiet", "--drop-objects"]) == 0
    got = torch.load(out, weights_only=False)
    assert "namespace" not in got and "omegaconf" not in got and "deque" not in got
    assert got["size"] == torch.Size([3, 4]) and got["set"] == {1, 2, 3} and "numpy_f32" in got
    # weights_only=True reads what is left apart from numpy (which torch allows only by safe_globals)
    without_numpy = tmp_path / "plain.pt"
    assert main(["convert", str(out), str(without_numpy), "--quiet", "--exclude", "numpy_*"]) == 0
    safe = torch.load(without_numpy, weights_only=True)
    assert safe["dtype"] is torch.bfloat16 and safe["bytes"] == b"\x00\xff raw" and safe["complex"] == 1.5 - 2j


def test_dry_run_lists_dropped_objects(original: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(original), "x.pt", "--dry-run", "--drop-objects"]) == 0
    text = capsys.readouterr().out
    assert "namespace  a recorded argparse.Namespace object  (--drop-objects)" in text


def test_dcp_refuses_a_record_a_pt_could_not_recreate_and_takes_it_with_allow_class(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """User classes (not data-only) are recorded by a trip through safetensors; a DCP folder holds
    them only with --allow-class, as a .pt does, and torch's own DCP reader re-creates them then."""
    source = tmp_path / "user.pt"
    torch.save({"w": torch.ones(2), "mode": Mode.FAST, "hyper": Hyper(0.1, [1, 2]), "state": WithState(5)}, source)
    middle = tmp_path / "user.safetensors"
    assert main(["convert", str(source), str(middle), "--quiet"]) == 0
    out = tmp_path / "d"
    refused = converters.DestinationError, UnsupportedValueError
    with pytest.raises(refused, match=rf"^at mode: the recorded object of class {__name__}\.Mode is not on the list"):
        converters.convert(middle, out, dst_format="dcp")
    assert not out.exists()
    capsys.readouterr()
    assert main(["convert", str(middle), str(out), "--to", "dcp", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "at mode:" in error and f"--allow-class {__name__}.Mode" in error, error
    assert "Traceback" not in error and not out.exists()
    allow = tuple(f"{__name__}.{name}" for name in ("Mode", "Hyper", "WithState"))
    converters.convert(middle, out, dst_format="dcp", allow_class=allow)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(out), str(tmp_path / "torch.pt"))
    got = torch.load(tmp_path / "torch.pt", weights_only=False)
    assert got["mode"] is Mode.FAST and got["hyper"] == Hyper(0.1, [1, 2]) and got["state"] == WithState(5)
    assert converters.verify(middle, out) == []  # and our reader gives the records back as written


def test_dcp_drop_objects_keeps_weights_and_torch_safe_values(tmp_path: Path, original: Path) -> None:
    converters.convert(original, tmp_path / "d", dst_format="dcp", drop_objects=True)
    tree = converters.load(tmp_path / "d")
    assert "namespace" not in tree and "omegaconf" not in tree and "deque" not in tree
    assert tree["dtype"] is torch.bfloat16 and type(tree["numpy_f32"]) is np.ndarray


def test_protocol_4_pickles_read_the_same(tmp_path: Path) -> None:
    path = tmp_path / "p4.pt"
    value = {"s": {1, 2}, "f": frozenset({3}), "b": b"xy", "ns": argparse.Namespace(a=1)}
    torch.save(value, path, pickle_protocol=4)
    tree = converters.read(path).tree
    assert tree["s"].name == "builtins.set" and tree["s"].args == ([1, 2],)
    assert tree["f"].name == "builtins.frozenset" and tree["b"] == b"xy"
    assert converters.load(path)["s"] == {1, 2}


def test_everything_torchs_safe_loader_accepts_is_accepted() -> None:
    """torch's own list of safe globals, enumerated from torch: none is refused as dangerous."""
    from torch import _weights_only_unpickler

    for dotted in _weights_only_unpickler._get_allowed_globals():
        module, _, name = dotted.rpartition(".")
        assert _global_allowed(module, name, None), dotted
        assert not pickle_objects.is_dangerous(dotted) or (module, name) in ALLOWED_GLOBALS, dotted


def test_a_checkpoint_torchs_safe_loader_reads_gives_the_same_values(tmp_path: Path) -> None:
    path = tmp_path / "safe.pt"
    value = {
        "dtype": torch.float16,
        "device": torch.device("cpu"),
        "size": torch.Size([2]),
        "bytes": b"\x01",
        "bytearray": bytearray(b"\x02"),
        "set": {"a"},
        "complex": 2j,
        "t": torch.ones(2),
        "p": torch.nn.Parameter(torch.zeros(1)),
    }
    torch.save(value, path)
    safe = torch.load(path, weights_only=True)
    ours = converters.load(path)
    for key in value:
        if isinstance(safe[key], torch.Tensor):
            assert tensor_bytes(ours[key]) == tensor_bytes(safe[key])
        else:
            assert type(ours[key]) is type(safe[key]) and ours[key] == safe[key], key


# ------------------------------------------------------------------------------ hostile


def _pickle_zip(tmp_path: Path, payload: bytes) -> Path:
    path = tmp_path / "payload.pt"
    torch.save({"w": torch.ones(1)}, path)
    data = path.read_bytes()
    buffer = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as out:
        for item in source.infolist():
            out.writestr(item, payload if item.filename.endswith("data.pkl") else source.read(item))
    path.write_bytes(buffer.getvalue())
    return path


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00ls\x85R.", "posix.system at byte 2, which can run code"),
        (b"\x80\x02cbuiltins\nexec\nX\x01\x00\x00\x001\x85R.", "builtins.exec at byte 2, which can run code"),
        (b"\x80\x02cimportlib\nimport_module\nX\x02\x00\x00\x00os\x85R.", "importlib.import_module at byte 2"),
        (b"\x80\x02ctorch\nload\nX\x01\x00\x00\x00x\x85R.", "torch.load at byte 2, which can run code"),
        (b"\x80\x02cargparse\nNamespace.__init__\n)R.", "argparse.Namespace.__init__ at byte 2"),
        (b"\x80\x02c__builtin__\neval\nX\x01\x00\x00\x001\x85R.", "__builtin__.eval at byte 2"),
        (b"\x80\x02cfunctools\npartial\n)R.", "functools.partial at byte 2"),
    ],
)
def test_payload_globals_are_still_refused(tmp_path: Path, payload: bytes, message: str) -> None:
    with pytest.raises(UnsafeFileError, match=message.replace(".", r"\.")):
        converters.read(_pickle_zip(tmp_path, payload))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        # calling the result of a call: its state cannot be captured without running the first call
        (b"\x80\x02cargparse\nNamespace\n)R)R.", "data.pkl calls a argparse.Namespace object"),
        # NEWOBJ of something that is not a class named by GLOBAL
        (b"\x80\x02}q\x00)\x81.", "data.pkl's NEWOBJ makes a dict"),
        # BUILD twice on one object
        (b"\x80\x02cargparse\nNamespace\n)\x81}b}b.", "applies BUILD twice to a argparse.Namespace object"),
        # BUILD on a class itself
        (b"\x80\x02cargparse\nNamespace\n}b.", "applies BUILD to the global argparse.Namespace"),
    ],
)
def test_record_capture_refuses_what_it_cannot_capture_inertly(tmp_path: Path, payload: bytes, message: str) -> None:
    with pytest.raises(UnsafeFileError, match=message):
        converters.read(_pickle_zip(tmp_path, payload))


def _globals_of(pt: Path) -> set[str]:
    import zipfile

    with zipfile.ZipFile(pt) as archive:
        data = archive.read(next(name for name in archive.namelist() if name.endswith("data.pkl")))
    found = set()
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.add(str(arg).replace(" ", "."))
    return found


def test_a_record_naming_a_dangerous_class_never_becomes_an_executable_pickle(tmp_path: Path) -> None:
    """A file whose tree (JSON, in safetensors) holds a record naming ``os.system``: reading keeps
    it inert; writing .pt refuses it, even when the user allows the class by name."""
    from safetensors.torch import save_file

    node = {
        "dict": [
            ["w", {"tensor": "w"}],
            ["evil", {"record": {"class": "os.system", "how": "call", "args": [{"str": "touch /tmp/pwned"}]}}],
        ]
    }
    import json

    path = tmp_path / "evil.safetensors"
    save_file({"w": torch.ones(1)}, str(path), metadata={"format": "pt", "sdconvert.tree": json.dumps(node)})
    tree = converters.read(path).tree
    assert type(tree["evil"]) is ObjectRecord and tree["evil"].name == "os.system"
    for allow in ((), ("os.system",)):
        with pytest.raises(UnsupportedValueError, match=r"at evil: the recorded object of class os\.system"):
            converters.convert(path, tmp_path / "out.pt", allow_class=allow)
    assert not (tmp_path / "out.pt").exists()


def test_pt_to_safetensors_to_pt_writes_only_data_only_globals(tmp_path: Path, original: Path) -> None:
    middle, back = tmp_path / "m.safetensors", tmp_path / "b.pt"
    converters.convert(original, middle)
    converters.convert(middle, back)
    allowed = pickle_objects.DATA_CLASSES | {"torch._utils._rebuild_tensor_v2", "collections.OrderedDict"}
    allowed |= {"_codecs.encode", "torch.FloatStorage", "numpy.core.multiarray._reconstruct"}
    for dotted in _globals_of(back):
        assert dotted in allowed or (dotted.startswith("torch.") and not pickle_objects.is_dangerous(dotted)), dotted


def test_msgpack_bin_values_are_bytes(tmp_path: Path) -> None:
    import msgpack

    path = tmp_path / "b.msgpack"
    path.write_bytes(msgpack.packb({"b": b"raw", "n": 1}, use_bin_type=True))
    assert converters.read(path).tree == {"b": b"raw", "n": 1}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: torch.eye(3).to_sparse(), "at x/t: a sparse tensor is not read: save tensor.to_dense()"),
        (lambda: torch.empty(3, device="meta"), "at x/t: a meta tensor is not read"),
        (
            lambda: torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8),
            "torch.QInt8Storage \\(a quantized tensor\\) is not read",
        ),
    ],
)
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_tensors_that_are_not_read_say_what_they_are(tmp_path: Path, make: Any, message: str) -> None:
    path = tmp_path / "t.pt"
    torch.save({"x": {"t": make()}}, path)
    with pytest.raises(UnsupportedValueError, match=message):
        converters.read(path)
    assert main(["inspect", str(path)]) == 2


def test_a_whole_pickled_module_says_to_save_its_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(UnsupportedValueError, match=r"whole pickled torch.nn.Module .*save model.state_dict\(\)"):
        converters.read(path)


def test_numpy_arrays_that_are_not_numeric_are_refused_by_path(tmp_path: Path) -> None:
    path = tmp_path / "n.pt"
    torch.save({"names": np.array(["a", "bc"])}, path)
    with pytest.raises(UnsupportedValueError, match="at names: a numpy array of dtype '<U2' is not read"):
        converters.read(path)


def test_the_pickle_of_a_record_is_what_pickle_itself_writes(original: Path, tmp_path: Path) -> None:
    """Protocol-2 opcodes only, and every object the same as pickle's own after a round trip."""
    back = tmp_path / "b.pt"
    converters.convert(original, back)
    expected = pickle.loads(pickle.dumps(torch.load(original, weights_only=False)["namespace"], protocol=2))
    assert torch.load(back, weights_only=False)["namespace"] == expected


# ------------------------------------------------------------------------------ review findings


def _tree_file(tmp_path: Path, node: dict[str, Any]) -> Path:
    """A safetensors file whose stored tree (JSON) is ``node``: how a hostile manifest arrives."""
    import json

    from safetensors.torch import save_file

    path = tmp_path / "crafted.safetensors"
    save_file({"w": torch.ones(1)}, str(path), metadata={"format": "pt", "sdconvert.tree": json.dumps(node)})
    return path


def _record(name: str, how: str = "call", args: list[Any] | None = None) -> dict[str, Any]:
    return {"record": {"class": name, "how": how, "args": args or []}}


@pytest.mark.parametrize(
    ("node", "message"),
    [
        # a record in an OrderedDict's _metadata (walked by nobody that checks classes): refused
        (
            {
                "dict": [
                    ["w", {"tensor": "w"}],
                    ["m", {"odict": [], "metadata": {"dict": [["x", _record("builtins.print")]]}}],
                ]
            },
            "_metadata holds a recorded object",
        ),
        # a record among its own constructor arguments: pickle cannot make it
        (
            {"dict": [["w", {"tensor": "w"}], ["a", _record("argparse.Namespace", args=[{"list": [{"backref": 1}]}])]]},
            "backref",
        ),
        # a global is a name: no arguments
        (
            {"dict": [["w", {"tensor": "w"}], ["g", _record("typing.Any", "global", [{"int": 1}])]]},
            "is a name, not an object",
        ),
        # an ndarray node naming a dtype numpy has no name for
        ({"dict": [["w", {"ndarray": "w"}]]}, None),
        # a numpy scalar whose bytes do not fit its dtype, or whose dtype is not numeric
        ({"dict": [["w", {"tensor": "w"}], ["s", {"npscalar": ["<f8", "00"]}]]}, "holds 8 bytes, found 1"),
        ({"dict": [["w", {"tensor": "w"}], ["s", {"npscalar": ["|O8", "00" * 8]}]]}, "numeric dtype"),
    ],
)
def test_a_crafted_tree_is_refused(tmp_path: Path, node: dict[str, Any], message: str | None) -> None:
    path = _tree_file(tmp_path, node)
    if message is None:  # float32 "w" as ndarray is fine: use a bfloat16 tensor instead
        import json

        from safetensors.torch import save_file

        save_file({"w": torch.ones(1, dtype=torch.bfloat16)}, str(path), metadata={"sdconvert.tree": json.dumps(node)})
        message = "a numpy array cannot hold bfloat16"
    with pytest.raises(converters.ConverterError, match=re.escape(message)):
        converters.read(path)


def test_the_pickle_writer_refuses_any_record_it_is_not_allowed_to_make(tmp_path: Path) -> None:
    """The last guard sits in the writer itself: a record the tree checks never saw is still refused."""
    from converters.codecs.torch_pickle import PickleWriter

    hidden = ObjectRecord(
        "argparse.Namespace", "new", (), state={"x": ObjectRecord("os.system", "call", ("id",))}, built=True
    )
    with pytest.raises(UnsupportedValueError, match="may not be re-created"):
        PickleWriter(lambda _path, _ref: "0").dumps({"a": hidden})  # by default no record may be written
    allowed = frozenset({"argparse.Namespace"})
    with pytest.raises(UnsupportedValueError, match=r"os\.system may not be re-created"):
        PickleWriter(
            lambda _path, _ref: "0", lambda record: pickle_objects.writable(record, allowed, frozenset())
        ).dumps({"a": hidden})


def test_a_set_that_holds_itself_is_refused_when_written(tmp_path: Path) -> None:
    """EMPTY_SET, ADDITEMS of itself: a hostile pickle can build it; no writer can write it."""
    payload = b"\x80\x04\x8f\x94(h\x00\x90."  # EMPTY_SET, MEMOIZE, MARK, BINGET 0, ADDITEMS, STOP
    path = _pickle_zip(tmp_path, payload)
    with pytest.raises(converters.ConverterError, match="among its own constructor arguments"):
        converters.convert(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_python2_spellings_of_dangerous_names_are_dangerous(tmp_path: Path) -> None:
    for name in ("__builtin__.eval", "__builtin__.getattr", "copy_reg._reconstructor", "torch.fx.graph_module.x"):
        assert pickle_objects.is_dangerous(name), name
    node = {"dict": [["w", {"tensor": "w"}], ["e", _record("__builtin__.eval", args=[{"str": "1"}])]]}
    path = _tree_file(tmp_path, node)
    with pytest.raises(UnsupportedValueError, match=r"can run code: a \.pt never re-creates it"):
        converters.convert(path, tmp_path / "out.pt", allow_class=("__builtin__.eval",))


def test_a_bytearray_of_a_size_stays_a_record(tmp_path: Path) -> None:
    payload = b"\x80\x02c__builtin__\nbytearray\nJ\x00\xe1\xf5\x05\x85R."  # bytearray(100_000_000)
    path = _pickle_zip(tmp_path, payload)
    value = converters.load(path)
    assert type(value) is ObjectRecord and value.name == "builtins.bytearray"


def test_a_numpy_array_subclass_is_not_read_as_a_plain_array(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({"m": np.matrix([[1.0, 2.0]])}, path)
    with pytest.raises(UnsupportedValueError, match=r"at m: a numpy array of the subclass numpy\.matrix"):
        converters.read(path)
