"""Metric math on hand-made vectors, and the real loading path on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from musar.errors import MusarError
from musar.eval.metrics import (
    Metrics,
    MetricsConfig,
    cosine,
    cosine_matrix,
    mean_reference_similarity,
    resolve_model_spec,
)


def test_cosine_on_hand_made_vectors() -> None:
    assert cosine([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert cosine([1.0, 0.0], [0.0, 5.0]) == pytest.approx(0.0)
    assert cosine([1.0, 1.0], [-2.0, -2.0]) == pytest.approx(-1.0)
    assert cosine([3.0, 0.0], [1.0, 1.0]) == pytest.approx(2**-0.5)
    m = cosine_matrix(
        torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    )
    assert m.shape == (2, 3)
    assert torch.allclose(m, torch.tensor([[1.0, 2**-0.5, 0.0], [0.0, 2**-0.5, -1.0]]), atol=1e-6)


def test_multi_subject_mean_is_flat_over_all_references() -> None:
    g = torch.tensor([1.0, 0.0])
    subject_a = torch.tensor([[1.0, 0.0], [2.0, 0.0]])  # cosines 1, 1
    subject_b = torch.tensor([[0.0, 1.0]])  # cosine 0
    flat, per_subject = mean_reference_similarity(g, [subject_a, subject_b])
    assert flat == pytest.approx(2 / 3)  # (1 + 1 + 0) / 3, not (1 + 0) / 2
    assert per_subject == pytest.approx((1.0, 0.0))


def test_model_specs(tmp_path: Path) -> None:
    assert resolve_model_spec("facebook/dino-vits16") == ("facebook/dino-vits16", "refs/pr/1")
    assert resolve_model_spec("facebook/dino-vits16@main") == ("facebook/dino-vits16", "main")
    assert resolve_model_spec("openai/clip-vit-base-patch32") == ("openai/clip-vit-base-patch32", None)
    assert resolve_model_spec(str(tmp_path)) == (str(tmp_path), None)
    with pytest.raises(MusarError, match="empty revision"):
        resolve_model_spec("org/model@")


def _clip_vocab() -> dict[str, int]:
    """A byte-level CLIP vocabulary without merges: every word tokenizes to its characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def build_tiny_metric_models(root: Path) -> tuple[Path, Path]:
    """Random DINO-like ViT and CLIP saved as safetensors with their processors and tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    dino_dir, clip_dir = root / "dino", root / "clip"
    vit = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
    )
    ViTModel(vit, add_pooling_layer=False).save_pretrained(dino_dir, safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(dino_dir)

    clip_dir.mkdir(parents=True)
    vocab = _clip_vocab()
    (clip_dir / "vocab.json").write_text(json.dumps(vocab))
    (clip_dir / "merges.txt").write_text("#version: 0.2\n")
    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        eos_token_id=eos,
        bos_token_id=bos,
        pad_token_id=eos,
    )
    vision = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(
        clip_dir, safe_serialization=True
    )
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        clip_dir
    )
    return dino_dir, clip_dir


@pytest.fixture(scope="module")
def tiny_metrics(tmp_path_factory: pytest.TempPathFactory) -> Metrics:
    dino_dir, clip_dir = build_tiny_metric_models(tmp_path_factory.mktemp("metric_models"))
    return Metrics(
        MetricsConfig(dino_model=str(dino_dir), clip_model=str(clip_dir), device="cpu", batch_size=2)
    )


def _noise(seed: int, size: int = 40) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy())


def test_tiny_models_score_images(tiny_metrics: Metrics, tmp_path: Path) -> None:
    m = tiny_metrics
    assert m.describe()["metrics_device"] == "cpu"
    refs = []
    for i in range(3):
        refs.append(tmp_path / f"ref{i}.png")
        _noise(i).save(refs[-1])
    generated = [_noise(0), _noise(7), _noise(8)]
    prompts = ["a dog in the jungle", "a dog and a can on the beach", "a red cat"]
    references = [[[refs[0]]], [[refs[0], refs[1]], [refs[2]]], [[refs[2]]]]
    scores = m.score(generated, prompts, references)
    assert len(scores) == 3
    # identical image (PNG round trip is lossless) -> cosine 1
    assert scores[0].dino == pytest.approx(1.0, abs=1e-5) and scores[0].clip_i == pytest.approx(1.0, abs=1e-5)
    # the multi-subject image: flat mean over the three references, per-subject means kept
    d_gen = m.dino_features([generated[1]])[0]
    d_refs = m.dino_features([Image.open(p) for p in refs])
    expected = float(cosine_matrix(d_gen[None], d_refs).mean())
    assert scores[1].dino == pytest.approx(expected, abs=1e-5)
    assert len(scores[1].dino_per_subject) == 2 and len(scores[1].clip_i_per_subject) == 2
    # CLIP-T is 100 x image-text cosine
    img, txt = m.clip_image_features([generated[2]]), m.clip_text_features([prompts[2]])
    assert scores[2].clip_t == pytest.approx(100 * cosine(img[0], txt[0]), abs=1e-3)
    assert all(-100 <= s.clip_t <= 100 for s in scores)
    assert m.dino_features(generated).shape == (3, 32) and img.shape == (1, 16)


def test_pickle_only_folder_is_refused(tmp_path: Path) -> None:
    from transformers import ViTConfig

    ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37
    ).save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(MusarError, match="cannot load the DINO model"):
        Metrics(MetricsConfig(dino_model=str(tmp_path), clip_model=str(tmp_path), device="cpu"))
