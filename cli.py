"""``sdconvert``: convert, inspect and verify PyTorch checkpoints across formats.

Exit codes: 0 ok, 1 ``verify`` found differences, 2 bad usage or bad input (one line on stderr),
3 an internal error (a bug: one line on stderr; set SDCONVERT_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_DIFFERENT, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


class UsageError(Exception):
    """Bad command-line usage; reported like bad input (exit 2, one line)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdconvert", description="Convert PyTorch checkpoints between formats, bit for bit.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    convert = commands.add_parser("convert", help="convert SRC to DST (format from suffix or --from/--to)")
    convert.add_argument("src", type=Path)
    convert.add_argument("dst", type=Path)
    convert.add_argument("--from", dest="src_format", metavar="FMT", help="format of SRC")
    convert.add_argument("--to", dest="dst_format", metavar="FMT", help="format of DST")
    convert.add_argument("--select", metavar="PATH", help="write only this sub-tree, e.g. model_state_dict")
    convert.add_argument("--force", action="store_true", help="replace DST if it exists")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.add_argument("--check", action="store_true", help="re-hash tensors against the digests SRC stores")
    convert.add_argument(
        "--no-fsync", action="store_true", help="skip fsync before the atomic rename (faster, not crash-durable)"
    )
    onnx = convert.add_argument_group("onnx output")
    onnx.add_argument(
        "--model",
        metavar="SPEC",
        help="add the model's forward graph: 'recipe' or 'package.module:Class' (no-arg ctor)",
    )
    onnx.add_argument("--input-shape", metavar="N,C,H,W", help="example input shape traced by the export")
    onnx.add_argument("--external-data", action="store_true", help="store tensors in DST.data (automatic past 2 GB)")
    shards = convert.add_argument_group("safetensors output")
    shards.add_argument(
        "--max-shard-size", metavar="SIZE", help="write DST as a folder of shards + index, e.g. 5GB or 512MiB"
    )

    inspect = commands.add_parser("inspect", help="list keys, dtypes and shapes, then the other values")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--from", dest="format", metavar="FMT")
    inspect.add_argument("--json", action="store_true", help="print the manifest instead")

    schema = commands.add_parser("schema", help="write the manifest (JSON schema of keys, dtypes, shapes)")
    schema.add_argument("file", type=Path)
    schema.add_argument("--from", dest="format", metavar="FMT")
    schema.add_argument("-o", "--output", type=Path, help="write here instead of stdout")

    verify = commands.add_parser(
        "verify", help="exit 0 if A and B are bit-identical (and, with --deep, match their stored digests), else 1"
    )
    verify.add_argument("a", type=Path)
    verify.add_argument("b", type=Path, nargs="?", help="omit with --deep to check A alone")
    verify.add_argument("--deep", action="store_true", help="also re-hash every tensor against its stored BLAKE3")

    commands.add_parser("formats", help="the registered formats, their suffixes and dtypes")

    demo = commands.add_parser("demo", help="the recipe Net + SGD through every format and back")
    demo.add_argument("--out", type=Path, default=Path("demo-out"), help="folder for the files (default: demo-out)")
    demo.add_argument("--steps", type=int, default=3, help="SGD steps before saving (default: 3)")
    return parser


