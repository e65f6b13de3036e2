"""The layering the README's "Architecture" section promises, checked by reading the source.

Every .py file under converters/ is parsed (nothing is imported, so a module cannot hide an import
behind a condition the test happens not to take) and every import statement is resolved to an
absolute module name: module level and inside functions, relative or absolute, and
``from X import name`` counts as importing ``X.name`` when that is a submodule. Calls of
``import_module``/``__import__`` with a constant string count too. The rules are the tables below;
failures name the file, the line and the statement.

Subprocess tests then check what the layering is for: importing the API imports no format,
``sdconvert inspect x.safetensors`` imports the safetensors format and nothing else (no
transformation, no comparison, none of the heavy modules start-up once paid for: bench/startup.py),
and converting a small file imports no other format.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import converters

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "converters"

# ---------------------------------------------------------------------------------------------
# The rules, as data.
#
# Each row: (the modules it covers, the converters modules they may import). Patterns:
#   "converters.core"   that module and every module under it
#   "=converters.api"   that module alone (for a package: its __init__, not its submodules)
#   "{own}"             the importing module's own format (converters.formats.<name> and below)
#   "*"                 any converters module
#   "!converters.cli"   never this one (checked before "*")
# A module takes the first row that covers it; a module no row covers fails the test, so a new
# layer must be placed in this table before it can exist.
# Imports outside the package (stdlib, numpy, blake3, ...) are not restricted here, except torch.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("converters.core", ("converters.core",)),
    ("converters.codecs", ("converters.core", "converters.codecs")),
    (
        "converters.formats",
        ("converters.core", "converters.codecs", "{own}", "=converters.formats", "=converters.torch_bridge"),
    ),
    ("converters.transforms", ("converters.core", "converters.transforms")),
    (
        "=converters.api",
        ("converters.core", "converters.transforms", "=converters.formats", "=converters.torch_bridge"),
    ),
    ("=converters.torch_bridge", ("converters.core",)),
    ("=converters.models", ("converters.core", "=converters.recipe")),
    ("=converters.recipe", ("converters.core", "=converters.api")),
    ("=converters.demo", ("!converters.cli", "*")),
    ("=converters.cli", ("*",)),
    # torchrun's entry point: the CLI on each rank, with torch.distributed carrying the messages.
    ("=converters.distributed", ("=converters.cli", "converters.core")),
    # The package facade re-exports the public names lazily (a module __getattr__); it is below
    # nothing, so it may name any layer, but it must stay importable without the CLI.
    ("=converters", ("!converters.cli", "*")),
]

# The only modules that may import torch, at module level or inside functions: everything else
# reaches torch through torch_bridge (the ONNX graph export and DCP writing included).
TORCH_IMPORTERS = {"converters.torch_bridge", "converters.recipe", "converters.demo", "converters.distributed"}

# Files that must not branch on a built-in format: no non-docstring string constant may be exactly
# a built-in format's name.
NO_FORMAT_NAMES_IN = ("converters/api.py", "converters/cli.py", "converters/core/*.py")
BUILTIN_FORMAT_NAMES = ("pt", "safetensors", "msgpack", "onnx", "dcp", "gguf", "npz")

# What `import converters.api` and `sdconvert inspect x.safetensors` must not drag in.
OTHER_FORMAT_MODULES = tuple(f"converters.formats.{name}" for name in ("pt", "msgpack", "onnx", "dcp", "gguf", "npz"))


# ---------------------------------------------------------------------------------------------
# The checker.


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository, for messages
    line: int
    importer: str  # the importing module
    target: str  # the absolute module imported
    statement: str  # the source text, for messages
    lazy: bool  # inside a function: runs on call, not on import
    type_only: bool  # under `if TYPE_CHECKING:`: never runs

    def where(self) -> str:
        return f"{self.file}:{self.line}: {self.importer} imports {self.target} ({self.statement!r})"


def module_name(relpath: str) -> tuple[str, bool]:
    """('converters.formats.safetensors', True) for converters/formats/safetensors/__init__.py."""
    parts = list(Path(relpath).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def package_sources() -> dict[str, str]:
    """Every .py file under converters/, by its path relative to the repository."""
    return {str(p.relative_to(ROOT)): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def known_modules(relpaths: list[str]) -> set[str]:
    return {module_name(relpath)[0] for relpath in relpaths}


def imports_of(relpath: str, source: str, known: set[str]) -> list[Import]:
    importer, is_package = module_name(relpath)
    package = importer if is_package else importer.rpartition(".")[0]
    found: list[Import] = []

    def add(node: ast.stmt | ast.expr, target: str, lazy: bool, type_only: bool) -> None:
        text = " ".join((ast.get_source_segment(source, node) or ast.unparse(node)).split())
        found.append(Import(relpath, node.lineno, importer, target, text, lazy, type_only))

    def visit(node: ast.AST, lazy: bool, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name, lazy, type_only)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(node, submodule if submodule in known else base, lazy, type_only)
        elif isinstance(node, ast.Call) and (dynamic := _dynamic_import(node)) is not None:
            add(node, dynamic, lazy, type_only)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            lazy = True
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, lazy, True)
            for child in node.orelse:
                visit(child, lazy, type_only)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, lazy, type_only)

    visit(ast.parse(source, relpath), False, False)
    return found


def _dynamic_import(call: ast.Call) -> str | None:
    """The module of `import_module("x")`, `importlib.import_module("x")` or `__import__("x")`."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name in ("import_module", "__import__") and call.args:
        first = call.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _covers(pattern: str, module: str) -> bool:
    if pattern.startswith("="):
        return module == pattern[1:]
    return module == pattern or module.startswith(pattern + ".")


