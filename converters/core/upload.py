"""Writing to a store that has no rename: the destination is written to a local staging folder
(by the format's own writer, unchanged), then uploaded so that it appears whole or not at all.

An object store cannot rename, so the local trick (write a temporary file, rename it onto the
destination) is replaced by the store's own atomic step: on S3 a multipart upload, completed
only after its last part (an object that is never completed is not visible, and an error or
Ctrl-C aborts it so no parts are left behind, billed and invisible); elsewhere the store's
writer, discarded on error. A folder (shards, DCP) is uploaded file by file with its index
(``*.index.json``, ``.metadata``) last, and what was uploaded is deleted again if a later file
fails: readers find a folder checkpoint through its index, which appears only once all the files
it names are there.

Staging needs local disk for the destination's size (not memory: the upload reads it in parts).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from .errors import ConverterError, DestinationError
from .storage import UPLOAD_PART, RemotePath, retrying

EXISTS = "exists; pass --force to replace it (overwrite=True in the library)"
MAX_PARTS = 10_000  # S3's limit on the parts of one multipart upload


@contextmanager
def staged(
    destination: RemotePath,
    *,
    overwrite: bool,
    replaceable: Callable[[Path], bool] | None = None,
    written_last: Callable[[str], bool] | None = None,
) -> Iterator[Path]:
    """A local path to write ``destination`` to; uploaded when the block ends without error.

    >>> # with staged(remote("s3://bucket/model.safetensors"), overwrite=False) as local:
    >>> #     write_safetensors(checkpoint, local)
    """
    if destination._protocol in ("http", "https"):
        raise DestinationError(
            "http(s):// URLs are read-only here; write to a store (s3://, gs://, hf://...)", file=destination
        )
    if not overwrite and destination.exists():
        raise DestinationError(EXISTS, file=destination)
    folder = Path(tempfile.mkdtemp(prefix="sdconvert-upload-"))
    try:
        local = folder / destination.name
        yield local
        upload(local, destination, overwrite=overwrite, replaceable=replaceable, written_last=written_last)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def upload(
    local: Path,
    destination: RemotePath,
    *,
    overwrite: bool,
    replaceable: Callable[[Path], bool] | None = None,
    written_last: Callable[[str], bool] | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Put the local file or folder ``local`` at ``destination``: whole or not at all.
    ``replaceable``: what files of an existing folder the format owns; ``written_last``: the
    names of the files readers open first to find the others (an index), uploaded after them
    (both the format's declarations; see ``_upload_folder``)."""
    if local.is_dir():
        last = written_last or (lambda name: False)
        _upload_folder(local, destination, overwrite=overwrite, replaceable=replaceable, last=last, progress=progress)
    else:
        if destination.is_dir():
            raise DestinationError("is a folder in the store; this checkpoint is one file", file=destination)
        upload_file(local, destination, overwrite=overwrite, progress=progress)
    destination._infos.clear()  # what was learnt about the store before is stale now
    destination._heads.clear()
    destination._listings.clear()


def upload_file(
    local: Path, destination: RemotePath, *, overwrite: bool, progress: Callable[[int], None] | None = None
) -> None:
    """One object, created atomically: a single PUT, or an S3 multipart upload completed last."""
    if destination._protocol in ("s3", "s3a"):
        _S3Upload(destination, overwrite).run(local, progress)
        return
    if not overwrite and destination.exists():
        raise DestinationError(EXISTS, file=destination)
    _generic_upload(local, destination, progress)


def _generic_upload(local: Path, destination: RemotePath, progress: Callable[[int], None] | None) -> None:
    """Through the store's own writer (GCS resumable upload, memory://...) to a temporary name,
    then moved onto the destination: some writers commit what they hold when dropped (memory://
    does, from its finalizer), so an interrupted upload must never be under the real name."""
    filesystem = destination.filesystem
    temporary = destination.parent / f".{destination.name}.sdconvert-{uuid.uuid4().hex[:12]}.partial"
    assert isinstance(temporary, RemotePath)
    handle = retrying(lambda: filesystem.open(temporary.url, "wb"), temporary, "write")
    try:
        with local.open("rb") as source:
            while chunk := source.read(UPLOAD_PART):
                handle.write(chunk)
                if progress:
                    progress(len(chunk))
        retrying(handle.close, destination, "write")
        retrying(lambda: filesystem.mv(temporary.url, destination.url), destination, "write")
    except BaseException:
        _discard(handle)
        del handle  # a writer committing from its finalizer does it now, under the temporary name
        _delete(temporary)
        raise


def _discard(handle: Any) -> None:
    discard = getattr(handle, "discard", None)
    with suppress(Exception):
        if discard is not None:
            discard()
    with suppress(Exception):  # a file object closed later (its finalizer) would commit: mark it closed
        handle.closed = True


