"""``musar ui`` in a real browser: headless Chromium (Debian's) driven by Playwright.

Starts the app on the tiny preset in a subprocess, uploads two references, types the phrases and
a prompt, checks that a phrase missing from the prompt is reported on the page, generates, and
saves a screenshot (outputs/ui_screenshot.png; the README shows a copy in docs/). Uses the system Chromium only: never
``playwright install``, never a download. Skips only where no browser or Playwright can be had.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# Written under outputs/ (ignored by git) so test runs leave the tree clean; docs/ui_screenshot.png
# in the README is a copy of one such run.
SCREENSHOT = ROOT / "outputs" / "ui_screenshot.png"
CHROMIUM = os.environ.get("MUSAR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
PROMPT = "a photo of a dog and a red backpack on the beach"
START_TIMEOUT_S = 120  # model build + Gradio start on a busy 2-core CI box
GENERATE_TIMEOUT_MS = 90_000

pytest.importorskip("gradio", reason="gradio not installed (pip install 'musar[ui]')")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright's Python package not installed (pip install 'musar[dev]')"
)
if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app on the tiny preset, in its own process, on a free 127.0.0.1 port."""
    tmp = tmp_path_factory.mktemp("ui_app")
    port = free_port()
    log = (tmp / "app.log").open("w+")
    paths = [str(ROOT / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "musar.cli.ui", "--preset", "tiny", "--port", str(port), "--out-dir", str(tmp / "out")],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp,
    )
    url = f"http://127.0.0.1:{port}/"
    # Direct connections: a proxy from the environment must not stand between us and localhost.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"musar ui exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                with opener.open(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"musar ui did not answer within {START_TIMEOUT_S} s:\n{log.read()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def page(app_url: str) -> Iterator[object]:
    profile = tempfile.mkdtemp(prefix="musar-chromium-")  # fresh profile: nothing cached, nothing synced
    try:
        with sync_api.sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1400, "height": 1000},
            )
            try:
                pg = context.new_page()
                pg.set_default_timeout(30_000)
                pg.goto(app_url)
                pg.wait_for_selector("#musar-generate")
                yield pg
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def text_input(pg: object, elem_id: str) -> object:
    # Gradio renders a one-line Textbox as <textarea> or <input> depending on version.
    return pg.locator(f"#{elem_id} textarea, #{elem_id} input").first  # type: ignore[attr-defined]


def test_generate_in_browser(page: object, tmp_path: Path) -> None:
    pg = page
    refs = [tmp_path / "dog.png", tmp_path / "backpack.jpg"]
    Image.new("RGB", (96, 80), (200, 40, 40)).save(refs[0])
    Image.new("RGB", (80, 112), (40, 40, 200)).save(refs[1])
    # Rows come and go: a third subject row appears, and goes again.
    assert not pg.is_visible("#subject-row-2")
    pg.click("#musar-add-subject")
    pg.wait_for_selector("#subject-row-2", state="visible")
    pg.click("#musar-remove-subject")
    pg.wait_for_selector("#subject-row-2", state="hidden")

    for k, ref in enumerate(refs):
        pg.set_input_files(f"#subject-image-{k} input[type=file]", str(ref))
        pg.wait_for_selector(f"#subject-image-{k} img")  # upload finished: the preview is shown
    text_input(pg, "subject-phrase-0").fill("a dog")
    text_input(pg, "subject-phrase-1").fill("a cat")
    text_input(pg, "musar-prompt").fill(PROMPT)

    # A phrase that is not in the prompt: a message on the page, next to the controls, app still up.
    pg.click("#musar-generate")
    pg.wait_for_selector("#musar-error li")
    message = pg.inner_text("#musar-error")
    assert "Subject 2" in message and "'a cat' does not appear in the prompt" in message
    assert "does not appear in the prompt" in pg.inner_text("#subject-error-1")
    assert pg.locator("#musar-output img").count() == 0

    text_input(pg, "subject-phrase-1").fill("a red backpack")
    pg.click("#musar-generate")
    pg.wait_for_selector("#musar-output img", timeout=GENERATE_TIMEOUT_MS)
    pg.wait_for_selector("#musar-error li", state="detached")
    pg.wait_for_selector("#musar-routing-grid img")
    pg.wait_for_selector("#musar-route-overlay img")
    pg.wait_for_selector("#musar-gallery img")
    command = text_input(pg, "musar-command").input_value()
    assert command.startswith("musar generate") and "--preset tiny" in command and "'a red backpack'" in command
    # The image really arrived: the <img> decoded to the requested size.
    size = pg.eval_on_selector("#musar-output img", "img => img.decode().then(() => [img.naturalWidth, img.naturalHeight])")
    assert size == [256, 256]

    SCREENSHOT.parent.mkdir(exist_ok=True)
    pg.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000

    # The gallery keeps the result with its parameters.
    pg.click("#musar-gallery img")
    pg.wait_for_function("() => document.querySelector('#musar-selected').innerText.includes('a red backpack')")
