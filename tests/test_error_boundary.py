"""The one error boundary of every command (issue 22, item 1): failures the user can act on are
one line with exit 2 (input) or 1 (the machine); a bug keeps its traceback."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from musar.errors import MusarError, describe_failure


@pytest.mark.parametrize(
    ("exc", "code", "needle"),
    [
        (MusarError("phrase 'x' not in the prompt"), 2, "phrase 'x'"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/nope.png"), 2, "/nope.png"),
        (PermissionError(errno.EACCES, "Permission denied", "/root/x"), 2, "Permission denied"),
        (OSError(errno.ENAMETOOLONG, "File name too long", "a" * 300), 2, "File name too long"),
        (OSError(errno.ENOSPC, "No space left on device", "out.png"), 1, "no space left on device"),
        (OSError(errno.EIO, "Input/output error"), 1, "Input/output error"),
        (MemoryError(), 1, "out of memory"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), 2, "cannot read the input"),
        (json.JSONDecodeError("Expecting value", "x", 0), 2, "JSONDecodeError"),
        (RecursionError("maximum recursion depth exceeded"), 2, "RecursionError"),
    ],
)
def test_failures_become_one_line_with_the_right_code(exc: BaseException, code: int, needle: str) -> None:
    got = describe_failure(exc)
    assert got is not None and got[0] == code and needle in got[1] and "\n" not in got[1]


def test_a_bug_is_not_described() -> None:
    assert describe_failure(KeyError("x")) is None
    assert describe_failure(TypeError("unsupported operand")) is None


def test_library_decode_errors_are_input_errors() -> None:
    from PIL import UnidentifiedImageError

    assert describe_failure(UnidentifiedImageError("cannot identify image file 'x.png'"))[0] == 2  # type: ignore[index]


def _musar(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "musar.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_turns_a_hostile_yaml_into_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"output_dir: \xff\xfe bad\n")  # not UTF-8
    done = _musar("train", "--config", str(cfg))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("musar train: error:") and "Traceback" not in done.stderr
    again = _musar("--traceback", "train", "--config", str(cfg))
    assert again.returncode != 0 and "Traceback" in again.stderr  # the flag shows what the line hid


def test_the_ui_shows_the_line_the_cli_prints() -> None:
    from musar.ui.logic import failure_problem

    full = OSError(errno.ENOSPC, "No space left on device", "out.png")
    problem, bug = failure_problem(full)
    assert not bug and problem.text() == describe_failure(full)[1]  # type: ignore[index]
    problem, bug = failure_problem(KeyError("x"))
    assert bug and "internal error" in problem.text()


@pytest.mark.parametrize("kind", ["gated", "missing", "offline", "diffusers"])
def test_hub_failures_name_the_cure(kind: str) -> None:
    import httpx
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    url = "https://huggingface.co/org/model/resolve/main/model_index.json"
    response = {code: httpx.Response(code, request=httpx.Request("GET", url)) for code in (403, 404)}
    exc: BaseException = {
        "gated": GatedRepoError("403 gated", response=response[403]),
        "missing": RepositoryNotFoundError("404", response=response[404]),
        "offline": LocalEntryNotFoundError("Cannot find the requested files in the disk cache"),
        "diffusers": OSError("black-forest-labs/FLUX.1-dev does not appear to have a file named config.json."),
    }[kind]
    got = describe_failure(exc)
    assert got is not None and got[0] == 2 and "\n" not in got[1]
    cure = {"gated": "accept its licence", "missing": "check the id", "offline": "local Hugging Face cache",
            "diffusers": "huggingface-cli download black-forest-labs/FLUX.1-dev"}[kind]
    assert cure in got[1]