class _S3Upload:
    """One S3 object written by a multipart upload (or one PUT when small), completed last.

    Without ``overwrite``, the request that makes the object visible is conditional
    (``If-None-Match: *``), so an object that appeared meanwhile is kept and the upload refused.
    """

    def __init__(self, destination: RemotePath, overwrite: bool) -> None:
        self.destination = destination
        self.overwrite = overwrite
        self.filesystem = destination.filesystem
        bucket, key, _ = self.filesystem.split_path(destination.url)
        self.target = {"Bucket": bucket, "Key": key}
        self.condition: dict[str, Any] = {} if overwrite else {"IfNoneMatch": "*"}

    def call(self, method: str, *, retry: bool = True, **arguments: Any) -> Any:
        def once() -> Any:
            try:
                return self.filesystem.call_s3(method, **self.target, **arguments)
            except FileExistsError:  # s3fs's name for 412 PreconditionFailed: If-None-Match found an object
                raise DestinationError(EXISTS, file=self.destination) from None

        return retrying(once, self.destination, "write", attempts=None if retry else 1)

    def run(self, local: Path, progress: Callable[[int], None] | None) -> None:
        # no existence check here: ``staged`` made it before any work, and the request that makes
        # the object visible is conditional (If-None-Match) without --force
        size = local.stat().st_size
        if size <= UPLOAD_PART:
            body = local.read_bytes()
            try:
                self.call("put_object", Body=body, **self.condition)
            except ConverterError:
                if not self._landed(hashlib.md5(body).hexdigest(), size):
                    raise
            if progress:
                progress(size)
        else:
            self._multipart(local, progress)
        self.filesystem.invalidate_cache(self.destination.url)

    def _landed(self, etag: str, size: int) -> bool:
        """Whether the object there is the one this upload made, although the request that made it
        failed: a completion (or PUT) whose answer was lost is retried, and the retry is refused
        (``If-None-Match``: the object now exists; or the upload id is gone), yet the object is
        ours. Known by its ETag, which S3 derives from the parts' contents."""
        with suppress(Exception):
            details = self.filesystem.info(self.destination.url, refresh=True)
            return bool(etag) and str(details.get("ETag", "")).strip('"') == etag and details.get("size") == size
        return False

    def _multipart(self, local: Path, progress: Callable[[int], None] | None) -> None:
        # S3 takes at most 10,000 parts: past 10,000 × UPLOAD_PART (80 GB) the parts grow, and
        # the memory of one part with them (a 200 GB object: 20 MiB parts)
        part = max(UPLOAD_PART, -(-local.stat().st_size // MAX_PARTS))
        # not retried: a creation whose answer was lost would leave an upload nobody knows to abort
        upload_id = self.call("create_multipart_upload", retry=False)["UploadId"]
        try:
            parts = []
            with local.open("rb") as source:
                number = 1
                while chunk := source.read(part):
                    done = self.call("upload_part", UploadId=upload_id, PartNumber=number, Body=chunk)
                    parts.append({"PartNumber": number, "ETag": done["ETag"]})
                    number += 1
                    if progress:
                        progress(len(chunk))
            try:
                self.call(
                    "complete_multipart_upload",
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    **self.condition,
                )
            except ConverterError:
                if not self._landed(_multipart_etag(parts), local.stat().st_size):
                    raise
        except BaseException:  # an error, Ctrl-C, SIGTERM: no dangling upload (its parts are billed)
            with suppress(Exception):
                self.filesystem.call_s3("abort_multipart_upload", **self.target, UploadId=upload_id)
            raise


def _multipart_etag(parts: list[dict[str, Any]]) -> str:
    """The ETag S3 gives the object a multipart upload of these parts completes: the MD5 of the
    parts' MD5s, then ``-`` and their number."""
    try:
        digests = b"".join(bytes.fromhex(str(part["ETag"]).strip('"')) for part in parts)
    except ValueError:  # not MD5s (a store or an encryption mode with other ETags): cannot tell
        return ""
    return f"{hashlib.md5(digests).hexdigest()}-{len(parts)}"


def _upload_folder(
    local: Path,
    destination: RemotePath,
    *,
    overwrite: bool,
    replaceable: Callable[[Path], bool] | None,
    last: Callable[[str], bool],
    progress: Callable[[int], None] | None,
) -> None:
    """Upload the staged folder's files, its index (``last``) last. Replacing a folder (``--force``): the
    old index goes first, so no reader ever finds it naming a mix of old and new files (if the
    upload then fails, the old checkpoint is gone: a store cannot swap a folder at once); the old
    files the new checkpoint does not have go last. A folder holding anything the format does
    not write (``replaceable``) is never replaced, as locally."""
    if not destination.is_dir() and destination.exists():
        raise DestinationError("exists and is not a folder; this checkpoint is written as a folder", file=destination)
    existing = {child.name: child for child in destination.iterdir()} if destination.is_dir() else {}
    if existing and not overwrite:
        raise DestinationError(EXISTS, file=destination)
    strangers = sorted(name for name, child in existing.items() if replaceable is None or not replaceable(child))
    if strangers:
        raise DestinationError(
            f"is a folder holding other files ({strangers[0]!r}); refusing to replace it", file=destination
        )
    for name, child in existing.items():
        if last(name):
            _delete(child, strict=True)
    files = sorted((p for p in local.iterdir() if p.is_file()), key=lambda p: (last(p.name), p.name))
    uploaded: list[RemotePath] = []
    try:
        for file in files:
            target = destination / file.name
            assert isinstance(target, RemotePath)
            upload_file(file, target, overwrite=overwrite or file.name in existing, progress=progress)
            uploaded.append(target)
    except BaseException:
        for target in uploaded:
            if target.name not in existing:
                _delete(target)
        raise
    for name in existing.keys() - {file.name for file in files}:  # files of the replaced checkpoint
        _delete(existing[name])


def _delete(target: Path, *, strict: bool = False) -> None:
    assert isinstance(target, RemotePath)
    filesystem = target.filesystem
    if strict:  # the old index must be gone before anything else changes
        retrying(lambda: filesystem.rm_file(target.url), target, "delete")
        return
    with suppress(Exception):
        filesystem.rm_file(target.url)
