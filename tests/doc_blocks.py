"""The code blocks of README.md and docs/*.md, their doc-test markers, and how a block is run.

The convention is documented once, in README.md, "How the docs are tested"; tests/test_docs.py
runs every block through :func:`run_blocks`. In short:

* Every fenced block tagged ``bash``, ``sh``, ``shell`` or ``console`` (its ``$ `` lines) runs
  with ``bash -e -o pipefail``; every ``python`` block runs in the venv's Python. An untagged
  block, or one tagged ``text``, is text (a diagram, printed output) and, untagged, must not look
  like a command.
* Each block runs in a fresh temporary folder: a copy of ``examples/``, a link to ``configs/``
  and the user files of :data:`USER_FILES`, with ``PATH`` starting at the venv's ``bin`` (so
  ``musar`` and ``python`` are the project's), ``OMP_NUM_THREADS=1``, ``HOME`` and ``TMPDIR``
  inside that folder and the hub offline. Nothing it writes lands in the repository.
* Hub ids (and FLUX.1-dev's size) become offline stand-ins by exactly one table, :data:`SUBSTITUTIONS`.
* An HTML comment right before a block changes how it runs::

      <!-- doc-test: skip covered-by=tests/test_x.py::test_a,tests/test_y.py::test_b reason="needs 2 GPUs" -->
      <!-- doc-test: name=pipe -->     (a Python block that starts a session)
      <!-- doc-test: after=pipe -->    (a later block of the session: one interpreter, file order)
"""

from __future__ import annotations

import ast
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DOC_FILES = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]

SHELL_TAGS = {"bash", "sh", "shell", "console"}
PYTHON_TAGS = {"python", "py"}
TEXT_TAGS = {"text"}  # printed output or error text, shown as such: never run
# An untagged block whose first word is one of these is a command someone forgot to tag.
COMMAND_WORDS = {"musar", "python", "python3", "make", "accelerate", "pip", "bash", "huggingface-cli",
                 "tensorboard", "git", "cd", "export", "$", ".venv/bin/python", ".venv/bin/musar"}

# The one rule that maps what a real user types to what runs here, offline: (doc text, test text,
# where it applies). Applied in this order, to every block of the matching kind; every entry must
# be used by some block (tests/test_docs.py checks it), so the table cannot rot.
SUBSTITUTIONS: list[tuple[str, str, str]] = [
    ("--model black-forest-labs/FLUX.1-dev", "--preset tiny", "shell"),  # FLUX.1-dev -> the tiny random preset
    ("--source Yuanshi/Subjects200K", "--source examples/data/toy_pairs.parquet", "shell"),  # the committed toy rows
    ('"black-forest-labs/FLUX.1-dev"', '"tiny-flux"', "python"),  # a saved tiny_pipeline() folder
    ('.to("cuda")', '.to("cpu")', "python"),
    ('device_map="cuda"', 'device_map="cpu"', "python"),
    # A user's local Subjects200K copy -> the committed fixture folder (24 toy-world rows).
    ("--source /data/subjects200k/", "--source examples/data/", "shell"),
    # FLUX.1-dev's size and step count -> a size the tiny preset draws in a second.
    ("--steps 28", "--steps 2", "shell"),
    ("--height 1024 --width 1024", "--height 64 --width 64", "shell"),
    ("height=1024, width=1024, num_inference_steps=28", "height=64, width=64, num_inference_steps=2", "python"),
]

# Files a user of the docs is assumed to have, made in each block's folder (see make_user_files).
USER_FILES = {
    "dog.jpg": "examples/dog.jpg",
    "backpack.jpg": "examples/backpack.jpg",
    "my_musar_lora.safetensors": "a MUSAR branch LoRA for the tiny preset (random, non-zero)",
    "my_lora.safetensors": "the same file",
    "musar.safetensors": "the same file",
    "watercolor_flux_lora.safetensors": "a standard FLUX LoRA (peft, diffusers' file layout) for the tiny preset",
    "turbo_flux_lora.safetensors": "another one",
    "flux1-dev-Q8_0.gguf": "the tiny transformer as a GGUF Q8_0 file",
    "tiny-flux/": "tiny_pipeline().save_pretrained(...)",
}

