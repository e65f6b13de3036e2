"""Casting is bit-identical to torch's ``tensor.to(dtype)``: every pair among float64, float32,
float16 and bfloat16, on a large random + edge sample (every exponent, ties, subnormals, ±0, ±inf,
NaN payloads, overflow), compared by raw bits. The 16-bit sources are checked exhaustively; all
2**32 float32 inputs are checked by ``bench/cast_exhaustive.py``.

torch's result is the one its vectorised loop gives on a contiguous tensor (the values in the bulk
of every real tensor). Its scalar paths differ for some NaNs; the tests below pin exactly where,
so that a change in torch shows up here rather than as a silent difference.
"""

from __future__ import annotations

import functools
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from converters.core.errors import ConverterError
from converters.core.sources import BufferSource, FileRange, read_all
from converters.transforms.cast import FLOAT_DTYPES, CastSource, cast_bits, cast_bytes

TORCH = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}
SIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
PAIRS = [(a, b) for a in FLOAT_DTYPES for b in FLOAT_DTYPES if a != b]


def torch_cast(bits: np.ndarray, source: str, target: str) -> np.ndarray:
    """torch's ``.to(target)`` of the ``source`` values whose bit patterns are ``bits``, as bits."""
    tensor = torch.from_numpy(bits.copy().view(f"i{bits.itemsize}")).view(TORCH[source])
    out = tensor.to(TORCH[target])
    return out.view(INT[out.element_size()]).numpy().view(UINT[out.element_size()])


def torch_body(bits: np.ndarray, source: str, target: str) -> np.ndarray:
    """torch's vectorised result for every element: padded so no element lands in a scalar tail
    (a multiple of 64 elements, so each thread's share is a multiple of 16 too)."""
    padded = np.concatenate([bits, np.zeros(-len(bits) % 64, bits.dtype)])
    return torch_cast(padded, source, target)[: len(bits)]


def is_nan(bits: np.ndarray, dtype: str) -> np.ndarray:
    view = {"float64": np.float64, "float32": np.float32, "float16": np.float16}
    if dtype in view:
        return np.isnan(bits.view(view[dtype]))
    return ((bits & 0x7F80) == 0x7F80) & ((bits & 0x7F) != 0)


# ------------------------------------------------------------------------------ the sample


def float32_sample(rng: np.random.Generator) -> np.ndarray:
    """~1.6 M float32 patterns: every exponent with random mantissas, the rounding edges of both
    16-bit targets (ties of each parity, just above and below, subnormal ranges, overflow), specials."""
    parts = []
    exponents = np.repeat(np.arange(256, dtype=np.uint32), 2048)
    mantissas = rng.integers(0, 1 << 23, len(exponents), dtype=np.uint32)
    signs = rng.integers(0, 2, len(exponents), dtype=np.uint32) << np.uint32(31)
    parts.append(signs | (exponents << np.uint32(23)) | mantissas)
    # rounding edges: for a cut of k low bits, the exact tie, one ulp below and above, with both
    # parities of the kept part, at every exponent
    exps = np.repeat(np.arange(256, dtype=np.uint32), 64) << np.uint32(23)
    high = rng.integers(0, 1 << 23, len(exps), dtype=np.uint32)
    for cut in (13, 14, 15, 16, 20, 23):  # float16 normal (13) and subnormal (14+), bfloat16 (16)
        half = np.uint32(1 << (cut - 1))
        base = (high >> np.uint32(cut)) << np.uint32(cut)
        for delta in (0, 1, 2):
            for moved in (base + half - np.uint32(delta), base + half + np.uint32(delta)):
                parts.append(exps | (moved & np.uint32(0x7FFFFF)))
    parts.append(
        np.array(
            [
                0x00000000,
                0x80000000,
                0x7F800000,
                0xFF800000,  # ±0, ±inf
                0x00000001,
                0x807FFFFF,
                0x00800000,
                0x7F7FFFFF,
                0xFF7FFFFF,  # subnormal / normal edges
                0x477FE000,
                0x477FEFFF,
                0x477FF000,
                0x477FF001,
                0x477FFFFF,
                0x47800000,  # float16 overflow
                0x7F7F7FFF,
                0x7F7F8000,
                0x7F7FC000,  # bfloat16 overflow edge
                0x33000000,
                0x33000001,
                0x32FFFFFF,
                0x33800000,
                0x33C00000,
                0x387FC000,
                0x387FE000,  # f16 subnormals
                0x7F800001,
                0x7FA00000,
                0xFFC00001,
                0x7FFFFFFF,
                0x7FC00000,
                0xFFC00000,
                0xFF800001,
                0x7F812345,
                0x7FBFFFFF,
                0xFFFFFFFF,
                0x7FC02000,
                0x7F802000,  # NaN: signalling, quiet, payloads, signs
            ],
            dtype=np.uint32,
        )
    )
    nan_payloads = rng.integers(1, 1 << 23, 20000, dtype=np.uint32)
    parts.append(np.uint32(0x7F800000) | nan_payloads | (rng.integers(0, 2, 20000, dtype=np.uint32) << np.uint32(31)))
    parts.append(rng.integers(0, 1 << 32, 200000, dtype=np.uint64).astype(np.uint32))  # any bits
    return np.concatenate(parts)


