"""torch.distributed.checkpoint folders: a real 2-rank FSDP2 job on gloo saves, we convert; we
write, a real 2-rank job loads. Bit-identical to the state gathered in the job."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_bit_identical, builtin_suffixes

import converters
from converters.core.errors import CorruptFileError, UnsafeFileError

JOB = Path(__file__).resolve().parent / "jobs" / "dcp_job.py"
CLI = Path(__file__).resolve().parent.parent / "cli.py"


def run_job(mode: str, folder: Path, output: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(JOB), mode, str(folder), str(output)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """(DCP folder written by 2 ranks, the full state gathered in the job)."""
    folder = tmp_path_factory.mktemp("dcp")
    run_job("save", folder / "checkpoint", folder / "reference.pt")
    return folder / "checkpoint", torch.load(folder / "reference.pt")


def test_two_rank_checkpoint_is_read_bit_identically(saved: tuple[Path, Any]) -> None:
    folder, reference = saved
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert_bit_identical(reference, converters.load(folder))
    # Row-sharded tensors are joined without copying: one stream over both ranks' files.
    sources = {
        type(ref.source).__name__
        for _, ref in converters.read(folder).unique_tensors()
        if ref.shape and ref.shape[0] > 1
    }
    assert sources == {"ConcatSource"}


@pytest.mark.parametrize("suffix", builtin_suffixes())
def test_two_rank_checkpoint_converts_to_every_format(tmp_path: Path, saved: tuple[Path, Any], suffix: str) -> None:
    folder, reference = saved
    converted = converters.convert(folder, tmp_path / f"full{suffix}")
    assert_bit_identical(reference, converters.load(converted))


def test_our_dcp_folder_is_loaded_by_a_two_rank_job(tmp_path: Path, saved: tuple[Path, Any]) -> None:
    _, reference = saved
    source = tmp_path / "reference.pt"
    torch.save(reference, source)
    ours = tmp_path / "ours"
    result = subprocess.run(
        [sys.executable, str(CLI), "convert", source, ours, "--to", "dcp"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    run_job("load", ours, tmp_path / "loaded.pt")
    assert_bit_identical(reference, torch.load(tmp_path / "loaded.pt"))
    assert converters.verify(source, ours) == []


def test_every_command_accepts_a_dcp_folder(saved: tuple[Path, Any]) -> None:
    folder, _ = saved
    for args in (["inspect", folder], ["schema", folder], ["verify", folder, folder]):
        result = subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True)
        assert result.returncode == 0, (args, result.stderr)


def test_torch_sees_dcps_flattening_and_we_read_back_the_tree(tmp_path: Path) -> None:
    """dcp_to_torch_save gives what it gives for torch's own dcp.save (int dict keys as strings,
    OrderedDicts as dicts); we read back the tree that was written, exactly."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    state = {"model": torch.nn.Linear(3, 2).state_dict(), "state": {0: {"step": torch.tensor(2.0)}}, "lr": 0.1}
    source = tmp_path / "s.pt"
    torch.save(state, source)
    converters.convert(source, tmp_path / "d", dst_format="dcp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=tmp_path / "torch", no_dist=True)
        dcp_to_torch_save(tmp_path / "d", tmp_path / "ours-view.pt")
        dcp_to_torch_save(tmp_path / "torch", tmp_path / "torch-view.pt")
    view = torch.load(tmp_path / "ours-view.pt", weights_only=False)
    assert_bit_identical(torch.load(tmp_path / "torch-view.pt", weights_only=False), view)
    assert list(view["state"]) == ["0"]
    assert_bit_identical(state, converters.load(tmp_path / "d"))  # the int key, the OrderedDict and its _metadata


def _metadata_path(tmp_path: Path) -> Path:
    source = tmp_path / "s.pt"
    torch.save({"w": torch.ones(4)}, source)
    converters.convert(source, tmp_path / "d", dst_format="dcp")
    return tmp_path / "d" / ".metadata"


def test_pickled_code_in_metadata_never_runs(tmp_path: Path) -> None:
    metadata = _metadata_path(tmp_path)
    metadata.write_bytes(b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.")
    with pytest.raises(UnsafeFileError, match=r"\.metadata asks for the global os\.system at byte 2; refusing"):
        converters.read(metadata.parent)


def test_data_file_names_cannot_leave_the_folder(tmp_path: Path) -> None:
    metadata = _metadata_path(tmp_path)
    data = metadata.read_bytes().replace(b"__0_0.distcp", b"../x/0.distcp")
    metadata.write_bytes(data)
    with pytest.raises((UnsafeFileError, CorruptFileError)):
        converters.read(metadata.parent)


def test_missing_data_file_is_a_clear_error(tmp_path: Path) -> None:
    metadata = _metadata_path(tmp_path)
    (metadata.parent / "__0_0.distcp").unlink()
    with pytest.raises(
        CorruptFileError, match=r"data file '__0_0\.distcp' is not a regular file in the checkpoint folder"
    ):
        converters.read(metadata.parent)


def test_a_pickle_of_real_metadata_classes_is_only_data(tmp_path: Path) -> None:
    metadata = _metadata_path(tmp_path)
    # The same bytes torch would unpickle into its dataclasses are, here, inert records.
    assert pickle.loads(metadata.read_bytes()).__class__.__name__ == "Metadata"
    assert converters.read(metadata.parent).tree.keys() == {"w"}
    (metadata.parent / "sdconvert.json").unlink()  # read as any DCP folder: from .metadata alone
    assert converters.read(metadata.parent).tree.keys() == {"w"}
