"""The package's layering (../shared/DESIGN.md): data flows utils -> data -> models ->
parallel -> checkpoints -> training -> inference -> eval -> serve, with the CLIs on top. A
module imports only from its own folder or folders to its left, and there is no import
cycle anywhere. Imports inside functions count too: a deferred import still couples."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "jaxground")
CHAIN = ("utils", "data", "models", "parallel", "checkpoints", "training", "inference", "eval",
         "serve")


def module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-3].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def package_modules() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                out[module_name(os.path.join(root, f))] = os.path.join(root, f)
    return out


def imports_of(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """The jaxground modules `name` imports (`from a import b` counts b when b is a
    module, else a)."""
    is_package = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("jaxground"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not source.startswith("jaxground"):
                continue
            subs = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in modules]
            found.update(subs or [source])
    return found - {name}


def layer(module: str) -> int:
    """Position in CHAIN; the package root, top-level modules and a folder's `__main__`
    (CLIs: `python -m jaxground.serve`) sit above it."""
    parts = module.split(".")
    if parts[-1] == "__main__":
        return len(CHAIN)
    if len(parts) >= 3 or (len(parts) == 2 and parts[1] in CHAIN):
        return CHAIN.index(parts[1])
    return len(CHAIN)


@pytest.fixture(scope="module")
def graph():
    modules = package_modules()
    assert len(modules) > 40, sorted(modules)
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def test_every_package_folder_has_a_place_in_the_chain():
    folders = {d for d in os.listdir(PACKAGE)
               if os.path.isdir(os.path.join(PACKAGE, d)) and not d.startswith("__")}
    assert folders <= set(CHAIN), folders - set(CHAIN)


def test_no_module_imports_from_a_folder_to_its_right(graph):
    wrong = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                   if layer(d) > layer(m))
    assert not wrong, "\n".join(wrong)


CLIS = ("jaxground.train", "jaxground.evaluate", "jaxground.demo", "jaxground.chat",
        "jaxground.serve.__main__")


def test_nothing_imports_a_cli(graph):
    """CLIs are flags -> config -> library calls: what another module needs from one lives in
    the library (the demo trains through jaxground.training, evaluates through
    jaxground.eval.runner)."""
    wrong = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if d in CLIS)
    assert not wrong, "\n".join(wrong)
    assert all(c in graph for c in CLIS)


def test_evaluation_never_imports_training(graph):
    """Evaluating a converted checkpoint needs no training code (DESIGN.md)."""
    wrong = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                   if m.split(".")[:2] == ["jaxground", "eval"]
                   and d.split(".")[:2] == ["jaxground", "training"])
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles(graph):
    # Tarjan's strongly connected components over module -> imported module.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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
            # A package importing its own submodules (its __init__ re-exporting them) is
            # not a cycle unless a submodule imports the package back.
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_checker_sees_a_planted_violation(tmp_path):
    """The walker itself: a reversed import and a two-module cycle are found."""
    modules = {"jaxground.models.a": "", "jaxground.training.b": "", "jaxground.models.c": ""}
    src = {"jaxground.models.a": "from jaxground.training import b\n",
           "jaxground.training.b": "import jaxground.models.a\n",
           "jaxground.models.c": "from . import a\n"}
    g = {}
    for m, text in src.items():
        p = tmp_path / (m + ".py")
        p.write_text(text)
        g[m] = imports_of(m, str(p), modules)
    assert g == {"jaxground.models.a": {"jaxground.training.b"},
                 "jaxground.training.b": {"jaxground.models.a"},
                 "jaxground.models.c": {"jaxground.models.a"}}
    assert layer("jaxground.training.b") > layer("jaxground.models.a")
