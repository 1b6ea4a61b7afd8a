"""A hub id that is not cached is judged by one request, before diffusers' slow download path.

No test reaches the real hub: a tiny HTTP server on 127.0.0.1 answers as the hub does (its
``X-Error-Code`` headers), and a closed local port stands for a machine without a network.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from musar.errors import MusarError
from musar.pipelines.model_folder import check_hub_model

ROOT = Path(__file__).resolve().parents[1]

# repo id -> (status, X-Error-Code) the fake hub answers for its model_index.json
ANSWERS = {
    "org/gated": (401, "GatedRepo"),
    "org/missing": (404, "RepoNotFound"),
    "org/notapipeline": (404, "EntryNotFound"),
    "org/ok": (200, ""),
}


class FakeHub(BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:  # http.server dispatches on this name
        repo = "/".join(self.path.strip("/").split("/")[:2])
        status, code = ANSWERS.get(repo, (404, "RepoNotFound"))
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", f"fake hub: {code}")
        else:
            self.send_header("ETag", '"abc"')
            self.send_header("X-Repo-Commit", "0" * 40)
            self.send_header("Content-Length", "2")
        self.end_headers()

    def log_message(self, *_: object) -> None:  # keep test output clean
        pass


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    _point_hub_at(endpoint, monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    yield endpoint
    server.shutdown()
    server.server_close()


def _point_hub_at(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # What HF_ENDPOINT does at huggingface_hub's import, for a process that has imported it.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(("repo", "says"), [
    ("org/gated", r"org/gated is gated: log in with `huggingface-cli login` and accept its licence"),
    ("org/missing", r"org/missing is not a model on the hub \(or it is private\)"),
    ("org/notapipeline", r"org/notapipeline has no model_index.json on the hub: it is not a diffusers pipeline"),
])
def test_the_hub_answer_names_the_cure(fake_hub: str, repo: str, says: str) -> None:
    with pytest.raises(MusarError, match=says):
        check_hub_model(repo)


def test_a_repo_the_hub_serves_passes(fake_hub: str) -> None:
    check_hub_model("org/ok")  # diffusers may download it: nothing to refuse


def test_an_unreachable_hub_is_one_line_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    _point_hub_at(f"http://127.0.0.1:{_closed_port()}", monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(MusarError, match=r"org/model is not in the local Hugging Face cache and the hub cannot be "
                                         r"reached .*HF_HUB_OFFLINE=1"):
        check_hub_model("org/model")


def test_the_cli_says_it_in_one_line_without_retries(tmp_path: Path) -> None:
    # The whole command, as a user runs it with the network down: exit 2, one line, no retry
    # warnings from huggingface_hub, nothing written.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "musar.cli", "generate", "--model", "black-forest-labs/FLUX.1-dev",
         "--prompt", "a corgi", "--subject", str(ROOT / "examples" / "dog.jpg"), "a corgi",
         "--out", str(tmp_path / "out.png")],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "the hub cannot be reached" in lines[0] and "Traceback" not in done.stderr, lines
    assert not (tmp_path / "out.png").exists()