def float64_sample(rng: np.random.Generator) -> np.ndarray:
    """~2 M float64 patterns: every exponent, the ranges of every target, ties at the float32
    level, the double-rounding cases of float16/bfloat16 targets, subnormals, specials, NaNs."""
    parts = []
    exponents = np.repeat(np.arange(2048, dtype=np.uint64), 256)
    parts.append(
        (rng.integers(0, 2, len(exponents), dtype=np.uint64) << np.uint64(63))
        | (exponents << np.uint64(52))
        | rng.integers(0, 1 << 52, len(exponents), dtype=np.uint64)
    )
    near = rng.integers(1023 - 160, 1023 + 140, 400000, dtype=np.uint64)  # float32/16 and bfloat16 ranges
    parts.append((near << np.uint64(52)) | rng.integers(0, 1 << 52, len(near), dtype=np.uint64))
    high = rng.integers(0, 1 << 52, 20000, dtype=np.uint64)
    exps = rng.integers(1023 - 160, 1023 + 140, 20000, dtype=np.uint64) << np.uint64(52)
    for cut in (29, 30, 42, 44, 45, 50):  # float32 ties; float16 and bfloat16 ties, all through float32
        half = np.uint64(1 << (cut - 1))
        base = (high >> np.uint64(cut)) << np.uint64(cut)
        for delta in (0, 1, 1 << 20, 1 << 27):  # 2**27 < a float32 half-ulp: double rounding lands on a tie
            parts.append(exps | ((base + half - np.uint64(delta)) & np.uint64((1 << 52) - 1)))
            parts.append(exps | ((base + half + np.uint64(delta)) & np.uint64((1 << 52) - 1)))
    specials = [0, 1 << 63, 0x7FF0000000000000, 0xFFF0000000000000, 1, 0x000FFFFFFFFFFFFF, 0x7FEFFFFFFFFFFFFF]
    specials += [0x7FF0000000000001, 0x7FF4000000000000, 0xFFF0000000000001, 0x7FFFFFFFFFFFFFFF, 0x7FF8000000000000]
    specials += [0x47EFFFFFE0000000, 0x47EFFFFFF0000000, 0x47EFFFFFEFFFFFFF]  # float32 overflow edge
    parts.append(np.array(specials, dtype=np.uint64))
    payloads = rng.integers(1, 1 << 52, 20000, dtype=np.uint64)
    parts.append(
        np.uint64(0x7FF0000000000000) | payloads | (rng.integers(0, 2, 20000, dtype=np.uint64) << np.uint64(63))
    )
    parts.append(rng.integers(0, 1 << 63, 100000, dtype=np.uint64) * np.uint64(2) + np.uint64(1))  # any bits
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def samples() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20260513)
    every16 = np.arange(1 << 16, dtype=np.uint16)
    return {"float32": float32_sample(rng), "float64": float64_sample(rng), "float16": every16, "bfloat16": every16}


# ------------------------------------------------------------------------------ the bulk: bit-identical


def test_the_sample_covers_every_class(samples: dict[str, np.ndarray]) -> None:
    f32 = samples["float32"]
    assert len(f32) + len(samples["float64"]) > 3_000_000, (len(f32), len(samples["float64"]))
    exponents = set(np.unique(f32 >> np.uint32(23) & np.uint32(0xFF)).tolist())
    assert exponents == set(range(256))  # every exponent, subnormals (0) and inf/NaN (255) included
    assert is_nan(f32, "float32").sum() > 20000 and (f32 == 0x80000000).any() and (f32 == 0xFF800000).any()
    assert ((f32 & np.uint32(0xFFFF)) == 0x8000).sum() > 10000  # exact bfloat16 ties