MARKER = re.compile(r"^<!--\s*doc-test:(?P<body>.*?)-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<tag>[\w+-]*)")
MARKER_KEYS = {"skip", "covered-by", "reason", "name", "after"}
BLOCK_TIMEOUT_S = 240


@dataclass
class Block:
    path: str  # relative to the repository
    line: int  # 1-based line of the opening fence
    tag: str
    code: str
    marker: dict[str, str] = field(default_factory=dict)
    marker_line: int | None = None

    @property
    def kind(self) -> str:
        if self.tag in SHELL_TAGS:
            return "shell"
        if self.tag in PYTHON_TAGS:
            return "python"
        return "text"

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def first_line(self) -> str:
        return next((ln.strip() for ln in self.code.splitlines() if ln.strip()), "")

    @property
    def skipped(self) -> bool:
        return "skip" in self.marker

    def covering_tests(self) -> list[str]:
        return [t for t in self.marker.get("covered-by", "").split(",") if t]

    def looks_like_a_command(self) -> bool:
        words = self.first_line.split()  # "musar generate: error: ..." is printed output, not a command
        return bool(words) and words[0] in COMMAND_WORDS and not any(w.endswith(":") for w in words[:2])

    def runnable_code(self) -> str:
        """The code as it runs: console prompts stripped, then :data:`SUBSTITUTIONS` applied."""
        code = self.code
        if self.tag == "console":
            code = "\n".join(ln.strip()[2:] for ln in code.splitlines() if ln.strip().startswith("$ "))
        for doc_text, test_text, kind in SUBSTITUTIONS:
            if kind == self.kind:
                code = code.replace(doc_text, test_text)
        return code


