"""Packages import one way: the order written in docs/architecture.md, checked on every import statement of
the installed package (those inside functions and `if TYPE_CHECKING:` blocks too)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "mindspeed_mm"


def declared_layers(text: str) -> list[list[str]]:
    """The ```layers block of the architecture doc: one line per layer, highest first."""
    m = re.search(r"```layers\n(.*?)```", text, re.S)
    assert m, "docs/architecture.md has no ```layers block"
    return [line.split("#")[0].split() for line in m.group(1).splitlines() if line.split("#")[0].strip()]


def unit_of(module: str) -> str:
    """`mindspeed_mm.models.internvl.model` -> `models`; `mindspeed_mm.device` -> `device`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports_of(source: str, module: str) -> list[tuple[int, str]]:
    """(line, imported module) of every mindspeed_mm import in `source`, relative ones resolved."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[:-node.level] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] if base in ("mindspeed_mm",) else [base]
            out += [(node.lineno, n) for n in names]
    return [(line, n) for line, n in out if n.split(".")[0] == "mindspeed_mm" and n != "mindspeed_mm"]


def violations(layers: list[list[str]], files: dict[str, str]) -> list[str]:
    """Imports from a unit to one on its own line (a sibling) or above; `files`: module name -> source."""
    rank = {u: i for i, line in enumerate(layers) for u in line}
    bad = []
    for module, source in sorted(files.items()):
        src = unit_of(module)
        assert src in rank, f"{module}: package {src!r} is not in the layers of docs/architecture.md"
        for line, target in imports_of(source, module):
            dst = unit_of(target)
            assert dst in rank, f"{module}:{line} imports {target}, whose package is not in the layers"
            if dst != src and rank[dst] <= rank[src]:
                bad.append(f"{module}:{line} imports {target} ({src} may only import packages below it)")
    return bad


def _package_sources() -> dict[str, str]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        if name != "mindspeed_mm":  # the empty top-level __init__
            out[name] = path.read_text(encoding="utf-8")
    return out


def test_packages_import_only_downwards():
    layers = declared_layers((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))
    assert violations(layers, _package_sources()) == []


def test_every_package_has_a_layer():
    layers = {u for line in declared_layers((ROOT / "docs" / "architecture.md").read_text()) for u in line}
    present = {unit_of(m) for m in _package_sources()}
    assert present <= layers, sorted(present - layers)


def test_the_check_finds_upward_sideways_and_hidden_imports():
    layers = [["training", "inference"], ["models", "data"], ["config"]]
    files = {
        "mindspeed_mm.config.a": "from mindspeed_mm.models.x import y\n",  # upwards
        "mindspeed_mm.models.b": "def f():\n    from mindspeed_mm.data import z\n",  # sideways, in a function
        "mindspeed_mm.inference.c": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                     "    from mindspeed_mm.training.t import u\n"),  # sideways, type-only
        "mindspeed_mm.training.d": "from ..models import m\nimport mindspeed_mm.config.q\n",  # allowed
        "mindspeed_mm.data.e": "from . import f\n",  # within its package
    }
    found = violations(layers, files)
    assert [v.split(":")[0] for v in found] == ["mindspeed_mm.config.a", "mindspeed_mm.inference.c",
                                                "mindspeed_mm.models.b"], found
