"""DINO, CLIP-I and CLIP-T, the three numbers of the paper's Table 1.

* DINO: cosine similarity of the CLS token (after the final layer norm) of a self-supervised
  ViT-S/16 (``facebook/dino-vits16``) between a generated image and a real subject image.
* CLIP-I: cosine similarity of CLIP ViT-B/32 image embeddings (``openai/clip-vit-base-patch32``,
  the projected embedding) between a generated and a real image.
* CLIP-T: 100 x cosine similarity of the CLIP image embedding and the CLIP text embedding of the
  prompt (no clamping at 0, no 2.5 factor: the plain scaled cosine the paper reports).

Each image is preprocessed by the model's own image processor. For a case with several
subjects, DINO and CLIP-I average the cosine over every real image of every subject (a flat
mean over all references, docs/design.md sec. 8); per-subject means are reported next to them.

Models load with ``from_pretrained(..., use_safetensors=True)`` from a hub id or a local folder;
pickle checkpoints are refused and no remote code ever runs. A spec may pin a revision as
``ID@REVISION``. ``facebook/dino-vits16`` keeps its safetensors weights only on the hub's
``refs/pr/1`` (the conversion by Hugging Face's SFconvertbot of the same weights), so that
revision is used for it unless the spec names another (:data:`SAFETENSORS_REVISIONS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from musar.errors import MusarError

DEFAULT_DINO_MODEL = "facebook/dino-vits16"
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"

# Hub ids whose main branch has only pickle weights: the revision holding a safetensors copy.
SAFETENSORS_REVISIONS: dict[str, str] = {"facebook/dino-vits16": "refs/pr/1"}


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities of the rows of ``a`` [N, D] and ``b`` [M, D] -> [N, M]."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


def cosine(a: torch.Tensor | Sequence[float], b: torch.Tensor | Sequence[float]) -> float:
    """Cosine similarity of two vectors."""
    ta = torch.as_tensor(a, dtype=torch.float32).reshape(1, -1)
    tb = torch.as_tensor(b, dtype=torch.float32).reshape(1, -1)
    return float(cosine_matrix(ta, tb)[0, 0])


def mean_reference_similarity(
    generated: torch.Tensor, references: Sequence[torch.Tensor]
) -> tuple[float, tuple[float, ...]]:
    """(flat mean over all references of all subjects, per-subject means) for one image's features.

    ``generated`` is [D]; ``references`` holds one [R_k, D] tensor per subject.
    """
    per_ref = [cosine_matrix(generated.reshape(1, -1), r)[0] for r in references]
    flat = torch.cat(per_ref)
    return float(flat.mean()), tuple(float(r.mean()) for r in per_ref)


@dataclass(frozen=True)
class ImageScores:
    """Scores of one generated image."""

    dino: float = field(metadata={"help": "mean DINO cosine over all references"})
    clip_i: float = field(metadata={"help": "mean CLIP image cosine over all references"})
    clip_t: float = field(metadata={"help": "100 x CLIP image-text cosine"})
    dino_per_subject: tuple[float, ...] = field(default=(), metadata={"help": "mean DINO per subject"})
    clip_i_per_subject: tuple[float, ...] = field(default=(), metadata={"help": "mean CLIP-I per subject"})


class Scorer(Protocol):
    """What the runner needs from a metrics object (tests plug in fakes)."""

    def score(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        references: Sequence[Sequence[Sequence[Path]]],
    ) -> list[ImageScores]:
        """One ImageScores per image; ``references[i][k]`` are subject k's real images for image i."""
        ...

    def describe(self) -> dict[str, Any]:
        """Settings to record in summary.json."""
        ...


@dataclass
class MetricsConfig:
    """Which models score the images, and where."""

    dino_model: str = field(default=DEFAULT_DINO_MODEL, metadata={"help": "hub id[@rev] or local folder"})
    clip_model: str = field(default=DEFAULT_CLIP_MODEL, metadata={"help": "hub id[@rev] or local folder"})
    device: str | None = field(default=None, metadata={"help": "torch device; None = cuda when present"})
    batch_size: int = field(default=32, metadata={"help": "images or texts per forward pass"})


def resolve_model_spec(spec: str) -> tuple[str, str | None]:
    """``ID[@REVISION]`` or a local folder -> (id or path, revision or None)."""
    if Path(spec).expanduser().exists():
        return str(Path(spec).expanduser()), None
    model_id, sep, revision = spec.partition("@")
    if sep and not revision:
        raise MusarError(f"empty revision in model spec {spec!r}")
    return model_id, (revision if sep else SAFETENSORS_REVISIONS.get(model_id))


