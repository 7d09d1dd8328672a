"""The package's import graph: no cycle, and no import that runs from a lower part up to a higher one.

Read from the source with `ast` (nothing is imported): every import counts, at module level, inside a function or
under TYPE_CHECKING, since each is a part the reader of a module has to understand first.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dali_kd"

# The parts, as module names (a name covers its sub-modules).
DATA = ("dali_kd.data",)
MODELS = ("dali_kd.models",)
CACHE = ("dali_kd.teacher_cache",)
LOOP = ("dali_kd.training",)
EVALUATION = ("dali_kd.evaluation",)
RUNS = ("dali_kd.runs",)
# The commands, and the forwarders that keep `python -m dali_kd.<command>` working.
COMMANDS = ("dali_kd.commands",) + tuple(
    f"dali_kd.{name}" for name in ("train", "shard", "export", "fetch", "report", "scan", "tune")
)
CHECKPOINT_FILES = ("dali_kd.runs.checkpoint",)

# Imports that still run upward, each to go when its part moves; an entry no longer needed fails the test too.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _module_names(package: Path) -> dict[str, Path]:
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _imported(name: str, modules: dict[str, Path]) -> str | None:
    """The package module `name` loads: itself, or its nearest enclosing module (`from a.b import f` loads a.b)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(_imported(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import mod` loads pkg.mod; `from mod import name` loads mod.
            found.update(
                _imported(f"{base}.{alias.name}", modules) or _imported(base, modules) for alias in node.names
            )
    found.discard(None)
    found.discard(module)
    return found


@cache
def import_graph(package: Path = PACKAGE) -> dict[str, frozenset[str]]:
    modules = _module_names(package)
    return {name: frozenset(_imports(name, path, modules)) for name, path in modules.items()}


def _within(module: str, part: tuple[str, ...]) -> bool:
    return any(module == name or module.startswith(name + ".") for name in part)


def _path_to(
    graph: dict[str, frozenset[str]], start: str, goal: tuple[str, ...], skip: set
) -> list[str] | None:
    """The first import chain from start into `goal` (breadth first), not through an edge in `skip`."""
    seen, queue = {start}, [[start]]
    while queue:
        chain = queue.pop(0)
        for nxt in sorted(graph[chain[-1]]):
            if (chain[-1], nxt) in skip or nxt in seen:
                continue
            if _within(nxt, goal):
                return [*chain, nxt]
            seen.add(nxt)
            queue.append([*chain, nxt])
    return None


def find_cycles(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """Each strongly connected group of more than one module (Tarjan), as sorted names."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def upward_imports(graph: dict[str, frozenset[str]], skip: set) -> list[str]:
    """Every chain that runs from a part to one it must not need, in words."""
    rules = [
        (DATA, MODELS + CACHE + LOOP + COMMANDS, "data needs models, the cache, the loop or a command"),
        (MODELS, CHECKPOINT_FILES + LOOP, "building a model needs a checkpoint module"),
        (CHECKPOINT_FILES, CACHE + LOOP, "checkpoint files need the cache or the loop"),
        (
            RUNS,
            MODELS + CACHE + LOOP + COMMANDS,
            "the run directory needs models, the cache, the loop or a command",
        ),
        (CACHE, LOOP + COMMANDS, "the teacher cache needs the loop or a command"),
        (EVALUATION, CACHE + LOOP + COMMANDS, "evaluation needs the cache, the loop or a command"),
        (LOOP, COMMANDS, "the loop needs a command"),
    ]
    found = []
    for low, high, what in rules:
        for module in sorted(m for m in graph if _within(m, low)):
            chain = _path_to(graph, module, high, skip)
            if chain:
                found.append(f"{what}: {' -> '.join(chain)}")
    return found


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert "dali_kd.training.trainer" in graph["dali_kd.commands.distill"], "a module-level import"
    # Function-level imports count: the loaders pick their backend inside a function.
    assert "dali_kd.data.dali_loader" in graph["dali_kd.data.loaders"]


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_import_runs_upward():
    graph = import_graph()
    assert upward_imports(graph, KNOWN_UPWARD) == []
    needed = {edge for edge in KNOWN_UPWARD if edge[1] in graph.get(edge[0], ())}
    assert needed == KNOWN_UPWARD, (
        f"no longer imported, drop from KNOWN_UPWARD: {sorted(KNOWN_UPWARD - needed)}"
    )


def test_a_planted_upward_import_is_found():
    graph = dict(import_graph())
    graph["dali_kd.data.batch"] = graph["dali_kd.data.batch"] | {"dali_kd.training.trainer"}
    assert any(
        "dali_kd.data.batch -> dali_kd.training.trainer" in line
        for line in upward_imports(graph, KNOWN_UPWARD)
    )
    assert any("dali_kd.data.batch" in cycle for cycle in find_cycles(graph)), "the trainer imports the batch"


# The parts from the top down, as docs/layout.md draws them: a part imports only parts below it (the top-level
# command names are forwarders, counted with the commands).
LAYERS = (
    "commands", "training", "evaluation", "teacher_cache", "models", "data", "runs", "telemetry", "identity",
    "config", "pipelines", "console", "distributed", "runtime", "cpu_budget", "io", "errors",
)  # fmt: skip
FORWARDERS = ("train", "shard", "export", "fetch", "report", "scan", "tune")


def _layer(module: str) -> str | None:
    name = module.split(".")[1] if "." in module else None
    return "commands" if name in FORWARDERS else name


def imports_against_the_layers(graph: dict[str, frozenset[str]]) -> list[str]:
    found = []
    for module, imported in sorted(graph.items()):
        here = _layer(module)
        for other in sorted(imported):
            there = _layer(other)
            if here in LAYERS and there in LAYERS and LAYERS.index(there) < LAYERS.index(here):
                found.append(f"{module} ({here}) imports {other} ({there}), a part above it")
    return found


def test_every_part_sits_in_a_layer():
    parts = {_layer(m) for m in import_graph()} - {None}
    assert parts <= set(LAYERS), f"parts in no layer: {sorted(parts - set(LAYERS))}"


def test_each_part_imports_only_the_parts_below_it():
    assert imports_against_the_layers(import_graph()) == []


def test_a_planted_import_against_the_layers_is_found():
    graph = dict(import_graph())
    graph["dali_kd.runs.directory"] = graph["dali_kd.runs.directory"] | {"dali_kd.models.distill"}
    assert imports_against_the_layers(graph) == [
        "dali_kd.runs.directory (runs) imports dali_kd.models.distill (models), a part above it"
    ]


# A private name (one leading underscore) belongs to its module: what another module needs is made public.
def private_imports(package: Path = PACKAGE) -> list[str]:
    found = []
    for module, path in _module_names(package).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("dali_kd")
            ):
                private = [
                    a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")
                ]
                found += [f"{module} imports {node.module}.{name}" for name in private]
    return found


def test_no_module_imports_another_modules_private_name():
    assert private_imports() == []


def test_a_planted_private_import_is_found(tmp_path):
    package = tmp_path / "dali_kd"
    package.mkdir()
    (package / "user.py").write_text("from dali_kd.data.dali_loader import _device_id, host_array\n")
    assert private_imports(package) == ["dali_kd.user imports dali_kd.data.dali_loader._device_id"]


# What a reader new to the package can take in: the top level shows the parts, no module or function is too long
# to read in one sitting (a function's docstring not counted: explaining a function never has to be cut to fit), and
# no function takes more parameters than a reader can hold (keyword-only ones count: several parts go as one object).
MAX_TOP_LEVEL_MODULES = 15
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 8


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """The function's lines, its signature included, without its docstring."""
    length = (node.end_lineno or node.lineno) - node.lineno + 1
    first = node.body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        length -= (first.end_lineno or first.lineno) - first.lineno + 1
    return length


def parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """Every parameter a caller gives (positional, keyword-only, *args, **kwargs), `self` and `cls` aside."""
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg) if a]
    return [name for name in names if name not in ("self", "cls")]


def _functions(tree: ast.AST) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Each function with its qualified name (`Class.method`; a nested function under its own name)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            found += [
                (f"{node.name}.{f.name}", f)
                for f in node.body
                if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
            ]
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not any(
            f is node for _, f in found
        ):
            found.append((node.name, node))
    return found


def sizes(package: Path = PACKAGE) -> list[str]:
    """Each module and function over its limit, in words (the DALI graphs included: they ship inside dali_kd)."""
    found = []
    paths = sorted(package.rglob("*.py")) + sorted((package / "pipelines").resolve().glob("*.py"))
    for path in dict.fromkeys(paths):
        text = path.read_text()
        if (lines := len(text.splitlines())) > MAX_MODULE_LINES:
            found.append(f"{path.name}: {lines} lines")
        for node in ast.walk(ast.parse(text, str(path))):
            is_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            if is_function and (length := body_lines(node)) > MAX_FUNCTION_LINES:
                found.append(f"{path.name}:{node.lineno} {node.name}(): {length} lines")
    return found


def wide_functions(package: Path = PACKAGE) -> dict[str, int]:
    """Each function over MAX_PARAMETERS, as "module.py Class.method", and how many it takes."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        for name, node in _functions(ast.parse(path.read_text(), str(path))):
            if (count := len(parameters(node))) > MAX_PARAMETERS:
                found[f"{path.name} {name}"] = count
    return found


def test_the_top_level_shows_the_parts():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, f"{len(modules)} modules at dali_kd/'s top level: {modules}"


def test_no_module_or_function_too_long_to_read():
    assert sizes() == []


def test_no_function_takes_too_many_parameters():
    assert wide_functions() == {}, "pass settings as one object (a frozen dataclass or a config section)"


def test_a_planted_long_function_is_found(tmp_path):
    package = tmp_path / "dali_kd"
    (package / "pipelines").mkdir(parents=True)
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (package / "long.py").write_text(f"def long():\n{body}\n")
    assert sizes(package) == [f"long.py:1 long(): {MAX_FUNCTION_LINES + 1} lines"]


def test_a_docstring_does_not_count_toward_a_functions_length(tmp_path):
    package = tmp_path / "dali_kd"
    (package / "pipelines").mkdir(parents=True)
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 1))
    docstring = '    """Why.\n\n' + "    A line of explanation.\n" * 20 + '    """'
    (package / "explained.py").write_text(f"def explained():\n{docstring}\n{body}\n")
    assert sizes(package) == []
    (package / "explained.py").write_text(f"def explained():\n{docstring}\n{body}\n    x = 0\n")
    assert sizes(package) == [f"explained.py:1 explained(): {MAX_FUNCTION_LINES + 1} lines"]


def test_a_planted_wide_function_is_found(tmp_path):
    package = tmp_path / "dali_kd"
    package.mkdir()
    names = [f"a{i}" for i in range(MAX_PARAMETERS)]
    (package / "wide.py").write_text(
        f"def narrow({', '.join(names)}): pass\n"
        f"class Part:\n    def __init__(self, {names[0]}, *, {', '.join(names[1:])}, more=None): pass\n"
    )
    assert wide_functions(package) == {"wide.py Part.__init__": MAX_PARAMETERS + 1}
