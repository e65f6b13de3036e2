"""Hugging Face folders as ``save_pretrained`` and the ``Trainer`` write them, recognised by the
names of the files in them and read as one checkpoint.

The model's weights are, in the order transformers prefers them when it loads a folder:

1. ``model.safetensors``, 2. ``model.safetensors.index.json`` with its shards,
3. ``pytorch_model.bin``, 4. ``pytorch_model.bin.index.json`` with its shards;

failing the exact names, the only shard index of a kind (``*.safetensors.index.json``,
``*.bin.index.json``: ``find_index``'s rule) or, where a kind has no index, the only ``*.safetensors``
file (``adapter_model.safetensors``) or the only ``*model.bin`` file (``diffusion_pytorch_model.bin``).
The first one found is read (the format whose suffix it has reads it); any other is named in the
checkpoint's ``notes`` (``inspect`` shows them), as are other checkpoint-like files not read.

A **Trainer checkpoint folder** (``checkpoint-N/``) is recognised by the files only the Trainer
writes beside the weights (``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state.pth`` /
``rng_state_<rank>.pth``, ``trainer_state.json``) and is read as ONE checkpoint whose tree is a
dict, in this order, of the parts present:

=================== =============================================================================
key                 value
=================== =============================================================================
``model``           the weights' tree (a state_dict), from any of the four layouts above
``optimizer``       ``optimizer.pt`` (``torch.save(optimizer.state_dict())``)
``scheduler``       ``scheduler.pt``
``scaler``          ``scaler.pt`` (the AMP ``GradScaler``'s state)
``rng_state``       ``rng_state.pth`` (python/numpy/cpu/cuda generator states); ``rng_state_<rank>``
                    for each ``rng_state_<rank>.pth`` of a multi-process run, by rank
``trainer_state``   ``trainer_state.json`` parsed as a plain tree (JSON as Python's ``json`` writes
                    it: duplicate keys refused; ``NaN``/``Infinity``, which it writes for a NaN
                    ``grad_norm``, read as those floats), at most 100 MB
``training_args``   ``training_args.bin``: a pickled ``TrainingArguments`` dataclass, an inert
                    record (class name and fields; nothing imported)
=================== =============================================================================

A folder holding weights and ``training_args.bin`` only (what ``trainer.save_model`` writes) is a
model folder: its weights alone, ``training_args.bin`` named in the notes.

Safety: nothing is followed. The folder is listed once; every part is opened only if it is a
regular file of the folder (``lstat``: a symbolic link, a FIFO, a socket, a device or a sub-folder
in a part's place is refused, naming it), sub-folders are not entered, and every part is read by
the existing reader of its format (``registry.for_suffix``) against the one budget of the read,
which ``Budget.for_path`` sized for all the folder's regular files.

This module names files, never formats (``core`` chooses formats through the registry).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .budget import Budget
from .errors import ConverterError, CorruptFileError, UnknownFormatError, shown
from .storage import RemoteError, RemotePath
from .stored import loads_json_strict, read_folder_file
from .tree import Checkpoint

INDEX_SUFFIX = ".index.json"
TRAINER_STATE = "trainer_state.json"
TRAINING_ARGS = "training_args.bin"
MAX_TRAINER_STATE_BYTES = 100_000_000  # as a shard index
TRAINER_KIND = "Hugging Face Trainer checkpoint folder"
MODEL_KIND = "Hugging Face model folder"
SHOWN_NAMES = 5  # names listed in a message before "and N more"
# Files that look like checkpoints: a folder's file of one of these kinds that is not read is named
# in the notes (a tokenizer's or a config's files are not).
CHECKPOINT_LIKE = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pth.tar", ".msgpack", ".onnx", ".h5", ".pkl")

# The Trainer's own files besides the weights, by key, in the tree's order; rng_state_<rank>.pth
# come after rng_state.pth, by rank.
TRAINER_PARTS: tuple[tuple[str, str], ...] = (
    ("optimizer", "optimizer.pt"),
    ("scheduler", "scheduler.pt"),
    ("scaler", "scaler.pt"),
    ("rng_state", "rng_state.pth"),
)
RANK_RNG_STATE = re.compile(r"rng_state_(0|[1-9][0-9]{0,5})\.pth")


@dataclass(frozen=True)
class Family:
    """One kind of weights ``save_pretrained`` writes: a file, or an index beside its shards."""

    suffix: str  # ".safetensors": which format reads it is the registry's business
    file: str  # "model.safetensors"
    index: str  # "model.safetensors.index.json"
    only: str  # without the exact names nor an index, the only file whose name ends so is the weights

    @property
    def index_suffix(self) -> str:
        return self.suffix + INDEX_SUFFIX


FAMILIES = (
    Family(".safetensors", "model.safetensors", "model.safetensors.index.json", ".safetensors"),
    # .bin says little: only a name like pytorch_model.bin (diffusion_pytorch_model.bin, adapter_model.bin)
    Family(".bin", "pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin"),
)


@dataclass(frozen=True)
class Layout:
    """What a folder holds, by name: its weights (in order of preference) and its Trainer parts."""

    folder: Path
    names: tuple[str, ...]  # every entry, sorted
    subfolders: tuple[str, ...]
    weights: tuple[Path, ...]  # weights files or shard indexes, the preferred first
    parts: tuple[tuple[str, Path], ...]  # Trainer parts: (key, file), in the tree's order

    @property
    def trainer(self) -> bool:
        """A Trainer checkpoint folder: it holds a file only the Trainer writes (training_args.bin
        alone is also written by ``trainer.save_model`` beside the model: not one of them)."""
        return any(key != "training_args" for key, _ in self.parts)

    def family(self, weights: Path) -> Family:
        return next(f for f in FAMILIES if weights.name.endswith((f.suffix, f.index_suffix)))

    def holds(self, limit: int = SHOWN_NAMES) -> str:
        """A few of its names, for messages: "'a.txt', 'b/' and 3 more" ("nothing" when empty)."""
        if not self.names:
            return "nothing"
        marked = [name + "/" if name in self.subfolders else name for name in self.names]
        listed = ", ".join(repr(shown(name, 80)) for name in marked[:limit])
        return listed + (f" and {len(marked) - limit} more" if len(marked) > limit else "")

    def describe(self) -> str:
        """What it is, for messages: "a Hugging Face Trainer checkpoint folder (model.safetensors, ...)"."""
        read = [path.name for path in self.weights[:1]] + [path.name for _, path in self.parts]
        if self.trainer:
            return f"a {TRAINER_KIND} ({', '.join(read)})"
        if self.weights:
            return f"a {MODEL_KIND} of {self.weights[0].name}"
        return f"a folder holding {self.holds()}"


def layout(folder: Path) -> Layout | None:
    """The layout of ``folder`` (None when it is not a folder). Lists it once; opens nothing."""
    if isinstance(folder, RemotePath):
        kinds = _remote_listing(folder)
        if kinds is None:
            return None
    else:
        try:
            with os.scandir(folder) as listing:
                kinds = {entry.name: entry.is_dir(follow_symlinks=False) for entry in listing}
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise ConverterError(f"cannot list the folder: {exc.strerror or exc}", file=folder) from None
    names = set(kinds)
    files = {name for name, is_dir in kinds.items() if not is_dir}  # an exact name is taken whatever it is
    weights: list[Path] = []
    for family in FAMILIES:
        index = family.index if family.index in names else _only(files, family.index_suffix)
        file = family.file if family.file in names else None
        if file is None and index is None:
            file = _only(files, family.only)
        weights += [folder / name for name in (file, index) if name is not None]
    parts = [(key, folder / name) for key, name in TRAINER_PARTS if name in names]
    ranks = sorted(int(match.group(1)) for name in names if (match := RANK_RNG_STATE.fullmatch(name)))
    parts += [(f"rng_state_{rank}", folder / f"rng_state_{rank}.pth") for rank in ranks]
    parts += [("trainer_state", folder / TRAINER_STATE), ("training_args", folder / TRAINING_ARGS)]
    parts = [(key, path) for key, path in parts if path.name in names]
    return Layout(
        folder,
        tuple(sorted(names)),
        tuple(sorted(name for name, is_dir in kinds.items() if is_dir)),
        tuple(weights),
        tuple(parts),
    )


def _remote_listing(folder: RemotePath) -> dict[str, bool] | None:
    """A remote folder's entries, name -> is a folder (one listing request; the sizes it tells are
    kept for the ``stat`` calls that follow). None when it is not a folder, or does not exist."""
    if not folder.is_dir():
        return None
    return {entry.name: entry.is_dir() for entry in folder.iterdir()}


def _only(names: set[str], suffix: str) -> str | None:
    found = [name for name in names if name.endswith(suffix)]
    return found[0] if len(found) == 1 else None


# ------------------------------------------------------------------ what the formats ask


def default_family(folder: Path) -> Family | None:
    """The kind of weights read from ``folder`` when no format is named: the preferred weights'
    (None for a Trainer folder, which is read whole, or a folder without weights)."""
    found = layout(folder)
    if found is None or found.trainer or not found.weights:
        return None
    return found.family(found.weights[0])


def is_trainer(folder: Path) -> bool:
    found = layout(folder)
    return found is not None and found.trainer


def weights_for(folder: Path, suffix: str, reader: str) -> tuple[Path, tuple[str, ...]]:
    """The weights file or shard index of kind ``suffix`` (".safetensors", ".bin") that the format
    named ``reader`` reads from ``folder`` (not a Trainer folder), and the notes to keep about the
    others; a folder without such weights is refused saying what it holds and what reads it."""
    found = layout(folder)
    if found is None:
        raise ConverterError("is not a folder", file=folder)
    family = next(f for f in FAMILIES if f.suffix == suffix)
    if found.trainer:
        raise _read_by_another(found, reader, f"; for the weights alone pass its {_weights_name(found)}")
    mine = [path for path in found.weights if found.family(path) is family]
    if not mine:
        if found.weights:
            raise _read_by_another(found, reader)
        raise UnknownFormatError(
            f"the folder holds no {family.file} nor {family.index}: {unrecognised(found)}", file=folder
        )
    chosen = mine[0]
    others = [path.name for path in found.weights if path != chosen]
    notes = []
    if others:
        why = "transformers loads it first" if chosen == found.weights[0] else f"the {reader} format reads it"
        notes.append(f"also holds {', '.join(others)}, not read: {chosen.name} is read ({why})")
    notes += _unread(found, [chosen])
    return chosen, tuple(notes)


def _weights_name(found: Layout) -> str:
    return found.weights[0].name if found.weights else "weights file"


def _read_by_another(found: Layout, reader: str, more: str = "") -> UnknownFormatError:
    from .registry import registry  # lazy: the registry's messages use this module

    actual = registry.by_contents(found.folder)
    if actual is None or actual.name == reader:
        return UnknownFormatError(f"{found.describe()}: the {reader} format cannot read it{more}", file=found.folder)
    return UnknownFormatError(
        f"{found.describe()}, not {reader} weights: pass --from {actual.name} (format={actual.name!r}) "
        f"or no --from{more}",
        file=found.folder,
    )


def wrong_index(path: Path, reader: str) -> UnknownFormatError:
    """An index file of another kind of shards given to ``reader`` (``--from safetensors`` on a
    ``pytorch_model.bin.index.json``): named, with the format that reads it."""
    from .registry import registry

    family = next((f for f in FAMILIES if path.name.endswith(f.index_suffix)), None)
    actual = registry.for_suffix(path)
    what = f"the shard index of {family.suffix} files" if family else "a shard index"
    if actual is None or actual.name == reader:
        return UnknownFormatError(f"{what}, which the {reader} format does not read", file=path)
    return UnknownFormatError(
        f"{what}, not of {reader} shards: pass --from {actual.name} (format={actual.name!r}) or no --from", file=path
    )


def unrecognised(found: Layout | Path) -> str:
    """What an unrecognised folder holds and what would be accepted, for the one-line error."""
    if isinstance(found, Path):
        listed = layout(found)
        if listed is None:
            return "not a folder"
        found = listed
    return (
        f"it holds {found.holds()}; a checkpoint folder holds model.safetensors or pytorch_model.bin, "
        "or a shard index (model.safetensors.index.json, pytorch_model.bin.index.json) beside its shards, "
        "with a Trainer checkpoint's optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json, "
        "or torch.distributed.checkpoint's .metadata"
    )


def regular_part(path: Path, what: str | None = None) -> Path:
    """``path`` if it is a regular file of its folder (``lstat``: a symbolic link is not followed),
    else a one-line ``CorruptFileError`` naming it and what it is."""
    name = what or path.name
    try:
        # A remote object's mode: a store holds files and folders only (no symlink to refuse)
        mode = path.stat().st_mode if isinstance(path, RemotePath) else os.lstat(path).st_mode
    except RemoteError as exc:
        if exc.missing:
            raise CorruptFileError(f"{shown(name)} is gone from the folder", file=path) from None
        raise
    except FileNotFoundError:
        raise CorruptFileError(f"{shown(name)} is gone from the folder", file=path) from None
    except OSError as exc:
        raise CorruptFileError(f"{shown(name)} cannot be read: {exc.strerror or exc}", file=path) from None
    if stat.S_ISREG(mode):
        return path
    if stat.S_ISLNK(mode):
        raise CorruptFileError(
            f"{shown(name)} is a symbolic link, not a regular file in the folder; refusing to follow it "
            "(pass the file it points to itself)",
            file=path,
        )
    kinds = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}
    kind = kinds.get(stat.S_IFMT(mode), "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
    raise CorruptFileError(f"{shown(name)} is {kind}, not a regular file; refusing to read it", file=path)


# ------------------------------------------------------------------ the Trainer folder


def read_trainer(folder: Path, budget: Budget) -> Checkpoint:
    """A Trainer checkpoint folder as one checkpoint (see the module's table), each part read by
    its format's reader against ``budget``."""
    from .registry import registry  # lazy: the registry's messages use this module

    found = layout(folder)
    if found is None or not found.trainer:
        raise UnknownFormatError(f"not a {TRAINER_KIND}: {unrecognised(folder)}", file=folder)
    budget.cover(_regular_size(found))
    tree: dict[str, Any] = {}
    notes: list[str] = []
    metadata = None
    if found.weights:
        weights = found.weights[0]
        if not weights.name.endswith(INDEX_SUFFIX):  # an index is checked by its reader, shards too
            regular_part(weights)
        fmt = registry.for_suffix(weights)
        if fmt is None:  # pragma: no cover - the built-in formats hold every family's suffixes
            raise UnknownFormatError(f"no format reads {weights.name}", file=weights)
        model = fmt.read(weights, budget)
        tree["model"] = model.tree
        metadata = model.file_metadata
        if len(found.weights) > 1:
            others = ", ".join(path.name for path in found.weights[1:])
            notes.append(f"also holds {others}, not read: {weights.name} is the model (transformers loads it first)")
    else:
        notes.append("no model weights (model.safetensors, pytorch_model.bin or a shard index) in the folder")
    for key, path in found.parts:
        regular_part(path)
        if key == "trainer_state":
            raw = read_folder_file(path, TRAINER_STATE, "the folder", MAX_TRAINER_STATE_BYTES, budget)
            tree[key] = loads_json_strict(raw, path, TRAINER_STATE, budget, allow_nan=True)
            del raw
            continue
        fmt = registry.for_suffix(path)
        if fmt is None:  # pragma: no cover - .pt, .pth and .bin are built-in suffixes
            raise UnknownFormatError(f"no format reads {path.name}", file=path)
        tree[key] = fmt.read(path, budget).tree
    notes += _unread(found, list(found.weights[:1]))
    return Checkpoint(tree, folder, file_metadata=metadata, kind=TRAINER_KIND, notes=tuple(notes))


def _regular_size(found: Layout) -> int:
    total = 0
    for name in found.names:
        path = found.folder / name
        try:
            info = path.stat() if isinstance(path, RemotePath) else os.lstat(path)
        except (OSError, RemoteError):
            continue
        if stat.S_ISREG(info.st_mode):
            total += info.st_size
    return total


def _unread(found: Layout, read: list[Path]) -> list[str]:
    """Notes naming the checkpoint-like files and the sub-folders of ``found`` that are not read."""
    used = {path.name for path in read} | ({path.name for _, path in found.parts} if found.trainer else set())
    if read and read[0].name.endswith(INDEX_SUFFIX):
        used |= {name for name in found.names if name.endswith(found.family(read[0]).suffix)}  # its shards
    used |= {path.name for path in found.weights}  # named by the preference note
    unread = [
        name
        for name in found.names
        if name not in used and name not in found.subfolders and name.lower().endswith(CHECKPOINT_LIKE)
    ]
    notes = []
    if unread:
        notes.append(
            f"not read: {', '.join(shown(name, 80) for name in unread[:SHOWN_NAMES])}"
            + (f" and {len(unread) - SHOWN_NAMES} more" if len(unread) > SHOWN_NAMES else "")
        )
    if found.subfolders:
        listed = ", ".join(shown(name, 80) + "/" for name in found.subfolders[:SHOWN_NAMES])
        more = f" and {len(found.subfolders) - SHOWN_NAMES} more" if len(found.subfolders) > SHOWN_NAMES else ""
        notes.append(f"sub-folders not read: {listed}{more}")
    return notes
