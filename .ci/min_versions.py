"""Check that the lowest versions pyproject.toml allows still work: build a throwaway venv with
every dependency pinned to its floor (``name>=X`` -> ``name==X``), reuse the torch already
installed (its floor cannot be installed cheaply on a CPU machine: PyPI's torch wheels for
Linux x86_64 are CUDA builds of several GB), then import every module and run a tiny generation,
the shipped toy model and a stacked LoRA (.ci/min_versions_smoke.py).

    python .ci/min_versions.py            # from the repo root, with the project's venv python

The venv (.venv-min/) is reused while the pins are unchanged, so a re-run costs only the smoke
run. Needs PyPI; no GPU.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-min"
# Packages whose floor is reused from the running environment instead of installed.
REUSED = {"torch"}


def floors() -> list[str]:
    """``name==floor`` for every dependency with a lower bound (torch excluded)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = []
    for dep in deps:
        match = re.match(r"^([A-Za-z0-9_.\-]+)\s*(?:\[.*\])?\s*(.*)$", dep)
        name, spec = match.group(1), match.group(2)
        low = re.search(r">=\s*([0-9][^,;\s]*)", spec)
        if name.lower() in REUSED:
            continue
        if low is None:
            raise SystemExit(f"dependency {dep!r} has no lower bound: every dependency needs a tested floor")
        pins.append(f"{name}=={low.group(1)}")
    return pins


def link_torch(site: Path) -> list[str]:
    """Make the running environment's torch (and only torch) importable in the new venv."""
    dist = md.distribution("torch")
    origin = Path(dist.locate_file(""))
    tops = {Path(str(f)).parts[0] for f in dist.files or []}
    tops = {t for t in tops if t != ".." and not t.endswith(".pth") and (origin / t).exists()}
    shelf = VENV / "reused"
    shelf.mkdir(exist_ok=True)
    for top in sorted(tops):
        (shelf / top).symlink_to(origin / top)
    (site / "reused-torch.pth").write_text(str(shelf) + "\n")
    # torch's own runtime requirements (sympy, networkx, ...) are installed in the venv.
    return [f"torch=={dist.version}"]


def build(pins: list[str], stamp: str) -> Path:
    python = VENV / "bin" / "python"
    if (VENV / "pins.json").is_file() and json.loads((VENV / "pins.json").read_text()).get("stamp") == stamp:
        return python
    shutil.rmtree(VENV, ignore_errors=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    torch_pin = link_torch(site)
    cmd = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins, *torch_pin]
    print("min-versions:", " ".join(pins), flush=True)
    subprocess.run(cmd, check=True)
    (VENV / "pins.json").write_text(json.dumps({"stamp": stamp, "pins": pins}))
    return python


def main() -> int:
    t0 = time.perf_counter()
    pins = floors()
    stamp = hashlib.sha256(json.dumps([pins, md.version("torch"), sys.version]).encode()).hexdigest()
    python = build(pins, stamp)
    t_build = time.perf_counter() - t0
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(python), str(ROOT / ".ci" / "min_versions_smoke.py")], env=env, cwd=ROOT, check=False)
    print(f"min-versions: venv {t_build:.0f} s, smoke {time.perf_counter() - t0 - t_build:.0f} s, "
          f"{'passed' if done.returncode == 0 else 'FAILED'}", flush=True)
    return done.returncode


if __name__ == "__main__":
    raise SystemExit(main())
