"""One resource budget per read, derived from the size of the input.

The bar every reader meets: for any input, peak memory stays under about twice the input's size
plus a fixed allowance, or the read is refused with a clear error before the memory is spent.
Readers do not measure memory; they *charge* the budget for what they are about to create, at the
costs measured by ``bench/costs.py`` (Python objects are far bigger than the bytes that encode
them: an empty dict is one pickle opcode and ~64 bytes of memory):

- ``nodes(n)``: values of the tree or of metadata being parsed (dicts, lists, strings, numbers,
  zip entries, protobuf fields kept), charged *before* they are created; ``small_values(n)`` for
  the values of a pickle that cannot grow (numbers, tuples, memo slots), at a smaller cost;
- ``tensors(n)``: tensor references (a ``TensorRef`` with its source and shape);
- ``materialize(n)``: bytes copied into memory (strided views gathered, typed protobuf fields
  decoded, decompressed records);
- ``output(n)``: tensor bytes that the input stores fewer times than the tree names them
  (overlapping views of one storage), so a small file cannot turn into a huge output;
- ``depth``: the nesting limit of every recursive parser (``MAX_DEPTH``).

The documented ceilings (``CEILING_*``) hold whatever the input size.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CorruptFileError

MIB = 1 << 20
ALLOWANCE = 64 * MIB  # what any input may cost beyond twice its size
MEMORY_FACTOR = 2  # ... and twice its size
# Bytes of memory one unit costs, measured by bench/costs.py (rounded up), see README "Safety".
NODE_COST = (
    250  # one small value read (an empty dict: ~90 B) and written again (encoded, pickled: measured ~150 B more)
)
# A value that cannot grow once made (a number, a short string, a tuple, a memo slot, a pickle MARK's
# stack): torch pickles make ~20 per tensor, most of them dropped at once (a 30,000-tensor
# state_dict peaks at ~1.4 KB per tensor in all, measured with tracemalloc).
SMALL_COST = 48
TENSOR_COST = 500  # a TensorRef with its source and shape (~390 B at peak); its key and header are nodes
OUTPUT_FACTOR = 4  # tensor bytes written may exceed the input's size at most this many times (+ allowance)
MAX_DEPTH = 256
CEILING_NODES = 50_000_000
CEILING_TENSORS = 5_000_000


class Budget:
    """The resources one read of ``file`` (``size`` bytes) may spend."""

    def __init__(self, file: Path | str, size: int) -> None:
        self.file = file
        self.size = size
        self.memory_limit = MEMORY_FACTOR * size + ALLOWANCE
        self.output_limit = OUTPUT_FACTOR * size + ALLOWANCE
        self.memory = 0
        self.node_count = 0
        self.tensor_count = 0
        self.output_bytes = 0

    @classmethod
    def for_path(cls, path: Path) -> Budget:
        """The budget of a file, or of a folder (its regular files together)."""
        if path.is_dir():
            from .storage import RemotePath

            if isinstance(path, RemotePath):
                size = sum(child.stat().st_size for child in path.iterdir() if child.is_file())
            else:
                size = sum(entry.stat().st_size for entry in os.scandir(path) if entry.is_file(follow_symlinks=False))
        else:
            size = path.stat().st_size
        return cls(path, size)

    def cover(self, size: int) -> None:
        """Widen the budget to a read of ``size`` input bytes when it was sized for fewer (a
        sharded checkpoint read through its index file covers the shards it names too)."""
        if size > self.size:
            self.memory_limit += MEMORY_FACTOR * (size - self.size)
            self.output_limit += OUTPUT_FACTOR * (size - self.size)
            self.size = size

    def nodes(self, count: int = 1, what: str = "values") -> None:
        self.node_count += count
        if self.node_count > CEILING_NODES:
            self._refuse(f"holds more than {CEILING_NODES} {what} (the limit for any input)")
        self._spend(count * NODE_COST, what)

    def small_values(self, count: int = 1, what: str = "values") -> None:
        """Values that cannot grow once made (see ``SMALL_COST``); containers are ``nodes``."""
        self.node_count += count
        if self.node_count > CEILING_NODES:
            self._refuse(f"holds more than {CEILING_NODES} {what} (the limit for any input)")
        self._spend(count * SMALL_COST, what)

    def tensors(self, count: int = 1) -> None:
        self.tensor_count += count
        if self.tensor_count > CEILING_TENSORS:
            self._refuse(f"holds more than {CEILING_TENSORS} tensors (the limit for any input)")
        self._spend(count * TENSOR_COST, "tensors")

    def materialize(self, nbytes: int, what: str = "tensor bytes gathered into memory") -> None:
        self._spend(nbytes, what)

    def output(self, nbytes: int, what: str = "tensor bytes") -> None:
        self.output_bytes += nbytes
        if self.output_bytes > self.output_limit:
            self._refuse(
                f"names {self.output_bytes} bytes of {what} from a {self.size}-byte input (more than "
                f"{OUTPUT_FACTOR}x its size + {ALLOWANCE // MIB} MiB: overlapping views or a compression bomb)"
            )

    def _spend(self, nbytes: int, what: str) -> None:
        self.memory += nbytes
        if self.memory > self.memory_limit:
            self._refuse(
                f"would need more than {self.memory_limit // MIB} MiB of memory to read ({what}); the limit for a "
                f"{self.size}-byte input is {MEMORY_FACTOR}x its size + {ALLOWANCE // MIB} MiB"
            )

    def _refuse(self, message: str) -> None:
        raise CorruptFileError(message, file=self.file)
