"""The package's layers, as behaviour: every import (function-level ones included) goes down the
layer order of docs/architecture.md or stays in its own layer, no import cycle, no file of 400 lines
or more, the core never imports the miniature world, and the CLI's entry modules stay light enough
to answer ``--help`` at once. The checkers themselves are tested on synthetic graphs and sources."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "musar"

# docs/architecture.md's drawing, bottom row (1) first. A module may import its own layer and any layer
# of a lower row; layers that share a row never import each other. ``utils`` also holds the package
# root (musar/__init__.py) and its single-file modules (musar/errors.py). The miniature world sits
# beside the core: it may import any layer, and no layer imports it.
ROWS: tuple[tuple[str, ...], ...] = (
    ("utils",),
    ("models",),
    ("lora", "data"),
    ("pipelines",),
    ("train", "eval"),
    ("bench", "ui"),
    ("cli",),
    ("toy",),
)
RANK = {layer: row for row, layers in enumerate(ROWS) for layer in layers}
# diffusers has layers of its own: below musar's pipelines/ only its models, schedulers and
# utilities may be used, never its pipelines (that is what musar's pipelines/ wraps).
BELOW_PIPELINES = {layer for layer, row in RANK.items() if row < RANK["pipelines"]}
MAX_LINES = 400

# Known violations, each named, with why it is still there. The test fails once one is gone, so
# the entry is removed with its fix.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}
# Files over MAX_LINES in folders this change could not edit (each to be split, then removed here).
LONG_FILES: dict[str, str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(nodes: Iterable[ast.AST]) -> Iterator[ast.AST]:
    """Every node under ``nodes`` that runs at some point: ``if TYPE_CHECKING:`` bodies are left out
    (their ``else:`` runs), function bodies, methods, ``try`` and conditional blocks are kept."""
    for node in nodes:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _statements(node.orelse)
            continue
        yield node
        yield from _statements(ast.iter_child_nodes(node))


def imported(source: str, name: str, is_package: bool = False) -> list[tuple[str, int]]:
    """(dotted target, line) of every import in ``source``, the source of module ``name``.

    ``from a.b import c`` yields ``a.b`` and ``a.b.c`` (``c`` may be a module or a name in
    ``a.b``); relative imports are resolved against ``name``.
    """
    found: list[tuple[str, int]] = []
    for node in _statements([ast.parse(source)]):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, *([node.module] if node.module else [])])
            found.append((base, node.lineno))
            found += [(f"{base}.{a.name}", node.lineno) for a in node.names if a.name != "*"]
    return found


def lazy_exports(path: Path) -> dict[str, str]:
    """A package's ``_EXPORTS`` (name -> defining module, utils/lazy.py): importing such a name
    imports that module, so the import graph follows it there."""
    for node in ast.parse(path.read_text()).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == "_EXPORTS" and node.value is not None:  # type: ignore[attr-defined]
            return ast.literal_eval(node.value)  # type: ignore[attr-defined]
    return {}


def resolve(target: str, mods: Mapping[str, object], exports: Mapping[str, Mapping[str, str]]) -> str | None:
    """The package module ``target`` loads: itself, a lazily exported name's module, or the module
    that defines the imported name (``musar.a.b.name`` -> ``musar.a.b``)."""
    parent, _, attr = target.rpartition(".")
    if target not in mods and attr in exports.get(parent, {}):
        return exports[parent][attr]
    while target and target not in mods:
        target = target.rpartition(".")[0]
    return target or None


def import_graph() -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """(module -> {package module it imports: line}, module -> {outside module it imports: line})."""
    mods = modules()
    exports = {name: lazy_exports(path) for name, path in mods.items() if path.name == "__init__.py"}
    inside: dict[str, dict[str, int]] = {}
    outside: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        inside[name], outside[name] = {}, {}
        for target, line in imported(path.read_text(), name, path.name == "__init__.py"):
            if target == "musar" or target.startswith("musar."):
                module = resolve(target, mods, exports)
                if module is not None and module != name:
                    inside[name].setdefault(module, line)
            else:
                outside[name].setdefault(target, line)
    return inside, outside


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else "utils"


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``) of ``graph``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def upward_imports(inside: Mapping[str, Mapping[str, int]], outside: Mapping[str, Mapping[str, int]]) -> dict[tuple[str, str], str]:
    """Every import against the layer order: (importer, imported) -> where and why."""
    bad: dict[tuple[str, str], str] = {}
    for name, targets in inside.items():
        for target, line in targets.items():
            a, b = layer(name), layer(target)
            if a != b and RANK[b] >= RANK[a]:
                bad[(name, target)] = f"line {line}: {a}/ (row {RANK[a] + 1}) imports {b}/ (row {RANK[b] + 1})"
    for name, targets in outside.items():
        if layer(name) not in BELOW_PIPELINES:
            continue
        hits = {t for t in targets if t.partition(".")[0] == "diffusers"
                and (t.partition(".")[2].startswith("pipelines") or t.endswith("Pipeline"))}
        for target in hits:
            if not any(target.startswith(h + ".") for h in hits):  # `from m import n` is one import of m
                bad[(name, target)] = f"line {targets[target]}: {layer(name)}/ imports diffusers' pipeline layer"
    return bad


def long_files(paths: Iterable[Path], root: Path, limit: int = MAX_LINES) -> dict[str, int]:
    counts = {p.relative_to(root).as_posix(): len(p.read_text().splitlines()) for p in paths}
    return {name: n for name, n in counts.items() if n >= limit}


def is_toy(name: str) -> bool:
    return layer(name) == "toy"


# -- the package -----------------------------------------------------------------------------------


def test_every_layer_has_a_place_in_the_drawing() -> None:
    assert {layer(name) for name in modules()} <= set(RANK), "add the new folder to ROWS and docs/architecture.md"


def test_no_import_cycle() -> None:
    inside, _ = import_graph()
    cycle = find_cycle(inside)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_every_import_goes_down_the_layers() -> None:
    bad = upward_imports(*import_graph())
    assert {k: v for k, v in bad.items() if k not in KNOWN_UPWARD} == {}
    assert sorted(KNOWN_UPWARD.keys() - bad.keys()) == [], "fixed: remove these from KNOWN_UPWARD"


def test_every_file_is_under_400_lines() -> None:
    long = long_files(PACKAGE.rglob("*.py"), SRC)
    assert {k: v for k, v in long.items() if k not in LONG_FILES} == {}
    assert sorted(LONG_FILES.keys() - long.keys()) == [], "split: remove these from LONG_FILES"


def test_the_core_never_imports_the_toy_world() -> None:
    inside, _ = import_graph()
    offenders = {name: sorted(t for t in targets if is_toy(t)) for name, targets in inside.items() if not is_toy(name)}
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


# -- the checkers, on synthetic input: each must see a real violation --------------------------------


def test_the_walker_sees_function_level_imports_and_skips_type_checking() -> None:
    source = (
        "from __future__ import annotations\n"
        "import typing\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from musar.pipelines import hidden\n"
        "if typing.TYPE_CHECKING:\n    import musar.cli\nelse:\n    import musar.data.batches\n"
        "def f():\n    from musar.train.loop import Trainer\n"
        "class C:\n    def m(self):\n        try:\n            import musar.bench.runner as r\n        except ImportError:\n            pass\n"
        "from . import sibling\n"
        "from ..pipelines.spans import find_subject_spans\n"
    )
    targets = {t for t, _ in imported(source, "musar.models.x")}
    assert {"musar.data.batches", "musar.train.loop", "musar.train.loop.Trainer", "musar.bench.runner",
            "musar.models.sibling", "musar.pipelines.spans.find_subject_spans"} <= targets
    assert not {t for t in targets if t.startswith(("musar.pipelines.hidden", "musar.cli"))}


def test_lazy_exports_are_followed_to_their_module() -> None:
    mods = {"musar.lora": 0, "musar.lora.layer": 0, "musar.models.layout": 0}
    exports = {"musar.lora": {"inject_branch_lora": "musar.lora.layer"}}
    assert resolve("musar.lora.inject_branch_lora", mods, exports) == "musar.lora.layer"
    assert resolve("musar.models.layout.TokenLayout", mods, exports) == "musar.models.layout"
    assert resolve("musar.lora", mods, exports) == "musar.lora"


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import() -> None:
    graph = {"musar.pipelines.a": {"musar.pipelines.b"}, "musar.pipelines.b": {"musar.pipelines.c"},
             "musar.pipelines.c": {"musar.pipelines.a"}, "musar.utils.io": set()}
    assert find_cycle(graph) == ["musar.pipelines.a", "musar.pipelines.b", "musar.pipelines.c", "musar.pipelines.a"]
    assert find_cycle({"musar.pipelines.a": {"musar.utils.io"}, "musar.utils.io": set()}) is None


def test_the_layer_check_refuses_upward_and_sideways_imports() -> None:
    inside = {
        "musar.utils.quiet": {"musar.pipelines.registry": 43},  # upward
        "musar.data.samples": {"musar.lora.io": 3},  # sideways: same row, another layer
        "musar.ui.logic": {"musar.cli.generate": 19},  # upward
        "musar.errors": {"musar.utils.io": 1},  # the root sits with utils/
        "musar.train.objective": {"musar.pipelines.spans": 39, "musar.train.config": 40, "musar.data": 5},  # down
        "musar.toy.cli": {"musar.cli.args": 1},  # the toy world may import anything
    }
    outside = {"musar.models.transformer": {"diffusers.pipelines.flux.pipeline_flux": 28},
               "musar.lora.layer": {"diffusers.FluxPipeline": 2, "diffusers.models": 3},
               "musar.train.objective": {"diffusers.pipelines.flux.pipeline_flux": 33}}
    assert set(upward_imports(inside, outside)) == {
        ("musar.utils.quiet", "musar.pipelines.registry"), ("musar.data.samples", "musar.lora.io"),
        ("musar.ui.logic", "musar.cli.generate"), ("musar.models.transformer", "diffusers.pipelines.flux.pipeline_flux"),
        ("musar.lora.layer", "diffusers.FluxPipeline"),
    }


def test_the_line_check_counts_lines(tmp_path: Path) -> None:
    (tmp_path / "short.py").write_text("x = 1\n" * (MAX_LINES - 1))
    (tmp_path / "long.py").write_text("x = 1\n" * MAX_LINES)
    assert long_files(tmp_path.glob("*.py"), tmp_path) == {"long.py": MAX_LINES}