def _own_format(module: str) -> str | None:
    parts = module.split(".")
    return ".".join(parts[:3]) if parts[:2] == ["converters", "formats"] and len(parts) >= 3 else None


def rule_for(module: str) -> tuple[str, tuple[str, ...]] | None:
    return next((row for row in LAYERS if _covers(row[0], module)), None)


def layer_violations(imports: list[Import]) -> list[str]:
    problems = []
    for item in imports:
        if not _covers("converters", item.target) or item.target == item.importer:
            continue
        row = rule_for(item.importer)
        if row is None:
            problems.append(f"{item.file}: no row of LAYERS covers {item.importer}; place it in the table")
            continue
        allowed = [p.replace("{own}", _own_format(item.importer) or "=<no own format>") for p in row[1]]
        if any(p.startswith("!") and _covers(p[1:], item.target) for p in allowed):
            problems.append(f"{item.where()}: forbidden by the rule for {row[0]!r}")
        elif "*" in allowed or any(_covers(p, item.target) for p in allowed if not p.startswith("!")):
            continue
        elif _own_format(item.importer) and _own_format(item.target):
            problems.append(f"{item.where()}: a format may not import a sibling format")
        else:
            problems.append(f"{item.where()}: {row[0]!r} may import only {', '.join(row[1])}")
    return problems


def torch_violations(imports: list[Import]) -> list[str]:
    return [
        f"{item.where()}: only {', '.join(sorted(TORCH_IMPORTERS))} may import torch (go through torch_bridge)"
        for item in imports
        if _covers("torch", item.target) and item.importer not in TORCH_IMPORTERS
    ]


def format_name_violations(relpath: str, source: str, names: tuple[str, ...] = BUILTIN_FORMAT_NAMES) -> list[str]:
    if not any(fnmatch.fnmatch(relpath, pattern) for pattern in NO_FORMAT_NAMES_IN):
        return []
    tree = ast.parse(source, relpath)
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [
        f"{relpath}:{node.lineno}: the string {node.value!r} names a built-in format "
        "(api, cli and core look formats up in the registry instead)"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings
    ]


def find_cycle(imports: list[Import], known: set[str]) -> list[Import] | None:
    """A cycle of module-level imports (the edges that run on import), as its import statements."""
    edges: dict[str, list[Import]] = {}
    for item in imports:
        if not item.lazy and not item.type_only and item.target in known and item.target != item.importer:
            edges.setdefault(item.importer, []).append(item)
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after
    stack: list[Import] = []

    def dfs(module: str) -> list[Import] | None:
        state[module] = "open"
        for item in edges.get(module, []):
            if state.get(item.target) == "open":
                start = next(i for i, s in enumerate(stack) if s.importer == item.target) if stack else 0
                return [*stack[start:], item]
            if item.target not in state:
                stack.append(item)
                found = dfs(item.target)
                if found:
                    return found
                stack.pop()
        state[module] = "done"
        return None

    for module in sorted(edges):
        if module not in state:
            cycle = dfs(module)
            if cycle:
                return cycle
    return None


def check_all(sources: dict[str, str]) -> dict[str, list[str]]:
    """Every problem in ``sources`` ({relative path: text}), by rule."""
    known = known_modules(list(sources)) | known_modules(list(package_sources()))
    imports = [item for relpath, text in sources.items() for item in imports_of(relpath, text, known)]
    cycle = find_cycle(imports, known)
    return {
        "layers": layer_violations(imports),
        "torch": torch_violations(imports),
        "format names": [p for relpath, text in sources.items() for p in format_name_violations(relpath, text)],
        "cycle": [" -> ".join(item.where() for item in cycle)] if cycle else [],
    }


