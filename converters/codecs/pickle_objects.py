"""Which objects a pickle may name, how numpy values become exact values, and which records a
``.pt`` output may turn back into objects.

Reading: a pickle names classes and functions by dotted name (``GLOBAL``). torch's rebuild
functions and plain containers are interpreted (``torch_pickle``); every other name becomes an
inert :class:`~converters.core.objects.ObjectRecord`, never imported, never called, *unless* it is
on :func:`is_dangerous`'s list: the callables that pickle exploits use (``os.system``,
``builtins.eval``, ``subprocess.Popen``, ``torch.load``...), refused as unsafe as before, so a
payload file is still reported as one rather than carried along as a harmless-looking record.

Writing ``.pt``: a record's class name is an unverified string (``subprocess.Popen`` is a class
too), so the pt writer re-creates the original pickle structure only for the data-only classes of
:data:`DATA_CLASSES` and the ones the user names (``--allow-class``); any other record is refused
at write time naming its path and class.
"""

from __future__ import annotations

import _compat_pickle
from typing import Any

from ..core.errors import CorruptFileError, UnsafeFileError
from ..core.objects import TORCH_DTYPE, NumpyScalar, ObjectRecord, Unreadable, torch_dtype
from ..core.sources import BufferSource
from ..core.transfer import blake3_hex
from ..core.tree import TensorRef

# -------------------------------------------------------------------------- refused by name

# Modules whose every name is refused (process, file system, import machinery, code execution,
# serialisers that would run more pickles, network). After picklescan's and fickling's lists.
DANGEROUS_MODULES = frozenset(
    {
        *("os", "posix", "nt", "posixpath", "ntpath", "subprocess", "sys", "shutil", "signal", "pty", "platform"),
        *("importlib", "imp", "runpy", "pkgutil", "zipimport", "code", "codeop", "compileall", "py_compile"),
        *("pickle", "_pickle", "cPickle", "marshal", "shelve", "dill", "joblib", "cloudpickle", "yaml"),
        *("ctypes", "_ctypes", "cffi", "socket", "ssl", "http", "urllib", "urllib2", "requests", "ftplib"),
        *("smtplib", "telnetlib", "webbrowser", "asyncio", "multiprocessing", "threading", "_thread", "thread"),
        *("concurrent", "tempfile", "glob", "io", "_io", "fileinput", "pdb", "bdb", "trace", "timeit"),
        *("cProfile", "profile", "pydoc", "inspect", "ast", "types", "gc", "weakref", "atexit", "sqlite3"),
        *("distutils", "setuptools", "pip", "venv", "ensurepip", "site", "sysconfig", "operator", "_operator"),
        *("functools", "itertools", "torch.hub", "torch.jit", "torch._C", "torch.ops"),
        *("torch.classes", "torch._dynamo", "torch._inductor", "torch.utils.cpp_extension", "numpy.f2py"),
        *("numpy.distutils", "numpy.testing", "numpy.lib.npyio", "pandas.io", "keras", "tensorflow"),
        *("torch.fx", "torch.package", "torch.utils.cpp_extension", "torch.multiprocessing", "torch.distributed"),
        *("logging.config", "doctest", "pandas", "numpy.ctypeslib", "numpy.lib.format", "numpy.f2py"),
    }
)
# Single names refused in otherwise harmless modules.
DANGEROUS_NAMES = frozenset(
    {
        *(f"builtins.{name}" for name in ("eval", "exec", "compile", "open", "getattr", "setattr", "delattr")),
        *(f"builtins.{name}" for name in ("__import__", "globals", "locals", "vars", "input", "breakpoint")),
        *(f"builtins.{name}" for name in ("exit", "quit", "help", "memoryview", "type", "super", "object")),
        *(f"builtins.{name}" for name in ("classmethod", "staticmethod", "property", "print", "dir", "apply")),
        "builtins.execfile",
        "builtins.reload",
        "builtins.file",
        "torch.load",
        "torch.save",
        "torch.serialization.load",
        "torch.serialization.save",
        "torch.serialization._load",
        "torch.serialization._legacy_load",
        "numpy.loads",
        "torch.storage._load_from_bytes",
        "numpy.load",
        "numpy.save",
        "numpy.fromfile",
        "numpy.memmap",
        "copyreg._reconstructor",
        "copy_reg._reconstructor",
        "codecs.open",
        "collections.namedtuple",
        "abc.ABCMeta",
        "typing.NamedTuple",
        "enum.EnumMeta",
        "enum.Enum",
    }
)


