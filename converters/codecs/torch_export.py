"""torch.export program archives (``torch.export.save(ep, "m.pt2")``): their weights, read as the
``ExportedProgram.state_dict`` that ``torch.export.load(f).state_dict`` gives, without torch and
without reading the program; and a clear refusal, saying what it is, for any other zip that is not
a torch checkpoint.

A ``.pt2`` file (torch >= 2.7) is torch's zip writer's archive (every record under one folder
named after the file, stored, 64-byte aligned) laid out as the PT2 archive::

    <p>/archive_format                        "pt2"
    <p>/models/<model>.json                   the program (graph, signature): not read
    <p>/data/weights/<model>_weights_config.json
                                              {"config": {fqn: {"path_name": "weight_3", "use_pickle": false,
                                               "tensor_meta": {"dtype": 7, "sizes": [{"as_int": 3}, ...],
                                               "strides": [...], "storage_offset": {"as_int": 0},
                                               "layout": 7, ...}}}}
    <p>/data/weights/weight_<n>               one storage's raw bytes (little-endian)
    <p>/data/constants/...                    non-persistent buffers and lifted constants: not read
    <p>/data/sample_inputs/<model>.pt         a torch.save of the example inputs: not read

Each weight is a strided view (``sizes``, ``strides``, ``storage_offset`` in elements) of one
storage record, exactly what the torch archive reader's views are (``torch_archive.storage_views``:
the same bounds checks, budget charges and C-order gathering), so two weights viewing the same
bytes the same way come back as one tied tensor. ``dtype`` is torch.export's ``ScalarType`` number.
The tree is the weights in the config's order (the program's state_dict: parameters, then
persistent buffers); an archive of several programs gives ``{model name: weights}``, in the archive's order.

Refused, naming the weight: a weight pickled inside the archive (``use_pickle``: a tensor
subclass), a symbolic size, a layout other than strided, a record that lacks its bytes (a fake
tensor saved without data). An AOTInductor package (``.pt2`` of compiled code without a program's
weights config) and the older (torch < 2.7) archive layout are refused saying what to do.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import dtypes
from ..core.budget import Budget
from ..core.errors import CorruptFileError, UnsupportedValueError
from ..core.storage import is_remote
from ..core.stored import loads_json_strict
from ..core.tree import MAX_DIM, MAX_NDIM, TensorRef
from .torch_archive import storage_views
from .torch_pickle import Storage, quoted
from .zip import Ranges, StoredEntry, check_entry, read_entry, remote_ranges, stored_entries

KIND = "torch.export program archive (.pt2)"
NOTE = (
    "the exported program (its graph, constants and sample inputs) is not carried: only its weights, "
    "as torch.export.load(f).state_dict gives them"
)
ARCHIVE_FORMAT = "archive_format"
MODELS = "models/"
WEIGHTS = "data/weights/"
CONFIG_SUFFIX = "_weights_config.json"
MAX_CONFIG_BYTES = 100_000_000
STRIDED = 7  # torch.export's Layout.Strided
# torch/_export/serde/schema.py ScalarType -> torch dtype name
SCALAR_TYPES = {
    1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float16", 7: "float32", 8: "float64",
    9: "complex32", 10: "complex64", 11: "complex128", 12: "bool", 13: "bfloat16", 28: "uint16",
    29: "float8_e4m3fn", 30: "float8_e5m2", 31: "float8_e4m3fnuz", 32: "float8_e5m2fnuz", 33: "float8_e8m0fnu",
    34: "uint32", 35: "uint64",
}  # fmt: skip
PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")
LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip local file header, its name follows
ZIP_MAGIC = b"PK\x03\x04"
SHOWN_NAMES = 4


@dataclass(frozen=True)
class Exported:
    tree: dict[str, Any]
    notes: tuple[str, ...]


def starts_like_torch_save(head: bytes) -> bool:
    """Whether a zip's first record is ``<archive>/data.pkl``, as ``torch.save`` writes it first:
    such a file goes straight to the archive reader (any other zip is looked at here first)."""
    if len(head) < LOCAL_HEADER.size or not head.startswith(ZIP_MAGIC):
        return False
    name_length = LOCAL_HEADER.unpack_from(head)[9]
    name = head[LOCAL_HEADER.size : LOCAL_HEADER.size + name_length]
    return name.endswith(b"/data.pkl") and name.count(b"/") == 1


def read_if_exported(path: Path, budget: Budget, ranges: Ranges | None = None) -> Exported | None:
    """The weights of a ``.pt2`` archive; None for a torch archive (one ``<archive>/data.pkl``: the
    archive reader's); any other zip refused, saying what it holds. ``ranges``: a remote file's
    (see ``zip.stored_entries``), by default new ones."""
    with remote_ranges(path, ranges) as held:
        return _read_if_exported(path, budget, held)


def _read_here(name: str, size: int) -> int:
    """``stored_entries``'s ``ahead`` for a remote archive: the records read here, fetched with their
    local headers (not the program, the weights, nor a torch archive's records: its reader's own)."""
    return size if name.endswith(("/" + ARCHIVE_FORMAT, CONFIG_SUFFIX)) else 0


def _read_if_exported(path: Path, budget: Budget, ranges: Ranges | None) -> Exported | None:
    entries = stored_entries(path, path.stat().st_size, budget=budget, ranges=ranges, ahead=_read_here)
    pickles = [name for name in entries if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) == 1:
        return None
    prefix = _pt2_prefix(path, entries, budget, ranges)
    if prefix is None:
        raise UnsupportedValueError(_not_a_checkpoint(entries, pickles), file=path)
    models = list(  # in the archive's order: the writer's
        name[len(prefix + MODELS) : -len(".json")]
        for name in entries
        if name.startswith(prefix + MODELS) and name.endswith(".json") and name.count("/") == prefix.count("/") + 1
    )
    configs = {model: entries.get(f"{prefix}{WEIGHTS}{model}{CONFIG_SUFFIX}") for model in models}
    if not models:
        raise UnsupportedValueError(
            "a PT2 archive without an exported program (an AOTInductor package: its weights are compiled "
            "into it); load it with torch._inductor.aoti_load_package and save the model's state_dict() "
            "with torch.save",
            file=path,
        )
    missing = [model for model, config in configs.items() if config is None]
    if missing:
        legacy = f"{prefix}{WEIGHTS}{missing[0]}.pt" in entries
        raise UnsupportedValueError(
            f"a torch.export (.pt2) archive whose program {quoted(missing[0])} has no weights config"
            + (" (its weights are in the older layout, one pickled file)" if legacy else "")
            + "; load it with torch.export.load and save ep.state_dict with torch.save",
            file=path,
        )
    views = storage_views(path, budget)
    programs = {}
    for model, config in configs.items():
        assert config is not None
        programs[model] = _weights(path, entries, prefix, model, config, views, budget, ranges)
    tree = programs["model"] if list(programs) == ["model"] else programs
    return Exported(tree, (NOTE,))


def _pt2_prefix(path: Path, entries: dict[str, StoredEntry], budget: Budget, ranges: Ranges | None) -> str | None:
    """``<p>/`` of a PT2 archive (its ``<p>/archive_format`` record says ``pt2``), else None."""
    for name, entry in entries.items():
        small = name.endswith("/" + ARCHIVE_FORMAT) and name.count("/") == 1 and entry.file_size <= 64
        if small and bytes(read_entry(path, entry, budget, ranges)).strip() == b"pt2":
            return name[: -len(ARCHIVE_FORMAT)]
    return None


def _not_a_checkpoint(entries: dict[str, StoredEntry], pickles: list[str]) -> str:
    names = sorted(entries)
    listed = ", ".join(quoted(name, 80) for name in names[:SHOWN_NAMES])
    more = f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else ""
    if len(pickles) > 1:
        return (
            f"a zip holding {len(pickles)} torch archives ({', '.join(quoted(p, 80) for p in pickles[:SHOWN_NAMES])}), "
            "not one torch.save checkpoint: extract them and convert each"
        )
    if any(name.endswith(("serialized_exported_program.json", "serialized_state_dict.pt")) for name in names):
        return (
            "a torch.export archive in the layout of torch < 2.7: load it with torch.export.load and save "
            "ep.state_dict with torch.save (or re-save it with a newer torch.export.save, whose weights are read)"
        )
    what = f"it holds {listed}{more}" if names else "it is empty"
    return (
        f"a zip archive, not a torch checkpoint: {what}, and no <archive>/data.pkl (what torch.save writes); "
        "a .pt2 program archive is read when torch.export.save wrote it"
    )


def _weights(
    path: Path,
    entries: dict[str, StoredEntry],
    prefix: str,
    model: str,
    config_entry: StoredEntry,
    views: Any,
    budget: Budget,
    ranges: Ranges | None,
) -> dict[str, TensorRef]:
    what = f"{WEIGHTS}{model}{CONFIG_SUFFIX}"
    if config_entry.file_size > MAX_CONFIG_BYTES:
        raise CorruptFileError(f"{what} is larger than {MAX_CONFIG_BYTES} bytes", file=path)
    config = loads_json_strict(bytes(read_entry(path, config_entry, budget, ranges)), path, what, budget)
    weights = config.get("config") if type(config) is dict else None
    if type(weights) is not dict:
        raise CorruptFileError(f"{what} must hold a 'config' object of weight name to payload", file=path)
    storages: dict[str, Storage] = {}
    made: dict[tuple[Any, ...], TensorRef] = {}
    tree: dict[str, TensorRef] = {}
    for fqn, payload in weights.items():
        where = f"{what}: weight {quoted(fqn, 120)}"
        if type(payload) is not dict or type(payload.get("path_name")) is not str:
            raise CorruptFileError(f"{where} must be an object with a 'path_name'", file=path)
        if payload.get("use_pickle") is not False:
            raise UnsupportedValueError(
                f"{where} is pickled inside the archive (a tensor subclass), not stored as raw bytes; "
                "load the archive with torch.export.load and save ep.state_dict with torch.save",
                file=path,
            )
        dtype, shape, stride, offset = _tensor_meta(path, where, payload.get("tensor_meta"))
        name = payload["path_name"]
        if not PLAIN_NAME.fullmatch(name):
            raise CorruptFileError(f"{where} names the record {quoted(name, 80)}, not a plain file name", file=path)
        storage = storages.get(name)
        if storage is None:
            entry = entries.get(f"{prefix}{WEIGHTS}{name}")
            if entry is None:
                raise CorruptFileError(f"{where} names the record {WEIGHTS}{name}, which the archive lacks", file=path)
            if entry.compressed and is_remote(path):  # checked when used: here it would download it
                budget.output(entry.file_size, f"data inflated from {entry.label}")
            elif entry.compressed:  # inflated and checked once now (a zip tool re-compressed the file)
                check_entry(path, entry, budget)
            storage = storages[name] = Storage(name, None, entry.source(path), entry.file_size)
        if storage.nbytes == 0 and dtypes.numel(shape) > 0:
            raise UnsupportedValueError(
                f"{where}: its record {WEIGHTS}{name} is empty (saved without data, from a fake tensor)", file=path
            )
        key = (name, dtype.name, shape, stride, offset)
        ref = made.get(key)
        if ref is None:
            ref = made[key] = views(storage, dtype, offset, shape, stride)
        tree[fqn] = ref
    return tree


def _tensor_meta(path: Path, where: str, meta: Any) -> tuple[dtypes.DType, tuple[int, ...], tuple[int, ...], int]:
    if type(meta) is not dict:
        raise CorruptFileError(f"{where} has no tensor_meta object", file=path)
    number = meta.get("dtype")
    name = SCALAR_TYPES.get(number) if type(number) is int else None
    if name is None:
        raise UnsupportedValueError(f"{where} has the unknown dtype number {meta.get('dtype')!r:.40}", file=path)
    if meta.get("layout", STRIDED) != STRIDED:
        layout = f"{meta.get('layout')!r:.40}"
        raise UnsupportedValueError(f"{where} is not a strided (dense) tensor (layout {layout})", file=path)
    shape = _ints(path, where, "sizes", meta.get("sizes"))
    stride = _ints(path, where, "strides", meta.get("strides"))
    if len(stride) != len(shape):
        raise CorruptFileError(f"{where} has {len(shape)} sizes but {len(stride)} strides", file=path)
    offset = meta.get("storage_offset", {"as_int": 0})
    (offset_value,) = _ints(path, where, "storage_offset", [offset])
    return dtypes.DTYPES[name], shape, stride, offset_value


def _ints(path: Path, where: str, what: str, values: Any) -> tuple[int, ...]:
    """``[{"as_int": n}, ...]`` as ints in [0, 2**63): a symbolic (``as_expr``) value is refused."""
    if type(values) is not list or len(values) > MAX_NDIM:
        raise CorruptFileError(f"{where}: {what} must be a list of at most {MAX_NDIM} sizes", file=path)
    result = []
    for value in values:
        number = value.get("as_int") if type(value) is dict and len(value) == 1 else None
        if type(number) is not int:
            raise UnsupportedValueError(f"{where}: {what} holds {value!r:.60}, not a concrete int", file=path)
        if not 0 <= number <= MAX_DIM:
            raise CorruptFileError(f"{where}: {what} holds {number}, outside [0, 2**63)", file=path)
        result.append(number)
    return tuple(result)
