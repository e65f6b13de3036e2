"""``Cast`` (``--dtype``): floating-point tensors to another floating dtype, torch-free and streaming.

The bytes are converted by :class:`CastSource`, a byte source that wraps the tensor's own source
and converts it in bounded blocks as a writer pulls chunks (memory stays flat whatever the tensor
size; nothing is converted before it is written). The rounding is integer arithmetic on the bit
patterns (numpy, imported when the first block is converted), so it does not depend on the FPU's
rounding mode or on flush-to-zero/denormals-are-zero flags another library may have set.

What it computes, for every pair among float64, float32, float16 and bfloat16, is what
``tensor.to(dtype)`` gives in torch 2.13 on a contiguous CPU tensor (checked against torch by raw
bits in ``tests/test_cast.py`` and, for all 2**32 float32 inputs, ``bench/cast_exhaustive.py``):

- Finite values: round to nearest, ties to even; subnormals kept and produced exactly; a value
  past the largest finite target rounds to ±inf (from the half-way point up, as IEEE says);
  ±0 and ±inf keep their sign. Widening (float16/bfloat16 → float32/float64, float32 → float64)
  is exact.
- float64 → float16 and float64 → bfloat16 round twice, as torch does: to float32 first, then to
  the target (``1 + 2**-8 + 2**-30`` becomes bfloat16 ``1.0``, not ``1.0078125``).
- NaN, as torch's vectorised loop on an AVX2 CPU produces it:

  ====================  =========================================================================
  float32 → bfloat16    ``0xFFFF`` for every NaN (sign and payload lost)
  float64 → bfloat16    ``0xFFFF`` for every NaN (via float32)
  float16 → bfloat16    ``0x7FC0`` for every NaN
  float32 → float16     sign kept, quiet bit set, the top 10 payload bits kept (F16C:
                        ``0x7F800001 → 0x7E00``, ``0x7FA00000 → 0x7F00``, ``0xFFC00001 → 0xFE00``)
  float64 → float16     the same, via float32
  bfloat16 → float16    the same, via float32
  float64 → float32     sign kept, quiet bit set, the top 23 payload bits kept
  float32 → float64,    sign kept, quiet bit set, payload kept (shifted up)
  float16 → float32/64
  bfloat16 → float32    the bits shifted up 16: nothing changes, a signalling NaN stays signalling
  bfloat16 → float64    sign kept, quiet bit set, payload kept
  ====================  =========================================================================

  torch itself is not a function of the value for NaN in three pairs: in its scalar code paths
  (the last ``numel % 8`` elements of each thread's share of a contiguous tensor, ``% 16`` for
  float64 → bfloat16, and every element of a non-contiguous tensor) it gives float16 → float32
  ``0x7FFFFFFF`` (sign lost), float64 → bfloat16 ``0x7FC0``, and (non-contiguous only) float32 →
  bfloat16 ``0x7FC0``. Which elements take which path depends on the tensor's size and torch's
  thread count, so the cast here is the vectorised result everywhere; the tests pin those torch
  paths down so a change in torch shows.

Not cast, and left as they are: integer, bool and complex tensors, and the float8 types (``Cast``
lists them as skipped).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from ..core import dtypes
from ..core.errors import ConverterError, CorruptFileError
from ..core.integrity import crc_message, records_of, verify_record
from ..core.sources import CHUNK_SIZE, ByteSource, FileRange, fill_from_chunks, slice_source
from ..core.transfer import Checks
from ..core.tree import CastOrigin, Checkpoint, TensorRef
from .base import (
    InvalidOptionError,
    NoMatchError,
    Path,
    RawPath,
    Reporting,
    TracksOrigins,
    TransformError,
    map_tensors,
    paths_by_tensor,
    replace_tree,
)
from .paths import PathPattern, format_path

FLOAT_DTYPES = dtypes.CASTABLE  # what Cast converts between
SKIPPED_FLOATS = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
# Elements per converted block are chosen so that the wider side of a block is this many bytes:
# with the kernels' temporaries, a cast holds a few times this much, whatever the tensor's size.
BLOCK_BYTES = 1 << 20

_UINT = {2: "uint16", 4: "uint32", 8: "uint64"}


# ------------------------------------------------------------------------------ the kernels
#
# Each kernel takes a numpy array of the source's bit patterns (uint16/32/64) and a Scratch, and
# returns the target's bit patterns in an array the Scratch owns (valid until its next use).
# Every step writes into a preallocated array: a fresh array per step and block would cost a page
# fault per 4 KiB each time (measured: 5x slower than the arithmetic itself).
# float16 and bfloat16 sources go through a 65536-entry table per target.

_F64 = (64, 52, 1023)  # (bits, mantissa bits, exponent bias)
_F32 = (32, 23, 127)
_F16 = (16, 10, 15)


class Scratch:
    """Work arrays reused from block to block, one per (name, dtype), grown when needed."""

    def __init__(self, np: Any) -> None:
        self.np = np
        self.arrays: dict[tuple[str, str], Any] = {}

    def get(self, name: str, dtype: str, count: int) -> Any:
        array = self.arrays.get((name, dtype))
        if array is None or len(array) < count:
            array = self.np.empty(count, dtype=dtype)
            self.arrays[(name, dtype)] = array
        return array[:count]


def _narrow(np: Any, u: Any, src: tuple[int, int, int], dst: tuple[int, int, int], work: Scratch) -> Any:
    """Round to nearest even into a narrower format (finite → nearest or ±inf, inf → inf). The
    lanes of NaN inputs are left for the caller to overwrite."""
    (sbits, ms, bias_s), (dbits, mt, bias_t) = src, dst
    kind = _UINT[sbits // 8]
    uint = np.uint64 if sbits == 64 else np.uint32
    tag, count = f"narrow{sbits}-{dbits}", len(u)
    shift = ms - mt
    rebias = bias_s - bias_t
    threshold = rebias + 1  # the source exponent of the target's smallest normal
    a = np.bitwise_and(u, uint((1 << (sbits - 1)) - 1), out=work.get(tag + "a", kind, count))
    # Normal results: rebias the exponent, add the rounding increment to the whole pattern (a carry
    # out of the mantissa correctly bumps the exponent), shift, and clamp to inf.
    r = np.subtract(a, uint(rebias << ms), out=work.get(tag + "r", kind, count))  # tiny inputs wrap: redone below
    np.add(r, uint((1 << (shift - 1)) - 1), out=r)
    t = np.right_shift(a, uint(shift), out=work.get(tag + "t", kind, count))
    np.bitwise_and(t, uint(1), out=t)
    np.add(r, t, out=r)
    np.right_shift(r, uint(shift), out=r)
    np.minimum(r, uint(((1 << (dbits - 1 - mt)) - 1) << mt), out=r)
    exponent = np.right_shift(a, uint(ms), out=t)
    low = np.less(exponent, uint(threshold), out=work.get(tag + "low", "bool", count))
    if low.any():  # subnormal (or zero) results: shift the significand further, rounding once
        one = uint(1)
        index = np.flatnonzero(low)
        al, el = a[index], exponent[index]
        significand = (al & uint((1 << ms) - 1)) | np.where(el > 0, uint(1 << ms), uint(0)).astype(uint)
        distance = np.minimum(uint(shift + threshold) - el, uint(sbits - 1))
        lsb = (significand >> distance) & one
        r[index] = (significand + (one << (distance - one)) - one + lsb) >> distance
    sign = np.right_shift(u, uint(sbits - dbits), out=t)
    np.bitwise_and(sign, uint(1 << (dbits - 1)), out=sign)
    np.bitwise_or(r, sign, out=r)
    out = work.get(tag + "out", _UINT[dbits // 8], count)
    np.copyto(out, r, casting="unsafe")
    return out


def _f32_to_bf16(np: Any, u: Any, work: Scratch) -> Any:
    # bfloat16 has float32's exponent range: rounding the low 16 bits away is the whole cast
    # (subnormals included; the largest finite values round up to inf by the carry).
    count = len(u)
    t = np.right_shift(u, np.uint32(16), out=work.get("bf16t", "uint32", count))
    np.bitwise_and(t, np.uint32(1), out=t)
    np.add(t, np.uint32(0x7FFF), out=t)
    np.add(t, u, out=t)
    np.right_shift(t, np.uint32(16), out=t)
    out = work.get("bf16out", "uint16", count)
    np.copyto(out, t, casting="unsafe")
    nan = np.isnan(u.view(np.float32), out=work.get("bf16nan", "bool", count))
    if nan.any():
        out[nan] = 0xFFFF
    return out


def _f32_to_f16(np: Any, u: Any, work: Scratch) -> Any:
    out = _narrow(np, u, _F32, _F16, work)
    nan = np.isnan(u.view(np.float32), out=work.get("f16nan", "bool", len(u)))
    if nan.any():
        un = u[nan]
        sign = (un >> np.uint32(16)) & np.uint32(0x8000)
        out[nan] = (sign | np.uint32(0x7E00) | ((un >> np.uint32(13)) & np.uint32(0x3FF))).astype(np.uint16)
    return out


def _f64_to_f32(np: Any, u: Any, work: Scratch) -> Any:
    out = _narrow(np, u, _F64, _F32, work)
    nan = np.isnan(u.view(np.float64), out=work.get("f32nan", "bool", len(u)))
    if nan.any():
        un = u[nan]
        sign = (un >> np.uint64(32)) & np.uint64(0x80000000)
        payload = (un >> np.uint64(29)) & np.uint64(0x7FFFFF)
        out[nan] = (sign | np.uint64(0x7FC00000) | payload).astype(np.uint32)
    return out


def _f32_to_f64(np: Any, u: Any, work: Scratch) -> Any:
    count = len(u)
    wide = work.get("f64wide", "uint64", count)
    np.copyto(wide, u, casting="unsafe")
    a = np.bitwise_and(wide, np.uint64(0x7FFFFFFF), out=work.get("f64a", "uint64", count))
    out = np.left_shift(a, np.uint64(29), out=work.get("f64out", "uint64", count))
    np.add(out, np.uint64((1023 - 127) << 52), out=out)
    exponent = np.right_shift(a, np.uint64(23), out=work.get("f64t", "uint64", count))
    mask = work.get("f64mask", "bool", count)
    if np.equal(exponent, np.uint64(0), out=mask).any():
        # zero and subnormals: the value is mantissa * 2**-149, exact in float64
        out[mask] = np.ldexp(a[mask].astype(np.float64), -149).view(np.uint64)
    if np.equal(exponent, np.uint64(255), out=mask).any():
        # inf stays inf; NaN gets the quiet bit, its payload shifted up
        at = a[mask]
        quiet = np.where(at > np.uint64(0x7F800000), np.uint64(1 << 51), np.uint64(0))
        out[mask] = np.uint64(0x7FF0000000000000) | ((at & np.uint64(0x7FFFFF)) << np.uint64(29)) | quiet
    sign = np.bitwise_and(wide, np.uint64(0x80000000), out=exponent)
    np.left_shift(sign, np.uint64(32), out=sign)
    np.bitwise_or(out, sign, out=out)
    return out


def _f16_to_f32_all(np: Any) -> Any:
    """Every float16 pattern as float32 (torch's vectorised result: NaN quieted, payload kept)."""
    h = np.arange(65536, dtype=np.uint32)
    exponent = (h >> np.uint32(10)) & np.uint32(0x1F)
    mantissa = h & np.uint32(0x3FF)
    out = ((exponent + np.uint32(127 - 15)) << np.uint32(23)) | (mantissa << np.uint32(13))
    sub = exponent == 0
    out[sub] = np.ldexp(mantissa[sub].astype(np.float64), -24).astype(np.float32).view(np.uint32)  # exact
    top = exponent == 31
    quiet = np.where(mantissa[top] != 0, np.uint32(0x400000), np.uint32(0))
    out[top] = np.uint32(0x7F800000) | (mantissa[top] << np.uint32(13)) | quiet
    return out | ((h & np.uint32(0x8000)) << np.uint32(16))


@cache
def _table(source: str, target: str) -> Any:
    """The 65536 results of a float16/bfloat16 → ``target`` cast, by source bit pattern."""
    import numpy as np

    wide = _f16_to_f32_all(np) if source == "float16" else np.arange(65536, dtype=np.uint32) << np.uint32(16)
    work = Scratch(np)
    if target == "float32":
        table = wide
    elif target == "float64":
        table = _f32_to_f64(np, wide, work).copy()
    elif target == "float16":
        table = _f32_to_f16(np, wide, work).copy()
    else:
        table = _f32_to_bf16(np, wide, work).copy()
        table[np.isnan(wide.view(np.float32))] = 0x7FC0  # float16 → bfloat16: not torch's 0xFFFF
    table.flags.writeable = False
    return table


Kernel = Callable[[Any, Any, Scratch], Any]


def _lookup(source: str, target: str) -> Kernel:
    def kernel(np: Any, u: Any, work: Scratch) -> Any:
        table = _table(source, target)
        return np.take(table, u, out=work.get("table", str(table.dtype), len(u)), mode="clip")  # unbuffered

    return kernel


def _kernel(source: str, target: str) -> Kernel:
    if source in ("float16", "bfloat16"):
        return _lookup(source, target)
    kernels: dict[tuple[str, str], Kernel] = {
        ("float32", "bfloat16"): _f32_to_bf16,
        ("float32", "float16"): _f32_to_f16,
        ("float32", "float64"): _f32_to_f64,
        ("float64", "float32"): _f64_to_f32,
        ("float64", "float16"): lambda np, u, work: _f32_to_f16(np, _f64_to_f32(np, u, work), work),
        ("float64", "bfloat16"): lambda np, u, work: _f32_to_bf16(np, _f64_to_f32(np, u, work), work),
    }
    return kernels[(source, target)]


def cast_bits(bits: Any, source: str, target: str) -> Any:
    """The bit patterns of ``bits`` (a numpy array of the source's uint16/32/64 patterns) cast from
    ``source`` to ``target`` dtype, as a numpy array of the target's patterns.

    >>> import numpy as np
    >>> [hex(x) for x in cast_bits(np.array([0x3F808000, 0x3F818000, 0x7FC00001], np.uint32), "float32", "bfloat16")]
    ['0x3f80', '0x3f82', '0xffff']
    """
    import numpy as np

    _check_pair(source, target)
    if source == target:
        return bits.copy()
    expected = np.dtype(_UINT[dtypes.itemsize(source)])
    if bits.dtype != expected:
        raise ValueError(f"{source} bits must be a {expected} array, got {bits.dtype}")
    return _kernel(source, target)(np, np.ascontiguousarray(bits), Scratch(np))


def cast_bytes(data: bytes | bytearray | memoryview, source: str, target: str) -> bytes:
    """Little-endian C-order ``source`` bytes as ``target`` bytes (whole, in memory: for small data)."""
    import numpy as np

    _check_pair(source, target)
    size, out = dtypes.itemsize(source), dtypes.itemsize(target)
    bits = np.frombuffer(data, dtype=f"<u{size}").astype(f"=u{size}")
    return bytes(cast_bits(bits, source, target).astype(f"<u{out}").tobytes())


def _check_pair(source: str, target: str) -> None:
    for name in (source, target):
        if name not in FLOAT_DTYPES:
            raise ConverterError(f"cannot cast {source} to {target}: casts are between {', '.join(FLOAT_DTYPES)}")


# ------------------------------------------------------------------------------ the byte source


@dataclass(frozen=True)
class CastSource:
    """The bytes of ``source`` (``from_dtype`` elements) cast to ``to_dtype``, converted block by block
    as they are read: at most ``BLOCK_BYTES`` (of the wider dtype) of input and output at a time.

    ``source_digest`` is the digest the source file stores for the *source* bytes (None when it
    stores none). ``origin`` (the :class:`CastOrigin` the cast tensor records) learns the source
    bytes' digest from the pass when the file stores none, so writers can record it without a
    second read; a manifest shows it beside the source dtype, so a cast is always visible.

    The source bytes are checked as they are read, so a cast never launders a flipped bit into the
    fresh digest of its output: a zip record's CRC-32 always (on the way when the source is one whole
    record, before the first block when it is part of one, as writers do for copies), and
    ``source_digest`` when ``check_digest`` (a BLAKE3 pass over the input: what ``check=True`` asks
    of copies). A mismatch raises ``CorruptFileError`` when the last block is pulled.

    >>> from converters.core.sources import BufferSource, read_all
    >>> import struct
    >>> source = CastSource(BufferSource.of(struct.pack("<2f", 1.0, -2.5)), "float32", "bfloat16")
    >>> source.nbytes, bytes(read_all(source)).hex()
    (4, '803f20c0')
    """

    source: ByteSource
    from_dtype: str
    to_dtype: str
    source_digest: str | None = field(default=None, compare=False)
    block_bytes: int = field(default=BLOCK_BYTES, compare=False)
    check_digest: bool = field(default=False, compare=False)
    origin: CastOrigin | None = field(default=None, compare=False)

    # Derived once (a checkpoint may hold 100,000 tensors): element sizes and the output size.
    in_size: int = field(init=False, repr=False, compare=False)
    out_size: int = field(init=False, repr=False, compare=False)
    nbytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_pair(self.from_dtype, self.to_dtype)
        if self.from_dtype == self.to_dtype:
            raise ConverterError(f"a cast from {self.from_dtype} to itself: keep the source")
        in_size, out_size = dtypes.itemsize(self.from_dtype), dtypes.itemsize(self.to_dtype)
        if self.source.nbytes % in_size:
            raise ConverterError(
                f"a {self.from_dtype} source must hold whole elements, it holds {self.source.nbytes} bytes"
            )
        object.__setattr__(self, "in_size", in_size)
        object.__setattr__(self, "out_size", out_size)
        object.__setattr__(self, "nbytes", self.source.nbytes // in_size * out_size)

    @property
    def numel(self) -> int:
        return self.nbytes // self.out_size

    @property
    def block_elements(self) -> int:
        return max(1, self.block_bytes // max(self.in_size, self.out_size))

    def slice(self, offset: int, length: int) -> CastSource | None:
        """``length`` bytes of the cast output from ``offset`` as a cast of the matching slice of the
        source, when both fall on element boundaries (else None: stream up to it). For
        ``core.sources.slice_source``: without it a slice re-converts everything before it."""
        if offset % self.out_size or length % self.out_size or not 0 <= offset <= offset + length <= self.nbytes:
            return None
        start, count = offset // self.out_size * self.in_size, length // self.out_size * self.in_size
        part = slice_source(self.source, start, count)
        return CastSource(part, self.from_dtype, self.to_dtype, None, self.block_bytes)  # no digest: a part

    def readinto(self, buffer: memoryview) -> None:
        fill_from_chunks(self, buffer)

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[memoryview]:
        """The cast bytes in order, each chunk at most ``chunk_size`` long (whole elements when
        ``chunk_size`` allows); a chunk's memory is reused once the next one is asked for."""
        for block in self._blocks():
            view = memoryview(block).cast("B")
            step = chunk_size - chunk_size % self.out_size if chunk_size >= self.out_size else chunk_size
            for start in range(0, len(view), step):
                yield view[start : start + step]

    def _blocks(self) -> Iterator[Any]:
        import numpy as np

        kernel = _kernel(self.from_dtype, self.to_dtype)
        in_size = self.in_size
        little_in, native_in = np.dtype(f"<u{in_size}"), np.dtype(f"=u{in_size}")
        little_out = np.dtype(f"<u{self.out_size}")
        in_block = self.block_elements * in_size
        staging = memoryview(bytearray(in_block))  # only for elements split across source chunks
        filled = total = 0
        source = self.source
        whole = source.record if isinstance(source, FileRange) and source.is_whole_record else None
        for record in records_of(source):
            if record is not whole:
                verify_record(record)  # part of a record: the whole record is checked first
        hashing = self.check_digest and self.source_digest is not None
        observing = self.origin is not None and self.origin.digest is None
        checks = Checks.make(crc=whole is not None, digest=hashing or observing)

        work = Scratch(np)  # the kernels' arrays, reused by every block of this pass

        def convert(data: memoryview) -> Any:
            bits = np.frombuffer(data, dtype=little_in).astype(native_in, copy=False)
            return kernel(np, bits, work).astype(little_out, copy=False)

        for chunk in self.source.chunks(in_block):
            piece = memoryview(chunk).cast("B")
            total += len(piece)
            if checks.needed:
                checks.update(piece)
            position, end = 0, len(piece)
            while position < end:
                if filled == 0:
                    take = min(end - position, in_block)
                    take -= take % in_size
                    if take:  # whole elements straight from the source's chunk
                        yield convert(piece[position : position + take])
                        position += take
                    else:  # the start of an element that the next chunk completes
                        staging[: end - position] = piece[position:]
                        filled, position = end - position, end
                else:
                    take = min(end - position, in_block - filled)
                    staging[filled : filled + take] = piece[position : position + take]
                    filled += take
                    position += take
                    if filled % in_size == 0:
                        yield convert(staging[:filled])
                        filled = 0
        if filled or total != self.source.nbytes:
            raise ConverterError(
                f"a byte source gave {total} bytes, it declares {self.source.nbytes} ({self.from_dtype} elements)"
            )
        if whole is not None and checks.crc != whole.crc32:
            raise CorruptFileError(crc_message(whole, checks.crc or 0), file=whole.path)
        actual = checks.hexdigest()
        if observing and actual is not None and self.origin is not None:
            self.origin.observe(actual)
        if hashing and actual != self.source_digest:
            raise CorruptFileError(
                f"the {self.from_dtype} bytes being cast do not match their stored BLAKE3 digest "
                f"(stored {self.source_digest}, bytes hash to {actual})"
            )


# ------------------------------------------------------------------------------ the transform


class Cast(TracksOrigins, Reporting):
    """Cast the floating-point tensors (float64/32/16, bfloat16) to ``dtype``.

    ``include``/``exclude``: path globs (see :mod:`converters.transforms.paths`); a tensor is cast
    when one of ``include`` (if any) matches its path or a sub-tree holding it and no ``exclude``
    does: ``Cast("bfloat16", exclude=["**/*running_*"])`` leaves BatchNorm statistics alone. A tied
    tensor is cast at all its paths or none (paths that disagree are an error), and stays one tensor.
    Tensors already of ``dtype`` keep their bytes (and stored digest); integer, bool, complex and
    float8 tensors are left as they are. A checkpoint with no floating-point tensor, or a pattern
    that matches no tensor, is an error. ``check``: also hash the source bytes of each cast against
    the digest their file stores (as ``convert(check=True)`` does for copies); zip CRC-32s are
    always checked.

    >>> from converters.core.sources import BufferSource
    >>> ref = TensorRef("float32", (2,), BufferSource.of(bytes(8)))
    >>> Cast("bfloat16")(Checkpoint({"w": ref})).tree["w"].dtype
    'bfloat16'
    """

    kind = "cast"

    def __init__(
        self,
        dtype: str,
        include: str | Iterable[str] = (),
        exclude: str | Iterable[str] = (),
        *,
        check: bool = False,
        option: str = "--dtype",
        include_option: str = "--dtype-include",
        exclude_option: str = "--dtype-exclude",
    ) -> None:
        self.check = check
        self.option = option
        self.include_option = include_option
        self.exclude_option = exclude_option
        if dtype not in FLOAT_DTYPES:
            raise InvalidOptionError(option, str(dtype), f"can cast to {', '.join(FLOAT_DTYPES)}")
        self.dtype = dtype
        self.arguments = (dtype,)
        include_texts = (include,) if isinstance(include, str) else tuple(include)
        exclude_texts = (exclude,) if isinstance(exclude, str) else tuple(exclude)
        self.include = tuple(PathPattern.parse(text, include_option) for text in include_texts)
        self.exclude = tuple(PathPattern.parse(text, exclude_option) for text in exclude_texts)
        self._report = None

    def __call__(self, checkpoint: Checkpoint) -> Checkpoint:
        paths_of, refs = paths_by_tensor(checkpoint)
        all_paths = [path for paths in paths_of.values() for path in paths]
        for patterns, option in ((self.include, self.include_option), (self.exclude, self.exclude_option)):
            for pattern in patterns:
                if not any(pattern.matches_within(path) for path in all_paths):
                    raise NoMatchError(option, pattern.text, "matches no tensor", file=checkpoint.origin)
        found = sorted({ref.dtype for ref in refs.values()})
        if not any(name in FLOAT_DTYPES for name in found):
            raise NoMatchError(
                self.option,
                self.dtype,
                f"no floating-point tensor to cast (dtypes found: {', '.join(found) or 'no tensors'})",
                file=checkpoint.origin,
            )
        cast: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        made: dict[int, TensorRef] = {}
        self._forget_origins()
        for key, paths in paths_of.items():
            ref = refs[key]
            entry: dict[str, Any] = {"path": RawPath(paths[0]), "dtype": ref.dtype, "shape": list(ref.shape)}
            if len(paths) > 1:
                entry["aliases"] = [RawPath(path) for path in paths[1:]]
            if ref.dtype not in FLOAT_DTYPES or ref.numpy:
                reason = "float8 is not cast" if ref.dtype in SKIPPED_FLOATS else "not floating-point"
                skipped.append({**entry, "reason": "a numpy array (kept as it is)" if ref.numpy else reason})
                continue
            chosen = [self._chosen(path) for path in paths]
            if not all(chosen):
                if any(chosen):
                    self._tie_conflict(paths, chosen, checkpoint)
                skipped.append({**entry, "reason": self._why_not(paths[0])})
                continue
            if ref.dtype == self.dtype:
                skipped.append({**entry, "reason": f"already {self.dtype}"})
                continue
            origin = CastOrigin(ref.dtype, ref.digest, ref.source)
            source = CastSource(
                ref.source, ref.dtype, self.dtype, source_digest=ref.digest, check_digest=self.check, origin=origin
            )
            new = ref.derive(dtype=self.dtype, source=source).with_cast_from(origin)
            made[key] = new
            self._made_from(new, ref)
            cast.append(
                {
                    **entry,
                    "dtype": self.dtype,
                    "from_dtype": ref.dtype,
                    "source_digest": ref.digest,
                    "bytes_before": ref.nbytes,
                    "bytes": new.nbytes,
                }
            )
        result = map_tensors(checkpoint, lambda path, ref: made.get(id(ref), ref))
        self._report = {
            "dtype": self.dtype,
            "include": [pattern.text for pattern in self.include],
            "exclude": [pattern.text for pattern in self.exclude],
            "cast": cast,
            "skipped": skipped,
        }
        return replace_tree(checkpoint, result.tree)

    def _chosen(self, path: Path) -> bool:
        if self.include and not any(pattern.matches_within(path) for pattern in self.include):
            return False
        return not any(pattern.matches_within(path) for pattern in self.exclude)

    def _why_not(self, path: Path) -> str:
        if self.include and not any(pattern.matches_within(path) for pattern in self.include):
            return f"not in {self.include_option}"
        return f"in {self.exclude_option}"

    def _tie_conflict(self, paths: list[Path], chosen: list[bool], checkpoint: Checkpoint) -> None:
        yes = format_path(paths[chosen.index(True)])
        no = format_path(paths[chosen.index(False)])
        raise TransformError(
            self.option,
            self.dtype,
            f"the tensor at {yes!r} is tied to {no!r}, which --dtype-include/--dtype-exclude leave out: "
            "a tied tensor is cast at all its paths or none (name both, or untie it with --ties materialize)",
            file=checkpoint.origin,
        )

    def summary(self) -> str:
        text = super().summary()
        report = self.report()
        if report is None:
            return text
        cast = report["cast"]
        sources = sorted({item["from_dtype"] for item in cast})
        before = sum(item["bytes_before"] for item in cast)
        after = sum(item["bytes"] for item in cast)
        return (
            f"{text}: {len(cast)} tensor(s) cast from {', '.join(sources) or '-'} ({before} → {after} bytes), "
            f"{len(report['skipped'])} left as they are"
        )