@pytest.mark.parametrize(("source", "target"), PAIRS)
def test_every_pair_is_bit_identical_to_torch(samples: dict[str, np.ndarray], source: str, target: str) -> None:
    bits = samples[source]
    expected = torch_body(bits, source, target)
    got = cast_bits(bits, source, target)
    assert got.dtype == expected.dtype
    wrong = np.flatnonzero(got != expected)
    assert not len(wrong), [(hex(bits[i]), hex(expected[i]), hex(got[i])) for i in wrong[:8]]


@pytest.mark.parametrize(("source", "target"), PAIRS)
def test_streaming_through_castsource_gives_the_same_bytes(
    samples: dict[str, np.ndarray], source: str, target: str
) -> None:
    """Source chunks that split elements, blocks of a few elements, chunks smaller than an element."""
    bits = samples[source][:50021]
    raw = bits.astype(f"<u{SIZE[source]}").tobytes()
    expected = torch_body(bits, source, target).astype(f"<u{SIZE[target]}").tobytes()
    for block_bytes, chunk, count in ((1 << 20, 1 << 20, 50021), (1 << 12, 7, 50021), (24, 5, 1001), (3, 1, 301)):
        raw, expected = raw[: count * SIZE[source]], expected[: count * SIZE[target]]
        cast = CastSource(RaggedSource(raw, [3, 1, 17, 4096, 5]), source, target, block_bytes=block_bytes)
        assert cast.nbytes == len(expected)
        pieces = [bytes(piece) for piece in cast.chunks(chunk)]
        assert all(len(piece) <= chunk for piece in pieces)
        if chunk >= SIZE[target]:
            assert all(len(piece) % SIZE[target] == 0 for piece in pieces)  # whole elements
        assert b"".join(pieces) == expected
    assert bytes(read_all(CastSource(BufferSource.of(raw), source, target))) == expected
    assert cast_bytes(raw, source, target) == expected


# ------------------------------------------------------------------------------ rounding twice


def test_float64_to_16_bits_rounds_twice_as_torch_does() -> None:
    """``1 + 2**-8 + 2**-30`` is above the bfloat16 tie at ``1 + 2**-8``: rounding once gives the
    next bfloat16 up; torch rounds to float32 first (landing exactly on the tie) and then to even."""
    cases = {
        "bfloat16": [
            1 + 2**-8 + 2**-30,  # above the tie at 1 + 2**-8: float32 rounds it onto the tie, then to even
            1 + 2**-8 - 2**-30,
            -(3 + 2**-7 + 2**-31),
            2.0**-130 * (1 + 2**-8 + 2**-40),  # a bfloat16 subnormal
        ],
        "float16": [
            1 + 2**-11 + 2**-40,
            1 + 2**-11 - 2**-40,
            2.0**-24 * (1.5 + 2**-30),  # float16 subnormals
            2.0**-20 * (1 + 2**-11 + 2**-36),
        ],
    }
    for target, values in cases.items():
        bits = np.array(values, dtype=np.float64).view(np.uint64)
        ours = cast_bits(bits, "float64", target)
        assert ours.tolist() == torch_body(bits, "float64", target).tolist()
        once = torch.tensor(values, dtype=torch.float64).numpy()
        single = [_round_once(value, target) for value in once]
        assert ours.tolist() != single  # the cases do expose double rounding


def _round_once(value: float, target: str) -> int:
    """Round ``value`` once, to nearest even, into ``target`` (exact rational arithmetic)."""
    from fractions import Fraction

    mantissa_bits, min_exp = (7, -126) if target == "bfloat16" else (10, -14)
    exact = Fraction(value)
    sign = 0x8000 if exact < 0 else 0
    exact = abs(exact)
    exponent = max(exact.numerator.bit_length() - exact.denominator.bit_length(), min_exp)
    while Fraction(2) ** exponent > exact and exponent > min_exp:
        exponent -= 1
    while Fraction(2) ** (exponent + 1) <= exact:
        exponent += 1
    scaled = exact / Fraction(2) ** (exponent - mantissa_bits)
    whole = scaled.numerator // scaled.denominator
    rest = scaled - whole
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and whole % 2):
        whole += 1
    bias = 127 if target == "bfloat16" else 15
    if whole < (1 << mantissa_bits):  # subnormal
        return sign | whole
    return sign | (((exponent + bias) << mantissa_bits) + whole - (1 << mantissa_bits))


