"""The main job on built-in defaults: the recipe's Net + SGD through every format and back.

``sdconvert demo`` (and ``make demo``) trains the recipe Net for a few SGD steps on generated data
so momentum buffers exist, saves the general checkpoint with ``torch.save``, converts it to every
registered format plus its manifest, rebuilds a fresh Net + SGD from each file and checks that
their state_dicts are bit-identical to the trained ones.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import api, recipe
from .api import registry
from .core import compare
from .core.report import describe, human_bytes
from .torch_bridge import from_torch


@dataclass
class DemoRow:
    format: str
    file: Path
    seconds: float
    identical: bool
    detail: str


def run(out_dir: Path, *, steps: int = 3, echo: Callable[[str], None] = print) -> bool:
    """Run the demo into ``out_dir``; True when every format gave back bit-identical state."""
    out_dir.mkdir(parents=True, exist_ok=True)
    net, optimizer, checkpoint = recipe.trained_checkpoint(steps)
    source = out_dir / "source.pt"
    torch.save(checkpoint, source)
    echo(
        f"Recipe Net + SGD(lr={recipe.LR}, momentum={recipe.MOMENTUM}) after {steps} steps, "
        f"saved with torch.save to {source}"
    )
    echo("")
    echo("\n".join(describe(api.read(source).tree)))
    echo("")

    expected = from_torch({"model": net.state_dict(), "optimizer": optimizer.state_dict()}).tree
    rows = []
    for fmt in registry:
        if fmt.folder:  # folder formats (DCP) change container types by design; see README
            continue
        destination = out_dir / f"checkpoint{fmt.suffixes[0]}"
        started = time.perf_counter()
        api.convert(source, destination, dst_format=fmt.name)
        seconds = time.perf_counter() - started
        rebuilt_net, rebuilt_optimizer = recipe.rebuild(destination)
        rebuilt = from_torch({"model": rebuilt_net.state_dict(), "optimizer": rebuilt_optimizer.state_dict()}).tree
        problems = compare.differences(expected, rebuilt) + api.verify(source, destination)
        detail = "rebuilt Net + SGD bit-identical" if not problems else problems[0]
        rows.append(DemoRow(fmt.name, destination, seconds, not problems, detail))

    graph_path = out_dir / "checkpoint.graph.onnx"
    graph_note = _onnx_graph(source, graph_path, net)

    schema_path = out_dir / "checkpoint.schema.json"
    schema_path.write_text(json.dumps(api.manifest(source), indent=2) + "\n")
    weights = out_dir / "model.safetensors"
    api.convert(source, weights, select="model_state_dict")
    ddp_path, stripped = out_dir / "ddp.pt", out_dir / "ddp-stripped.safetensors"
    ddp_note = _strip_ddp_prefix(net, ddp_path, stripped)

    echo(f"{'format':<12} {'file':<26} {'size':>10} {'time':>8}  result")
    for row in rows:
        size = human_bytes(row.file.stat().st_size)
        mark = "ok" if row.identical else "MISMATCH"
        echo(f"{row.format:<12} {row.file.name:<26} {size:>10} {row.seconds * 1000:>6.1f}ms  {mark}: {row.detail}")
    echo(f"{'onnx graph':<12} {graph_path.name:<26} {human_bytes(graph_path.stat().st_size):>10}  {graph_note}")
    echo(f"{'manifest':<12} {schema_path.name:<26} {human_bytes(schema_path.stat().st_size):>10}")
    echo(
        f"{'weights':<12} {weights.name:<26} {human_bytes(weights.stat().st_size):>10}  "
        "model_state_dict only, for safetensors.torch.load_file"
    )
    echo(f"{'strip-prefix':<12} {stripped.name:<26} {human_bytes(stripped.stat().st_size):>10}  {ddp_note}")
    ok = all(row.identical for row in rows) and not graph_note.startswith("MISMATCH") and "MISMATCH" not in ddp_note
    echo("")
    echo("every format round-tripped bit-identically" if ok else "SOME FORMATS DID NOT ROUND-TRIP")
    return ok


def _strip_ddp_prefix(net: recipe.Net, ddp_path: Path, destination: Path) -> str:
    """A DistributedDataParallel-style checkpoint (keys ``module.conv1.weight``...) converted with
    ``strip_prefix="auto"`` loads into a fresh Net, bit for bit."""
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, ddp_path)
    api.convert(ddp_path, destination, select="model_state_dict", strip_prefix="auto")
    fresh = recipe.Net()
    fresh.load_state_dict(api.load(destination))  # "Missing key(s) in state_dict" without the strip
    same = all(
        torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        for a, b in zip(fresh.state_dict().values(), net.state_dict().values(), strict=True)
    )
    verdict = "loads into a fresh Net, bit-identical" if same else "MISMATCH after loading"
    return f"module.-prefixed (DDP) checkpoint, --strip-prefix auto: {verdict}"


def _onnx_graph(source: Path, destination: Path, net: recipe.Net) -> str:
    """The checkpoint with the Net's forward graph; run it in onnxruntime when that is installed."""
    api.convert(source, destination, model=recipe.Net(), example_input=recipe.Net.example_input_shape)
    try:
        import onnxruntime
    except ImportError:
        return "the Net's graph over the checkpoint (pip install onnxruntime to run it here)"
    images = torch.randn((4, *recipe.INPUT_SHAPE), generator=torch.Generator().manual_seed(1))
    session = onnxruntime.InferenceSession(str(destination), providers=["CPUExecutionProvider"])
    (outputs,) = session.run(None, {"input": images.numpy()})
    with torch.no_grad():
        expected = net(images)
    gap = float((torch.from_numpy(outputs) - expected).abs().max())
    verdict = "matches" if gap <= 1e-5 else "MISMATCH:"
    return f"{verdict} torch in onnxruntime (max |diff| {gap:.1e} over 4 images)"
