"""Training config (YAML, overrides, errors), the ``musar train`` CLI and the pure objective."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from musar import cli
from musar.errors import MusarError
from musar.train import checkpoint as ckpt
from musar.train.config import ObjectiveConfig, TrainConfig, load_config
from musar.train.objective import (
    flow_loss,
    interpolate,
    sample_timesteps,
    shift_mu,
    time_shift,
    velocity_target,
)

from train_fixtures import REPO


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


# -- config --------------------------------------------------------------------------------------


def test_paper_config_reproduces_the_paper() -> None:
    cfg = load_config(REPO / "configs" / "musar_flux_dev.yaml")
    c, lora = cfg.curriculum, cfg.lora
    assert (c.stage1_steps, c.stage2_steps, c.stage3_steps, cfg.total_steps) == (20000, 10000, 10000, 40000)
    assert (lora.subject_rank, lora.noise_rank, lora.mode) == (128, 4, "dual")
    assert cfg.routing.dynamic and cfg.routing.static and cfg.routing.backend == "fast"
    assert cfg.data.condition_size == 512 and cfg.data.quality_threshold == 5
    assert cfg.model.attention == "flash_efficient" and cfg.model.gradient_checkpointing


def test_tiny_config_and_accelerate_configs_parse() -> None:
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    assert cfg.model.preset == "tiny" and cfg.total_steps == 10
    kinds = {}
    for name in ("ddp", "deepspeed_zero2", "fsdp"):
        kinds[name] = yaml.safe_load((REPO / "configs" / "accelerate" / f"{name}.yaml").read_text())["distributed_type"]
    assert kinds == {"ddp": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED", "fsdp": "FSDP"}


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"optim": {"lrr": 1}}, "'optim.lrr'"),
        ({"max_step": 3}, "'max_step'"),
        ({"optim": {"lr": "fast"}}, "'optim.lr'"),
        ({"optim": {"betas": [0.9]}}, "'optim.betas'"),
        ({"model": {"mixed_precision": "fp8"}}, "'model.mixed_precision'"),
        ({"routing": {"backend": "dense"}}, "'routing.backend'"),
        ({"lora": "big"}, "section 'lora' must be a mapping"),
        ({"optim": {"batch_size": 0}}, "optim.batch_size must be >= 1"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, data: dict, needle: str) -> None:
    with pytest.raises(MusarError) as err:
        load_config(write(tmp_path, data))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_overrides_and_round_trip(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {"optim": {"lr": 1e-3}}), ["optim.lr=3e-4", "lora.targets=[x_embedder]", "seed=7"])
    assert cfg.optim.lr == 3e-4 and cfg.lora.targets == ("x_embedder",) and cfg.seed == 7
    with pytest.raises(MusarError, match="key=value"):
        load_config(None, ["optim.lr"])
    from musar.train.config import dump_config

    again = load_config(write(tmp_path, yaml.safe_load(dump_config(cfg))))
    assert again == cfg and isinstance(again.optim.betas, tuple)
    assert load_config(None) == TrainConfig()


# -- CLI -----------------------------------------------------------------------------------------


def test_cli_bad_config_path_is_exit_2_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(["train", "--config", "no/such/config.yaml"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "config file not found" in err


def test_cli_unknown_key_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(["train", "--config", str(write(tmp_path, {"data": {"sorce": "x"}}))], capsys)
    assert rc == 2 and "'data.sorce'" in err and err.count("\n") == 1


def test_cli_trains_the_tiny_config_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)  # the config's relative paths, as from a fresh clone
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_train.py
    try:
        _cli_end_to_end(tmp_path, capsys)
    finally:
        torch.set_num_threads(threads)


def _cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "run"
    rc, out, err = run_cli(["train", "--config", "configs/tiny.yaml", "--max-steps", "2", "--output-dir", str(out_dir),
                            "--set", "report_to=[tensorboard]", "--set", "model.device=cpu"], capsys)
    assert rc == 0, err
    assert "trained 2 steps" in out and (out_dir / "lora.safetensors").is_file()
    assert list((out_dir / "tensorboard").glob("events.*"))
    rc, out, _ = run_cli(["train", "--config", "configs/tiny.yaml", "--max-steps", "3", "--output-dir", str(out_dir),
                          "--resume", "latest", "--set", "model.device=cpu"], capsys)
    assert rc == 0 and "trained 1 step (from step 2 to 3)" in out


# -- objective -----------------------------------------------------------------------------------


def test_time_shift_matches_the_flux_scheduler() -> None:
    cfg = ObjectiveConfig()
    n = 2048  # a 1024x512 diptych
    mu = shift_mu(n, cfg)
    assert mu == pytest.approx(calculate_shift(n, 256, 4096, 0.5, 1.15))
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    assert torch.allclose(time_shift(t, mu), sched.time_shift(mu, 1.0, t))
    assert float(time_shift(torch.tensor(0.5), mu)) == pytest.approx(math.exp(mu) / (math.exp(mu) + 1))


def test_timesteps_are_logit_normal_shifted_and_seeded() -> None:
    cfg = ObjectiveConfig()
    draw = lambda n, seed: sample_timesteps(4000, n, cfg, torch.Generator().manual_seed(seed), "cpu")  # noqa: E731
    small, large = draw(64, 0), draw(4096, 0)
    assert torch.equal(small, draw(64, 0)) and not torch.equal(small, draw(64, 1))
    assert float(small.min()) > 0 and float(large.max()) < 1
    assert float(large.mean()) > float(small.mean())  # more tokens -> shifted towards noise
    plain = sample_timesteps(4000, 4096, ObjectiveConfig(shift=False), torch.Generator().manual_seed(0), "cpu")
    assert float(plain.mean()) == pytest.approx(0.5, abs=0.02)


def test_flow_interpolation_and_target() -> None:
    x0, eps = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    t = torch.tensor([0.0, 1.0])
    xt = interpolate(x0, eps, t)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], eps[1])
    v = velocity_target(x0, eps)
    mid = interpolate(x0, eps, torch.tensor([0.25, 0.75]))
    # The straight path: x_t moves with constant velocity v = eps - x0.
    assert torch.allclose(mid + 0.25 * v, interpolate(x0, eps, torch.tensor([0.5, 1.0])), atol=1e-6)
    assert flow_loss(v.bfloat16(), v).dtype == torch.float32


def test_optimizer_state_round_trips_without_pickle(tmp_path: Path) -> None:
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.8, 0.99))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    ckpt.write_optimizer_state(opt.state_dict(), tmp_path)
    loaded = ckpt.read_optimizer_state(tmp_path)
    assert loaded["param_groups"][0]["betas"] == (0.8, 0.99)
    fresh = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-3)
    fresh.load_state_dict(loaded)
    for a, b in zip(opt.state.values(), fresh.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_step_bench_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from musar.bench.train_step import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_train.py: 2 threads stall on a loaded 2-core machine
    out = tmp_path / "bench.json"
    assert main(["--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0",
                 "--peak-tflops", "1", "--out", str(out)]) == 0
    torch.set_num_threads(threads)
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"plain", "concat", "musar"}
    assert all(r["s_per_step"] > 0 and r["model_tflop"] > 0 and 0 < r["mfu"] < 1 for r in rows.values())
    assert all(r["n"] == len(r["s_all"]) == 1 and r["s_min"] <= r["s_per_step"] <= r["s_max"] for r in rows.values())
    printed = capsys.readouterr().out
    assert "target train_step_musar_vs_concat" in printed and "not judged on CPU" in printed  # as musar bench says it


def test_a_pretrained_base_loads_each_component_in_its_dtype(tmp_path: Path) -> None:
    import logging

    from musar.pipelines.presets import tiny_pipeline
    from musar.train.setup import build_pipeline

    tiny_pipeline().save_pretrained(tmp_path / "flux")
    warned: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warned.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("diffusers").addHandler(handler)  # diffusers' loggers do not propagate to the root
    try:
        cfg = load_config(None, [f"model.pretrained={tmp_path / 'flux'}", "model.dtype=fp16", "model.encoder_dtype=bf16"])
        pipe, dtype = build_pipeline(cfg)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert dtype == torch.float16 and {p.dtype for p in pipe.transformer.parameters()} == {torch.float16}
    for encoder in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}
    assert warned == []  # e.g. "should be kept in float32", diffusers' warning about a cast after loading