# ------------------------------------------------------------------------------ torch's other paths, pinned


@functools.cache
def special_values(source: str) -> np.ndarray:
    """~3000 values of every class (1000 NaNs among them) for the per-call torch checks."""
    rng = np.random.default_rng(7)
    if SIZE[source] == 2:
        every = np.arange(1 << 16, dtype=np.uint16)
        nan = is_nan(every, source)
        return np.concatenate([every[nan][::2][:1000], every[~nan][::31]])
    sample = float32_sample(rng) if source == "float32" else float64_sample(rng)
    nan = is_nan(sample, source)
    rest = sample[~nan]
    return np.concatenate([sample[nan][:1000], rest[:: len(rest) // 2000]])


# (source, target) -> what torch's scalar path gives for a NaN, where it differs from its vectorised loop
TAIL_NAN = {("float16", "float32"): 0x7FFFFFFF, ("float64", "bfloat16"): 0x7FC0}
STRIDED_NAN = {("float32", "bfloat16"): 0x7FC0, ("float64", "bfloat16"): 0x7FC0}


@pytest.mark.parametrize(("source", "target"), PAIRS)
def test_torch_scalar_tails_differ_from_us_only_for_the_documented_nans(source: str, target: str) -> None:
    """Tensors of 1, 7, 15, 17 and 33 elements put values in torch's scalar tail loop."""
    values = special_values(source)
    ours = cast_bits(values, source, target)
    nan = is_nan(values, source)
    for size in (1, 7, 15, 17, 33):
        count = len(values) - len(values) % size
        got = np.concatenate(
            [torch_cast(values[start : start + size], source, target) for start in range(0, count, size)]
        )
        differ = got != ours[:count]
        assert not (differ & ~nan[:count]).any(), f"{source}->{target}: a non-NaN differs in a tail"
        tail = np.zeros(count, bool)
        vector = 16 if (source, target) == ("float64", "bfloat16") else 8  # elements per vectorised step
        for start in range(0, count, size):
            tail[start + size - size % vector : start + size] = True
        if (source, target) in TAIL_NAN:
            assert (got[tail & nan[:count]] == TAIL_NAN[(source, target)]).all()
            assert not (differ & ~tail).any()
        else:
            assert not differ.any()


@pytest.mark.parametrize(("source", "target"), PAIRS)
def test_torch_on_a_non_contiguous_tensor_differs_only_for_the_documented_nans(source: str, target: str) -> None:
    values = special_values(source)
    spaced = np.zeros(2 * len(values), values.dtype)
    spaced[::2] = values
    tensor = torch.from_numpy(spaced.view(f"i{values.itemsize}")).view(TORCH[source])[::2]
    out = tensor.to(TORCH[target]).contiguous()
    got = out.view(INT[out.element_size()]).numpy().view(UINT[out.element_size()])
    ours = cast_bits(values, source, target)
    nan = is_nan(values, source)
    assert (got[~nan] == ours[~nan]).all()
    if (source, target) in STRIDED_NAN:
        assert (got[nan] == STRIDED_NAN[(source, target)]).all()
    else:
        assert (got[nan] == ours[nan]).all()


def test_the_brief_s_measured_nan_cases() -> None:
    f32 = np.array([0x7F800001, 0x7FA00000, 0xFFC00001, 0x7FFFFFFF], dtype=np.uint32)
    assert cast_bits(f32, "float32", "float16").tolist() == [0x7E00, 0x7F00, 0xFE00, 0x7FFF]
    assert cast_bits(f32, "float32", "bfloat16").tolist() == [0xFFFF] * 4
    # float16 -> float32: torch's vectorised loop keeps sign and payload (its 1-7 element tails give 0x7FFFFFFF)
    f16 = np.array([0x7C01, 0xFE00, 0x7E00], dtype=np.uint16)
    assert cast_bits(f16, "float16", "float32").tolist() == [0x7FC02000, 0xFFC00000, 0x7FC00000]
    assert torch_cast(f16, "float16", "float32").tolist() == [0x7FFFFFFF] * 3


# ------------------------------------------------------------------------------ the source itself


class RaggedSource:
    """A plugin's byte source that hands out chunks of awkward sizes (splitting elements)."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data, self.sizes = data, sizes

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def readinto(self, buffer: memoryview) -> None:
        buffer[:] = self.data

    def chunks(self, chunk_size: int = 1 << 20) -> Iterator[memoryview]:
        position, turn = 0, 0
        while position < len(self.data):
            size = min(self.sizes[turn % len(self.sizes)], chunk_size)
            yield memoryview(self.data)[position : position + size]
            position += size
            turn += 1


def test_castsource_checks_what_it_wraps() -> None:
    with pytest.raises(ConverterError, match="whole elements"):
        CastSource(BufferSource.of(bytes(6)), "float32", "bfloat16")
    with pytest.raises(ConverterError, match="casts are between"):
        CastSource(BufferSource.of(bytes(4)), "int32", "float32")
    with pytest.raises(ConverterError, match="itself"):
        CastSource(BufferSource.of(bytes(4)), "float32", "float32")

    class Short(RaggedSource):
        @property
        def nbytes(self) -> int:
            return len(self.data) + 4

    with pytest.raises(ConverterError, match="gave 8 bytes, it declares 12"):
        list(CastSource(Short(bytes(8), [8]), "float32", "float16").chunks())
    empty = CastSource(BufferSource.of(b""), "float32", "float64")
    assert empty.nbytes == 0 and list(empty.chunks()) == []


def test_casting_a_large_tensor_keeps_memory_flat(tmp_path: Path) -> None:
    """64 MiB of float32 → bfloat16 through a file range: numpy's allocations (which tracemalloc
    sees) stay within a few MiB, whatever the tensor's size."""
    path = tmp_path / "big.f32"
    block = np.random.default_rng(1).standard_normal(1 << 20, dtype=np.float32).tobytes()
    with open(path, "wb") as handle:
        for _ in range(16):
            handle.write(block)
    cast = CastSource(FileRange(path, 0, 64 << 20), "float32", "bfloat16")
    reference = torch.from_numpy(np.frombuffer(block, np.float32).copy()).to(torch.bfloat16)
    first = reference.view(torch.int16).numpy().tobytes()
    tracemalloc.start()
    try:
        total = 0
        for chunk in cast.chunks():
            if total < len(first):
                assert bytes(chunk) == first[total : total + len(chunk)]
            total += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 32 << 20
    assert peak < 12 << 20, f"peak {peak >> 20} MiB"


def test_a_slice_of_a_cast_is_a_cast_of_the_slice() -> None:
    data = np.arange(100, dtype=np.float32).tobytes()
    cast = CastSource(BufferSource.of(data), "float32", "float16")
    whole = bytes(read_all(cast))
    part = cast.slice(20, 60)
    assert isinstance(part, CastSource) and part.nbytes == 60
    assert bytes(read_all(part)) == whole[20:80]
    assert cast.slice(21, 60) is None and cast.slice(0, 202) is None  # not on elements, or outside


# ------------------------------------------------------------------------------ a cast never launders a flipped bit


def _flip_a_bit_of(path: Path, tensor: torch.Tensor) -> None:
    data = bytearray(path.read_bytes())
    raw = tensor.numpy().tobytes()
    at = data.find(raw)
    assert at > 0 and data.find(raw, at + 1) < 0
    data[at + len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_cast_checks_the_zip_crc_of_what_it_reads(tmp_path: Path) -> None:
    import converters
    from converters.transforms import Cast

    values = torch.arange(4096, dtype=torch.float32)
    source = tmp_path / "torch.pt"
    torch.save({"w": values, "v": torch.ones(3)}, source)
    _flip_a_bit_of(source, values)
    out = tmp_path / "out.safetensors"
    with pytest.raises(ConverterError, match="does not match its CRC-32"):
        converters.convert(source, out, transforms=[Cast("bfloat16")])
    assert not out.exists()


def test_a_cast_checks_the_stored_digest_when_asked(tmp_path: Path) -> None:
    import converters
    from converters.transforms import Cast

    values = torch.arange(4096, dtype=torch.float32)
    source = tmp_path / "ours.safetensors"
    converters.save({"w": values}, source)
    _flip_a_bit_of(source, values)
    out = tmp_path / "out.pt"
    with pytest.raises(ConverterError, match="do not match their stored BLAKE3 digest"):
        converters.convert(source, out, transforms=[Cast("float16", check=True)])
    assert not out.exists()
