"""What the performance work promises, checked without timing: tensor bytes move by
copy_file_range, digests come from the data flow, loads map files instead of copying,
and inspecting or converting never imports torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import blake3
import pytest
import torch
from helpers import builtin_suffixes, tensor_bytes

import converters
from converters.core import transfer
from converters.core.sources import BufferSource, ConcatSource, FileRange, read_all, slice_source

CLI = Path(__file__).resolve().parent.parent / "cli.py"


@pytest.mark.parametrize("suffix", builtin_suffixes())
def test_our_files_store_blake3_digests_that_match_the_bytes(tmp_path: Path, recipe_pt: Path, suffix: str) -> None:
    path = converters.convert(recipe_pt, tmp_path / f"c{suffix}")
    stored = {key: ref.digest for key, ref in converters.read(path).unique_tensors()}
    assert all(stored.values()), "every tensor should carry the digest written with it"
    for tensor_path, ref in converters.read(path).unique_tensors():
        data = bytearray(ref.nbytes)
        ref.source.readinto(memoryview(data))
        assert stored[tensor_path] == blake3.blake3(bytes(data)).hexdigest()


def test_manifest_of_a_foreign_file_computes_the_digests(tmp_path: Path, trained: Any) -> None:
    path = tmp_path / "plain.pt"
    torch.save(trained[0].state_dict(), path)
    assert all(ref.digest is None for _, ref in converters.read(path).unique_tensors())
    entries = {entry["key"]: entry for entry in converters.manifest(path)["tensors"]}
    for key, tensor in trained[0].state_dict().items():
        assert entries[key]["blake3"] == blake3.blake3(tensor_bytes(tensor)).hexdigest()


def test_copy_into_matches_crc_and_digest_for_every_kind_of_source(tmp_path: Path) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    (tmp_path / "src.bin").write_bytes(b"HEAD" + payload)
    sources = [
        FileRange(tmp_path / "src.bin", 4, len(payload)),
        BufferSource.of(payload),
        ConcatSource((BufferSource.of(payload[:1000]), FileRange(tmp_path / "src.bin", 1004, len(payload) - 1000))),
        slice_source(
            ConcatSource(
                (BufferSource.of(b"xx" + payload[:10]), FileRange(tmp_path / "src.bin", 14, len(payload) - 10))
            ),
            2,
            len(payload),
        ),
    ]
    import zlib

    for index, source in enumerate(sources):
        out = tmp_path / f"out{index}"
        checks = transfer.Checks.make(crc=True, digest=True)
        with open(out, "wb") as handle:
            handle.write(b"PREFIX")
            transfer.copy_into(handle, source, checks)
            handle.write(b"SUFFIX")
        assert out.read_bytes() == b"PREFIX" + payload + b"SUFFIX"
        assert checks.crc == zlib.crc32(payload)
        assert checks.hexdigest() == blake3.blake3(payload).hexdigest()


def test_file_ranges_are_copied_by_the_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.copy_file_range

    def spy(src: int, dst: int, count: int, *args: Any) -> int:
        calls.append(count)
        return real(src, dst, count, *args)

    monkeypatch.setattr(os, "copy_file_range", spy)
    source = tmp_path / "w.safetensors"
    # A tensor above transfer.INLINE_COPY goes through the kernel; a small one is read and written
    # in one go (a thread and a kernel copy per tiny tensor cost more than its bytes).
    converters.save({"w": torch.randn(1000, 400), "small": torch.randn(10)}, source)
    calls.clear()
    converters.convert(source, tmp_path / "w.pt")
    assert calls == [1_600_000]
    assert converters.verify(source, tmp_path / "w.pt") == []


@pytest.mark.parametrize("mmap", [False, True])
def test_load_maps_aligned_tensors_instead_of_copying(tmp_path: Path, mmap: bool) -> None:
    path = tmp_path / "m.safetensors"
    converters.save({"a": torch.randn(64, 64), "b": torch.randn(32)}, path)  # both 64-byte aligned
    refs = dict(converters.read(path).unique_tensors())
    loaded = converters.load(path, mmap=mmap)
    offset_gap = refs[("b",)].source.offset - refs[("a",)].source.offset  # type: ignore[attr-defined]
    # Both tensors point into one mapping of the file, exactly as far apart as in the file.
    assert loaded["b"].data_ptr() - loaded["a"].data_ptr() == offset_gap
    before = path.read_bytes()
    loaded["a"].add_(1.0)  # copy-on-write: the file is untouched
    assert path.read_bytes() == before


def test_unaligned_tensors_are_copied_unless_mmap_is_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "odd.safetensors"
    converters.save({"a": torch.randn(3), "b": torch.randn(5)}, path)  # b starts 12 bytes in
    mapped, copied = converters.load(path, mmap=True), converters.load(path)
    assert mapped["b"].data_ptr() - mapped["a"].data_ptr() == 12
    assert copied["b"].data_ptr() % 64 == 0 and torch.equal(mapped["b"], copied["b"])


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "{src}"],
        ["inspect", "--json", "{src}"],
        ["schema", "{src}"],
        ["convert", "{src}", "{dst}"],
        ["verify", "{src}", "{src}"],
    ],
)
def test_paths_without_torch_objects_never_import_torch(tmp_path: Path, recipe_pt: Path, args: list[str]) -> None:
    script = (
        "import runpy, sys\n"
        "sys.argv = ['cli.py', *sys.argv[1:]]\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit as exit:\n    code = exit.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n"
    )
    filled = [a.format(src=recipe_pt, dst=tmp_path / "out.msgpack") for a in args]
    result = subprocess.run([sys.executable, "-c", script, *filled], capture_output=True, text=True, cwd=CLI.parent)
    assert result.stderr.strip().endswith("NO-TORCH"), result.stderr


def test_cli_progress_quiet_and_no_fsync(tmp_path: Path, recipe_pt: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(CLI), "convert", recipe_pt, tmp_path / "q.safetensors", "--quiet", "--no-fsync"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    assert converters.verify(recipe_pt, tmp_path / "q.safetensors") == []


def test_progress_callback_counts_every_tensor_byte(tmp_path: Path, recipe_pt: Path) -> None:
    seen: list[tuple[int, int]] = []
    converters.convert(recipe_pt, tmp_path / "p.msgpack", progress=lambda done, total: seen.append((done, total)))
    total = sum(ref.nbytes for _, ref in converters.read(recipe_pt).unique_tensors())
    assert sum(done for done, _ in seen) == total and {t for _, t in seen} == {total}


def test_progress_bar_appears_only_for_big_conversions(capsys: pytest.CaptureFixture[str]) -> None:
    from converters import cli

    small = cli._ProgressBar("small.pt")
    small(1 << 20, 10 << 20)
    small.close()
    assert small.bar is None and capsys.readouterr().err == ""
    big = cli._ProgressBar("big.pt")
    for _ in range(4):
        big(64 << 20, 256 << 20)
    assert big.bar is not None and big.bar.n == 256 << 20
    big.close()
    assert "big.pt" in capsys.readouterr().err


@pytest.mark.parametrize("zip_file", [True, False], ids=["zip", "legacy"])
def test_a_state_dict_of_many_tiny_tensors_is_within_the_budget(tmp_path: Path, zip_file: bool) -> None:
    """25,000 four-element tensors (~7 MB of file, ~1.4 KB of Python objects each at peak): the
    pickle's transient values are charged at their small cost, so the read is not refused."""
    path = tmp_path / "many.pt"
    state = {f"layers.{index}.scale": torch.full((4,), float(index)) for index in range(25_000)}
    torch.save(state, path, _use_new_zipfile_serialization=zip_file)
    tree = converters.read(path).tree
    assert len(tree) == 25_000
    assert bytes(read_all(tree["layers.24999.scale"].source)) == tensor_bytes(state["layers.24999.scale"])
