"""Readers sit above writers: reading a bank or parsing the command line never imports the trainer, the bank
builder or the engines."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module,absent", [
    ("loramix.bank", ["loramix.build", "loramix.engine", "loramix.train"]),
    ("loramix.cli", ["loramix.build", "loramix.train"]),
])
def test_readers_do_not_import_writers(module, absent):
    code = f"import sys, {module}; print([m for m in {absent!r} if m in sys.modules])"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_lazy_names_of_the_package():
    import loramix
    from loramix.index import BankIndex
    from loramix.pipeline import generate

    assert loramix.BankIndex is BankIndex and loramix.generate is generate and callable(loramix.compose)
    with pytest.raises(AttributeError):
        loramix.nothing_of_that_name


def _import_graph() -> dict[str, set[str]]:
    """loramix's modules -> the loramix modules each imports anywhere in its text (at the top, inside functions, under
    TYPE_CHECKING: a layer that imports a higher one lazily is still a cycle of the design)."""
    import ast
    from pathlib import Path

    import loramix

    src = Path(loramix.__file__).parent.parent
    files = {".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (src / "loramix").rglob("*.py")}

    def owner(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets |= {base} | {f"{base}.{a.name}" for a in node.names}
        graph[module] = {t for t in map(owner, targets) if t and t != module}
    return graph


def test_no_import_cycle_in_the_package():
    """The package is layered: no module imports, even lazily, one that imports it back (directly or through others)."""
    graph = _import_graph()
    assert len(graph) > 40 and graph["loramix.pipeline"] >= {"loramix.check", "loramix.runtime.pytorch"}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module):] + [module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_only_the_runtime_loads_a_base_model():
    """transformers' model classes (from_pretrained of a model) appear only in runtime/ and for the sentence encoder
    (encoder.py, which loads all-MiniLM, not a base)."""
    import re
    from pathlib import Path

    import loramix

    root = Path(loramix.__file__).parent
    loaders = re.compile(r"\b(AutoModel\w*|PeftModel|\w+ForCausalLM)\.from_pretrained\(")
    found = sorted(str(p.relative_to(root)) for p in root.rglob("*.py") if loaders.search(p.read_text(encoding="utf-8")))
    assert found and all(f.startswith("runtime/") or f == "encoder.py" for f in found), found