def normalized(module: str, name: str) -> str:
    """The dotted name a pickle's ``GLOBAL module name`` stands for, with Python 2's names mapped as
    ``pickle`` maps them for protocols below 3 (``__builtin__.long`` is ``builtins.int``): the
    tables of the standard library's ``_compat_pickle``, which ``pickle.Unpickler`` itself uses."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def is_dangerous(dotted: str) -> bool:
    """Whether a pickle naming ``dotted`` is refused outright (see the module doc). A name is
    matched with every module prefix (``os.path.join`` is refused through ``os``)."""
    if not dotted.isprintable() or ".." in dotted or dotted.startswith(".") or dotted.endswith("."):
        return True
    module, _, name = dotted.rpartition(".")
    dotted = normalized(module, name)  # __builtin__.eval is builtins.eval, as pickle loads it
    if dotted in DANGEROUS_NAMES:
        return True
    parts = dotted.split(".")
    if any(part.startswith("__") and part.endswith("__") for part in parts[1:]):
        return True  # an attribute path into a function or class (``f.__globals__``, ``C.__init__``)
    return any(".".join(parts[:end]) in DANGEROUS_MODULES for end in range(1, len(parts)))


# -------------------------------------------------------------------------- numpy values

NUMPY_CORES = ("numpy.core.multiarray", "numpy._core.multiarray")
RECONSTRUCT = frozenset(f"{core}._reconstruct" for core in NUMPY_CORES)
SCALAR = frozenset(f"{core}.scalar" for core in NUMPY_CORES)
DTYPE = "numpy.dtype"
NDARRAY = "numpy.ndarray"


def numpy_descr(dtype: Any, file: Any) -> str:
    """numpy's dtype string (``<f8``) of a recorded ``numpy.dtype(...)``: ``dtype('f8', False, True)``
    with the state ``(3, '<', None, None, None, -1, -1, 0)`` numpy pickles for a plain dtype."""
    if type(dtype) is not ObjectRecord or dtype.name != DTYPE or dtype.how != "call":
        raise CorruptFileError(f"a numpy value needs a numpy.dtype, found {_what(dtype)}", file=file)
    args, state = dtype.args, dtype.state
    if (
        len(args) < 1
        or type(args[0]) is not str
        or not dtype.built
        or type(state) is not tuple
        or len(state) < 2
        or type(state[1]) is not str
        or state[1] not in "<>|="
        or (len(state) > 2 and any(value is not None for value in state[2:5]))
    ):
        raise CorruptFileError("a numpy.dtype in the pickle is not a plain numeric dtype", file=file)
    order = state[1] if state[1] != "=" else "<"
    return order + args[0]


def numpy_array(record: ObjectRecord, state: Any, file: Any) -> TensorRef | Unreadable:
    """A tensor marked as a numpy array from ``_reconstruct(ndarray, (0,), b'b')`` and its state
    ``(1, shape, dtype, is_fortran, raw bytes)``; what cannot be one exactly is :class:`Unreadable`."""
    if (
        type(state) is not tuple
        or len(state) != 5
        or type(state[1]) is not tuple
        or not all(type(d) is int and d >= 0 for d in state[1])
        or type(state[3]) is not bool
    ):
        raise CorruptFileError("a numpy array's pickled state is malformed", file=file)
    kind = record.args[0] if record.args else None
    if type(kind) is not ObjectRecord or kind.name != NDARRAY or kind.how != "global":
        what = kind.name if type(kind) is ObjectRecord else type(kind).__name__
        return Unreadable(f"a numpy array of the subclass {what} is not read: save a plain ndarray (np.asarray(a))")
    shape, descr, fortran, raw = state[1], numpy_descr(state[2], file), state[3], state[4]
    dtype = TORCH_DTYPE.get(descr.replace("=", "<"))
    if dtype is None:
        return Unreadable(
            f"a numpy array of dtype {descr!r} is not read: only numeric dtypes a tensor can hold are "
            "(object, string, datetime and structured arrays are not)"
        )
    if type(raw) is not bytes:
        raise CorruptFileError(f"a numpy array of dtype {descr} must hold its bytes", file=file)
    if fortran and sum(d > 1 for d in shape) > 1:
        return Unreadable("a Fortran-ordered numpy array is not read: save np.ascontiguousarray(a) instead")
    # The bytes sit inside data.pkl (its zip CRC-32 checks them): their digest is taken as they are
    # read, so the tree digest our writers store covers numpy arrays like the other tensors.
    source = BufferSource.of(raw)
    return TensorRef(dtype, shape, source).as_numpy().with_stored_digest(blake3_hex(source))


def numpy_scalar(dtype: Any, data: Any, file: Any) -> NumpyScalar:
    """``scalar(dtype, bytes)``: a numeric numpy scalar, its bytes exactly as many as its dtype says."""
    descr = numpy_descr(dtype, file)
    size = descr[2:]
    if (
        type(data) is not bytes
        or descr[1:2] not in ("f", "i", "u", "c", "b")
        or not size.isdigit()
        or int(size) != len(data)
    ):
        raise CorruptFileError(f"a numpy scalar of dtype {descr} must be numeric and hold its bytes", file=file)
    return NumpyScalar(descr, data)


def _what(value: Any) -> str:
    return f"a {value.name} record" if type(value) is ObjectRecord else type(value).__name__


# -------------------------------------------------------------------------- writing .pt

# Data-only classes: making one runs no code beyond storing its arguments and state.
DATA_CLASSES = frozenset(
    {
        *(f"builtins.{name}" for name in ("set", "frozenset", "bytearray", "complex", "slice", "range")),
        *(f"builtins.{name}" for name in ("dict", "list", "tuple", "int", "float", "str", "bool", "bytes")),
        "collections.OrderedDict",
        "collections.defaultdict",
        "collections.deque",
        "collections.Counter",
        "argparse.Namespace",
        *(f"pathlib.{name}" for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath")),
        "pathlib.PureWindowsPath",
        *(f"datetime.{name}" for name in ("datetime", "date", "time", "timedelta", "timezone")),
        "decimal.Decimal",
        "fractions.Fraction",
        "uuid.UUID",
        "typing.Any",
        "torch.Size",
        "torch.device",
        "torch.serialization._get_layout",
        *(f"torch.{name}" for name in ("strided", "sparse_coo", "contiguous_format", "channels_last")),
        DTYPE,
        NDARRAY,
        *RECONSTRUCT,
        *SCALAR,
        "omegaconf.dictconfig.DictConfig",
        "omegaconf.listconfig.ListConfig",
        "omegaconf.base.ContainerMetadata",
        "omegaconf.base.Metadata",
        *(f"omegaconf.nodes.{name}" for name in ("AnyNode", "StringNode", "IntegerNode", "FloatNode")),
        *(f"omegaconf.nodes.{name}" for name in ("BooleanNode", "BytesNode", "PathNode", "ValueNode")),
        "pytorch_lightning.utilities.parsing.AttributeDict",
        "lightning.pytorch.utilities.parsing.AttributeDict",
        "lightning.fabric.utilities.data.AttributeDict",
        "lightning_fabric.utilities.data.AttributeDict",
    }
)


def writable(record: ObjectRecord, allowed: frozenset[str], dtype_names: frozenset[str] | set[str]) -> bool:
    """Whether a ``.pt`` may re-create ``record`` itself (not what it holds): a data-only class made
    the way such a class is (a torch dtype only as itself), or a class the user allows — never a
    dangerous name, allowed or not."""
    name = record.name
    if is_dangerous(name):
        return False
    if torch_dtype(ObjectRecord(name, "global"), dtype_names) is not None:
        return record.how == "global"  # a dtype is only ever itself
    return name in DATA_CLASSES or name in allowed


def unsafe_to_write(
    record: ObjectRecord, allowed: frozenset[str], dtype_names: frozenset[str] | set[str]
) -> str | None:
    """The first class name in ``record`` (itself, or any record its state holds) that a ``.pt``
    output may not re-create; None when all are data-only classes or allowed by the user."""
    stack, seen = [record], set()
    while stack:
        node = stack.pop()
        if type(node) is ObjectRecord:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if not writable(node, allowed, dtype_names):
                return node.name
            stack.extend(node.children())
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return None


def refuse_unsafe(name: str, file: Any) -> UnsafeFileError:
    return UnsafeFileError(
        f"data.pkl asks for the global {name}, which can run code; refusing to run pickled code", file=file
    )


def check_writable(
    tree: Any, allowed: tuple[str, ...] | frozenset[str], dtype_names: frozenset[str] | set[str]
) -> None:
    """Refuse, naming its path and class, a record of ``tree`` that a ``.pt`` may not re-create."""
    from ..core.errors import UnsupportedValueError
    from ..core.tree import walk

    allowed = frozenset(allowed)
    for path, leaf in walk(tree):
        if type(leaf) is ObjectRecord:
            name = unsafe_to_write(leaf, allowed, dtype_names)
            if name is not None:
                held = "" if name == leaf.name else f" (inside a {leaf.name} object)"
                if is_dangerous(name):
                    raise UnsupportedValueError(
                        f"the recorded object of class {name}{held} names a callable that can run code: a .pt "
                        "never re-creates it (--allow-class cannot allow it); drop it with --drop-objects",
                        path=path,
                    )
                raise UnsupportedValueError(
                    f"the recorded object of class {name}{held} is not on the list of data-only classes a .pt may "
                    f"re-create (its name is only a string from the source file); pass --allow-class {name} if you "
                    "trust it, or drop recorded objects with --drop-objects",
                    path=path,
                )
