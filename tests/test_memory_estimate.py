"""The memory estimate (musar.utils.memory): what it counts, and that it refuses only the impossible."""

from __future__ import annotations

from pathlib import Path

import pytest

from musar.errors import MusarError
from musar.pipelines.model_folder import flux_transformer_params, text_encoder_params
from musar.pipelines.preload import FLUX1_DEV, model_facts
from musar.utils import memory
from musar.utils.memory import (
    GIB,
    REFUSE_RATIO,
    Estimate,
    ModelSize,
    check_fits,
    estimate_generation,
    estimate_training,
    sequence_tokens,
    vae_params,
)

FLUX = ModelSize(width=3072, blocks=57, token_px=16, transformer_params=flux_transformer_params(FLUX1_DEV["transformer"]),
                 t5_params=text_encoder_params(FLUX1_DEV["text_encoder_2"]),
                 other_params=text_encoder_params(FLUX1_DEV["text_encoder"]) + vae_params(FLUX1_DEV["vae"]))
ONE = {"height": 1024, "width": 1024, "refs": 1, "condition_size": 512, "prompt_tokens": 512, "phrase_tokens": 32}


def test_tokens_are_prompt_image_and_each_reference() -> None:
    assert sequence_tokens(FLUX, 1024, 1024, 0, 512, 512, 32) == 512 + 64 * 64
    assert sequence_tokens(FLUX, 1024, 1024, 2, 512, 512, 32) == 512 + 4096 + 2 * (1024 + 32)
    toy = ModelSize(width=192, blocks=4, token_px=8, transformer_params=0, t5_params=0, other_params=0)
    assert sequence_tokens(toy, 64, 64, 1, 64, 64, 8) == 64 + 64 + 64 + 8


def test_the_model_size_matches_flux1_dev() -> None:
    facts = model_facts()  # FLUX.1-dev's published sizes, nothing downloaded
    assert facts.size() == FLUX
    assert 4.5e9 < FLUX.t5_params < 5.0e9  # T5-XXL's encoder: 4.76e9
    assert 60e6 < vae_params(FLUX1_DEV["vae"]) < 90e6  # FLUX's VAE: 84e6


def test_flux1_dev_at_1024_px() -> None:
    est = estimate_generation(FLUX, **ONE)
    assert 30 * GIB < est.weights < 36 * GIB  # 11.9e9 + 4.8e9 + CLIP/VAE parameters in bf16
    # the VAE decoder's full-resolution maps (1024^2 x 128 channels x 3) outweigh the transformer's
    assert est.activations == pytest.approx(1024 * 1024 * 128 * 2 * 3)
    assert estimate_generation(FLUX, **ONE, dtype="fp32").weights == pytest.approx(2 * est.weights)


def test_quantisation_and_offload_move_the_weights() -> None:
    bf16 = estimate_generation(FLUX, **ONE)
    int8 = estimate_generation(FLUX, **ONE, quantize="int8wo")
    assert int8.weights < 0.55 * bf16.weights
    assert estimate_generation(FLUX, **ONE, quantize="nf4").weights < int8.weights
    gguf = estimate_generation(FLUX, **ONE, quantize="gguf:/x.gguf", gguf_bytes=12 * GIB)
    assert gguf.weights == pytest.approx(12 * GIB + FLUX.t5_params * 2 + FLUX.other_params * 2)
    model = estimate_generation(FLUX, **ONE, offload="model")
    assert model.weights == pytest.approx(FLUX.transformer_params * 2) and model.host == pytest.approx(bf16.weights)
    sequential = estimate_generation(FLUX, **ONE, offload="sequential")
    assert sequential.weights == 0 and sequential.host == pytest.approx(bf16.weights)


@pytest.mark.parametrize("change", [{"height": 2048}, {"width": 4096}, {"refs": 16}, {"condition_size": 2048}])
def test_activations_grow_with_the_run(change: dict) -> None:
    small = estimate_generation(FLUX, **ONE)
    big = estimate_generation(FLUX, **{**ONE, **change})
    assert big.activations > small.activations and big.weights == small.weights
    assert estimate_generation(FLUX, **ONE, num_images=4).activations == pytest.approx(4 * small.activations)


