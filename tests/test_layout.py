"""The source tree's shape (pure, fast): file and function sizes, and imports only downwards.

Rules, each printed with every offender when broken:

* No Python file under `src/` is longer than 400 lines.
* No function or method is longer than 60 lines, argument tables aside: a function's length
  is its lines (from `def` to its last line) minus the lines of its `….add_argument(…)`
  calls, so a command's table of flags does not count, the code around it does.
* No module imports from a higher layer, whether at the top of the file, under
  `TYPE_CHECKING` or lazily inside a function. Layers, low to high (a module may import
  from its own layer and from any lower one):
  `halollm` itself and `errors`; `units`, `paths`; `model/`; `sampling`, `generate`,
  `metrics` (what is done with a model's logits); `groups`; `predictor/`; `scheduler/`; `loader/`;
  `runtime/`; `testbed/`; `eval/`; `bench/`; `serve/`; `cli/`.
  A new top-level module or package must be given its layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
LAYERS = [
    {"", "errors"},
    {"units", "paths"},
    {"model"},
    {"sampling", "generate", "metrics"},
    {"groups"},
    {"predictor"},
    {"scheduler"},
    {"loader"},
    {"runtime"},
    {"testbed"},
    {"eval"},
    {"bench"},
    {"serve"},
    {"cli"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    """The layer name of a `halollm…` module ('' for the package itself); None otherwise."""
    parts = module.split(".")
    if parts[0] != "halollm":
        return None
    return parts[1] if len(parts) > 1 else ""


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import anywhere in the tree (`module`: the
    importing module, for relative imports). `from X import y` counts as importing X, except
    `from halollm import LAYER`, which counts as importing halollm.LAYER."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            if base == "halollm":
                out += [(node.lineno, f"halollm.{alias.name}") for alias in node.names
                        if alias.name in RANK]
                out += [(node.lineno, base) for alias in node.names if alias.name not in RANK]
            else:
                out.append((node.lineno, base))
    return out


def argument_table_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    lines = 0
    for node in ast.walk(fn):
        if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Attribute)
                and node.value.func.attr == "add_argument"):
            lines += node.end_lineno - node.lineno + 1
    return lines


def test_files_are_short():
    long = [f"{p.relative_to(SRC.parent)}: {n} lines" for p in sources()
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    assert not long, f"files over {MAX_FILE_LINES} lines:\n" + "\n".join(long)


def test_functions_are_short():
    long = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1 - argument_table_lines(node)
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC.parent)}:{node.lineno} "
                                f"{node.name}: {n} lines")
    assert not long, (f"functions over {MAX_FUNCTION_LINES} lines (add_argument calls "
                      "aside):\n" + "\n".join(long))


def test_every_module_has_a_layer():
    unknown = [str(p.relative_to(SRC.parent)) for p in sources()
               if layer_of(module_name(p)) not in RANK]
    assert not unknown, "modules without a layer (add them to LAYERS):\n" + "\n".join(unknown)


def test_imports_only_go_down():
    upward = []
    for path in sources():
        module = module_name(path)
        own = RANK.get(layer_of(module), len(LAYERS))
        tree = ast.parse(path.read_text(), str(path))
        for line, target in imported_modules(tree, module, path.name == "__init__.py"):
            layer = layer_of(target)
            if layer is None:
                continue
            if layer not in RANK:
                upward.append(f"{path.relative_to(SRC.parent)}:{line} imports {target}, "
                              "which has no layer")
            elif RANK[layer] > own:
                upward.append(f"{path.relative_to(SRC.parent)}:{line} imports {target} "
                              f"({layer or 'halollm'} is above {layer_of(module) or 'halollm'})")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_checks_see_violations():
    """The import walk finds lazy, relative and `from halollm import layer` imports, and the
    length rule leaves out add_argument calls only."""
    tree = ast.parse("def f():\n    from halollm.cli import demo\n    from . import spec\n"
                     "    import halollm.runtime.worker\n    from halollm import bench\n")
    found = sorted(m for _, m in imported_modules(tree, "halollm.testbed.cluster", False))
    assert found == ["halollm.bench", "halollm.cli", "halollm.runtime.worker",
                     "halollm.testbed"]
    assert RANK[layer_of("halollm.cli")] > RANK[layer_of("halollm.testbed.cluster")]
    assert layer_of("numpy") is None and layer_of("halollm") == ""
    fn = ast.parse("def add(p):\n    p.add_argument('--a',\n        type=int)\n    x = 1\n"
                   ).body[0]
    assert argument_table_lines(fn) == 2  # type: ignore[arg-type]
