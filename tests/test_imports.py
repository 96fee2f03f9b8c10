"""The dependency rule between the packages (stated in `projectors/__init__.py`), read from the
source with `ast`: every import counts, the ones inside functions and `TYPE_CHECKING` blocks too
(a lazy import is still a dependency)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vlm_encoder", "projectors")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _own(name: str) -> str | None:
    """The longest module of ours that `name` is or lies in (`None`: another distribution's)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """Our modules that `module` imports anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level else node.module
            # `from package import name` imports the submodule `package.name` when there is one.
            targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names)
    return {own for own in map(_own, targets) if own is not None}


def _top(module: str) -> str:
    return module.partition(".")[0]


def test_the_package_graph_has_no_cycle():
    """`projectors` imports `vlm_encoder`; nothing in `vlm_encoder` imports `projectors`."""
    edges = {(_top(m), _top(t)) for m in MODULES for t in imports_of(m) if _top(m) != _top(t)}
    assert edges <= {("projectors", "vlm_encoder")}, sorted(edges)
    offenders = sorted(m for m in MODULES if _top(m) == "vlm_encoder" and any(_top(t) == "projectors" for t in imports_of(m)))
    assert not offenders, f"these vlm_encoder modules import the top-level projectors: {offenders}"


def test_projectors_build_only_on_base_modules():
    """What `vlm_encoder.projectors` reaches, directly or through other modules, is neither the
    package root (which exports the VLM) nor `vlm_encoder.vlm`, the projectors' one user."""
    start = [m for m in MODULES if m == "vlm_encoder.projectors" or m.startswith("vlm_encoder.projectors.")]
    seen, todo = set(start), list(start)
    while todo:
        for target in imports_of(todo.pop()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    bad = sorted(m for m in seen if m == "vlm_encoder" or m == "vlm_encoder.vlm" or m.startswith("vlm_encoder.vlm."))
    assert not bad, f"vlm_encoder.projectors reaches {bad}"


def test_the_checker_sees_lazy_and_relative_imports():
    """The parser must see what the rules forbid: a function-level relative import in `vlm`."""
    assert "vlm_encoder.projectors" in imports_of("vlm_encoder.vlm.saving")
    assert "vlm_encoder.output" in imports_of("vlm_encoder.projectors.base")
    assert "vlm_encoder.projectors" in imports_of("projectors")


def test_the_core_imports_no_engine():
    """`ray` and `pyspark` are optional extras: importing the package, its extraction API, the
    engine adapters and the CLI (with every command registered) imports neither."""
    import subprocess
    import sys

    code = ("import sys, vlm_encoder, vlm_encoder.extract, vlm_encoder.extract.engines, vlm_encoder.cli; "
            "vlm_encoder.cli.build_parser(); print(sorted(m for m in ('ray', 'pyspark') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert run.stdout.strip() == "[]", run.stdout