def run(args: argparse.Namespace) -> int:
    import converters

    if args.command == "convert":
        if args.dst.exists() and not args.force:
            raise converters.DestinationError("exists; pass --force to replace it", file=args.dst)
        options = _writer_options(args)
        bar = None if args.quiet or not sys.stderr.isatty() else _ProgressBar(args.dst.name)
        try:
            converters.convert(
                args.src,
                args.dst,
                src_format=args.src_format,
                dst_format=args.dst_format,
                select=args.select,
                progress=bar,
                **options,
            )
        finally:
            if bar is not None:
                bar.close()
        if not args.quiet:
            print(f"wrote {args.dst}")
    elif args.command == "inspect":
        if args.json:
            print(json.dumps(converters.manifest(args.file, args.format), indent=2))
        else:
            _inspect(args.file, args.format)
    elif args.command == "schema":
        text = json.dumps(converters.manifest(args.file, args.format), indent=2) + "\n"
        if args.output:
            from converters.atomic import atomic_output

            with atomic_output(args.output) as out:
                out.write(text.encode())
            print(f"wrote {args.output}")
        else:
            sys.stdout.write(text)
    elif args.command == "verify":
        if args.b is None and not args.deep:
            raise UsageError("sdconvert verify: give two files, or --deep to check one against its digests")
        problems = converters.verify(args.a, args.b, deep=args.deep)
        subject = f"{args.a} and {args.b}" if args.b else str(args.a)
        if problems:
            print(
                f"{len(problems)} difference(s) in {subject}:"
                if args.b is None
                else f"{len(problems)} difference(s) between {subject}:"
            )
            for line in problems:
                print(f"  {line}")
            return EXIT_DIFFERENT
        if args.b is None:
            print(f"intact: every stored digest of {args.a} matches its tensor bytes")
        else:
            print(f"bit-identical: {subject}" + (" (stored digests checked)" if args.deep else ""))
    elif args.command == "formats":
        _formats()
    elif args.command == "demo":
        from converters import demo

        return EXIT_OK if demo.run(args.out, steps=args.steps) else EXIT_DIFFERENT
    return EXIT_OK


def _writer_options(args: argparse.Namespace) -> dict[str, object]:
    """The onnx writer's options from --model/--input-shape/--external-data (other writers take none)."""
    options: dict[str, object] = {}
    if args.model:
        from converters.formats.onnx_graph import example_input, resolve_model

        if args.input_shape is None and args.model != "recipe":
            raise UsageError("sdconvert convert: --model needs --input-shape (e.g. 1,3,32,32)")
        options["model"] = resolve_model(args.model)
        options["example_input"] = example_input(args.input_shape or "1,3,32,32")
    elif args.input_shape:
        raise UsageError("sdconvert convert: --input-shape goes with --model")
    if args.external_data:
        options["external_data"] = True
    if args.no_fsync:
        options["fsync"] = False
    if args.check:
        options["check"] = True
    if args.max_shard_size:
        options["max_shard_size"] = args.max_shard_size
    return options


class _ProgressBar:
    """A tqdm bar on stderr, shown only for conversions big enough to wait for."""

    MIN_BYTES = 64 * 1024 * 1024

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            if total < self.MIN_BYTES:
                return
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=self.label, leave=False)
        self.bar.update(done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _inspect(path: Path, format: str | None) -> None:
    import converters
    from converters.api import stored_size
    from converters.plugins import registry
    from converters.report import describe, human_bytes

    fmt = registry.resolve(path, format)
    checkpoint = converters.read(path, fmt.name)
    tensors = checkpoint.unique_tensors()
    tied = len(list(checkpoint.tensors())) - len(tensors)
    total = sum(ref.nbytes for _, ref in tensors)
    also = f", {tied} more paths tied to them" if tied else ""
    size = human_bytes(stored_size(path))
    print(f"{path}: {fmt.name}, {size}, {len(tensors)} tensors ({human_bytes(total)}){also}")
    for line in describe(checkpoint.tree):
        print(line)


def _formats() -> None:
    from converters.dtypes import DTYPES
    from converters.plugins import registry

    formats = list(registry)
    print(f"{'format':<12} {'suffixes':<22} description")
    for fmt in formats:
        print(f"{fmt.name:<12} {' '.join(fmt.suffixes):<22} {fmt.description}")
    print()
    print(f"{'dtype':<16}" + "".join(f"{fmt.name:<12}" for fmt in formats))
    for name in DTYPES:
        print(f"{name:<16}" + "".join(f"{'yes' if name in fmt.dtypes else '-':<12}" for fmt in formats))


def main(argv: Sequence[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python cli.py` from a checkout
    from converters.errors import ConverterError

    try:
        return run(build_parser().parse_args(argv))
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ConverterError, OSError) as exc:
        print(f"sdconvert: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("sdconvert: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("SDCONVERT_DEBUG"):
            raise
        print(
            f"sdconvert: internal error: {type(exc).__name__}: {_one_line(exc)} "
            "(a bug; SDCONVERT_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
