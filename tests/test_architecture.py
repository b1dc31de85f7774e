"""Imports inside effdist/ point one way (docs/architecture.md).

Every module is parsed with `ast` and every `import`/`from` statement anywhere in it counts, including
the ones inside functions: a lazy import is still an edge, it only hides the cycle until run time.
Two checks: the module graph has no cycle, and no module imports a higher layer than its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "effdist"

# The layers, lowest first; a module may import its own layer's part and any lower layer, never a higher
# one, nor another part of the same layer (pipeline and epas know nothing of each other; they meet in
# effdist.protocols). Parts are top-level modules or subpackages of effdist.
LAYERS: list[tuple[str, ...]] = [
    ("config", "protocols"),
    ("runtime", "kernels"),
    ("model", "data"),
    ("pipeline", "epas"),
    ("train",),
    ("infer",),
    ("cli", "bench"),
]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def module_name(path: Path, package: Path) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules(package: Path) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The effdist modules `name` imports anywhere in its source (as written: `from effdist.a import b`
    counts effdist.a.b when b is a module, else effdist.a)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, path.name == "__init__.py", node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in modules else base)
    found = set()
    for t in targets:
        if not (t == "effdist" or t.startswith("effdist.")):
            continue
        # Importing a.b.c runs a/__init__ and a/b/__init__ first: those are edges too, except towards the
        # importer's own packages (a package importing its submodules is how packages work).
        parts = t.split(".")
        for i in range(2, len(parts) + 1):
            candidate = ".".join(parts[:i])
            if candidate in modules and candidate != name and not name.startswith(candidate + "."):
                found.add(candidate)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = all_modules(package)
    names = set(modules)
    return {name: imported_modules(name, path, names) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def part_of(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in sorted(graph.items()):
        for dst in sorted(targets):
            a, b = part_of(src), part_of(dst)
            if a == b or not a or not b:
                continue
            if a not in RANK or b not in RANK:
                bad.append(f"{src} -> {dst}: effdist.{a if a not in RANK else b} has no layer in LAYERS")
            elif RANK[b] >= RANK[a]:
                bad.append(f"{src} -> {dst}: {a} (layer {RANK[a]}) imports {b} (layer {RANK[b]})")
    return bad


# ------------------------------------------------------------------------------------------ the checks

def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in effdist/:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_imports_point_down_the_layers():
    bad = layer_violations(import_graph())
    assert not bad, "imports against the layer order (docs/architecture.md):\n" + "\n".join(bad)


def test_config_imports_nothing_from_effdist():
    assert import_graph()["effdist.config"] == set()


# ------------------------------------------------------------------------------------------ the checker

def _graph_of(sources: dict[str, str], tmp_path: Path) -> dict[str, set[str]]:
    root = tmp_path / "effdist"
    for rel, text in sources.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return import_graph(root)


def test_checker_sees_function_level_and_relative_imports(tmp_path):
    graph = _graph_of({
        "__init__.py": "",
        "config.py": "def check():\n    from effdist.pipeline import executor\n",
        "pipeline/__init__.py": "",
        "pipeline/executor.py": "from ..config import Config\n",
    }, tmp_path)
    assert graph["effdist.config"] == {"effdist.pipeline", "effdist.pipeline.executor"}
    assert graph["effdist.pipeline.executor"] == {"effdist.config"}
    assert find_cycles(graph) == [["effdist.config", "effdist.pipeline.executor"]]
    assert layer_violations(graph) == [
        "effdist.config -> effdist.pipeline: config (layer 0) imports pipeline (layer 3)",
        "effdist.config -> effdist.pipeline.executor: config (layer 0) imports pipeline (layer 3)",
    ]


def test_checker_counts_package_inits_and_same_layer_neighbours(tmp_path):
    graph = _graph_of({
        "__init__.py": "",
        "epas/__init__.py": "from effdist.epas.controller import C\n",
        "epas/controller.py": "import effdist.model.shared_qk\n",
        "model/__init__.py": "",
        "model/shared_qk.py": "from effdist.epas.controller import helper\n",
        "pipeline/__init__.py": "",
        "pipeline/executor.py": "from effdist.epas import schedule\n",
    }, tmp_path)
    # model.shared_qk -> epas (its __init__ runs first) -> epas.controller -> model.shared_qk
    assert find_cycles(graph) == [["effdist.epas", "effdist.epas.controller", "effdist.model.shared_qk"]]
    assert "effdist.pipeline.executor -> effdist.epas: pipeline (layer 3) imports epas (layer 3)" in \
        layer_violations(graph)


@pytest.mark.parametrize("part", sorted({p.stem if p.suffix else p.name for p in PACKAGE.iterdir()
                                         if (p.suffix == ".py" or (p / "__init__.py").is_file())
                                         and p.name != "__init__.py"}))
def test_every_part_of_effdist_has_a_layer(part):
    assert part in RANK, f"effdist.{part} is missing from LAYERS in tests/test_architecture.py"


def test_the_trainer_module_imports_no_megatron():
    """megatron-core is imported by the trainer's setup, not by `import effdist.train.trainer`: a Ctrl-C or SIGTERM
    in the seconds of that import is then the trainer's (one line, its teardown), and --dry-run, errors on the
    command line and `effdist plan` answer without it."""
    import subprocess
    import sys

    code = ("import sys, effdist.train.trainer, effdist.train.planner, effdist.train.estimate\n"
            "assert not [m for m in sys.modules if m.startswith('megatron')], "
            "sorted(m for m in sys.modules if m.startswith('megatron'))[:5]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