def _from_pretrained(loader: Any, spec: str, what: str, **kwargs: Any) -> Any:
    model_id, revision = resolve_model_spec(spec)
    try:
        return loader.from_pretrained(model_id, revision=revision, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MusarError(
            f"cannot load the {what} from {spec!r}: {reason} "
            "(give a hub id[@revision] with safetensors weights or a local folder)"
        ) from None


def load_image(path: str | Path) -> Image.Image:
    """An RGB image with its EXIF orientation applied, read by the one defensive image reader
    (regular file, pixel limit, malformed EXIF tolerated); unreadable files are a MusarError.
    Transparency is dropped as ``convert("RGB")`` drops it, as the metric models were scored."""
    from musar.utils.images import exif_transpose, open_image

    return exif_transpose(open_image(path)).convert("RGB")


class Metrics:
    """The real scorer: DINO and CLIP models loaded once; reference features cached by path."""

    def __init__(self, config: MetricsConfig | None = None) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, ViTModel

        self.config = config or MetricsConfig()
        if self.config.batch_size < 1:
            raise MusarError(f"metrics batch size must be at least 1, got {self.config.batch_size}")
        self.device = torch.device(self.config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        weights = {"use_safetensors": True}
        self.dino = _from_pretrained(
            ViTModel, self.config.dino_model, "DINO model", add_pooling_layer=False, **weights
        )
        self.dino_processor = _from_pretrained(
            AutoImageProcessor, self.config.dino_model, "DINO image processor"
        )
        self.clip = _from_pretrained(CLIPModel, self.config.clip_model, "CLIP model", **weights)
        self.clip_processor = _from_pretrained(
            AutoImageProcessor, self.config.clip_model, "CLIP image processor"
        )
        self.tokenizer = _from_pretrained(AutoTokenizer, self.config.clip_model, "CLIP tokenizer")
        self.dino.to(self.device).eval()
        self.clip.to(self.device).eval()
        self._ref_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def describe(self) -> dict[str, Any]:
        return {
            "dino_model": self.config.dino_model,
            "dino_revision": resolve_model_spec(self.config.dino_model)[1],
            "clip_model": self.config.clip_model,
            "clip_revision": resolve_model_spec(self.config.clip_model)[1],
            "metrics_device": str(self.device),
        }

    def _batches(self, items: Sequence[Any]) -> list[Sequence[Any]]:
        n = self.config.batch_size
        return [items[i : i + n] for i in range(0, len(items), n)]

    def _pixels(self, processor: Any, images: Sequence[Image.Image]) -> torch.Tensor:
        rgb = [im.convert("RGB") for im in images]
        return processor(images=rgb, return_tensors="pt")["pixel_values"].to(self.device)

    @torch.inference_mode()
    def dino_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[N, D] CLS features on the CPU (not normalised; the cosine helpers normalise)."""
        out = [
            self.dino(pixel_values=self._pixels(self.dino_processor, b)).last_hidden_state[:, 0]
            for b in self._batches(images)
        ]
        return torch.cat(out).float().cpu()

    @torch.inference_mode()
    def clip_image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        for b in self._batches(images):
            pooled = self.clip.vision_model(pixel_values=self._pixels(self.clip_processor, b)).pooler_output
            out.append(self.clip.visual_projection(pooled))
        return torch.cat(out).float().cpu()

    @torch.inference_mode()
    def clip_text_features(self, texts: Sequence[str]) -> torch.Tensor:
        max_len = min(
            int(self.tokenizer.model_max_length), int(self.clip.config.text_config.max_position_embeddings)
        )
        out = []
        for b in self._batches(list(texts)):
            tok = self.tokenizer(
                list(b), padding=True, truncation=True, max_length=max_len, return_tensors="pt"
            )
            pooled = self.clip.text_model(
                input_ids=tok["input_ids"].to(self.device),
                attention_mask=tok["attention_mask"].to(self.device),
            ).pooler_output
            out.append(self.clip.text_projection(pooled))
        return torch.cat(out).float().cpu()

    def reference_features(self, paths: Sequence[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        """(DINO [R, D], CLIP [R, D']) for real images, computed once per path per process."""
        keys = [str(Path(p).resolve()) for p in paths]
        missing = list(dict.fromkeys(k for k in keys if k not in self._ref_cache))
        if missing:
            images = [load_image(k) for k in missing]
            dino, clip = self.dino_features(images), self.clip_image_features(images)
            for i, k in enumerate(missing):
                self._ref_cache[k] = (dino[i], clip[i])
        return (
            torch.stack([self._ref_cache[k][0] for k in keys]),
            torch.stack([self._ref_cache[k][1] for k in keys]),
        )

    def score(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        references: Sequence[Sequence[Sequence[Path]]],
    ) -> list[ImageScores]:
        if not (len(images) == len(prompts) == len(references)):
            raise ValueError("images, prompts and references must have the same length")
        if not images:
            return []
        # Encode every not-yet-seen reference in full batches before the per-image loop.
        self.reference_features(
            list(dict.fromkeys(p for refs in references for subject in refs for p in subject))
        )
        dino, clip = self.dino_features(images), self.clip_image_features(images)
        text = self.clip_text_features(prompts)
        out = []
        for i, refs in enumerate(references):
            ref_feats = [self.reference_features(list(subject)) for subject in refs]
            d_mean, d_per = mean_reference_similarity(dino[i], [r[0] for r in ref_feats])
            c_mean, c_per = mean_reference_similarity(clip[i], [r[1] for r in ref_feats])
            clip_t = 100.0 * cosine(clip[i], text[i])
            out.append(ImageScores(d_mean, c_mean, clip_t, d_per, c_per))
        return out
