"""Values beyond the plain tree types, kept exactly and never executed.

Checkpoints hold more than tensors and plain containers: ``argparse.Namespace`` arguments,
hyper-parameter dicts of trainer libraries, numpy scalars, ``pathlib`` paths, enum members,
``torch.Size``... A pickle builds them by calling a class with arguments and then setting its
state. We never import or call anything a file names, so such an object becomes an
:class:`ObjectRecord`: the dotted class name (an unverified string) and the state the pickle gives
it, as a tree. Every format carries records exactly (the manifest's ``record`` node); which of
them a ``.pt`` output may turn back into the original pickle is decided by the pt writer's allowlist.

numpy values that have an exact meaning are not records: an array is a tensor of the same dtype and
bytes that remembers it was an array (``TensorRef.numpy``), a scalar is a :class:`NumpyScalar`.
``bytes`` is a plain leaf of the tree.
"""

from __future__ import annotations

from typing import Any

from .errors import UnsupportedValueError

# How a pickle made the object: "global" is the class or function itself used as a value
# (``typing.Any``, ``torch.float16``), "call" is ``name(*args)`` (REDUCE), "new" is
# ``name.__new__(name, *args)`` (NEWOBJ).
HOW = ("global", "call", "new")

# numpy's dtype strings (byte order + kind + size) of the dtypes a tensor can hold, by torch name.
NUMPY_DESCR = {
    "float64": "<f8", "float32": "<f4", "float16": "<f2", "int8": "|i1", "int16": "<i2", "int32": "<i4",
    "int64": "<i8", "uint8": "|u1", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8", "bool": "|b1",
    "complex64": "<c8", "complex128": "<c16",
}  # fmt: skip
TORCH_DTYPE = {descr: name for name, descr in NUMPY_DESCR.items()}


class ObjectRecord:
    """An object recorded, not rebuilt: class name, how it was made, its arguments and state.

    ``state`` is what ``BUILD`` gave (``built`` says whether it did: a state may be None), ``items``
    the ``(key, value)`` pairs and ``elements`` the values set on it as on a dict or a list (what
    pickle does for ``defaultdict``, ``deque`` and dict subclasses such as Lightning's
    ``AttributeDict``). All of them are trees of plain values and records; never tensors.

    A record may refer to a record that holds it (omegaconf nodes point at their parent): the tree
    is then not a tree but the manifest writes such a reference as a ``backref`` node.
    """

    __slots__ = ("args", "built", "elements", "how", "items", "name", "state")

    def __init__(
        self,
        name: str,
        how: str = "new",
        args: tuple[Any, ...] = (),
        *,
        state: Any = None,
        built: bool = False,
        items: list[tuple[Any, Any]] | None = None,
        elements: list[Any] | None = None,
    ) -> None:
        if how not in HOW:
            raise ValueError(f"how must be one of {HOW}, not {how!r}")
        self.name = name
        self.how = how
        self.args = args
        self.state = state
        self.built = built
        self.items: list[tuple[Any, Any]] = [] if items is None else items
        self.elements: list[Any] = [] if elements is None else elements

    @property
    def module(self) -> str:
        return self.name.rpartition(".")[0]

    def children(self) -> list[Any]:
        """Every value the record holds, in order: arguments, state, item keys and values, elements."""
        values = list(self.args)
        if self.built:
            values.append(self.state)
        for key, value in self.items:
            values += (key, value)
        values += self.elements
        return values

    def __repr__(self) -> str:
        return f"<record {self.name} ({self.how})>"


class NumpyScalar:
    """A numpy scalar (``np.float64(0.75)``, ``np.int32(7)``): numpy's dtype string (``<f8``) and its
    bytes, so it comes back as the same numpy type with the same bits."""

    __slots__ = ("data", "dtype")

    def __init__(self, dtype: str, data: bytes) -> None:
        size = dtype[2:]
        if len(dtype) < 3 or dtype[0] not in "<>|=" or dtype[1] not in "fiucb" or not size.isdigit():
            raise UnsupportedValueError(f"a numpy scalar must have a numeric dtype, found {dtype[:20]!r}")
        if int(size) != len(data):
            raise UnsupportedValueError(f"a numpy {dtype} scalar holds {size} bytes, found {len(data)}")
        self.dtype = dtype
        self.data = data

    def __eq__(self, other: object) -> bool:
        return type(other) is NumpyScalar and other.dtype == self.dtype and other.data == self.data

    def __hash__(self) -> int:
        return hash((self.dtype, self.data))

    def __repr__(self) -> str:
        return f"NumpyScalar({self.dtype!r}, {self.data.hex()})"


class Unreadable:
    """A value a reader met but cannot represent exactly (a sparse tensor, a numpy object array):
    it stands in the tree so that validation refuses it naming its path. ``what`` is the message
    ("a sparse tensor is not read: save tensor.to_dense() ...")."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __repr__(self) -> str:
        return f"<unreadable: {self.what}>"


# The objects torch's own safe loader (``torch.load(weights_only=True)``) makes from a checkpoint
# besides tensors and containers: they are plain values to torch, so ``load()`` gives them back as
# values and ``--drop-objects`` keeps them. The torch dtypes (``torch.float16``) are among them.
TORCH_SAFE_CALLS = frozenset({"torch.Size", "torch.device", "builtins.set", "builtins.bytearray", "builtins.complex"})


def torch_dtype(record: Any, dtype_names: Any) -> str | None:
    """The dtype name (``float16``) when ``record`` is a torch dtype named by pickle (``torch.float16``,
    a global), else None: the one test the reader, the pt writer and ``load()`` share."""
    if type(record) is not ObjectRecord or record.how != "global":
        return None
    module, _, name = record.name.rpartition(".")
    return name if module == "torch" and name in dtype_names else None


def torch_safe(record: ObjectRecord, dtype_names: Any) -> bool:
    """Whether ``record`` is one of the values torch's safe loader makes (see ``TORCH_SAFE_CALLS``)."""
    if record.how == "global":
        return torch_dtype(record, dtype_names) is not None
    if record.how != "call" or record.built or record.items or record.elements or record.name not in TORCH_SAFE_CALLS:
        return False
    if record.name == "builtins.bytearray" and not (len(record.args) == 1 and type(record.args[0]) is bytes):
        return False  # bytearray(8_000_000_000) would allocate what no file stores
    stack: list[Any] = list(record.args)
    while stack:
        node = stack.pop()
        if type(node) is ObjectRecord:
            return False
        if isinstance(node, (list, tuple)):
            stack.extend(node)
    return True
