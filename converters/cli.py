"""``sdconvert``: convert, inspect and verify PyTorch checkpoints across formats.

Exit codes: 0 ok, 1 ``verify`` found differences, 2 bad usage or bad input (one line on stderr),
3 an internal error (a bug: one line on stderr; set SDCONVERT_DEBUG=1 for the traceback),
128 + N when stopped by signal N (SIGINT, SIGTERM, SIGHUP: temporary files removed, one line).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .core.errors import ConverterError, shown

if TYPE_CHECKING:
    from .core.contract import OptionSpec
    from .core.parallel import Group

    Subcommands = argparse._SubParsersAction["_Parser"]

EXIT_OK, EXIT_DIFFERENT, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
# transforms.layout.LAYOUT_KEY (tests/test_layers.py keeps them equal): inspect imports the layout
# code only for a file that records a layout
LAYOUT_KEY = "sdconvert_layout"
STOPPING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds the stack like ``KeyboardInterrupt`` does for SIGINT, so
    every atomic writer removes its temporary file or staging folder on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class UsageError(Exception):
    """Bad command-line usage; reported like bad input (exit 2, one line)."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No abbreviated flags: `--ex` must not mean --exclude today and be ambiguous once a format
        # declares --external-data (format flags are added only when needed, see parse_arguments).
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def build_parser(*, with_format_options: bool = True, command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``convert``'s format flags come from what each format declares
    (building them imports every format, so commands other than ``convert`` skip it). Given a
    ``command``, only its sub-command is built (each costs start-up time)."""
    parser = _Parser(prog="sdconvert", description="Convert PyTorch checkpoints between formats, bit for bit.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, add in SUBCOMMANDS.items():
        if command in (None, name):
            add(commands)
    if with_format_options and "convert" in commands.choices:
        _add_format_options(commands.choices["convert"])
    return parser


def _add_convert(commands: Subcommands) -> None:
    convert = commands.add_parser("convert", help="convert SRC to DST (format from suffix or --from/--to)")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--from", dest="src_format", metavar="FMT", help="format of SRC")
    convert.add_argument("--to", dest="dst_format", metavar="FMT", help="format of DST")
    convert.add_argument("--force", action="store_true", help="replace DST if it exists")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.add_argument("--check", action="store_true", help="re-hash tensors against the digests SRC stores")
    convert.add_argument(
        "--no-fsync", action="store_true", help="skip fsync before the atomic rename (faster, not crash-durable)"
    )
    convert.add_argument(
        "--workers",
        metavar="N",
        type=_positive_int,
        help="write the files of a folder destination (shards, DCP) on N threads "
        "(default: the CPUs available, at most 4)",
    )
    _add_storage_options(convert)
    changes = convert.add_argument_group(
        "changes on the way (in this order; a pattern or rule that matches nothing is an error)"
    )
    _add_key_options(changes)
    changes.add_argument(
        "--dtype", metavar="DTYPE", help="cast floating-point tensors: bfloat16, float16, float32, float64 (as torch)"
    )
    changes.add_argument("--dtype-include", metavar="PATH", action="append", help="cast only these paths (globs)")
    changes.add_argument("--dtype-exclude", metavar="PATH", action="append", help="do not cast these paths (globs)")
    changes.add_argument(
        "--ties", metavar="MODE", help="tied tensors: keep (default), materialize (each path its own), drop-aliases"
    )
    changes.add_argument(
        "--drop-objects",
        action="store_true",
        help="drop recorded objects (argparse.Namespace, hyper-parameter classes...): weights and plain values only",
    )
    changes.add_argument(
        "--layout",
        metavar="LAYOUT",
        help="state_dicts as flax or mlx parameter trees (or a JSON rules file), recorded in DST; "
        "'torch' undoes a recorded layout (runs first)",
    )
    changes.add_argument("--dry-run", action="store_true", help="print what would be written; write nothing")
    changes.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")


def _add_inspect(commands: Subcommands) -> None:
    inspect = commands.add_parser("inspect", help="list keys, dtypes and shapes, then the other values")
    inspect.add_argument("file")
    inspect.add_argument("--from", dest="format", metavar="FMT")
    inspect.add_argument("--json", action="store_true", help="print the manifest instead")
    inspect.add_argument(
        "--patterns", action="store_true", help="tensor keys that differ only in numbers once: layers.#.w ×32"
    )
    _add_storage_options(inspect)


def _add_schema(commands: Subcommands) -> None:
    schema = commands.add_parser("schema", help="write the manifest (JSON schema of keys, dtypes, shapes)")
    schema.add_argument("file")
    schema.add_argument("--from", dest="format", metavar="FMT")
    schema.add_argument("-o", "--output", help="write here instead of stdout (a path or a URL)")
    _add_storage_options(schema)


def _add_verify(commands: Subcommands) -> None:
    verify = commands.add_parser(
        "verify", help="exit 0 if A and B are bit-identical (and, with --deep, match their stored digests), else 1"
    )
    verify.add_argument("a")
    verify.add_argument("b", nargs="?", help="omit with --deep to check A alone")
    verify.add_argument("--deep", action="store_true", help="also re-hash every tensor against its stored BLAKE3")
    verify.add_argument(
        "--tensors",
        action="store_true",
        help="compare tensors by path only: exit 0 when all are bit-identical, whatever the containers and key order",
    )
    verify.add_argument("--json", action="store_true", help="the report as JSON")
    _add_storage_options(verify)
    loose = verify.add_argument_group("the same weights, not the same bits")
    loose.add_argument(
        "--atol",
        metavar="X",
        help="floating-point tensors pass when every |a-b| <= atol + rtol*|b| (numpy.isclose; NaN and inf must "
        "match; default 0); with a tolerance, two floating dtypes are compared by value, both widened to float64",
    )
    loose.add_argument("--rtol", metavar="Y", help="relative tolerance (see --atol; default 0)")
    loose.add_argument(
        "--cast-aware",
        action="store_true",
        help="where A and B hold a tensor in two floating dtypes, cast A's to B's dtype (as convert --dtype, "
        "torch's tensor.to) and compare that with B's bit for bit",
    )
    _add_key_options(verify.add_argument_group("changes to A (the first checkpoint) before comparing, as in convert"))


def _add_formats(commands: Subcommands) -> None:
    commands.add_parser("formats", help="the registered formats, their suffixes and dtypes")


def _add_demo(commands: Subcommands) -> None:
    demo = commands.add_parser("demo", help="the recipe Net + SGD through every format and back")
    demo.add_argument("--out", type=Path, default=Path("demo-out"), help="folder for the files (default: demo-out)")
    demo.add_argument("--steps", type=int, default=3, help="SGD steps before saving (default: 3)")


SUBCOMMANDS: dict[str, Callable[[Subcommands], None]] = {  # in the order of `sdconvert --help`
    "convert": _add_convert,
    "inspect": _add_inspect,
    "schema": _add_schema,
    "verify": _add_verify,
    "formats": _add_formats,
    "demo": _add_demo,
}


def _add_storage_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--storage-option",
        dest="storage_options",
        metavar="KEY=VALUE",
        action="append",
        help="an fsspec option for URL paths (s3://, https://, hf://...), repeatable: endpoint_url=http://..., "
        "anon=true, profile=NAME; VALUE is read as JSON when it parses (true, 3, {...}), else as text; "
        "PROTOCOL.KEY=VALUE (s3.endpoint_url=...) goes to that protocol's URLs only. "
        "Credentials are better left to the environment or profiles (they are never printed)",
    )


def _storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--storage-option key=value`` pairs as fsspec takes them."""
    from converters.core.storage import SECRET_NAMES

    pairs = getattr(args, "storage_options", None)
    if not pairs:
        return None
    options: dict[str, Any] = {}
    for pair in pairs:
        key, equals, text = pair.partition("=")
        if not equals or not key:  # not echoed: it may be a secret pasted without its key
            raise UsageError("sdconvert: --storage-option takes KEY=VALUE (a value without a key was given)")
        if SECRET_NAMES.search(key):  # a secret is text, whatever it looks like (and stays redacted)
            options[key] = text
            continue
        try:
            options[key] = json.loads(text)
        except ValueError:
            options[key] = text
    return options


def _locations(args: argparse.Namespace) -> None:
    """The command's paths as local ``Path``s or remote locations (URLs, with the storage options)."""
    from converters.core.storage import is_url, location

    options = _storage_options(args)
    named = [name for name in ("src", "dst", "file", "a", "b", "output") if getattr(args, name, None) is not None]
    if options and not any(is_url(getattr(args, name)) for name in named):
        raise UsageError("sdconvert: --storage-option applies to URL paths (s3://, https://...), and none is given")
    for name in named:
        value = getattr(args, name)
        setattr(args, name, location(value, options))


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def run(args: argparse.Namespace, group: Group | None = None) -> int:
    """Run one parsed command; ``group`` is set by ``converters.distributed`` (convert only)."""
    import converters

    _locations(args)
    if args.command == "convert":
        changes = {
            "select": args.select,
            "exclude": args.exclude,
            "strip_prefix": args.strip_prefix,
            "rename": args.rename,
            "dtype": args.dtype,
            "dtype_include": args.dtype_include,
            "dtype_exclude": args.dtype_exclude,
            "ties": args.ties,
            "drop_objects": args.drop_objects,
            "layout": args.layout,
        }
        if args.json and not args.dry_run:
            raise UsageError("sdconvert convert: --json goes with --dry-run")
        if args.dry_run:
            _dry_run(args, changes)
            return EXIT_OK
        if _exists(args.dst) and not args.force:  # a dangling symlink is an existing destination
            raise converters.DestinationError("exists; pass --force to replace it", file=args.dst)
        options = _writer_options(args)
        bar = None if args.quiet or not sys.stderr.isatty() else _ProgressBar(args.dst.name)
        try:
            converters.convert(
                args.src,
                args.dst,
                src_format=args.src_format,
                dst_format=args.dst_format,
                **changes,
                progress=bar,
                fsync=not args.no_fsync,
                check=args.check,
                overwrite=args.force,  # without --force, a destination that appears meanwhile is kept
                workers=args.workers,
                group=group,
                **options,
            )
        finally:
            if bar is not None:
                bar.close()
        if not args.quiet:
            print(f"wrote {shown(args.dst, 1000)}")
    elif args.command == "inspect":
        if args.json:
            print(json.dumps(converters.manifest(args.file, args.format), indent=2))
        else:
            _inspect(args.file, args.format, patterns=args.patterns)
    elif args.command == "schema":
        text = json.dumps(converters.manifest(args.file, args.format), indent=2) + "\n"
        if args.output:
            _write_text(args.output, text)
            print(f"wrote {shown(args.output, 1000)}")
        else:
            sys.stdout.write(text)
    elif args.command == "verify":
        if args.b is None and not args.deep:
            raise UsageError("sdconvert verify: give two files, or --deep to check one against its digests")
        loose = [flag for flag, dest in VERIFY_COMPARISON_FLAGS if getattr(args, dest) not in (None, False)]
        if args.b is None and loose:
            raise UsageError(f"sdconvert verify: {loose[0]} goes with two files to compare")
        if args.b is not None:
            return _verify_two(args)
        problems = converters.verify(args.a, args.b, deep=args.deep)
        subject = shown(args.a, 1000)
        if args.json:
            print(json.dumps({"file": str(args.a), "problems": problems}, indent=2))
            return EXIT_DIFFERENT if problems else EXIT_OK
        if problems:
            print(
                f"{len(problems)} difference(s) in {subject}:"
                if args.b is None
                else f"{len(problems)} difference(s) between {subject}:"
            )
            for line in problems:  # they quote keys from the files: escaped, one line each
                print(f"  {shown(line, 2000)}")
            return EXIT_DIFFERENT
        if args.b is None:
            print(f"intact: every stored digest of {shown(args.a, 1000)} matches its tensor bytes")
        else:
            print(f"bit-identical: {subject}" + (" (stored digests checked)" if args.deep else ""))
    elif args.command == "formats":
        _formats()
    elif args.command == "demo":
        from converters import demo

        return EXIT_OK if demo.run(args.out, steps=args.steps) else EXIT_DIFFERENT
    return EXIT_OK


def _write_text(path: Path, text: str) -> None:
    """``schema -o``: a local file replaced atomically, or an object uploaded whole."""
    from converters.core.atomic import atomic_output
    from converters.core.storage import RemotePath

    if isinstance(path, RemotePath):
        from converters.core.upload import staged

        with staged(path, overwrite=True) as local, atomic_output(local, fsync=False) as out:
            out.write(text.encode())
        return
    with atomic_output(path) as out:
        out.write(text.encode())


def _exists(path: Path) -> bool:
    from converters.core.storage import RemotePath

    return path.exists() if isinstance(path, RemotePath) else os.path.lexists(path)


VERIFY_COMPARISON_FLAGS = (
    ("--atol", "atol"),
    ("--rtol", "rtol"),
    ("--cast-aware", "cast_aware"),
    ("--select", "select"),
    ("--exclude", "exclude"),
    ("--strip-prefix", "strip_prefix"),
    ("--rename", "rename"),
)


def _tolerance(args: argparse.Namespace, name: str) -> float | None:
    """``--atol``/``--rtol`` as a float: None when not given; a non-number or a negative or
    non-finite one is bad usage."""
    text = getattr(args, name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"sdconvert verify: --{name} takes a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"sdconvert verify: --{name} {text}: a tolerance is a finite number >= 0")
    return value


def _verify_two(args: argparse.Namespace) -> int:
    """Two checkpoints: the tensors first (matched by path: bit-identical, within tolerance with the
    largest difference, differing with by how much, missing on either side), then every other
    difference (containers, key order, values). A is transformed first when asked (--select...)."""
    from converters.api import verify_report

    atol, rtol = _tolerance(args, "atol"), _tolerance(args, "rtol")
    found = verify_report(
        args.a,
        args.b,
        deep=args.deep,
        tensors_only=args.tensors,
        atol=atol,
        rtol=rtol,
        cast_aware=args.cast_aware,
        select=args.select,
        exclude=args.exclude,
        strip_prefix=args.strip_prefix,
        rename=args.rename,
    )
    report, others, integrity = found.tensors, found.other, found.integrity
    if args.json:
        print(json.dumps(found.as_json(), indent=2))
        return EXIT_OK if found.same else EXIT_DIFFERENT
    subject = f"{shown(args.a, 1000)} and {shown(args.b, 1000)}"
    if found.bit_identical:
        print(f"bit-identical: {subject}" + (" (stored digests checked)" if args.deep else ""))
    elif found.same and report.bit_identical:  # --tensors: every tensor identical; the rest does not fail
        print(f"tensors bit-identical: {subject} ({len(report.identical)} tensors)")
    elif found.same:
        how = f"within tolerance ({report.tolerance_text()})" if report.within else "bit-identical"
        cast = " after casting the first's tensors to the second's dtypes" if report.cast_from else ""
        print(f"tensors {how}{cast}: {subject} ({len(report.identical) + len(report.within)} tensors)")
    else:
        print(f"{len(found.problems())} difference(s) between {subject}:")
    for line in found.transformed:
        print(f"  applied to the first: {shown(line, 2000)}")
    if found.bit_identical:
        return EXIT_OK
    print(f"  {report.summary()}")
    for path, text, _ in report.within:
        print(f"  {shown(path, 300)}: within tolerance, {text}")
    for path, text in report.differ:
        print(f"  {shown(path, 300)}: {text}")
    for label, paths in (("only in the first", report.only_first), ("only in the second", report.only_second)):
        for path in paths:
            print(f"  {shown(path, 300)}: {label}")
    for line in integrity:
        print(f"  {shown(line, 2000)}")
    if others:
        print("  other differences (containers, key order, values):" if not args.tensors else "  also (not compared):")
        for line in others:
            print(f"    {shown(line, 2000)}")
    return EXIT_OK if found.same else EXIT_DIFFERENT


def _dry_run(args: argparse.Namespace, changes: dict[str, Any]) -> None:
    """What the conversion would write (after every change), checked as far as possible without
    writing: the destination's format, its options and whether it can hold every dtype."""
    import converters
    from converters.api import registry
    from converters.transforms import plan_lines

    options = _writer_options(args)
    fmt = registry.resolve(args.dst, args.dst_format, for_write=True, options=options)
    planned = converters.plan(args.src, src_format=args.src_format, check=args.check, **changes)
    planned["destination"] = {"path": str(args.dst), "format": fmt.name}
    unsupported = sorted({t["dtype"] for t in planned["tensors"] if t["dtype"] not in fmt.dtype_codes})
    if unsupported:
        raise converters.UnsupportedValueError(f"{fmt.name} cannot hold dtype {unsupported[0]}", file=args.dst)
    if args.json:
        print(json.dumps(planned, indent=2))
        return
    print(f"dry run: {shown(args.src, 1000)} -> {shown(args.dst, 1000)} ({fmt.name}); nothing written")
    for line in plan_lines(planned):
        print(line)


def _format_options() -> dict[str, tuple[OptionSpec, list[str]]]:
    """Every write option any format declares, by flag: (its spec, the formats that take it)."""
    from converters.api import registry
    from converters.core.contract import option_specs

    by_flag: dict[str, tuple[OptionSpec, list[str]]] = {}
    for fmt in registry:
        for spec in option_specs(fmt.Options):
            known = by_flag.get(spec.flag)
            if known is not None and (known[0].name, known[0].kind) != (spec.name, spec.kind):
                raise ConverterError(f"formats {known[1][0]} and {fmt.name} declare the flag {spec.flag} differently")
            by_flag.setdefault(spec.flag, (spec, []))[1].append(fmt.name)
    return by_flag


def _add_format_options(convert: argparse.ArgumentParser) -> None:
    from converters.api import registry
    from converters.core.contract import option_specs

    # A flag several formats take may mean something different to each: say what, per format.
    helps: dict[str, dict[str, str]] = {}
    for fmt in registry:
        for item in option_specs(fmt.Options):
            helps.setdefault(item.flag, {})[fmt.name] = item.help
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag, (spec, owners) in _format_options().items():
        title = f"{' / '.join(owners)} output"
        group = groups.setdefault(title, convert.add_argument_group(title))
        dest = f"option:{spec.name}"  # absent unless given (SUPPRESS), so "not given" is clear
        texts = helps[flag]
        text = spec.help if len(set(texts.values())) == 1 else "; ".join(f"{name}: {h}" for name, h in texts.items())
        if spec.kind == "flag":
            group.add_argument(flag, dest=dest, action="store_true", default=argparse.SUPPRESS, help=text)
        elif spec.kind == "list":
            group.add_argument(
                flag, dest=dest, action="append", metavar=spec.metavar, default=argparse.SUPPRESS, help=text
            )
        else:
            group.add_argument(flag, dest=dest, metavar=spec.metavar, default=argparse.SUPPRESS, help=text)


def _writer_options(args: argparse.Namespace) -> dict[str, Any]:
    """The destination format's options from the flags given, parsed by the kind each declares.

    A flag of another format is refused (it would be silently ignored otherwise).
    """
    from converters import models
    from converters.api import registry
    from converters.core.contract import option_specs

    given = {name.removeprefix("option:"): value for name, value in vars(args).items() if name.startswith("option:")}
    if not given:
        return {}
    fmt = registry.resolve(args.dst, args.dst_format, for_write=True, options=given)
    specs = {spec.name: spec for spec in option_specs(fmt.Options)}
    flags = {spec.name: spec.flag for spec, _ in _format_options().values()}
    for name in given:
        if name not in specs:
            raise UsageError(f"sdconvert convert: {flags[name]} is not an option of the {fmt.name} writer")
    options: dict[str, Any] = {}
    for name, value in given.items():
        kind = specs[name].kind
        if kind == "int":
            try:
                options[name] = int(value)
            except ValueError:
                raise UsageError(f"sdconvert convert: {specs[name].flag} takes a number, got {value!r}") from None
        elif kind == "model":
            options[name] = models.resolve_model(value)
        elif kind == "shape":
            options[name] = models.parse_shape(value)
        elif kind == "list":
            options[name] = tuple(value)
        else:
            options[name] = value
    # A shape option describes the input of the format's model option (it is traced by an export).
    model = next((spec for spec in specs.values() if spec.kind == "model"), None)
    shape = next((spec for spec in specs.values() if spec.kind == "shape"), None)
    if model is not None and shape is not None:
        if shape.name in options and model.name not in options:
            raise UsageError(f"sdconvert convert: {shape.flag} goes with {model.flag}")
        if model.name in options and shape.name not in options:
            default = models.default_input_shape(options[model.name])
            if default is None:
                raise UsageError(f"sdconvert convert: {model.flag} needs {shape.flag} (e.g. 1,3,32,32)")
            options[shape.name] = default
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


def _inspect(path: Path, format: str | None, *, patterns: bool = False) -> None:
    import converters
    from converters.api import stored_size
    from converters.core.report import cast_totals, describe, dtype_totals, human_bytes, records

    checkpoint = converters.read(path, format)
    tensors = checkpoint.unique_tensors()
    tied = len(list(checkpoint.tensors())) - len(tensors)
    total = sum(ref.nbytes for _, ref in tensors)
    also = f", {tied} more paths tied to them" if tied else ""
    size = human_bytes(stored_size(path))
    kind = f" ({checkpoint.kind})" if checkpoint.kind else ""
    print(
        f"{shown(path, 1000)}: {checkpoint.format}{kind}, {size}, {len(tensors)} tensors ({human_bytes(total)}){also}"
    )
    for note in checkpoint.notes:
        print(f"note: {shown(note, 400)}")
    for key, value in (checkpoint.file_metadata or {}).items():
        if key == LAYOUT_KEY:  # what a --layout conversion recorded
            from converters.transforms.layout import describe_record

            print(f"layout: {shown(describe_record(value), 400)}")
            continue
        print(f"file metadata {shown(key, 120)}: {shown(value, 300)}")
    for line in describe(checkpoint.tree, patterns=patterns):
        print(line)
    print("totals: " + "; ".join(dtype_totals([ref for _, ref in tensors])) if tensors else "totals: no tensors")
    cast = cast_totals([ref for _, ref in tensors])
    if cast:
        print("cast: " + "; ".join(cast))
    objects = records(checkpoint.tree)
    if objects:  # kept exactly but never imported: say so, and which classes they name
        print(f"records: {len(objects)} objects kept as inert records (class name and state, never imported):")
        for line in objects:
            print("  " + line)


def _formats() -> None:
    from converters.api import registry
    from converters.core.contract import option_specs
    from converters.core.dtypes import DTYPES

    formats = list(registry)
    suffixes = {fmt.name: " ".join(fmt.suffixes) or "(a folder)" for fmt in formats}
    width = max(len("suffixes"), *map(len, suffixes.values()))
    print(f"{'format':<12} {'suffixes':<{width}} description")
    for fmt in formats:
        print(f"{fmt.name:<12} {suffixes[fmt.name]:<{width}} {fmt.description}")
    print()
    print("write options (sdconvert convert ... FLAG; the library takes the name as a keyword):")
    for fmt in formats:
        for spec in option_specs(fmt.Options):
            print(f"  {fmt.name:<12} {spec.flag:<20} {spec.name:<16} {spec.help}")
    print()
    print(f"{'dtype':<16}" + "".join(f"{fmt.name:<12}" for fmt in formats))
    for name in DTYPES:
        print(f"{name:<16}" + "".join(f"{'yes' if name in fmt.dtype_codes else '-':<12}" for fmt in formats))


def _add_key_options(group: argparse._ArgumentGroup) -> None:
    """--select, --exclude, --strip-prefix, --rename: convert's, and verify's for its first checkpoint."""
    group.add_argument(
        "--select",
        metavar="PATH",
        action="append",
        help="keep only these sub-trees (repeatable, globs: model_state_dict/fc*)",
    )
    group.add_argument(
        "--exclude",
        metavar="PATH",
        action="append",
        help="drop sub-trees (repeatable, globs: '**/*.num_batches_tracked')",
    )
    group.add_argument(
        "--strip-prefix",
        metavar="PREFIX",
        action="append",
        help="remove a key prefix from every state_dict (repeatable); 'auto': module. (DDP), _orig_mod. (compile)",
    )
    group.add_argument(
        "--rename",
        metavar="REGEX=REPL",
        action="append",
        help="rename state_dict keys (Python re, repeatable, in order)",
    )


def parse_arguments(arguments: list[str]) -> argparse.Namespace:
    """The parsed command line. The formats' own flags (``--max-shard-size``, ``--model``...) are
    built from every format's declaration, which imports every format and scans installed plugins;
    so they are added only when the command line holds a flag the common parser does not know, or
    asks for help."""
    command = arguments[0] if arguments and arguments[0] in SUBCOMMANDS else None
    converting = not arguments or arguments[0] == "convert"
    if not converting or any(arg in ("-h", "--help") for arg in arguments):
        return build_parser(with_format_options=converting, command=command).parse_args(arguments)
    known, unknown = build_parser(with_format_options=False, command=command).parse_known_args(arguments)
    if not unknown:
        return known
    return build_parser(with_format_options=True, command=command).parse_args(arguments)


def main(argv: Sequence[str] | None = None, *, group: Group | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        with _stopping_signals_unwind():
            return run(parse_arguments(arguments), group)
    except UsageError as exc:
        print(shown(exc, 2000), file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # `sdconvert formats | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (ConverterError, OSError) as exc:  # after BrokenPipeError, an OSError too
        print(f"sdconvert: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        if argv is None:  # the process's own command line: it ends now
            _quiet_teardown()
        print("sdconvert: interrupted (SIGINT); temporary files removed", file=sys.stderr)
        return 128 + signal.SIGINT
    except Terminated as exc:
        if argv is None:
            _quiet_teardown()
        print(f"sdconvert: stopped by {signal.Signals(exc.signum).name}; temporary files removed", file=sys.stderr)
        return 128 + exc.signum
    except Exception as exc:
        if os.environ.get("SDCONVERT_DEBUG"):
            raise
        print(
            f"sdconvert: internal error: {type(exc).__name__}: {_one_line(exc)} "
            "(a bug; SDCONVERT_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


@contextmanager
def _stopping_signals_unwind() -> Iterator[None]:
    """While the command runs, SIGTERM and SIGHUP raise :class:`Terminated` in the main thread.

    The first one unwinds the stack (temporary files are removed on the way); further ones are
    ignored until the command is over, so the clean-up itself is not cut short (SIGKILL still
    works). A signal the process was started ignoring (``nohup``) stays ignored. Only the main
    thread can install handlers: elsewhere (``main()`` called from a thread) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.getsignal(number) for number in STOPPING_SIGNALS}

    def stop(signum: int, frame: object) -> None:
        for number in previous:
            if signal.getsignal(number) is stop:
                signal.signal(number, signal.SIG_IGN)
        raise Terminated(signum)

    for number, handler in previous.items():
        if handler != signal.SIG_IGN:
            signal.signal(number, stop)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)


def _quiet_teardown() -> None:
    """After a stop, the one line said it all: a request to a store that was in flight on fsspec's
    event-loop thread when the signal came is abandoned, and the interpreter's teardown would
    print it ("Exception ignored in: <coroutine ...>", "Task was destroyed but it is pending")."""
    if "fsspec" in sys.modules:
        import logging

        logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
        sys.unraisablehook = lambda unraisable: None


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{shown(os.fsdecode(exc.filename), 1000)}: {shown(exc.strerror or exc, 1000)}"
    return shown(" ".join(str(exc).split()), 2000)


if __name__ == "__main__":
    sys.exit(main())
