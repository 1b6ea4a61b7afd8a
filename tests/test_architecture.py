"""The package's layers, as behaviour: the core never imports the miniature world, module-level
imports form no cycle, and the CLI's entry modules stay light enough to answer ``--help`` at once."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "musar"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, top_level_only: bool) -> set[str]:
    """Modules of this package ``path`` imports (all imports, or only those run at import time)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m == "musar" or m.startswith("musar.")}


def is_toy(name: str) -> bool:
    return name == "musar.toy" or name.startswith("musar.toy.")


def test_the_core_never_imports_the_toy_world() -> None:
    offenders = {
        name: sorted(m for m in imports(path, top_level_only=False) if is_toy(m))
        for name, path in modules().items()
        if not is_toy(name)
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_every_core_module_loads_no_toy_module() -> None:
    core = sorted(n for n in modules() if not is_toy(n) and not n.endswith("__main__"))
    code = (
        "import importlib, sys\n"
        f"for m in {core!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m == 'musar.toy' or m.startswith('musar.toy.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_module_level_imports_have_no_cycle() -> None:
    mods = modules()
    graph = {
        name: {m for m in imports(path, top_level_only=True) if m in mods and m != name} for name, path in mods.items()
    }
    # A package's __init__ importing its own submodules is how packages work, not a cycle to avoid.
    for name in graph:
        graph[name] = {m for m in graph[name] if not (mods[name].name == "__init__.py" and m.startswith(name + "."))}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize(
    "argv", [[c, "--help"] if c else ["--help"] for c in ("", "generate", "train", "eval", "data", "bench", "ui", "toy")]
    + [["train", "--help-config"]],
)
def test_help_imports_no_model_stack(argv: list[str]) -> None:
    """``musar [X] --help`` must not import torch, diffusers, transformers or gradio (timings are in
    bench/cli_help.py; this checks the cause of a slow --help, not a clock)."""
    code = (
        "import sys\n"
        "from musar.cli import main\n"
        f"try:\n    main({argv!r})\n"
        "except SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'gradio', 'datasets') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert err.strip().splitlines()[-1] == "HEAVY []"
