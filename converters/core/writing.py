"""The one writer primitive: copy a tensor's bytes into the output and get the digest to store.

Every writer moves tensor bytes with :class:`TensorWriter`. It copies with the kernel where it can
(``transfer.copy_into``), hashes with BLAKE3 only when the tensor has no digest to carry over (or
when the context asks to check), refuses bytes that do not match the digest their file stores, and
reports progress. Digests are known only once the bytes went by, so formats that store them in a
header reserve it with :class:`Reserved` and rewrite it in place at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from . import manifests
from .contract import WriteContext
from .errors import CorruptFileError, TreePath
from .integrity import crc_message, mismatch_message, records_of, verify_bytes, verify_record
from .parallel import stop_if_asked
from .sources import ByteSource, FileRange, Record
from .transfer import Checks, blake3_hex, copy_into
from .tree import Checkpoint, TensorRef

DIGEST_PLACEHOLDER = "0" * 64


@dataclass(frozen=True)
class Copied:
    digest: str  # the BLAKE3 digest to store for the bytes just written
    crc32: int | None  # their zip CRC-32, when asked for


class TensorWriter:
    """Copies tensors into outputs under one :class:`WriteContext`.

    ``origin`` (the source checkpoint's path) only names the file in error messages.
    """

    def __init__(self, context: WriteContext, origin: object = None) -> None:
        self.context = context
        self.origin = origin
        self._digests: dict[int, str] = {}  # id(TensorRef) -> the digest stored for its bytes
        self.checked_records: set[Record] = set()  # zip records found intact by this write

    def tree_digest(self, checkpoint: Checkpoint) -> str:
        """The tree digest to store (``manifests.tree_digest``) once every tensor was copied;
        ``DIGEST_PLACEHOLDER`` before that (a header reserved for it keeps its length)."""
        digest = manifests.tree_digest(
            checkpoint.tree, lambda _path, ref: self._digests.get(id(ref)), checkpoint.carried_metadata()
        )
        return digest or DIGEST_PLACEHOLDER

    def copy(self, out: BinaryIO, ref: TensorRef, path: TreePath, *, crc32: bool = False) -> Copied:
        """Append ``ref``'s bytes to ``out`` at its position; the digest to store for them."""
        piecewise = self.piecewise(ref, path, crc32=crc32)
        piecewise.write(out, ref.source)
        return piecewise.finish()

    def piecewise(self, ref: TensorRef, path: TreePath, *, crc32: bool = False) -> PiecewiseCopy:
        """For layouts that split one tensor's bytes (flax's chunked arrays): write its pieces in
        order with ``write``, then ``finish`` for the digest of the whole."""
        return PiecewiseCopy(self, ref, path, crc32)

    def hashed(self, ref: TensorRef) -> str:
        """For bytes a writer stores by other means (a numpy array inside a pickle): their digest,
        taken now (the stored one when the tensor has one, checked when the context asks)."""
        digest = ref.digest if ref.digest is not None and not self.context.check else blake3_hex(ref.source)
        if ref.digest is not None and digest != ref.digest:
            raise CorruptFileError(mismatch_message(ref, digest), file=str(self.origin) if self.origin else None)
        self._digests[id(ref)] = digest
        return digest

    def written(self, ref: TensorRef) -> tuple[str, str | None]:
        """What another process needs to know about ``ref`` once written here (a rank of a
        distributed write): the digest stored for its bytes, and for a cast tensor the digest of
        the bytes it was cast from (learnt while casting)."""
        digest = self._digests[id(ref)]
        return digest, ref.cast_from.resolved() if ref.cast_from is not None else None

    def learn(self, ref: TensorRef, written: tuple[str, str | None]) -> None:
        """What another process's ``written(ref)`` said: counted in the tree digest (and the cast
        records) as if written here, without reading the bytes again."""
        digest, cast_digest = written
        self._digests[id(ref)] = digest
        if ref.cast_from is not None and cast_digest is not None:
            ref.cast_from.observe(cast_digest)

    def check_sources(self, checkpoint: Checkpoint) -> None:
        """For writers that hand bytes to another library: with ``check``, re-hash stored digests first."""
        if self.context.check:
            verify_bytes(checkpoint, self.origin)

    def progress(self, count: int) -> None:
        """For writers that move bytes by other means: report ``count`` more bytes written."""
        if self.context.progress is not None and count:
            self.context.progress(count)


class PiecewiseCopy:
    def __init__(self, writer: TensorWriter, ref: TensorRef, path: TreePath, crc32: bool) -> None:
        self._writer, self._ref, self._path = writer, ref, path
        # A tensor that is exactly one checksummed record of its container (a zip record) has its
        # CRC-32 computed on the way; one that is part of a record has the record checked first.
        source = ref.source
        self._record = source.record if isinstance(source, FileRange) and source.is_whole_record else None
        for record in records_of(source):
            if record is not self._record:
                verify_record(record, writer.checked_records)
        self._checks = Checks.make(
            crc=crc32 or self._record is not None, digest=writer.context.check or ref.digest is None
        )
        self._written = 0

    def write(self, out: BinaryIO, source: ByteSource) -> None:
        stop_if_asked()  # one of a folder's files failed, or Ctrl-C: this thread's file stops here
        copy_into(out, source, self._checks, self._writer.context.progress)
        self._written += source.nbytes

    def finish(self) -> Copied:
        ref, computed = self._ref, self._checks.hexdigest()
        if self._written != ref.nbytes:
            raise AssertionError(f"wrote {self._written} of the tensor's {ref.nbytes} bytes")
        if self._record is not None and self._checks.crc != self._record.crc32:
            raise CorruptFileError(
                crc_message(self._record, self._checks.crc or 0), file=self._record.path, path=self._path
            )
        if computed is not None and ref.digest is not None and computed != ref.digest:
            origin = self._writer.origin
            raise CorruptFileError(
                mismatch_message(ref, computed), file=str(origin) if origin else None, path=self._path
            )
        digest = computed or ref.digest
        assert digest is not None  # hashed whenever there was no digest to carry over
        self._writer._digests[id(ref)] = digest
        return Copied(digest, self._checks.crc)


class Reserved:
    """A header whose final bytes are known only after the tensors: write a same-length
    placeholder now, rewrite it in place at the end (nothing after it moves).

    ``encode()`` must give the same length each time it is called (digests are fixed-length hex).
    """

    def __init__(self, out: BinaryIO, encode: Callable[[], bytes]) -> None:
        self._out, self._encode = out, encode
        self.offset = out.tell()
        first = encode()
        self.length = len(first)
        out.write(first)

    def rewrite(self) -> None:
        data = self._encode()
        if len(data) != self.length:
            raise AssertionError(f"rewritten header is {len(data)} bytes, its placeholder {self.length}")
        end = self._out.tell()
        self._out.seek(self.offset)
        self._out.write(data)
        self._out.seek(end)
