"""Validation grids: the current LoRA rendered on fixed prompts and subjects.

Generation goes through the training run's own :class:`~musar.pipelines.pipeline_musar.MusarPipeline`, whose
transformer *is* the model being trained, so the grid shows exactly the current LoRA without a
save/reload round trip. Each row is ``[reference 1, ..., reference c, generated image]``; the same
seed is used every time, so grids of successive steps are directly comparable. The grid PNG and a
JSON sidecar (prompts, step) are written atomically.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from musar.errors import MusarError
from musar.train.config import ValidationConfig
from musar.train.encoding import quiet_truncation
from musar.utils.images import open_rgb
from musar.utils.io import atomic_path, atomic_write_json


def check_validation(cfg: ValidationConfig) -> None:
    """Fail before training starts, not after hours, on a missing reference or an empty prompt."""
    if not cfg.prompts:
        raise MusarError("validate_every is set but validation.prompts is empty")
    for i, item in enumerate(cfg.prompts):
        if not item.prompt.strip() or not item.subjects:
            raise MusarError(f"validation.prompts[{i}] needs a prompt and at least one subject")
        for path, _ in item.subjects:
            if not Path(path).is_file():
                raise MusarError(f"validation.prompts[{i}]: reference image not found: {path}")


def _fit_height(image: Image.Image, height: int) -> Image.Image:
    width = max(1, round(image.width * height / image.height))
    return image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)




def make_grid(rows: list[list[Image.Image]], height: int, gap: int = 4) -> Image.Image:
    """Rows of images scaled to one height, left-aligned on a white canvas."""
    # Hand-written: each image keeps its own width (references of any aspect next to the output) and
    # rows differ in length; diffusers' make_image_grid tiles equal cells only, rows x cols exactly.
    scaled = [[_fit_height(im, height) for im in row] for row in rows]
    width = max(sum(im.width for im in row) + gap * (len(row) - 1) for row in scaled)
    canvas = Image.new("RGB", (width, len(scaled) * height + gap * (len(scaled) - 1)), (255, 255, 255))
    for r, row in enumerate(scaled):
        x = 0
        for im in row:
            canvas.paste(im, (x, r * (height + gap)))
            x += im.width + gap
    return canvas


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def render_validation(pipe: object, cfg: ValidationConfig, condition_size: int, device: torch.device) -> Image.Image:
    """Generate every validation prompt with the pipeline's current weights; return the grid."""
    rows = []
    transformer = pipe.transformer  # type: ignore[attr-defined]
    # fork_rng: generation must not move the global RNG streams that training relies on.
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), eval_mode(transformer), torch.no_grad(), quiet_truncation():
        for item in cfg.prompts:
            generator = torch.Generator(device=device).manual_seed(cfg.seed)
            out = pipe(  # type: ignore[operator]
                prompt=item.prompt,
                subjects=[(path, phrase) for path, phrase in item.subjects],
                height=cfg.height,
                width=cfg.width,
                num_inference_steps=cfg.steps,
                guidance_scale=cfg.guidance,
                generator=generator,
                condition_size=condition_size,
                progress=False,
            )
            refs = [open_rgb(path) for path, _ in item.subjects]
            rows.append([*refs, out.images[0]])
    return make_grid(rows, height=min(cfg.height, 512))


def write_grid(grid: Image.Image, directory: Path, step: int, cfg: ValidationConfig) -> Path:
    path = directory / f"step_{step:08d}.png"
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    atomic_write_json(path.with_suffix(".json"), {
        "step": step,
        "seed": cfg.seed,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "rows": [{"prompt": p.prompt, "subjects": [list(s) for s in p.subjects]} for p in cfg.prompts],
    })
    return path
