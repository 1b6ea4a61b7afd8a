"""A run is what it was started as (issue 22, item 4): a resume with another config is refused
with every difference listed and nothing rewritten; `--resume latest` passes over hostile
checkpoints and says where it starts; a finished run says so; an eval image is reused only for
the exact case it was made from, and a settings change is refused before any model loads."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from musar import cli
from musar.errors import MusarError
from musar.eval.protocols import build_cases
from musar.eval.runner import run_eval
from musar.train import train
from musar.train.checkpoint import find_resume
from musar.train.config import dump_config
from musar.train.fingerprint import RESUME_FREE, differences, run_config

from train_fixtures import REPO, tiny_config

STEP2, STEP4 = "step_00000002", "step_00000004"


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config file, run folder): 4 tiny steps, checkpoints at 2 and 4, run to its end."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fp")
    cfg = tiny_config(root / "run", "max_steps=4", "checkpoint_every=2", "keep_last=0", "validate_every=0")
    config = root / "tiny.yaml"
    config.write_text(dump_config(cfg), encoding="utf-8")
    train(cfg)
    return config, root / "run"


@pytest.fixture
def copy(finished: tuple[Path, Path], tmp_path: Path) -> Path:
    shutil.copytree(finished[1], tmp_path / "run")
    return tmp_path / "run"


def musar_train(config: Path, out: Path, *extra: str) -> int:
    return cli.main(["train", "--config", str(config), "--output-dir", str(out), *extra])


def test_a_resume_with_another_config_is_refused_and_nothing_is_rewritten(
    finished: tuple[Path, Path], copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = finished
    before, yaml_bytes = snapshot(copy), (copy / "config.yaml").read_bytes()
    code = musar_train(config, copy, "--resume", "latest", "--max-steps", "6", "--set", "optim.lr=0.5",
                       "--set", "data.padding=2")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "optim.lr: 0.001 -> 0.5" in err[0] and "data.padding: 1 -> 2" in err[0] and "2 key(s)" in err[0]
    assert "max_steps" not in err[0].split("only these may change")[0]  # extending a run is allowed
    assert (copy / "config.yaml").read_bytes() == yaml_bytes and snapshot(copy) == before


def test_the_allow_list_covers_cadence_not_substance(tmp_path: Path) -> None:
    base = run_config(tiny_config(tmp_path, "max_steps=4"))
    free = run_config(tiny_config(tmp_path / "elsewhere", "max_steps=8", "checkpoint_every=7", "log_every=3",
                                  "data.num_workers=2", "report_to=[tensorboard]", "validation.steps=5"))
    assert differences(base, free) == []
    bound = run_config(tiny_config(tmp_path, "seed=1", "lora.subject_rank=4", "curriculum.stage1_steps=5",
                                   "optim.schedule=cosine", "model.mixed_precision=bf16"))
    assert [line.split(":")[0] for line in differences(base, bound)] == [
        "curriculum.stage1_steps", "lora.subject_rank", "model.mixed_precision", "optim.schedule", "seed"]
    assert all(reason for reason in RESUME_FREE.values())


def nested(path: Path) -> None:
    path.write_text("[" * 200_000 + "]" * 200_000)


def huge_number(path: Path) -> None:
    path.write_text('{"step": ' + "9" * 100_000 + "}")


def bool_step(path: Path) -> None:
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "step": True}))


def bad_record(path: Path) -> None:
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "run_config": ["not", "a", "mapping"]}))


def not_utf8(path: Path) -> None:
    path.write_bytes(b'{"step": "\xff\xfe"}')


def no_torch_tensor(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"other": torch.zeros(1)}, str(path))


HOSTILE = [("trainer.json", nested, "nests deeper"), ("trainer.json", huge_number, "not readable JSON"),
           ("trainer.json", bool_step, "malformed step"), ("trainer.json", bad_record, "malformed run_config"),
           ("optimizer.json", not_utf8, "not UTF-8"), ("manifest.json", nested, "nests deeper"),
           ("rng_rank0.safetensors", no_torch_tensor, "lacks tensor 'torch'"),
           ("lora.safetensors", lambda p: p.unlink(), "lora.safetensors is missing")]


@pytest.mark.parametrize(("name", "damage", "message"), HOSTILE, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(HOSTILE)])
def test_latest_passes_over_a_hostile_checkpoint(copy: Path, name: str, damage: Any, message: str) -> None:
    damage(copy / "checkpoints" / STEP4 / name)
    point = find_resume(copy, "latest")
    assert point.path.name == STEP2 and len(point.skipped) == 1 and message in point.skipped[0], point.skipped
    assert "\n" not in point.skipped[0]


def test_resume_latest_says_where_it_starts_and_trains_on(
    finished: tuple[Path, Path], copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nested(copy / "checkpoints" / STEP4 / "trainer.json")
    assert musar_train(finished[0], copy, "--resume", "latest") == 0
    out, err = capsys.readouterr()
    assert f"skipping damaged checkpoint {STEP4} (trainer.json is not readable JSON" in err
    assert f"resuming from {STEP2}, the newest valid checkpoint (step 2)" in err
    assert "trained 2 steps (from step 2 to 4)" in out
    assert find_resume(copy, "latest").path.name == STEP4  # rewritten, whole again


def test_resume_latest_on_a_finished_run_trains_nothing_and_says_so(
    finished: tuple[Path, Path], copy: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("musar.train.loop.train", lambda *a, **k: pytest.fail("a finished run was trained"))
    (copy / "lora.safetensors").unlink()  # as if the run died between its last checkpoint and the copy
    assert musar_train(finished[0], copy, "--resume", "latest") == 0
    out = capsys.readouterr().out
    assert f"already complete: {STEP4} is at step 4" in out and "trained" not in out.replace("nothing trained", "")
    saved = copy / "checkpoints" / STEP4 / "lora.safetensors"
    assert (copy / "lora.safetensors").read_bytes() == saved.read_bytes()


# -- eval ----------------------------------------------------------------------------------------


class Fake:
    def __init__(self) -> None:
        self.prompts: list[str] = []

    def __call__(self, prompt: str, subjects: list[tuple[Image.Image, str]], seed: int) -> Image.Image:
        self.prompts.append(prompt)
        return Image.new("RGB", (16, 16), (seed * 50, len(prompt), 7))


def write_cases(path: Path, first_prompt: str) -> Path:
    examples = REPO / "examples"
    path.write_text(json.dumps([
        {"id": "dog", "prompt": first_prompt, "subjects": [{"image": str(examples / "dog.jpg"), "phrase": "a corgi"}]},
        {"id": "bag", "prompt": "a red backpack on a bench",
         "subjects": [{"image": str(examples / "backpack.jpg"), "phrase": "a red backpack"}]},
    ]))
    return path


def test_an_edited_case_is_generated_again_never_reused(tmp_path: Path) -> None:
    cases_file, out = write_cases(tmp_path / "cases.json", "a corgi on the beach"), tmp_path / "eval"
    kw: dict[str, Any] = {"seeds": (0, 1), "out_dir": out, "settings": {"model": "fake"}, "grids": False, "progress": False}
    first = run_eval(build_cases("custom", cases_file), Fake(), None, **kw)
    assert (first.generated, first.reused) == (4, 0)
    write_cases(cases_file, "a corgi in the snow")
    again = Fake()
    second = run_eval(build_cases("custom", cases_file), again, None, **kw)
    assert (second.generated, second.reused, second.replaced) == (2, 2, 2)
    assert again.prompts == ["a corgi in the snow"] * 2
    sidecar = json.loads((out / "images" / "dog_s0.json").read_text())
    assert sidecar["prompt"] == "a corgi in the snow"
    third = run_eval(build_cases("custom", cases_file), Fake(), None, **kw)
    assert (third.generated, third.reused) == (0, 4)
    (out / "images" / "bag_s1.png").write_bytes((out / "images" / "dog_s1.png").read_bytes())  # swapped by hand
    assert run_eval(build_cases("custom", cases_file), Fake(), None, **kw).generated == 1


def test_a_steps_change_is_refused_before_any_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from musar.cli import eval as eval_cli

    loads: list[int] = []

    def load_pipeline(**kwargs: Any) -> Any:
        loads.append(1)
        return lambda **call: types.SimpleNamespace(images=[Image.new("RGB", (call["width"], call["height"]))])

    monkeypatch.setattr("musar.pipelines.presets.load_pipeline", load_pipeline)
    parser = argparse.ArgumentParser(prog="musar")
    eval_cli.add_parser(parser.add_subparsers(dest="command"))
    cases_file, out = write_cases(tmp_path / "cases.json", "a corgi on the beach"), tmp_path / "eval"
    common = ["eval", "--protocol", "custom", "--data", str(cases_file), "--preset", "tiny", "--seeds", "0",
              "--height", "64", "--width", "64", "--skip-metrics", "--no-grids", "--out", str(out)]
    args = parser.parse_args([*common, "--steps", "2"])
    assert args.func(args) == 0 and loads == [1]
    args = parser.parse_args([*common, "--steps", "3", "--guidance", "5"])
    with pytest.raises(MusarError, match=r"holds a run with guidance=3\.5, not 5\.0; steps=2, not 3"):
        args.func(args)
    assert loads == [1]