@pytest.fixture(scope="module")
def problems() -> dict[str, list[str]]:
    return check_all(package_sources())


# ---------------------------------------------------------------------------------------------
# The package.


def test_the_checker_sees_the_whole_package() -> None:
    # Guards against a checker that passes because it parsed nothing: every layer has files, and
    # the imports we know of are found (a relative, a lazy and a submodule-by-name one).
    sources = package_sources()
    known = known_modules(list(sources))
    imports = {(i.importer, i.target, i.lazy) for r, t in sources.items() for i in imports_of(r, t, known)}
    assert ("converters.api", "converters.core.registry", False) in imports
    assert ("converters.api", "converters.torch_bridge", True) in imports
    assert ("converters.formats.safetensors", "converters.formats.safetensors.sharded", False) in imports
    assert ("converters.cli", "converters.demo", True) in imports
    assert all(rule_for(module) is not None for module in known), sorted(m for m in known if rule_for(m) is None)


def test_every_import_respects_its_layer(problems: dict[str, list[str]]) -> None:
    assert not problems["layers"], "\n".join(problems["layers"])


def test_only_the_edges_import_torch(problems: dict[str, list[str]]) -> None:
    assert not problems["torch"], "\n".join(problems["torch"])


def test_api_cli_and_core_name_no_format(problems: dict[str, list[str]]) -> None:
    from converters.formats import BUILTIN_MODULES

    # The table above must keep up with the built-ins (a sixth format joins the check).
    assert set(BUILTIN_FORMAT_NAMES) == set(BUILTIN_MODULES)
    assert not problems["format names"], "\n".join(problems["format names"])


def test_no_import_cycle_at_module_level(problems: dict[str, list[str]]) -> None:
    assert not problems["cycle"], "import cycle:\n" + "\n".join(problems["cycle"])


# ---------------------------------------------------------------------------------------------
# The checker catches each kind of violation (so the tests above cannot pass vacuously).

SYNTHETIC = [
    # (rule, {file: source}, what the report must contain)
    ("layers", {"converters/formats/x.py": '"""Doc."""\nfrom ..api import read\n'}, "converters/formats/x.py:2"),
    ("layers", {"converters/formats/x.py": "def f():\n    from . import pt\n"}, "sibling format"),
    ("layers", {"converters/codecs/x.py": "from converters.formats import dcp\n"}, "converters.formats.dcp"),
    ("layers", {"converters/core/x.py": "from .. import transforms\n"}, "converters.transforms"),
    ("layers", {"converters/transforms/x.py": "from ..api import read\n"}, "converters.api"),
    ("layers", {"converters/api.py": "from .formats.safetensors import FORMAT\n"}, "converters.formats.safetensors"),
    ("layers", {"converters/demo.py": "def f():\n    from . import cli\n"}, "forbidden"),
    ("layers", {"converters/newlayer.py": "from . import api\n"}, "no row of LAYERS covers converters.newlayer"),
    ("torch", {"converters/formats/x.py": "def f():\n    import torch.distributed\n"}, "x.py:2"),
    ("torch", {"converters/codecs/x.py": "import importlib\nimportlib.import_module('torch')\n"}, "x.py:2"),
    ("format names", {"converters/core/x.py": '"""pt"""\nif name == "pt":\n    pass\n'}, "x.py:2: the string 'pt'"),
    (
        "cycle",
        {"converters/core/aa.py": "from . import bb\n", "converters/core/bb.py": "from .aa import thing\n"},
        "converters/core/aa.py:1: converters.core.aa imports converters.core.bb",
    ),
]


@pytest.mark.parametrize(("rule", "sources", "expected"), SYNTHETIC)
def test_the_checker_catches_a_violation(rule: str, sources: dict[str, str], expected: str) -> None:
    found = check_all(sources)
    assert any(expected in line for line in found[rule]), found


def test_the_checker_allows_what_the_rules_allow() -> None:
    # A lazy import breaks no cycle rule, a format may use its own package and torch_bridge, and a
    # docstring may name a format.
    sources = {
        "converters/core/aa.py": '"""The pt story."""\ndef f():\n    from . import bb\n',
        "converters/core/bb.py": "from .aa import thing\n",
        "converters/formats/x/__init__.py": "from . import y\nfrom ...torch_bridge import to_torch\n",
        "converters/formats/x/y.py": "from .z import helper\nfrom ... import formats\n",
        "converters/formats/x/z.py": "from ...core.tree import Checkpoint\n",
    }
    assert check_all(sources) == {"layers": [], "torch": [], "format names": [], "cycle": []}