def test_training_counts_lora_states_and_kept_activations() -> None:
    kw = {"height": 512, "width": 1024, "refs": 2, "condition_size": 512, "prompt_tokens": 512, "phrase_tokens": 32,
          "lora_params": 1_000_000}
    one = estimate_training(FLUX, batch_size=1, **kw)
    assert estimate_training(FLUX, batch_size=8, **kw).activations == pytest.approx(8 * one.activations)
    assert estimate_training(FLUX, batch_size=1, gradient_checkpointing=False, **kw).activations > 5 * one.activations
    no_lora = estimate_training(FLUX, batch_size=1, **{**kw, "lora_params": 0})
    assert one.weights - no_lora.weights == pytest.approx(1_000_000 * (4 + 4 + 8))  # fp32 weight, grad, AdamW


def test_refused_only_above_the_ratio() -> None:
    est = Estimate(weights=10 * GIB, activations=2 * GIB)
    check_fits(est, "cpu", "x", "cure", free=lambda d: int(est.total / REFUSE_RATIO) + 1)  # tight, but possible
    with pytest.raises(MusarError, match=r"^x needs ~12 GiB on cpu \(10 GiB weights \+ 2 GiB activations\), "
                                         r"4 GiB free; cure$"):
        check_fits(est, "cpu", "x", "cure", free=lambda d: 4 * GIB)
    check_fits(est, "cpu", "x", "cure", free=lambda d: None)  # a platform that does not say: never refused


def test_offloaded_weights_must_fit_in_ram() -> None:
    est = Estimate(weights=GIB, activations=GIB, host=40 * GIB)
    free = {"cuda": 24 * GIB, "cpu": 8 * GIB}
    with pytest.raises(MusarError, match="keeps ~40 GiB of offloaded weights in RAM, 8 GiB free; more RAM"):
        check_fits(est, "cuda", "x", "cure", host_cure="more RAM", free=lambda d: free[d.split(":")[0]])
    check_fits(est, "cpu", "x", "cure", free=lambda d: free[d])  # on the CPU nothing is offloaded


@pytest.mark.parametrize(("gpu_gib", "refused"), [(80, False), (24, False), (16, True)])
def test_flux1_dev_on_common_gpus(gpu_gib: int, refused: bool) -> None:
    # 24 GB runs FLUX.1-dev with offload or tight settings: not refused (no false refusals);
    # 16 GB cannot hold its bf16 weights at all.
    from musar.cli.preflight import check_generation_run

    def run() -> None:
        check_generation_run(model_facts(), height=1024, width=1024, refs=1, condition_size=512, prompt_tokens=512,
                             phrase_tokens=32, dtype="bf16", device="cuda:0",
                             free=lambda d: (gpu_gib if d.startswith("cuda") else 512) * GIB)

    if refused:
        with pytest.raises(MusarError, match=r"on cuda:0 .* 16 GiB free; the weights alone do not fit: use --offload"):
            run()
    else:
        run()


def test_the_machine_is_read() -> None:
    free = memory.host_free_bytes()
    assert free is None or free > 0
    if Path("/proc/meminfo").is_file():
        assert (memory._meminfo() or 0) > 0
    assert memory.free_bytes("cpu") == free or memory.free_bytes("cpu") is not None


def test_a_cgroup_limit_caps_the_free_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cg"
    root.mkdir()
    (root / "memory.max").write_text("1073741824\n")
    (root / "memory.current").write_text("268435456\n")
    real = Path

    def fake(*parts: str) -> Path:
        if parts and parts[0] == "/sys/fs/cgroup":
            return real(root, *parts[1:])
        return real(*parts)

    monkeypatch.setattr(memory, "Path", fake)
    assert memory._cgroup_room() == 768 * 1024 * 1024
    assert (memory.host_free_bytes() or 0) <= 768 * 1024 * 1024
    (root / "memory.max").write_text("max\n")
    assert memory._cgroup_room() is None
