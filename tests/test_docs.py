"""Docs as tests (issue 24): every shell and Python block of README.md and docs/*.md runs as written.

The convention (markers, the hub-id substitution table, the user files each block finds) is
README.md, "How the docs are tested"; the mechanics are tests/doc_blocks.py. A block that cannot
run here names the test that covers it, and that test must exist.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from doc_blocks import (
    DOC_FILES,
    REPO,
    SUBSTITUTIONS,
    TEXT_TAGS,
    USER_FILES,
    Block,
    Result,
    all_blocks,
    covering_test_problem,
    make_user_files,
    parse_doc,
    prepare_workdir,
    run_blocks,
    session,
)

BLOCKS = all_blocks()
RUNNABLE = [b for b in BLOCKS if b.kind != "text" and not b.skipped]
SKIPPED = [b for b in BLOCKS if b.skipped]
NAMED = {b.marker["name"]: b for b in BLOCKS if "name" in b.marker}
HUB_IDS = ("black-forest-labs/", "Yuanshi/", "guozinan/")
_sessions: dict[str, Result] = {}


@pytest.fixture(scope="module")
def user_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_user_files(tmp_path_factory.mktemp("doc-user-files"))


def _failure(block: Block, result: Result) -> str:
    return (f"{block.id}: the block starting `{block.first_line}` failed (exit {result.returncode}, "
            f"{result.seconds:.0f} s)\n--- as run (README.md, 'How the docs are tested'):\n{result.code}\n"
            f"--- output, last 4000 characters:\n{result.output[-4000:]}")


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_block_runs(block: Block, user_files: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    name = block.marker.get("name") or block.marker.get("after")
    if name:  # a Python session: run once, every test reads how far it got
        if name not in _sessions:
            folder = prepare_workdir(tmp_path_factory.mktemp("doc") / "work", user_files)
            _sessions[name] = run_blocks(session(NAMED[name], BLOCKS), folder)
            print(f"session {name}: {_sessions[name].seconds:.1f} s, {_sessions[name].cpu_seconds:.1f} s CPU")
        result = _sessions[name]
        assert result.reached_end_of(block), _failure(block, result)
    else:
        result = run_blocks([block], prepare_workdir(tmp_path_factory.mktemp("doc") / "work", user_files))
        print(f"{block.id}: {result.seconds:.1f} s, {result.cpu_seconds:.1f} s CPU")
        assert result.returncode == 0 and result.reached_end_of(block), _failure(block, result)


def test_markers_are_well_formed() -> None:
    problems = [p for path in DOC_FILES for p in parse_doc(path)[1]]
    for b in BLOCKS:
        m = b.marker
        if b.skipped and not (b.covering_tests() and m.get("reason")):
            problems.append(f"{b.id}: a skip marker needs covered-by=tests/<file>.py::<test> and reason=\"...\"")
        if b.skipped and ({"name", "after"} & m.keys()):
            problems.append(f"{b.id}: a skipped block cannot be part of a session (name= / after=)")
        if ({"covered-by", "reason"} & m.keys()) and not b.skipped:
            problems.append(f"{b.id}: covered-by= and reason= only go with skip")
        if ({"name", "after"} & m.keys()) and b.kind != "python":
            problems.append(f"{b.id}: name= and after= are for Python blocks")
        if "after" in m and (m["after"] not in NAMED or NAMED[m["after"]].path != b.path):
            problems.append(f"{b.id}: after={m['after']} names no block of {b.path} (name=...)")
        if "name" in m and "after" in m:
            problems.append(f"{b.id}: a named block starts a session; it cannot come after another")
    names = [b.marker["name"] for b in BLOCKS if "name" in b.marker]
    problems += [f"name={n} is used twice" for n in {n for n in names if names.count(n) > 1}]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("block", SKIPPED, ids=lambda b: b.id)
def test_skip_markers_name_existing_tests(block: Block) -> None:
    problems = [why for ref in block.covering_tests() if (why := covering_test_problem(ref))]
    assert not problems, f"{block.id} (`{block.first_line}`): " + "; ".join(problems)


def test_untagged_blocks_are_text_not_commands() -> None:
    untagged = [b for b in BLOCKS if b.kind == "text" and b.looks_like_a_command()]
    assert not untagged, "tag these blocks ```bash or ```python so they run: " + ", ".join(b.id for b in untagged)
    unknown = [b for b in BLOCKS if b.kind == "text" and b.tag and b.tag not in TEXT_TAGS]
    assert not unknown, "unknown block tags: " + ", ".join(f"{b.id} ({b.tag})" for b in unknown)


def test_every_substitution_is_used_and_no_hub_id_is_left() -> None:
    unused = [doc for doc, _, kind in SUBSTITUTIONS if not any(doc in b.code for b in RUNNABLE if b.kind == kind)]
    assert not unused, f"substitutions no runnable block uses (remove them from the table): {unused}"
    left = [b.id for b in RUNNABLE if any(h in b.runnable_code() for h in HUB_IDS)]
    assert not left, f"blocks that would reach the hub after substitution (skip them or extend the table): {left}"


def test_the_convention_section_states_the_table() -> None:
    """README's table of substitutions is SUBSTITUTIONS, row for row; its list of user files is USER_FILES."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "## How the docs are tested" in readme
    section = readme.split("## How the docs are tested", 1)[1].split("\n## ", 1)[0]
    rows = [re.findall(r"`([^`]+)`", ln)[:2] for ln in section.splitlines() if ln.strip().startswith("| `")]
    assert rows == [[doc, test] for doc, test, _ in SUBSTITUTIONS]
    missing = [name for name in USER_FILES if f"`{name}`" not in section]
    assert not missing, f"README 'How the docs are tested' does not name the user files {missing}"


def _make_targets() -> list[str]:
    found = {m.group(1) for b in BLOCKS if b.kind == "shell" for m in re.finditer(r"^\s*make ([\w-]+)", b.code, re.M)}
    return sorted(found)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_documented_make_targets_exist() -> None:
    """Every `make X` of the docs is a target: `make -n` (prints the recipe, runs nothing) accepts it."""
    targets = _make_targets()
    assert {"demo", "test"} <= set(targets)
    for target in targets:
        done = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"make {target} (documented) is not a working target: {done.stderr}"


def _commands(text: str) -> list[str]:
    """Shell text as one line per command: continuations joined, comments and whitespace normalised."""
    joined = re.sub(r"\\\n", " ", text)
    return [" ".join(ln.split("#", 1)[0].split()) for ln in joined.splitlines() if ln.split("#", 1)[0].strip()]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_runs_the_documented_commands() -> None:
    """`make demo` is the README's generate command (run above) and `musar toy demo` (test_toy_shipped)."""
    done = subprocess.run(["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    recipe = [re.sub(r"^\S*/bin/musar ", "musar ", c) for c in _commands(done.stdout) if "/bin/musar " in c]
    documented = {c for b in BLOCKS if b.kind == "shell" for c in _commands(b.code)}
    assert len(recipe) == 2 and all(c in documented for c in recipe), (recipe, sorted(documented))
    generate = next(b for b in RUNNABLE if _commands(b.code) == [recipe[1]])
    assert generate.path == "README.md"  # ... and it is one of the blocks test_block_runs runs
