"""The neutral checkpoint tree: Python containers whose tensor leaves are :class:`TensorRef`.

A tree is what ``torch.save`` users put in a checkpoint, with torch tensors replaced by
``TensorRef`` (dtype name, shape, byte source). Exact Python types carry meaning and are kept:
``dict`` vs ``OrderedDict`` (and its ``_metadata`` attribute) vs ``Counter``, ``list`` vs ``tuple``,
``int`` vs ``str`` keys, ``bool`` vs ``int`` vs ``float``. Anything else is refused with its tree path.

Tied tensors (two paths holding the same tensor: an embedding tied to an output layer) are one
``TensorRef`` object at both paths: readers produce that, writers store it once, and torch gets
one tensor back for both.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import dtypes
from .errors import ConverterError, UnsupportedValueError, shown
from .objects import NUMPY_DESCR, NumpyScalar, ObjectRecord, Unreadable
from .sources import ByteSource

SCALAR_TYPES = (type(None), bool, int, float, str, bytes, NumpyScalar)
MAPPING_TYPES = (dict, OrderedDict, Counter)
CONTAINER_TYPES = (*MAPPING_TYPES, list, tuple)
MAX_DEPTH = 64
MAX_DIM = 2**63 - 1  # a dim is an int64 in torch (and in every format that stores one)
DERIVED_METADATA = frozenset({"total_size", "total_parameters"})  # about a written file: recomputed, not carried
MAX_NDIM = 64  # dims of a tensor: numpy's limit (flax), the .pt reader's; keeps numel's product small


class CastOrigin:
    """What a cast tensor was made from: the source dtype and the BLAKE3 digest of the source bytes,
    so a cast stays visible in the manifest and in ``inspect`` after the file is written.

    Readers give the digest their file stores. A cast made now starts with the digest the source
    file stores, or without one (a file from another tool): then the cast observes it as the source
    bytes stream by (:meth:`observe`), and :meth:`resolved` hashes ``source`` only if no pass did.
    """

    __slots__ = ("digest", "dtype", "source")

    def __init__(self, dtype: str, digest: str | None = None, source: ByteSource | None = None) -> None:
        self.dtype = dtype
        self.digest = digest
        self.source = source  # the source bytes, while a cast is in flight (None once read from a file)

    def observe(self, digest: str) -> None:
        if self.digest is None:
            self.digest = digest

    def resolved(self) -> str:
        if self.digest is None:
            if self.source is None:
                raise AssertionError("a cast origin without a digest or a source to hash")
            from .transfer import blake3_hex  # transfer imports sources only; kept lazy all the same

            self.digest = blake3_hex(self.source)
        return self.digest

    def __repr__(self) -> str:
        return f"CastOrigin({self.dtype!r}, {self.digest!r})"


@dataclass(frozen=True)
class TensorRef:
    """A tensor in flight: dtype (torch spelling), shape, and where its C-order bytes are."""

    dtype: str
    shape: tuple[int, ...]
    source: ByteSource = field(compare=False)
    # The BLAKE3 digest a file stores for these bytes (our files do). It belongs to the bytes, so it
    # is not an argument: ``TensorRef(...)``, ``derive`` and ``dataclasses.replace`` all start without
    # one, and only ``with_stored_digest`` (used by readers) attaches one.
    digest: str | None = field(default=None, compare=False, init=False)
    # Set on a tensor made by a dtype cast (and on one read back from a file that records the cast):
    # what it was cast from. Like ``digest`` it is not an argument, and ``derive`` drops it.
    cast_from: CastOrigin | None = field(default=None, compare=False, init=False)
    # True for a numpy array (a checkpoint that pickled one): the same dtype and bytes, given back
    # as an ``ndarray`` by ``load()`` and by a ``.pt`` written from it. Kept by ``derive``.
    numpy: bool = field(default=False, compare=False, init=False)

    def __post_init__(self) -> None:
        try:
            itemsize = dtypes.DTYPES[self.dtype].itemsize
        except (KeyError, TypeError):
            itemsize = dtypes.lookup(self.dtype).itemsize  # raises, naming the known dtypes
        # Every dim an int64 that torch, numpy and every format's reader accept: a writer must never
        # write a shape its own readers refuse ([0, 2**64] has 0 elements, yet no reader takes it).
        # At most MAX_NDIM dims, so the element count below stays a small (exact) Python int.
        shape = self.shape
        count = 1
        if len(shape) > MAX_NDIM:
            self._bad_shape()
        for dim in shape:
            if type(dim) is not int or dim < 0 or dim > MAX_DIM:
                self._bad_shape()
            count *= dim
        if self.source.nbytes != count * itemsize:
            raise ConverterError(
                f"tensor {self.dtype}{list(shape)} needs {count * itemsize} bytes, "
                f"its source holds {self.source.nbytes}"
            )

    def _bad_shape(self) -> None:
        raise UnsupportedValueError(
            f"tensor shape {shown(list(self.shape), 80)}: at most {MAX_NDIM} dims, each an int in [0, 2**63)"
        )

    @property
    def nbytes(self) -> int:
        return self.source.nbytes

    def with_stored_digest(self, digest: str | None) -> TensorRef:
        """The same tensor carrying the digest its file stores for these exact bytes (readers only)."""
        ref = object.__new__(TensorRef)  # a copy of a checked tensor: not checked again
        ref.__dict__.update(self.__dict__)
        object.__setattr__(ref, "digest", digest)
        return ref

    def as_numpy(self) -> TensorRef:
        """The same tensor, marked as a numpy array (readers); only a dtype numpy names."""
        if self.dtype not in NUMPY_DESCR:
            raise UnsupportedValueError(f"a numpy array cannot hold {self.dtype} (numpy has no such dtype)")
        ref = object.__new__(TensorRef)
        ref.__dict__.update(self.__dict__)
        object.__setattr__(ref, "numpy", True)
        return ref

    def with_cast_from(self, origin: CastOrigin | None) -> TensorRef:
        """The same tensor recording the cast that made it (the cast transform; readers)."""
        ref = object.__new__(TensorRef)
        ref.__dict__.update(self.__dict__)
        object.__setattr__(ref, "cast_from", origin)
        return ref

    def derive(
        self, *, dtype: str | None = None, shape: tuple[int, ...] | None = None, source: ByteSource | None = None
    ) -> TensorRef:
        """A tensor made from this one; it carries no digest (new bytes need a new one).

        >>> from converters.core.sources import BufferSource
        >>> ref = TensorRef("float32", (2,), BufferSource.of(bytes(8))).with_stored_digest("0" * 64)
        >>> ref.derive(shape=(1, 2)).digest is None
        True
        """
        made = TensorRef(
            self.dtype if dtype is None else dtype,
            self.shape if shape is None else shape,
            self.source if source is None else source,
        )
        return made.as_numpy() if self.numpy else made


@dataclass
class Checkpoint:
    """A tree plus where it came from (for messages). Built by readers, consumed by writers."""

    tree: Any
    origin: Path | None = None
    format: str | None = None  # the name of the format it was read from
    # The digest of the tree its file stores (see manifests.tree_digest), when it stores one.
    tree_digest: str | None = None
    # The file's own metadata beside the tensors, not ours (safetensors ``__metadata__`` such as
    # ``format``, a shard index's ``metadata``): shown by ``inspect``, not part of the tree.
    file_metadata: dict[str, Any] | None = None
    # What kind of file it was, when a format reads several ("torch zip archive", "torch legacy
    # (non-zip) file", "TorchScript archive", "Hugging Face .bin shard folder"), and what of it was
    # not carried (TorchScript's code): ``inspect`` says both.
    kind: str | None = None
    notes: tuple[str, ...] = ()
    # The file is one of ours that stores tensor digests, so it should store a tree digest too:
    # ``verify --deep`` reports one that is missing (a flipped bit in its key loses it).
    expects_tree_digest: bool = False

    def carried_metadata(self) -> dict[str, Any]:
        """The file's own metadata that a conversion carries to its output (every format stores it,
        and ``verify`` compares it): ``file_metadata`` without the facts each writer recomputes
        about the file it writes (a shard index's ``total_size`` and ``total_parameters``)."""
        return {key: value for key, value in (self.file_metadata or {}).items() if key not in DERIVED_METADATA}

    def tensors(self) -> Iterator[tuple[tuple[str | int, ...], TensorRef]]:
        """Every tensor with its tree path, in tree order (a tied tensor once per path)."""
        for path, leaf in walk(self.tree):
            if isinstance(leaf, TensorRef):
                yield path, leaf

    def unique_tensors(self) -> list[tuple[tuple[str | int, ...], TensorRef]]:
        """Each distinct tensor once, with the first path that holds it: what writers store."""
        seen: set[int] = set()
        unique = []
        for path, ref in self.tensors():
            if id(ref) not in seen:
                seen.add(id(ref))
                unique.append((path, ref))
        return unique


def walk(tree: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    """Yield ``(path, leaf)`` for every leaf in order; the ``_metadata`` of OrderedDicts is skipped.

    Iterative (a stack of the open containers' iterators), so a leaf costs the same at any depth.
    """
    kind = type(tree)
    if kind in MAPPING_TYPES:
        items: Iterator[tuple[Any, Any]] = iter(tree.items())
    elif kind is list or kind is tuple:
        items = enumerate(tree)
    else:
        yield path, tree
        return
    stack = [(path, items)]
    while stack:
        prefix, items = stack[-1]
        for key, value in items:
            kind = type(value)
            if kind in MAPPING_TYPES:
                stack.append(((*prefix, key), iter(value.items())))
                break
            if kind is list or kind is tuple:
                stack.append(((*prefix, key), enumerate(value)))
                break
            yield (*prefix, key), value
        else:
            stack.pop()


def validate(tree: Any, *, file: Path | str | None = None) -> None:
    """Refuse, naming the path, anything the neutral tree cannot represent exactly.

    >>> validate({"w": 1.5, "steps": (1, 2)})
    >>> validate({"w": {1, 2}})
    Traceback (most recent call last):
    ...
    converters.core.errors.UnsupportedValueError: at w: cannot represent a value of type builtins.set ...
    """
    _validate(tree, (), file, 0)


def _validate(node: Any, path: tuple[str | int, ...], file: Path | str | None, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise UnsupportedValueError(f"nesting deeper than {MAX_DEPTH} levels", file=file, path=path)
    kind = type(node)
    if kind in MAPPING_TYPES:
        for key in node:
            if type(key) is not str and type(key) is not int:
                raise UnsupportedValueError(
                    f"dict keys must be str or int, found {type(key).__name__} key {key!r}",
                    file=file,
                    path=path,
                )
            _validate(node[key], (*path, key), file, depth + 1)
        extra = set(vars(node)) - {"_metadata"} if kind is OrderedDict else set()
        if extra:
            raise UnsupportedValueError(
                f"OrderedDict attributes other than _metadata are not kept, found {sorted(extra)}",
                file=file,
                path=path,
            )
        if kind is OrderedDict and hasattr(node, "_metadata"):
            _validate_metadata(node._metadata, (*path, "_metadata"), file, depth + 1)
    elif kind is list or kind is tuple:
        for index, value in enumerate(node):
            _validate(value, (*path, index), file, depth + 1)
    elif kind in SCALAR_TYPES or kind is TensorRef:
        return
    elif kind is ObjectRecord:
        _validate_record(node, path, file, depth, [], set())
    elif kind is Unreadable:
        raise UnsupportedValueError(node.what, file=file, path=path)
    else:
        raise UnsupportedValueError(
            f"cannot represent a value of type {kind.__module__}.{kind.__qualname__} (supported: dict, "
            "OrderedDict, Counter, list, tuple, tensor, None, bool, int, float, str, bytes, records)",
            file=file,
            path=path,
        )


def _validate_record(
    record: ObjectRecord, path: tuple[str | int, ...], file: Any, depth: int, chain: list[int], done: set[int]
) -> None:
    """A record and what it holds: plain values and records, never a tensor (a record is not
    walked for tensors, so one inside it would be lost). A record met again while inside itself is
    a back-reference (kept); one met again elsewhere was checked already."""
    if id(record) in done:
        return
    if type(record.name) is not str or not record.name or type(record.args) is not tuple:
        raise UnsupportedValueError("a record needs a class name and a tuple of arguments", file=file, path=path)
    if record.how == "global" and (record.args or record.built or record.items or record.elements):
        raise UnsupportedValueError(
            f"the global {shown(record.name, 120)} is a name, not an object: it has no arguments or state",
            file=file,
            path=path,
        )
    chain.append(id(record))
    stack: list[tuple[Any, int]] = [(value, depth + 1) for value in reversed(record.children())]
    while stack:
        value, level = stack.pop()
        if level > MAX_DEPTH:
            raise UnsupportedValueError(f"nesting deeper than {MAX_DEPTH} levels", file=file, path=path)
        kind = type(value)
        if kind is ObjectRecord:
            if id(value) not in chain:
                _validate_record(value, path, file, level, chain, done)
        elif kind is TensorRef:
            if record.built and type(record.state) is dict and "_parameters" in record.state:
                raise UnsupportedValueError(
                    f"this is a whole pickled torch.nn.Module ({record.name}), not a state_dict: its code is not "
                    "run, so its weights cannot be read; save model.state_dict() with torch.save instead",
                    file=file,
                    path=path,
                )
            raise UnsupportedValueError(
                f"the {record.name} object holds a tensor; tensors inside recorded objects are not kept "
                "(drop the object with --drop-objects, or store the tensor in the checkpoint's dict)",
                file=file,
                path=path,
            )
        elif kind in MAPPING_TYPES:
            for key, item in value.items():
                if type(key) is not str and type(key) is not int:
                    raise UnsupportedValueError(
                        f"dict keys must be str or int, found {type(key).__name__} key in a {record.name} object",
                        file=file,
                        path=path,
                    )
                stack.append((item, level + 1))
        elif kind is list or kind is tuple:
            stack.extend((item, level + 1) for item in value)
        elif kind is Unreadable:
            raise UnsupportedValueError(f"inside a {record.name} object, {value.what}", file=file, path=path)
        elif kind not in SCALAR_TYPES:
            raise UnsupportedValueError(
                f"the {record.name} object holds a value of type {kind.__module__}.{kind.__qualname__}",
                file=file,
                path=path,
            )
    chain.pop()
    done.add(id(record))


def _validate_metadata(metadata: Any, path: tuple[str | int, ...], file: Path | str | None, depth: int) -> None:
    """An OrderedDict's ``_metadata``: what torch puts there is ``{module prefix: {"version": int, ...}}``
    and ``load_state_dict`` calls ``.get(prefix)`` on it. Accepted: a dict or OrderedDict with str
    keys whose values are plain values (containers and scalars, any depth within the limit); a
    tensor anywhere in it is refused (torch never puts one there, and writers would store it
    outside the tree's tensors)."""
    if type(metadata) not in (dict, OrderedDict) or not all(type(key) is str for key in metadata):
        found = type(metadata).__name__ + (" with a non-str key" if type(metadata) in (dict, OrderedDict) else "")
        raise UnsupportedValueError(
            f"an OrderedDict's _metadata must be a dict with str keys (module prefixes), found {found}",
            file=file,
            path=path,
        )
    _validate(metadata, path, file, depth)
    for leaf_path, leaf in walk(metadata, path):
        if type(leaf) is TensorRef or type(leaf) is ObjectRecord or type(leaf) is NumpyScalar:
            what = {TensorRef: "a tensor", ObjectRecord: "a recorded object"}.get(type(leaf), "a numpy scalar")
            raise UnsupportedValueError(
                f"an OrderedDict's _metadata holds {what}; only plain values (versions) are kept there",
                file=file,
                path=leaf_path,
            )


def map_leaves(tree: Any, fn: Any, path: tuple[str | int, ...] = ()) -> Any:
    """A copy of ``tree`` with every leaf replaced by ``fn(path, leaf)``; container types kept."""
    kind = type(tree)
    if kind in MAPPING_TYPES:
        out = kind({key: map_leaves(value, fn, (*path, key)) for key, value in tree.items()})
        if kind is OrderedDict and hasattr(tree, "_metadata"):
            out._metadata = map_leaves(tree._metadata, fn, (*path, "_metadata"))  # type: ignore[union-attr]
        return out
    if kind is list or kind is tuple:
        return kind(map_leaves(value, fn, (*path, index)) for index, value in enumerate(tree))
    return fn(path, tree)
