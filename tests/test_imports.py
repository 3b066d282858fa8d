"""The package's import structure, read from the source with ``ast`` (nothing is imported).

- No import cycle between the package's modules. Every import counts, at module level or inside a
  function: an import deferred into a function still ties the two modules together, and deferring
  it to dodge a cycle only hides one. Deferred imports are fine for start-up cost (the CLI's
  commands, the optional libraries), never to break a cycle.
- No module imports another module's underscored names (``from .x import _y``, or ``x._y`` on an
  imported module): a helper two modules need lives, public, where both can see it.
- No module imports the package root (``from . import __version__``): the root imports every stage.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, NamedTuple, Set

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "mergekit_vision"


class Import(NamedTuple):
    module: str     # the importing module
    target: str     # the imported module (a package stands for its __init__)
    names: tuple    # names taken from it (empty for ``import x`` and for submodules)
    line: int
    deferred: bool  # inside a function


class Package:
    """Every module of the package under ``root``, and every import between them."""

    def __init__(self, root: Path):
        self.name = root.name
        self.paths: Dict[str, Path] = {self.module_name(root, p): p for p in sorted(root.rglob("*.py"))}
        self.trees = {m: ast.parse(p.read_text(), filename=str(p)) for m, p in self.paths.items()}
        self.imports = [i for m in self.paths for i in self.imports_of(m)]

    @staticmethod
    def module_name(root: Path, path: Path) -> str:
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    def inside(self, name: str) -> bool:
        return name == self.name or name.startswith(self.name + ".")

    def resolve(self, module: str, level: int, target: str) -> str:
        """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
        if level == 0:
            return target
        base = module.split(".")
        if self.paths[module].name != "__init__.py":
            base = base[:-1]
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([target] if target else []))

    def imports_of(self, module: str) -> List[Import]:
        found: List[Import] = []

        def visit(node, deferred: bool) -> None:
            for child in ast.iter_child_nodes(node):
                inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, ast.ImportFrom):
                    target = self.resolve(module, child.level, child.module or "")
                    if self.inside(target):
                        names = [a.name for a in child.names]
                        subs = [n for n in names if f"{target}.{n}" in self.paths]  # from . import data
                        for n in subs:
                            found.append(Import(module, f"{target}.{n}", (), child.lineno, inner))
                        rest = tuple(n for n in names if n not in subs)
                        if rest:
                            found.append(Import(module, target, rest, child.lineno, inner))
                elif isinstance(child, ast.Import):
                    for a in child.names:
                        if self.inside(a.name):
                            found.append(Import(module, a.name, (), child.lineno, inner))
                visit(child, inner)

        visit(self.trees[module], False)
        return found

    def aliases(self, module: str) -> Dict[str, str]:
        """Local names bound to one of the package's modules (``from . import data as D``: D)."""
        out = {}
        for i in self.imports:
            if i.module == module and not i.names and i.target in self.paths:
                for node in ast.walk(self.trees[module]):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and node.lineno == i.line:
                        for a in node.names:
                            if i.target.endswith("." + a.name) or i.target == a.name:
                                out[a.asname or a.name.split(".")[-1]] = i.target
        return out

    # ---- the checks: each returns what it found wrong, as lines ------------------------------------
    def cycles(self) -> List[str]:
        edges: Dict[str, Set[str]] = {}
        for i in self.imports:
            if i.target in self.paths and i.target != i.module:
                edges.setdefault(i.module, set()).add(i.target)
        lines = []
        for comp in strongly_connected(sorted(self.paths), edges):
            inside = [i for i in self.imports if i.module in comp and i.target in comp and i.target != i.module]
            lines.append(" <-> ".join(comp) + ": " + "; ".join(
                f"{i.module}:{i.line} imports {i.target}{' (in a function)' if i.deferred else ''}" for i in inside))
        return lines

    def private_cross_imports(self) -> List[str]:
        bad = [f"{i.module}:{i.line} imports {n} from {i.target}"
               for i in self.imports for n in i.names if is_private(n)]
        for m in self.paths:
            aliases = self.aliases(m)
            for node in ast.walk(self.trees[m]):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                        and node.value.id in aliases and is_private(node.attr)):
                    bad.append(f"{m}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
        return bad

    def unresolved(self) -> List[str]:
        return [f"{i.module}:{i.line} imports {i.target}, which is no module of the package"
                for i in self.imports if i.target not in self.paths]

    def root_imports(self) -> List[str]:
        return [f"{i.module}:{i.line} imports {', '.join(i.names) or i.target} from the package root"
                for i in self.imports if i.target == self.name and i.module != self.name]


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def strongly_connected(nodes: List[str], edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Tarjan: the components of more than one module, each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in nodes:
        if v not in index:
            connect(v)
    return out


@pytest.fixture(scope="module")
def package() -> Package:
    return Package(PACKAGE_DIR)


def test_the_walk_sees_the_package(package):
    assert {"mergekit_vision", "mergekit_vision.merge", "mergekit_vision.trace.coupling"} <= set(package.paths)
    assert any(i.module == "mergekit_vision.merge" and i.target == "mergekit_vision.spec" for i in package.imports)
    assert any(i.module == "mergekit_vision.cli" and i.deferred for i in package.imports)


def test_every_import_of_the_package_resolves(package):
    found = package.unresolved()
    assert not found, "\n".join(found)


def test_no_import_cycles(package):
    found = package.cycles()
    assert not found, "import cycles:\n" + "\n".join(found)


def test_no_private_cross_imports(package):
    found = package.private_cross_imports()
    assert not found, "underscored names used across modules (make them public where both can see them):\n" + \
        "\n".join(found)


def test_no_module_imports_the_package_root(package):
    found = package.root_imports()
    assert not found, "\n".join(found) + "\n(__version__ lives in mergekit_vision/_version.py)"


def toy_package(tmp_path: Path, files: Dict[str, str]) -> Package:
    root = tmp_path / "pkg"
    root.mkdir()
    (root / "__init__.py").write_text(files.pop("__init__", ""))
    for name, text in files.items():
        (root / f"{name}.py").write_text(text)
    return Package(root)


@pytest.mark.parametrize("source, expected", [
    ("from .b import _helper\n", ["pkg.a:1 imports _helper from pkg.b"]),
    ("from . import b as B\nB._helper()\n", ["pkg.a:2 uses pkg.b._helper"]),
    ("import pkg.b as B\nB._helper()\n", ["pkg.a:2 uses pkg.b._helper"]),
    ("from .b import helper, __version__\n", []),
])
def test_the_private_check_on_a_toy_package(tmp_path, source, expected):
    pkg = toy_package(tmp_path, {"a": source, "b": "def _helper(): pass\ndef helper(): pass\n__version__ = '0'\n"})
    assert pkg.private_cross_imports() == expected


def test_the_cycle_check_on_a_toy_package(tmp_path):
    pkg = toy_package(tmp_path, {
        "a": "from .b import f\n",
        "b": "def f():\n    from .a import g  # deferred: still a cycle\n    return g\n",
        "c": "from . import a\n",
        "__init__": "from . import __version__\n",
    })
    assert pkg.cycles() == ["pkg.a <-> pkg.b: pkg.a:1 imports pkg.b; pkg.b:2 imports pkg.a (in a function)"]
    assert pkg.root_imports() == []  # the root importing from itself is not a stage doing it


def test_the_root_check_on_a_toy_package(tmp_path):
    pkg = toy_package(tmp_path, {"a": "def version():\n    from . import __version__\n    return __version__\n"})
    assert pkg.root_imports() == ["pkg.a:2 imports __version__ from the package root"]


def test_the_resolution_check_on_a_toy_package(tmp_path):
    pkg = toy_package(tmp_path, {"a": "from .errors import E\nfrom . import b\n", "b": ""})
    assert pkg.unresolved() == ["pkg.a:1 imports pkg.errors, which is no module of the package"]
