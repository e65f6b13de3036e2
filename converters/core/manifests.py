"""The manifest: the JSON description of a checkpoint (its "schema" of keys, dtypes and shapes).

It is the one place where the exact shape of the tree is written down in a language-neutral way,
so formats that cannot say "tuple" or "int key" embed it (safetensors ``__metadata__``), and other
tools can read it without knowing Python. ``schemas/manifest.schema.json`` is its JSON Schema and
``schemas/manifest.md`` explains every field.

Tree nodes are one-key objects naming their type, so no type is ever guessed from JSON syntax::

    {"odict": [["conv1.weight", {"tensor": "conv1.weight"}]], "metadata": {...}}
    {"dict": [[0, {...}], ["lr", {"float": 0.001}]]}     keys are JSON strings or integers
    {"counter": [[4, {"int": 2}]]}                       collections.Counter (MultiStepLR milestones)
    {"list": [...]}  {"tuple": [...]}  {"none": null}  {"bool": true}  {"int": 3}  {"str": "x"}
    {"float": 0.9}   {"float": "0x7ff8000000000001"}     non-finite floats as IEEE-754 bits
    {"bytes": "00ff"}  {"npscalar": ["<f8", "000000000000e83f"]}  {"ndarray": "key"}  (numpy array)
    {"record": {"class": "argparse.Namespace", "how": "new", "args": [], "state": {...}}}
    {"backref": 1}                                       the record 1 level up (a parent pointer)
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import Any

from blake3 import blake3

from .errors import CorruptFileError, TreePath, UnsupportedValueError, shown
from .objects import HOW, NumpyScalar, ObjectRecord
from .tree import MAPPING_TYPES, Checkpoint, TensorRef, walk

MANIFEST_VERSION = 1
GENERATOR = "statedict-convert"

JsonNode = dict[str, Any]


def storage_keys(tree: Any) -> dict[tuple[str | int, ...], str]:
    """The key each tensor is stored under, by tree path.

    A bare ``state_dict`` (a mapping of str keys to tensors) keeps its own keys, so other tools
    find ``conv1.weight`` where they expect it. Anything else uses the tree path, segments joined
    by ``/`` with ``~`` and ``/`` escaped as ``~0`` and ``~1`` (RFC 6901), e.g.
    ``optimizer_state_dict/state/0/momentum_buffer``.

    A tied tensor (one ``TensorRef`` at several paths) has one key: its first path's.
    """
    tensors = [(path, leaf) for path, leaf in walk(tree) if isinstance(leaf, TensorRef)]
    flat = isinstance(tree, dict) and all(
        type(key) is str and isinstance(value, TensorRef) for key, value in tree.items()
    )
    keys: dict[tuple[str | int, ...], str] = {}
    by_identity: dict[int, str] = {}
    taken: set[str] = set()
    for path, ref in tensors:
        if id(ref) in by_identity:
            keys[path] = by_identity[id(ref)]
            continue
        key = str(path[0]) if flat else "/".join(_escape(segment) for segment in path)
        candidate, n = key, 1
        while candidate in taken:  # only an int key and a str key spelling the same digits clash
            n += 1
            candidate = f"{key}#{n}"
        taken.add(candidate)
        keys[path] = by_identity[id(ref)] = candidate
    return keys


def _escape(segment: str | int) -> str:
    return str(segment).replace("~", "~0").replace("/", "~1")


def encode_tree(tree: Any, keys: dict[tuple[str | int, ...], str]) -> JsonNode:
    """The JSON node for ``tree``; tensors become ``{"tensor": key}`` using ``keys`` by path."""
    return _encode(tree, (), keys)


def _encode(
    node: Any,
    path: tuple[str | int, ...],
    keys: dict[tuple[str | int, ...], str],
    records: list[list[Any]] | None = None,
) -> JsonNode:
    kind = type(node)
    if kind in MAPPING_TYPES:
        items = [[key, _encode(value, (*path, key), keys, records)] for key, value in node.items()]
        if kind is dict:
            return {"dict": items}
        if kind is Counter:
            return {"counter": items}
        encoded: JsonNode = {"odict": items}
        if hasattr(node, "_metadata"):
            encoded["metadata"] = _encode(node._metadata, (*path, "_metadata"), {})
        return encoded
    if kind is list or kind is tuple:
        return {kind.__name__: [_encode(v, (*path, i), keys, records) for i, v in enumerate(node)]}
    if node is None:
        return {"none": None}
    if kind is bool:
        return {"bool": node}
    if kind is int:
        return {"int": node}
    if kind is float:
        return {"float": node if math.isfinite(node) else float_bits(node)}
    if kind is str:
        return {"str": node}
    if kind is TensorRef:
        return {"ndarray" if node.numpy else "tensor": keys[path]}
    if kind is bytes:
        return {"bytes": node.hex()}
    if kind is NumpyScalar:
        return {"npscalar": [node.dtype, node.data.hex()]}
    if kind is ObjectRecord:
        return _encode_record(node, path, [] if records is None else records)
    raise TypeError(f"unvalidated tree: {kind!r} at {path}")  # validate() runs first


def _encode_record(record: ObjectRecord, path: tuple[str | int, ...], records: list[list[Any]]) -> JsonNode:
    # records: [record, its arguments written] of the records being encoded, outermost first
    for level, (outer, arguments_done) in enumerate(reversed(records), 1):
        if outer is record:
            if not arguments_done:  # pickle makes an object after its arguments: no cycle there
                raise UnsupportedValueError(
                    f"a {shown(record.name)} object is among its own constructor arguments", path=path
                )
            return {"backref": level}
    records.append([record, False])
    body: JsonNode = {
        "class": record.name,
        "how": record.how,
        "args": [_encode(value, path, {}, records) for value in record.args],
    }
    records[-1][1] = True
    if record.built:
        body["state"] = _encode(record.state, path, {}, records)
    if record.items:
        body["items"] = [[_encode(k, path, {}, records), _encode(v, path, {}, records)] for k, v in record.items]
    if record.elements:
        body["elements"] = [_encode(value, path, {}, records) for value in record.elements]
    records.pop()
    return {"record": body}


def float_bits(value: float) -> str:
    """IEEE-754 binary64 bits as ``0x`` + 16 hex digits (keeps NaN payloads)."""
    return "0x" + struct.pack(">d", value).hex()


def decode_tree(node: Any, tensor: Callable[[str, TreePath], Any], *, file: Any = None) -> Any:
    """Rebuild the Python tree from its JSON node; ``tensor(key, path)`` supplies each tensor.

    An ``odict``'s ``metadata`` (torch's ``_metadata``) holds plain values only: a tensor node
    there is refused (``core.tree.validate`` refuses it in any tree)."""
    return _Decoder(tensor, file).decode(node, (), 0)


def _no_tensor(key: str, path: TreePath, *, file: Any = None) -> Any:
    raise CorruptFileError(
        "an OrderedDict's _metadata holds a tensor; only plain values (versions) are kept there",
        file=file,
        path=path,
    )


_RECORD_FIELDS = frozenset({"class", "how", "args", "state", "items", "elements"})


class _Decoder:
    def __init__(self, tensor: Callable[[str, TreePath], Any], file: Any) -> None:
        self.tensor, self.file = tensor, file
        self.records: list[ObjectRecord] = []  # the records being decoded, for backref nodes
        self.arrays: dict[str, Any] = {}  # storage key -> the tensor marked as a numpy array (ties stay ties)

    def decode(self, node: Any, path: tuple[str | int, ...], depth: int) -> Any:
        file = self.file
        if depth > 64:
            raise CorruptFileError("manifest tree nested deeper than 64 levels", file=file, path=path)
        if type(node) is not dict or len(node) != 1 + ("metadata" in node and "odict" in node):
            raise CorruptFileError(
                f"manifest tree node must be a one-key object, found {_short(node)}", file=file, path=path
            )
        tag = next(key for key in node if key != "metadata") if len(node) > 1 else next(iter(node))
        value = node[tag]
        if tag in ("dict", "odict", "counter"):
            out: dict[Any, Any] = {"dict": dict, "odict": OrderedDict, "counter": Counter}[tag]()
            for item in _expect(value, list, path, file, tag):
                if type(item) is not list or len(item) != 2 or type(item[0]) not in (str, int):
                    raise CorruptFileError(
                        f"dict item must be [str|int key, node], found {_short(item)}", file=file, path=path
                    )
                key = item[0]
                if key in out:
                    raise CorruptFileError(f"duplicate key {key!r}", file=file, path=path)
                out[key] = self.decode(item[1], (*path, key), depth + 1)
            if "metadata" in node:
                metadata = _Decoder(partial(_no_tensor, file=file), file).decode(
                    node["metadata"], (*path, "_metadata"), depth + 1
                )
                out._metadata = metadata  # type: ignore[attr-defined]
            return out
        if tag in ("list", "tuple"):
            items = [self.decode(v, (*path, i), depth + 1) for i, v in enumerate(_expect(value, list, path, file, tag))]
            return items if tag == "list" else tuple(items)
        if tag == "none":
            if value is not None:
                raise CorruptFileError(f"'none' node must hold null, found {_short(value)}", file=file, path=path)
            return None
        if tag == "bool":
            return _expect(value, bool, path, file, tag)
        if tag == "int":
            return _expect(value, int, path, file, tag)
        if tag == "str":
            return _expect(value, str, path, file, tag)
        if tag == "float":
            return _decode_float(value, path, file)
        if tag == "tensor":
            return self.tensor(_expect(value, str, path, file, tag), path)
        if tag == "ndarray":
            key = _expect(value, str, path, file, tag)
            ref = self.tensor(key, path)
            if key not in self.arrays:  # by key: one array for a key named twice (a tie)
                try:
                    self.arrays[key] = ref.as_numpy()  # a TensorRef, or a reader's placeholder that says so
                except UnsupportedValueError as exc:
                    raise CorruptFileError(f"'ndarray' node {key!r}: {exc}", file=file, path=path) from None
            return self.arrays[key]
        if tag == "bytes":
            return _hex(value, path, file, tag)
        if tag == "npscalar":
            if type(value) is not list or len(value) != 2 or type(value[0]) is not str or not value[0]:
                raise CorruptFileError(
                    f"'npscalar' node must hold [numpy dtype, hex bytes], found {_short(value)}", file=file, path=path
                )
            try:
                return NumpyScalar(value[0], _hex(value[1], path, file, tag))
            except UnsupportedValueError as exc:
                raise CorruptFileError(f"'npscalar' node: {exc}", file=file, path=path) from None
        if tag == "record":
            return self.record(value, path, depth)
        if tag == "backref":
            level = value
            if type(level) is not int or not 1 <= level <= len(self.records):
                raise CorruptFileError(
                    f"'backref' must name one of the {len(self.records)} enclosing records, found {_short(level)}",
                    file=file,
                    path=path,
                )
            return self.records[-level]
        raise CorruptFileError(f"unknown manifest node type {tag!r}", file=file, path=path)

    def record(self, body: Any, path: tuple[str | int, ...], depth: int) -> ObjectRecord:
        file = self.file
        if (
            type(body) is not dict
            or not {"class", "how", "args"} <= body.keys() <= _RECORD_FIELDS
            or type(body["class"]) is not str
            or not body["class"]
            or body["how"] not in HOW
            or type(body["args"]) is not list
            or type(body.get("items", [])) is not list
            or type(body.get("elements", [])) is not list
        ):
            raise CorruptFileError(
                "'record' node must hold class, how (global/call/new), args and optionally state, items, "
                f"elements; found {_short(body)}",
                file=file,
                path=path,
            )
        record = ObjectRecord(body["class"], body["how"])
        # its arguments first: a back-reference may name it only from what is set after it is made
        record.args = tuple(self.decode(value, path, depth + 1) for value in body["args"])
        self.records.append(record)
        if "state" in body:
            record.state, record.built = self.decode(body["state"], path, depth + 1), True
        for pair in body.get("items", []):
            if type(pair) is not list or len(pair) != 2:
                raise CorruptFileError(f"a record's item must be [key, value], found {_short(pair)}", file=file)
            record.items.append((self.decode(pair[0], path, depth + 1), self.decode(pair[1], path, depth + 1)))
        record.elements = [self.decode(value, path, depth + 1) for value in body.get("elements", [])]
        self.records.pop()
        if any(type(leaf) is TensorRef for leaf in _leaves(record.children())):
            raise CorruptFileError(f"the {record.name} record holds a tensor; records hold no tensors", file=file)
        return record


def _leaves(values: list[Any]) -> Iterator[Any]:
    for value in values:
        yield from (leaf for _, leaf in walk(value))


def _hex(value: Any, path: TreePath, file: Any, tag: str) -> bytes:
    if type(value) is str and len(value) % 2 == 0:
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    raise CorruptFileError(f"{tag!r} node must hold hex digits, found {_short(value)}", file=file, path=path)


def _expect(value: Any, kind: type, path: TreePath, file: Any, tag: str) -> Any:
    if type(value) is not kind:
        raise CorruptFileError(f"{tag!r} node must hold a {kind.__name__}, found {_short(value)}", file=file, path=path)
    return value


def _decode_float(value: Any, path: TreePath, file: Any) -> float:
    if type(value) is float:
        return value
    if type(value) is str and len(value) == 18 and value.startswith("0x"):
        try:
            return float(struct.unpack(">d", bytes.fromhex(value[2:]))[0])
        except ValueError:
            pass
    raise CorruptFileError(
        f"'float' node must hold a JSON float or '0x' + 16 hex digits, found {_short(value)}",
        file=file,
        path=path,
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def tensor_entry(key: str, path: tuple[str | int, ...], ref: TensorRef) -> dict[str, Any]:
    entry = {"key": key, "path": list(path), "dtype": ref.dtype, "shape": list(ref.shape), "nbytes": ref.nbytes}
    if ref.cast_from is not None:
        entry["cast"] = cast_record(ref, final=True)
    return entry


def cast_record(ref: TensorRef, *, final: bool) -> dict[str, str]:
    """What a cast tensor records (``{"from": source dtype, "blake3": source bytes' digest}``), as
    every format stores it beside its tensor digests. Before the tensors are written (``final``
    False) a digest not yet known is a same-length placeholder, for headers rewritten in place."""
    origin = ref.cast_from
    assert origin is not None
    digest = origin.resolved() if final else origin.digest or "0" * 64
    return {"from": origin.dtype, "blake3": digest}


def cast_records(
    tensors: Iterable[tuple[tuple[str | int, ...], TensorRef]],
    keys: Mapping[tuple[str | int, ...], str],
    *,
    final: bool,
) -> dict[str, dict[str, str]]:
    """The cast records of ``tensors`` (path, tensor) by storage key: empty when none was cast."""
    return {keys[path]: cast_record(ref, final=final) for path, ref in tensors if ref.cast_from is not None}


def build(checkpoint: Checkpoint, *, digests: bool = True) -> dict[str, Any]:
    """The manifest of a checkpoint. With ``digests``, each tensor's BLAKE3 digest: the one the file
    stores (our writers store them) or, for files from other writers, computed from the bytes."""
    keys = storage_keys(checkpoint.tree)
    tensors = []
    entries: dict[int, dict[str, Any]] = {}
    for path, ref in checkpoint.tensors():
        if id(ref) in entries:  # a tied tensor: listed once, its other paths as aliases
            entries[id(ref)].setdefault("aliases", []).append(list(path))
            continue
        entry = entries[id(ref)] = tensor_entry(keys[path], path, ref)
        if digests:
            entry["blake3"] = ref.digest or _blake3_hex(ref.source)
        tensors.append(entry)
    return {
        "sdconvert_manifest": MANIFEST_VERSION,
        "generator": GENERATOR,
        "tree": encode_tree(checkpoint.tree, keys),
        "tensors": tensors,
    }


def tree_digest(
    tree: Any,
    digests: Callable[[tuple[str | int, ...], TensorRef], str | None],
    metadata: Mapping[str, Any] | None = None,
) -> str | None:
    """BLAKE3 of everything a checkpoint says besides its tensor bytes: the tree (keys, key order,
    container types, values) and each tensor's key, dtype, shape and digest, in a canonical JSON.

    A cast tensor's row also holds what it was cast from (source dtype and digest); ``metadata`` is
    the file's own metadata that conversions carry (a LoRA trainer's ``ss_*`` keys), covered too.
    ``digests(path, ref)`` gives each tensor's digest (a writer: the one it stores; a reader: the
    one the file stores); None when a tensor has none, since then the digest cannot cover it.
    Writers store it beside the tree; ``verify --deep`` recomputes it from what was read, so a flip
    that changes a key, a dtype, a shape or a value (epoch 3 → 7) is found, not only tensor bytes.
    """
    keys = storage_keys(tree)
    tensors = []
    seen: set[int] = set()
    for path, leaf in walk(tree):
        if type(leaf) is not TensorRef or id(leaf) in seen:
            continue
        seen.add(id(leaf))
        digest = digests(path, leaf)
        if digest is None:
            return None
        row: list[Any] = [keys[path], leaf.dtype, list(leaf.shape), digest]
        if leaf.cast_from is not None:  # only cast tensors add it: digests of files without casts stay as they were
            row += [leaf.cast_from.dtype, leaf.cast_from.resolved()]
        tensors.append(row)
    document: dict[str, Any] = {"tree": encode_tree(tree, keys), "tensors": tensors}
    # The file's own metadata that conversions carry (Checkpoint.carried_metadata), as the strings
    # every format can give back, without safetensors' "format" marker; absent when there is none,
    # so the digest of a file without such metadata is what it always was.
    own = {key: value for key, value in metadata_strings(metadata or {}).items() if key != "format"}
    if own:
        document["metadata"] = dict(sorted(own.items()))
    canonical = json.dumps(document, separators=(",", ":"), ensure_ascii=True)
    return str(blake3(canonical.encode("ascii")).hexdigest())


def recomputed_tree_digest(checkpoint: Checkpoint) -> str | None:
    """The tree digest of a checkpoint as read, from the tensor digests its file stores."""
    return tree_digest(checkpoint.tree, lambda _path, ref: ref.digest, checkpoint.carried_metadata())


def metadata_strings(metadata: Mapping[str, Any]) -> dict[str, str]:
    """A file's own metadata for a format that stores strings only (safetensors ``__metadata__``,
    ONNX ``metadata_props``): strings as they are, other values as JSON text."""
    return {
        key: value if type(value) is str else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        for key, value in metadata.items()
    }


def _blake3_hex(source: Any) -> str:
    from .transfer import blake3_hex  # the copy machinery (and ISA-L): only when a digest is missing

    return blake3_hex(source)
