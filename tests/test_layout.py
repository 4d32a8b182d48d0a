"""The library's layout, checked on the source text (AST only: no JAX import, about a second).

(a) no module imports a private name (`_x`) of another module; tests, experiments and
    notebooks import no private name of difflax or of another test;
(b) the layering models < schedules < samplers < methods < training < workdir < cli: no
    module imports from a higher layer (imports inside functions count too);
(c) no import cycle between difflax's modules;
(d) no file under difflax/ longer than MAX_LINES.
"""
from __future__ import annotations

import ast
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "difflax"
MAX_LINES = 400

# Every top-level module or package of difflax and its layer; a module may import only from
# its own layer or lower ones. A new top-level module must be added here.
LAYERS = {
    # 0: networks and the plumbing below everything (arrays in, arrays out; no sampling)
    "models": 0, "data": 0, "mesh": 0, "chunks": 0, "images": 0, "timing": 0,
    # 1: noise schedules and parameterisations
    "schedules": 1, "parameterization": 1,
    # 2: the samplers and their one factory
    "samplers": 2,
    # 3: methods: one module per paper, metrics, the SD pipeline, SiT's interpolants
    "accel": 3, "rfpp": 3, "interpolants": 3, "metrics": 3, "latents": 3,
    "pipelines": 3,
    # 4: training (losses, state, loop), and GMem (its batches for the loop)
    "training": 4, "gmem": 4,
    # 5: run directories, configs and the shipped testbeds built from them
    "workdir": 5, "configs": 5, "testbeds": 5, "latent_runs": 5,
    # 6: the command line; 7: the package's flat public API
    "cli": 6, "__init__": 7,
}
LAYER_NAMES = ("models", "schedules", "samplers", "methods", "training", "workdir", "cli",
               "difflax/__init__")

# Known violations, each to be removed by the change named beside it.
KNOWN_UPWARD: set = set()
LONG_FILES = {
    "difflax/schedules.py",  # 433 lines: one schedule family per module is the way out
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = source_modules()


def imports(tree: ast.AST, importer: str):
    """(line, module, name or None) for every difflax import in `tree`, functions included.

    `from difflax.a import b` names module difflax.a.b if that is a module, else name b of
    difflax.a; relative imports are resolved against `importer`.
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("difflax"):
                    yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = importer.split(".")[:-node.level] if importer else []
                base = ".".join(package + ([base] if base else []))
            if not base.startswith("difflax"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:
                    yield node.lineno, sub, None
                else:
                    yield node.lineno, base, alias.name


def layer_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    assert top in LAYERS, (f"{module}: top-level module {top!r} has no layer; add it to "
                           "tests/test_layout.py's LAYERS")
    return LAYERS[top]


def parsed():
    for name, path in MODULES.items():
        yield name, path, ast.parse(path.read_text(), str(path))


def private_attribute_uses(tree: ast.AST):
    """(line, module, attribute) for `alias._x` where alias names an imported difflax module."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("difflax") and a.asname:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("difflax"):
            for a in node.names:
                if f"{node.module}.{a.name}" in MODULES:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and is_private(node.attr)):
            yield node.lineno, aliases[node.value.id], node.attr


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_every_module_has_a_layer():
    for name in MODULES:
        layer_of(name)


def test_no_private_imports_across_modules():
    bad = []
    for name, path, tree in parsed():
        for line, module, imported in imports(tree, name):
            if imported and is_private(imported) and module != name:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {imported} from {module}")
        for line, module, attr in private_attribute_uses(tree):
            if module != name:
                bad.append(f"{path.relative_to(ROOT)}:{line} uses {module}.{attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def script_sources():
    """(label, source) of the tests, experiments and notebooks (code cells, magics dropped)."""
    for path in sorted([*(ROOT / "tests").glob("*.py"), *(ROOT / "experiments").glob("*.py")]):
        yield str(path.relative_to(ROOT)), path.read_text()
    for path in sorted((ROOT / "experiments" / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        lines = [ln for cell in code for ln in cell.splitlines()
                 if not ln.lstrip().startswith(("%", "!"))]
        yield str(path.relative_to(ROOT)), "\n".join(lines)


def test_scripts_import_no_private_names():
    test_modules = {p.stem for p in (ROOT / "tests").glob("*.py")}
    bad = []
    for label, source in script_sources():
        tree = ast.parse(source, label)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            top = node.module.split(".")[0]
            own = node.module.split(".")[-1] in test_modules or top == "tests"
            if top == "difflax" or own:
                bad += [f"{label}:{node.lineno} imports {a.name} from {node.module}"
                        for a in node.names if is_private(a.name)]
        bad += [f"{label}:{line} uses {module}.{attr}"
                for line, module, attr in private_attribute_uses(tree)]
    assert not bad, "private names imported by tests / experiments:\n" + "\n".join(bad)


def test_no_upward_imports():
    bad = []
    for name, path, tree in parsed():
        for line, module, _ in imports(tree, name):
            if (name, module) in KNOWN_UPWARD:
                continue
            if layer_of(module) > layer_of(name):
                bad.append(f"{path.relative_to(ROOT)}:{line} ({LAYER_NAMES[layer_of(name)]}) "
                           f"imports {module} ({LAYER_NAMES[layer_of(module)]})")
    assert not bad, ("imports upward in the layering "
                     f"{' < '.join(LAYER_NAMES)}:\n" + "\n".join(bad))


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, _, tree in parsed():
        graph[name] = {m for _, m, _ in imports(tree, name)
                       if m in MODULES and m != name and (name, m) not in KNOWN_UPWARD}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes (first = last), or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_files_are_short():
    long = {}
    for path in MODULES.values():
        rel = str(path.relative_to(ROOT))
        n = len(path.read_text().splitlines())
        if n > MAX_LINES and rel not in LONG_FILES:
            long[rel] = n
    assert not long, f"files over {MAX_LINES} lines: {long}"