# ---------------------------------------------------------------------------------------------
# What the layering is for: start-up imports only what the job needs.


def test_importing_the_api_imports_no_format() -> None:
    code = (
        "import converters, sys; import converters.api; "
        "print(sorted(m for m in sys.modules if m.startswith('converters.formats.')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


# What `inspect` of a small file imported before it was made lazy, costing start-up (measured with
# bench/startup.py and `python -X importtime`), besides every transformation but transforms.base
# (which `read` applies). dataclasses imports `inspect` (and ast, dis...): that one stays while the
# core's records are dataclasses.
NOT_FOR_INSPECT = (
    "converters.core.compare",  # verify's
    "converters.torch_bridge",
    "converters.models",
    "converters.demo",
    "converters.recipe",
    "numpy",
    "torch",
    "tqdm",
    "importlib.resources",  # the layout rules tables
    "importlib.metadata",  # the plugin scan: a known suffix needs none
    "secrets",
    "hashlib",
    "tempfile",  # and random: writing only
    "random",
    "ctypes",
    "converters.core.transfer",  # the copy machinery, with ISA-L and the writeback thread: writes only
    "converters.core.writing",
    "isal",
)


def _imported_by_cli(*arguments: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run the checkout's cli.py as `python cli.py` would; its result and every module it imported."""
    script = (
        "import json, runpy, sys\n"
        "sys.argv = ['cli.py', *sys.argv[1:]]\n"
        "try:\n    runpy.run_path('cli.py', run_name='__main__')\nexcept SystemExit as exit:\n    code = exit.code\n"
        "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *arguments], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    return result, set(json.loads(result.stderr.strip().splitlines()[-1]))


def _not_for_inspect(module: str) -> bool:
    if _covers("converters.transforms", module):
        return module not in ("converters.transforms", "converters.transforms.base")
    return any(_covers(pattern, module) for pattern in NOT_FOR_INSPECT)


@pytest.fixture(scope="module")
def small_safetensors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("small") / "small.safetensors"
    converters.save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "step": torch.tensor(3)}, path)
    return path


def test_inspecting_a_safetensors_file_imports_only_its_format(small_safetensors: Path) -> None:
    result, modules = _imported_by_cli("inspect", str(small_safetensors))
    assert "w  " in result.stdout and "float32" in result.stdout, result.stdout + result.stderr
    assert "converters.formats.safetensors" in modules  # the one it needed (not a vacuous pass)
    unwanted = sorted(
        m
        for m in modules
        if m in ("numpy", "torch")
        or m in OTHER_FORMAT_MODULES
        or any(m.startswith(f"{other}.") for other in OTHER_FORMAT_MODULES)
        or _covers("converters.codecs", m)
    )
    assert unwanted == [], f"`sdconvert inspect x.safetensors` imported {unwanted}"


def test_inspecting_imports_no_transformation_comparison_or_heavy_module(small_safetensors: Path) -> None:
    result, modules = _imported_by_cli("inspect", str(small_safetensors))
    assert result.returncode == 0, result.stdout + result.stderr
    assert {"converters.core.report", "converters.transforms.base"} <= modules  # not a vacuous pass
    unwanted = sorted(m for m in modules if _not_for_inspect(m))
    assert unwanted == [], f"`sdconvert inspect x.safetensors` imported {unwanted} (see bench/startup.py)"


def test_converting_a_small_file_imports_no_comparison_or_other_format(small_safetensors: Path) -> None:
    out = small_safetensors.with_name("out.safetensors")
    result, modules = _imported_by_cli("convert", str(small_safetensors), str(out), "--force")
    assert result.returncode == 0, result.stdout + result.stderr
    unwanted = sorted(
        m
        for m in modules
        if m in ("converters.core.compare", "numpy", "torch", "importlib.metadata", "secrets", "hashlib")
        or any(_covers(other, m) for other in OTHER_FORMAT_MODULES)
        or _covers("converters.codecs", m)
    )
    assert unwanted == [], f"`sdconvert convert small.safetensors out.safetensors` imported {unwanted}"


def test_inspect_knows_the_layout_key_without_importing_the_layout_code() -> None:
    from converters import cli
    from converters.transforms import layout

    assert cli.LAYOUT_KEY == layout.LAYOUT_KEY
