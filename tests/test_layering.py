"""Imports follow the data flow of docs/design.md: no two modules of the package import each other (lazy imports
inside functions included: a cycle hidden in a function is still a cycle). A package's ``__init__`` is left out:
it re-exports its modules, and a module may read a constant (``__version__``) from it."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "loranull_kernels"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(name: str, file: Path, modules: dict[str, Path]) -> set[str]:
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:  # `from . import x` imports the module x when there is one
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def test_no_two_modules_import_each_other():
    modules = _modules()
    graph = {name: _imports(name, file, modules) for name, file in modules.items()}
    packages = {name for name, file in modules.items() if file.name == "__init__.py"}
    mutual = sorted((a, b) for a in graph for b in graph[a]
                    if a < b and a in graph[b] and not {a, b} & packages)
    assert not mutual, f"modules importing each other: {mutual}"


def test_the_checker_sees_lazy_relative_imports(tmp_path):
    """The parser finds an import inside a function (how the calibration modules used to import each other)."""
    file = tmp_path / "m.py"
    file.write_text("def f():\n    from .calibrate import calibrate\n    from .. import nn\n")
    modules = {"loranull_kernels.calibrate": file, "loranull_kernels.nn": file,
               "loranull_kernels.x.m": file}
    assert _imports("loranull_kernels.x.m", file, modules) == {"loranull_kernels.nn"}
    assert _imports("loranull_kernels.m", file, modules) == {"loranull_kernels.calibrate"}
