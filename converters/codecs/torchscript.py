"""TorchScript archives (``torch.jit.save``, ``scripted.save``, ``torch.jit.trace(...).save``): their
parameters and buffers, read as the state_dict ``torch.jit.load(f).state_dict()`` gives, without
running, compiling or importing any of their code (and without torch).

The archive is torch's zip (``codecs/torch_archive.py`` reads its layout and records): ``data.pkl``
pickles the module tree, each module a ``__torch__.<...>.ClassName`` object made by ``NEWOBJ`` whose
``BUILD`` state is a dict of its attributes (tensors, submodules, ``training``, other values);
``code/__torch__/<...>.py`` holds each class's TorchScript source. Only the code's *declarations*
are read, as text: which attributes a class has, in order (``name : Type`` and
``__annotations__["name"] = Type`` lines of its body), which of them are parameters and buffers
(``__parameters__ = ["weight", "bias", ]``, ``__buffers__ = [...]``), and whether the class is a
module (``class Name(Module):``). Nothing else of the code is looked at.

The state_dict, as ``torch.jit.load(f).state_dict()`` orders it (``nn.Module.state_dict`` over the
loaded module): per module, its parameters, then its buffers, each in the order its class declares
them (not the order of ``__parameters__``, nor of the pickled dict), then its submodules in the same
declaration order, recursively, keys joined with dots. A parameter or buffer that is ``None`` is
left out; every buffer is in (a loaded script module keeps non-persistent buffers in its
state_dict). A module that is at two places gives its tensors at both (one tensor each, tied). The
OrderedDict's ``_metadata`` is ``{prefix: {"version": 1}}`` per module in that order, as torch sets it.

The pickle goes through the same pre-scan, interpreter and budget as any ``data.pkl``; besides, the
list builders TorchScript pickles typed lists with (``torch.jit._pickle.build_intlist`` ...,
``restore_type_tag``) are stand-ins returning their argument, and the storage classes it names for
every dtype (``torch.Float8_e4m3fnStorage``, ``torch.UInt16Storage``, ``torch.ComplexHalfStorage``)
are read. The records ``data.pkl`` makes are walked here and dropped: only the flat OrderedDict of
tensors is the tree.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import dtypes
from ..core.budget import Budget
from ..core.errors import CorruptFileError, UnsupportedValueError
from ..core.objects import ObjectRecord, Unreadable
from ..core.tree import TensorRef
from . import pickle_objects as objects
from .torch_pickle import (
    Gather,
    SafeUnpickler,
    SourceFor,
    StandIn,
    StorageType,
    TreeCheck,
    describe,
    prescan,
    quoted,
    unpickle,
)
from .zip import Ranges, StoredEntry, read_entry

KIND = "TorchScript archive"
NOTE = (
    "the TorchScript code (forward and the other methods) is not carried: only the parameters and "
    "buffers, as torch.jit.load(f).state_dict() gives them"
)
FROZEN_NOTE = (
    "the module has no parameters or buffers: a frozen module (torch.jit.freeze) keeps its weights as "
    "constants of its code, which are not read: convert the module saved before it was frozen"
)
CONSTANTS = "constants.pkl"  # what tells a TorchScript archive from a torch.save one
MAX_CODE_BYTES = 32 << 20  # one code file (a class's source); torch's own are a few KiB to a few MiB
CODE_TEXT_FACTOR = 2  # memory per byte of a code file read: its bytes, then its text
KEY_BYTES = 64  # memory per state_dict key beyond its characters (the str, the dict slot)
NAMESPACE = "__torch__"  # every TorchScript class lives under it
CUSTOM_CLASSES = "__torch__.torch.classes."  # C++ classes (torch.classes.*): objects without code

# The list builders TorchScript pickles typed lists with, and the type tag of typed dicts and
# lists: pure data, made here by stand-ins that give their argument back.
_LIST_BUILDERS = frozenset(
    f"torch.jit._pickle.{name}" for name in ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist")
)
_TYPE_TAG = "torch.jit._pickle.restore_type_tag"
SCRIPT_GLOBALS = _LIST_BUILDERS | {_TYPE_TAG}
# The storage classes TorchScript's pickler names beyond the legacy typed ones: torch.<ScalarType>Storage.
_SCRIPT_STORAGES = {
    "ComplexHalfStorage": "complex32",
    "UInt16Storage": "uint16",
    "UInt32Storage": "uint32",
    "UInt64Storage": "uint64",
    "Float8_e4m3fnStorage": "float8_e4m3fn",
    "Float8_e5m2Storage": "float8_e5m2",
    "Float8_e4m3fnuzStorage": "float8_e4m3fnuz",
    "Float8_e5m2fnuzStorage": "float8_e5m2fnuz",
    "Float8_e8m0fnuStorage": "float8_e8m0fnu",
}

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
# The lines of a code file that matter: top-level ones (a class starts, or anything else ends one)
# and the lines of a class body (two spaces in); method bodies and signatures are deeper.
_LINES = re.compile(r"^(?:(\S[^\n]*)|  (\S[^\n]*))$", re.MULTILINE)
_CLASS = re.compile(rf"class ({_IDENTIFIER})(?:\(([^()\n]*)\))?:")
_LIST = re.compile(r"(__parameters__|__buffers__)\s*=\s*\[(.*)\]")
_LIST_ITEM = re.compile(r'\s*"([^"\\]*)"\s*(?:,|$)')
_DECLARED = re.compile(rf"({_IDENTIFIER}) : (?![^=]*=)\S")  # ``name : Type``; ``name : Final[T] = v`` is a constant
_ANNOTATION = re.compile(r'__annotations__\["([^"\\]*)"\] = \S')
_STRING = re.compile(r"[\x20-\x7e]*")  # the names torch.jit.load reads back (printable ASCII)


@dataclass
class ScriptClass:
    """What the code declares of one class: its attributes in order, which are parameters and
    buffers, and whether it is a module."""

    name: str
    module: bool
    enum: bool = False
    attributes: list[str] = field(default_factory=list)
    parameters: set[str] = field(default_factory=set)
    buffers: set[str] = field(default_factory=set)
    listed: set[str] = field(default_factory=set)  # which of the two lists the body had


def read_modules(
    path: Path,
    data: bytes | bytearray,
    entries: dict[str, StoredEntry],
    prefix: str,
    storage: SourceFor,
    view: Gather,
    budget: Budget,
    *,
    ranges: Ranges | None = None,
) -> OrderedDict[str, Any]:
    """The state_dict of the TorchScript archive whose ``data.pkl`` is ``data`` (see the module doc).

    ``entries``/``prefix``: the archive's records and folder (its ``code/`` files are read from
    them); ``storage``/``view``: the archive reader's storages and tensor views; ``ranges``: a
    remote archive's bytes fetched ahead (its code files among them).
    """
    prescan(data, path, budget=budget, also_allowed=SCRIPT_GLOBALS)
    code = _Code(path, entries, prefix, budget, ranges)
    root = unpickle(_ScriptUnpickler(data, path, storage, view, budget, code=code), path)
    # The tree check of any data.pkl (nesting, containers inside themselves, the tree as walked charged
    # to the budget) starts below a record root; a TorchScript root is one (the module), so from here.
    TreeCheck(path, budget).check([root])
    return _StateDict(path, code, budget).of(root)


def notes(state_dict: OrderedDict[str, Any]) -> tuple[str, ...]:
    """What ``inspect`` says of a TorchScript archive read as ``state_dict``: its code is not
    carried, and why it holds nothing when it holds nothing."""
    return (NOTE,) if state_dict else (NOTE, FROZEN_NOTE)


class _ScriptUnpickler(SafeUnpickler):
    """The safe interpreter, knowing TorchScript's list builders, its storage class names and its
    enum members (``REDUCE`` of an enum class with the member's value, not a tuple)."""

    def __init__(self, *args: Any, code: _Code, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._code = code

    def _not_a_tuple(self, function: ObjectRecord, arguments: Any) -> tuple[Any, ...]:
        cls = self._code.lookup(function.name)
        if cls is not None and cls.enum:
            return (arguments,)
        return super()._not_a_tuple(function, arguments)

    def find_class(self, module: str, name: str) -> Any:
        dotted = objects.normalized(module, name)
        if dotted in _LIST_BUILDERS:
            return StandIn(dotted, self._typed_list)
        if dotted == _TYPE_TAG:
            return StandIn(dotted, self._type_tag)
        if module == "torch" and name in _SCRIPT_STORAGES:
            return StorageType(dtypes.DTYPES[_SCRIPT_STORAGES[name]])
        return super().find_class(module, name)

    def _typed_list(self, *args: Any) -> list[Any]:
        if len(args) != 1 or type(args[0]) is not list:
            raise CorruptFileError("a TorchScript list builder must be given one list", file=self._file)
        return args[0]

    def _type_tag(self, *args: Any) -> Any:
        if len(args) != 2 or type(args[1]) is not str:
            raise CorruptFileError("restore_type_tag must be given a value and a type name", file=self._file)
        return args[0]


class _Code:
    """The classes the archive's ``code/`` files declare, each file read (and charged) once, when a
    class it holds is first needed: ``__torch__.a.b.Name`` is declared in ``code/__torch__/a/b.py``."""

    def __init__(
        self, path: Path, entries: dict[str, StoredEntry], prefix: str, budget: Budget, ranges: Ranges | None = None
    ) -> None:
        self._path, self._entries, self._prefix, self._budget = path, entries, prefix, budget
        self._ranges = ranges
        self._files: dict[str, dict[str, ScriptClass]] = {}

    def lookup(self, name: str) -> ScriptClass | None:
        """The class named ``name`` (a dotted name from data.pkl); None when it is not TorchScript's."""
        module, _, short = name.rpartition(".")
        parts = module.split(".")
        if parts[0] != NAMESPACE or not all(re.fullmatch(_IDENTIFIER, part) for part in [*parts, short]):
            return None
        record = f"code/{'/'.join(parts)}.py"
        classes = self._files.get(record)
        if classes is None:
            classes = self._files[record] = self._read(record, module)
        return classes.get(name)

    def _read(self, record: str, module: str) -> dict[str, ScriptClass]:
        entry = self._entries.get(self._prefix + record)
        if entry is None:
            return {}
        if entry.file_size > MAX_CODE_BYTES:
            raise UnsupportedValueError(
                f"the code record {record} holds {entry.file_size} bytes; a TorchScript class's code is read "
                f"only up to {MAX_CODE_BYTES} bytes",
                file=self._path,
            )
        self._budget.materialize(entry.file_size * (CODE_TEXT_FACTOR - 1), f"the code record {record}")
        raw = read_entry(self._path, entry, self._budget, self._ranges)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptFileError(
                f"the code record {record} is not UTF-8 text (byte {exc.start}); a TorchScript class's code is",
                file=self._path,
            ) from None
        return parse_code(text, module, self._path, record)


def parse_code(text: str, module: str, file: Path, record: str = "code") -> dict[str, ScriptClass]:
    """The classes a code file of module ``module`` declares, by dotted name (see the module doc).

    Only top-level ``class`` lines and the lines of class bodies two spaces in are looked at; of
    these, ``__parameters__``/``__buffers__`` lines and ``__annotations__[...]`` lines must have
    the exact form torch writes, or the file is refused.
    """
    classes: dict[str, ScriptClass] = {}
    current: ScriptClass | None = None
    for match in _LINES.finditer(text):
        top, body = match.group(1), match.group(2)
        if top is not None:
            current = None
            found = _CLASS.fullmatch(top.rstrip())
            if found is None:
                continue  # a function, or whatever else: not a class
            name = f"{module}.{found.group(1)}"
            if name in classes:
                raise _bad_code(file, record, f"declares the class {found.group(1)} twice")
            base = (found.group(2) or "").strip()
            current = classes[name] = ScriptClass(name, module=base == "Module", enum=base == "Enum")
            continue
        if current is None:
            continue
        line = body.rstrip()
        declared = _DECLARED.match(line)
        if declared is not None:
            _declare(current, declared.group(1), file, record)
        elif line.startswith("__annotations__["):
            annotation = _ANNOTATION.match(line)
            if annotation is None:
                raise _bad_code(file, record, f"has an __annotations__ line of class {_short(current)} it cannot read")
            _declare(current, annotation.group(1), file, record)
        elif line.startswith(("__parameters__", "__buffers__")):
            _list_line(current, line, file, record)
    for cls in classes.values():
        for kind, names in (("__parameters__", cls.parameters), ("__buffers__", cls.buffers)):
            missing = next((name for name in names if name not in cls.attributes), None)
            if missing is not None:
                raise _bad_code(
                    file,
                    record,
                    f"lists {quoted(missing)} in {kind} of class {_short(cls)}, which the class does not declare",
                )
        if cls.module and cls.listed != {"__parameters__", "__buffers__"}:
            raise _bad_code(
                file, record, f"declares the module class {_short(cls)} without __parameters__ and __buffers__"
            )
    return classes


def _declare(cls: ScriptClass, name: str, file: Path, record: str) -> None:
    if not _STRING.fullmatch(name):
        raise _bad_code(file, record, f"declares an attribute of class {_short(cls)} whose name is not printable ASCII")
    if name in cls.attributes:
        raise _bad_code(file, record, f"declares the attribute {quoted(name)} of class {_short(cls)} twice")
    cls.attributes.append(name)


def _list_line(cls: ScriptClass, line: str, file: Path, record: str) -> None:
    found = _LIST.fullmatch(line)
    if found is None:
        raise _bad_code(file, record, f"has a __parameters__ or __buffers__ line of class {_short(cls)} it cannot read")
    kind, inside = found.group(1), found.group(2)
    if kind in cls.listed:
        raise _bad_code(file, record, f"gives class {_short(cls)} {kind} twice")
    cls.listed.add(kind)
    names: list[str] = []
    position = 0
    while position < len(inside):
        item = _LIST_ITEM.match(inside, position)
        if item is None or item.end() == position:
            if inside[position:].strip():
                raise _bad_code(file, record, f"has a {kind} list of class {_short(cls)} that is not a list of names")
            break
        names.append(item.group(1))
        position = item.end()
    target = cls.parameters if kind == "__parameters__" else cls.buffers
    other = cls.buffers if kind == "__parameters__" else cls.parameters
    for name in names:
        if not _STRING.fullmatch(name) or name in target or name in other:
            raise _bad_code(
                file,
                record,
                f"names {quoted(name)} twice, or not in printable ASCII, in the lists of class {_short(cls)}",
            )
        target.add(name)


def _short(cls: ScriptClass) -> str:
    return cls.name.rpartition(".")[2]


def _bad_code(file: Path, record: str, what: str) -> CorruptFileError:
    return CorruptFileError(f"the code record {record} {what}", file=file)


class _StateDict:
    """The flat state_dict of a module tree of records (see the module doc for the order)."""

    def __init__(self, path: Path, code: _Code, budget: Budget) -> None:
        self._path, self._code, self._budget = path, code, budget
        self._out: OrderedDict[str, Any] = OrderedDict()
        self._metadata: OrderedDict[str, Any] = OrderedDict()
        self._open: set[int] = set()  # the modules being walked (a module inside itself is refused)

    def of(self, root: Any) -> OrderedDict[str, Any]:
        if self._module_class(root) is None:
            raise CorruptFileError(
                f"data.pkl holds {describe(root)} where a TorchScript archive holds its module (a __torch__ "
                "object of a class its code declares as a Module)",
                file=self._path,
            )
        self._visit(root, "")
        self._out._metadata = self._metadata  # type: ignore[attr-defined]
        return self._out

    def _module_class(self, value: Any) -> ScriptClass | None:
        """The class of ``value`` when it is a TorchScript module object (records of other classes,
        script classes and enums included, are not modules)."""
        if type(value) is not ObjectRecord or value.how == "global" or not value.name.startswith(NAMESPACE + "."):
            return None
        if value.name.startswith(CUSTOM_CLASSES):
            return None  # a C++ class's object (quantized packed parameters...): never a module, no code
        cls = self._code.lookup(value.name)
        if cls is None:
            raise CorruptFileError(
                f"data.pkl holds an object of class {quoted(value.name)}, which no code record of the archive declares",
                file=self._path,
            )
        return cls if cls.module else None

    def _visit(self, record: ObjectRecord, prefix: str) -> None:
        """One module, then its submodules (recursion: TreeCheck bounds the nesting to MAX_DEPTH
        containers, a module being two: its record and its dict)."""
        cls = self._module_class(record)
        assert cls is not None
        where = prefix[:-1] or "<root>"
        if id(record) in self._open:
            raise CorruptFileError(f"the module at {quoted(where)} contains itself", file=self._path)
        state = record.state
        if not record.built or type(state) is not dict or record.args or record.items or record.elements:
            found = describe(state) if record.built else "no state"
            raise CorruptFileError(
                f"the module at {quoted(where)} (class {quoted(cls.name)}) has {found}; a TorchScript module is "
                "made without arguments and given a dict of its attributes",
                file=self._path,
            )
        missing = next((name for name in cls.attributes if name not in state), None)
        if missing is not None:  # torch.jit.load refuses such a file too
            raise CorruptFileError(
                f"the module at {quoted(where)} (class {quoted(cls.name)}) declares the attribute {quoted(missing)}, "
                "which data.pkl does not give it",
                file=self._path,
            )
        self._open.add(id(record))
        self._budget.nodes(2, "state_dict metadata")
        self._metadata[prefix[:-1]] = {"version": 1}
        for kind, names in (("parameter", cls.parameters), ("buffer", cls.buffers)):
            for name in cls.attributes:
                if name in names:
                    self._tensor(state, name, prefix, kind, cls)
        for name in cls.attributes:
            value = state[name]
            if name not in cls.parameters and name not in cls.buffers and self._module_class(value) is not None:
                self._visit(value, f"{prefix}{name}.")
        self._open.discard(id(record))

    def _tensor(self, state: dict[Any, Any], name: str, prefix: str, kind: str, cls: ScriptClass) -> None:
        key = prefix + name
        value = state[name]  # every declared attribute is there (checked first)
        if value is None:
            return  # torch leaves a None parameter or buffer out of the state_dict
        if type(value) is Unreadable:
            raise UnsupportedValueError(value.what, file=self._path, path=(key,))
        if type(value) is not TensorRef or value.numpy:
            raise UnsupportedValueError(
                f"the {kind} {quoted(key)} (class {quoted(cls.name)}) is {describe(value)}, not a tensor",
                file=self._path,
            )
        self._budget.nodes(1, "state_dict keys")
        self._budget.materialize(len(key) + KEY_BYTES, "state_dict keys")
        self._out[key] = value