def parse_marker(body: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for token in shlex.split(body):
        key, eq, value = token.partition("=")
        if key not in MARKER_KEYS:
            raise ValueError(f"unknown doc-test marker key {key!r} (known: {', '.join(sorted(MARKER_KEYS))})")
        found[key] = value if eq else ""
    return found


def parse_doc(path: str) -> tuple[list[Block], list[str]]:
    """Every fenced block of one file, with its marker; and the problems found (orphan markers)."""
    lines = (REPO / path).read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    pending: tuple[int, dict[str, str]] | None = None
    i = 0
    while i < len(lines):
        text = lines[i]
        marker = MARKER.match(text.strip())
        fence = FENCE.match(text)
        if marker:
            if pending:
                problems.append(f"{path}:{pending[0]}: doc-test marker is not followed by a code block")
            try:
                pending = (i + 1, parse_marker(marker.group("body")))
            except ValueError as e:
                problems.append(f"{path}:{i + 1}: {e}")
                pending = None
        elif fence:
            close, indent = fence.group("fence"), len(fence.group("indent"))
            body: list[str] = []
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(close):
                body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
                j += 1
            block = Block(path, i + 1, fence.group("tag").lower(), "\n".join(body) + "\n")
            if pending:
                block.marker_line, block.marker = pending
                pending = None
            blocks.append(block)
            i = j
        elif text.strip() and pending:
            problems.append(f"{path}:{pending[0]}: doc-test marker is not right before a code block")
            pending = None
        i += 1
    if pending:
        problems.append(f"{path}:{pending[0]}: doc-test marker is not followed by a code block")
    return blocks, problems


def all_blocks() -> list[Block]:
    return [b for path in DOC_FILES for b in parse_doc(path)[0]]


def covering_test_problem(ref: str) -> str | None:
    """None if ``tests/file.py::name`` names a test function defined in that file, else why not."""
    file, sep, name = ref.partition("::")
    if not sep or not name:
        return f"{ref!r} is not of the form tests/<file>.py::<test function>"
    target = REPO / file
    if not target.is_file():
        return f"{file} does not exist"
    tree = ast.parse(target.read_text(encoding="utf-8"))
    names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    if name not in names or not name.startswith("test"):
        return f"{file} defines no test function {name}"
    return None


# ---- running a block ----------------------------------------------------------------------------


def make_user_files(folder: Path) -> Path:
    """The files of :data:`USER_FILES`, built once (CPU, seconds) into ``folder``."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from torch import nn

    from musar.lora import BranchLoRAConfig, inject_branch_lora, lora_named_parameters
    from musar.lora.io import save_branch_lora
    from musar.pipelines.gguf import write_gguf
    from musar.pipelines.pipeline_musar import MusarPipeline
    from musar.pipelines.presets import tiny_pipeline

    folder.mkdir(parents=True, exist_ok=True)
    for name, source in (("dog.jpg", "examples/dog.jpg"), ("backpack.jpg", "examples/backpack.jpg")):
        shutil.copyfile(REPO / source, folder / name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = tiny_pipeline()
        base.save_pretrained(folder / "tiny-flux")
        write_gguf(base.transformer.state_dict(), folder / "flux1-dev-Q8_0.gguf")
        musar = tiny_pipeline().transformer
        inject_branch_lora(musar, BranchLoRAConfig(noise_rank=2, subject_rank=4))
        for _, p in lora_named_parameters(musar):
            nn.init.normal_(p, std=0.02)
        save_branch_lora(musar, folder / "my_musar_lora.safetensors")
        for name in ("my_lora.safetensors", "musar.safetensors"):
            shutil.copyfile(folder / "my_musar_lora.safetensors", folder / name)
        for name in ("watercolor_flux_lora", "turbo_flux_lora"):
            style = tiny_pipeline().transformer
            style.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_out"],
                                         init_lora_weights=False))
            MusarPipeline.save_lora_weights(folder / name, transformer_lora_layers=get_peft_model_state_dict(style),
                                            weight_name=f"{name}.safetensors")
            shutil.move(folder / name / f"{name}.safetensors", folder / f"{name}.safetensors")
            shutil.rmtree(folder / name)
    return folder


def prepare_workdir(folder: Path, user_files: Path) -> Path:
    """A fresh folder to run one block in: examples/ copied, configs/ linked, the user files."""
    folder.mkdir(parents=True)
    shutil.copytree(REPO / "examples", folder / "examples")  # a copy: docs regenerate files in it
    (folder / "configs").symlink_to(REPO / "configs", target_is_directory=True)  # read only
    for item in user_files.iterdir():
        (shutil.copytree if item.is_dir() else shutil.copyfile)(item, folder / item.name)
    (folder / "home").mkdir()
    (folder / "tmp").mkdir()
    return folder


def block_env(folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "MUSAR_"))}
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "OMP_NUM_THREADS": "1",
        "HOME": str(folder / "home"),
        "TMPDIR": str(folder / "tmp"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "MPLBACKEND": "Agg",
    })
    return env


DONE = "@@doc-test done "  # printed after each block of a session, so a test finds how far it got


@dataclass
class Result:
    returncode: int
    output: str
    seconds: float
    code: str
    cpu_seconds: float = 0.0

    def reached_end_of(self, block: Block) -> bool:
        return f"{DONE}{block.id}\n" in self.output


def session(first: Block, blocks: list[Block]) -> list[Block]:
    """A named block and, in the order of the file, every block marked ``after=`` its name."""
    name = first.marker["name"]
    return [first, *(b for b in blocks if b.path == first.path and b.marker.get("after") == name)]


def run_blocks(chain: list[Block], folder: Path) -> Result:
    """Run one shell block, or Python blocks in one interpreter (a session), with cwd ``folder``."""
    if chain[0].kind == "python":
        parts = [f"{b.runnable_code()}\nprint({DONE + b.id!r}, flush=True)\n" for b in chain]
        code = "\n".join(parts)
        script = folder / "doc_block.py"
        script.write_text(code, encoding="utf-8")
        command = [sys.executable, str(script)]
    else:
        (block,) = chain
        code = block.runnable_code() + f"\necho {shlex.quote(DONE + block.id)}\n"
        command = ["bash", "-e", "-o", "pipefail", "-c", code]
    start, cpu = time.perf_counter(), _children_cpu()
    try:
        done = subprocess.run(command, cwd=folder, env=block_env(folder), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=BLOCK_TIMEOUT_S)
        returncode, output = done.returncode, done.stdout
    except subprocess.TimeoutExpired as e:
        partial = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        returncode, output = -1, f"{partial}\n(timed out after {BLOCK_TIMEOUT_S} s)"
    return Result(returncode, output, time.perf_counter() - start, code, _children_cpu() - cpu)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
