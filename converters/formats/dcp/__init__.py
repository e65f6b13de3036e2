"""``dcp``: a ``torch.distributed.checkpoint`` folder (``.metadata`` + ``__0_<n>.distcp`` files).

Read without torch (``reader.py``): torch's view of any DCP folder, or — for a folder we wrote —
the exact tree that was written (int keys, tuples, ``OrderedDict`` and ``_metadata``, records,
ties), from ``sdconvert.json``.

Written without torch, streaming like every other writer (``writer.py``): each value ``dcp.save``
would write becomes a ``torch.save`` archive in a data file (tensors copied by the kernel and
hashed on the way), then ``.metadata`` is pickled as ``FileSystemWriter`` pickles it
(``codecs/dcp_metadata.py``). So ``dcp.load``, ``dcp_to_torch_save`` and every DCP reader load the
folder as if ``dcp.save`` had written it — with one difference that makes training resume:
optimizers are written under parameter names, as ``get_state_dict`` gives them
(``optimizers.py``: the mapping rule, and where it is refused). Layout::

    .metadata          DCP's Metadata: per FQN a tensor (dtype, size, one whole chunk) or a value,
                       its planner_data path, and the (file, offset, length) of its archive
    __0_<n>.distcp     archives one after another, files filled in order up to --max-file-size;
                       a tensor's archive also holds its BLAKE3 digest and cast record (records
                       torch.load ignores); a tied tensor is stored once, both FQNs name its range
    sdconvert.json     ours, which no torch reader opens: the exact tree (a manifest tree whose
                       tensors are named by their place in DCP's view), its digest, the source's
                       own metadata, the parameter names given to each optimizer, and the BLAKE3
                       of .metadata (a folder saved again by torch is not taken for ours)

Why beside and not inside: whatever ``.metadata`` or the data files hold as entries is loaded by
``dcp_to_torch_save`` and listed by every DCP tool, so our tree would be an extra key in what
users load; a field of ``Metadata`` torch does not know is one torch release away from breaking
``pickle.load``. A file torch never opens changes nothing torch reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ...codecs.pickle_objects import check_writable
from ...core import dtypes
from ...core.atomic import atomic_folder
from ...core.budget import Budget
from ...core.contract import FormatBase, WriteContext, option
from ...core.errors import UnsupportedValueError
from ...core.parallel import serialized, write_files
from ...core.sizes import parse_size
from ...core.storage import location
from ...core.tree import MAPPING_TYPES, Checkpoint
from ...core.writing import TensorWriter
from . import optimizers, reader, writer

DEFAULT_MAX_FILE_SIZE = 512 << 20


@dataclass(frozen=True)
class DcpOptions:
    max_file_size: int = option(
        DEFAULT_MAX_FILE_SIZE,
        "start a new .distcp data file past this size, e.g. 1GB or 256MiB (default 512MiB)",
        metavar="SIZE",
    )
    model: Any = option(
        None,
        "the model, to tell its parameters from buffers when naming optimizer state: "
        "'recipe' or 'package.module:Class' (no-arg ctor)",
        kind="model",
        metavar="SPEC",
    )
    allow_class: tuple[str, ...] = option(
        (),
        "re-create recorded objects of this class (repeatable; beyond the data-only classes)",
        kind="list",
        metavar="CLASS",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_file_size", parse_size(self.max_file_size, "a data file size"))


class DcpFormat(FormatBase):
    name = "dcp"
    suffixes: tuple[str, ...] = ()
    folder = True
    description = "torch.distributed.checkpoint folder (.metadata + .distcp): dcp.save / dcp.load"
    dtype_codes: ClassVar[Mapping[str, Any]] = {name: name for name in dtypes.DTYPES}  # torch's own names
    Options = DcpOptions

    def reads_folder(self, path: Path) -> bool:
        metadata = location(path) / reader.METADATA  # not Path(): a remote folder stays remote
        return metadata.is_symlink() or metadata.is_file()  # a symlinked one is found, then refused

    def sniff(self, head: bytes) -> bool:
        return False

    def read(self, path: Path, budget: Budget) -> Checkpoint:
        return reader.read_folder(location(path), budget)

    def written_last(self, name: str) -> bool:
        """``.metadata`` (what ``dcp.load`` opens first) and our sidecar: after the data files."""
        return name in (reader.METADATA, reader.SIDECAR)

    def replaceable(self, path: Path) -> bool:
        return (path.name.endswith((".distcp", reader.METADATA)) or path.name == reader.SIDECAR) and path.is_file()

    def write(self, checkpoint: Checkpoint, path: Path, context: WriteContext, options: DcpOptions) -> None:
        if type(checkpoint.tree) not in MAPPING_TYPES:
            raise UnsupportedValueError("a DCP checkpoint's root must be a dict (DCP saves a state dict)")
        allowed = frozenset(options.allow_class)
        check_writable(checkpoint.tree, allowed, frozenset(dtypes.DTYPES))  # names the path of a refused record
        model = None
        if options.model is not None:
            from ...torch_bridge import model_parameters  # the model is a torch module: only the bridge reads it

            parameters, state = model_parameters(options.model)
            model = optimizers.ModelParameters(tuple(parameters), tuple(state))
        named = optimizers.name_parameters(checkpoint.tree, model)
        plan = writer.plan_folder(checkpoint, named, options.max_file_size, allowed)
        # The plan depends on the checkpoint alone, so any number of workers or ranks writes the
        # same files; each data file is written independently, .metadata last (by rank 0).
        context = dataclasses.replace(context, progress=serialized(context.progress))
        tensors = TensorWriter(context, checkpoint.origin)
        group = context.group
        with atomic_folder(
            Path(path), self.replaceable, fsync=context.fsync, overwrite=context.overwrite, group=group
        ) as staging:

            def data_file(index: int) -> Callable[[], writer.Written]:
                return lambda: writer.write_data_file(plan, index, staging, tensors, fsync=context.fsync)

            digests = write_files(
                [data_file(index) for index in range(len(plan.files))],
                plan.sizes(),
                workers=context.workers,
                group=group,
            )
            if group is None or group.rank == 0:
                writer.write_metadata(plan, digests, staging, fsync=context.fsync)

    def writes_in_parallel(self, options: DcpOptions) -> bool:
        return True


FORMAT = DcpFormat()
