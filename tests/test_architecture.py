"""The import arrows `lisa_ros -> lisa_core <- training`, and no import cycle among training's modules.

Every .py under lisa_core/, lisa_ros/ and training/ is parsed (not imported), so imports inside
functions count as much as those at the top of a file.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lisa_core", "lisa_ros", "training")
# package -> the packages of this repository it must never import
FORBIDDEN = {"lisa_core": {"lisa_ros", "training"}, "lisa_ros": {"training"}, "training": {"lisa_ros"}}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: str, root: Path = ROOT) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted((root / package).rglob("*.py"))}


def imports(path: Path, known: set[str], root: Path = ROOT) -> set[str]:
    """What `path` imports: `import a.b` gives a.b; `from p import n` gives p.n when that is a module
    in `known`, else p (the name comes from p's own code). Relative imports are resolved."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = node.module
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in known else source)
    return found


def import_graph(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports."""
    known = modules(package, root)
    return {name: (imports(path, set(known), root) & set(known)) - {name} for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph has none (depth-first search)."""
    visiting, done = [], set()

    def visit(node: str) -> list[str]:
        if node in visiting:
            return visiting[visiting.index(node):] + [node]
        if node in done:
            return []
        visiting.append(node)
        for target in sorted(graph.get(node, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        visiting.pop()
        done.add(node)
        return []

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return []


@pytest.mark.parametrize("package", PACKAGES)
def test_package_never_imports_the_packages_it_must_not(package):
    offences = []
    for path in modules(package).values():
        for imported in sorted(imports(path, set())):
            if imported.split(".")[0] in FORBIDDEN[package]:
                offences.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not offences, "\n".join(offences)


def test_training_modules_import_no_cycle():
    graph = import_graph("training")
    assert {"training.export", "training.data.templates"} <= graph["training.train"] | graph["training.data.synthetic"]
    cycle = find_cycle(graph)
    assert not cycle, " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_imports_resolve_relative_names_and_submodules(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    for name in ("__init__.py", "other.py", "sub/__init__.py"):
        (package / name).write_text("")
    (package / "mod.py").write_text(
        "import os.path\nfrom . import other\nfrom .sub import thing\n\ndef f():\n    from pkg import mod\n"
    )
    assert imports(package / "mod.py", {"pkg.other", "pkg.mod"}, tmp_path) == {"os.path", "pkg.other", "pkg.sub", "pkg.mod"}
    assert import_graph("pkg", tmp_path) == {"pkg": set(), "pkg.other": set(), "pkg.sub": set(), "pkg.mod": {"pkg.other", "pkg.sub"}}


MODEL_LIBRARIES = ("torch", "transformers", "segment_anything", "peft")


def test_the_node_starts_without_the_model_libraries():
    """The node loads them on configure: until then it declares and checks its parameters, so a bad one
    is refused at once, and a lifecycle manager sees the node as soon as the process runs."""
    code = ("import sys, lisa_ros.node, lisa_ros.perception_node; "
            f"print(sorted(m for m in {MODEL_LIBRARIES!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", result.stdout
