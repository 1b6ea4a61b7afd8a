"""Samples -> tensors in the VAE's range [-1, 1] -> batches of one condition count and target size.

The training loop gets :class:`Batch` objects and never stacks, pads or groups anything itself:
:func:`make_loader` wraps a :class:`~musar.data.curriculum.CurriculumStream` (whose batches are
already homogeneous) and :class:`BucketBatcher` groups any other sample stream by
``(num_conditions, target size)``.

Target size: the target is resized to height ``view_size`` and width ``view_size * n`` with
``n = max(1, round(width / height))`` views, so a 512x512 single target stays 512x512 and a
1024x512 diptych stays 1024x512 (each view keeps the same size); ``target_size`` overrides this.
References are resized to ``condition_size`` squared.

Images become tensors through diffusers' ``VaeImageProcessor`` with the settings
``FluxPipeline.image_processor`` uses (Lanczos resampling, [-1, 1]): the pixels a reference
becomes in training are the pixels it becomes at inference (one image path, no resampling skew).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from musar.data.samples import Sample

# FluxPipeline's processor, less its rounding of sizes to multiples of 16 (training sizes are
# multiples of 16 already; previews may not be).
_PROCESSOR = VaeImageProcessor(vae_scale_factor=1)


def to_tensor(image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """RGB image -> float tensor (3, H, W) in [-1, 1]; ``size`` is (width, height)."""
    image = image.convert("RGB")
    width, height = size if size is not None else image.size
    return _PROCESSOR.preprocess(image, height=height, width=width)[0].contiguous()


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """Inverse of :func:`to_tensor` (for previews and debugging)."""
    array = (
        tensor.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    )
    return Image.fromarray(array, "RGB")


@dataclass
class TensorSample:
    """A :class:`Sample` after :class:`BatchTransform`: images as [-1, 1] tensors."""

    target: torch.Tensor = field(metadata={"help": "(3, H, W) target in [-1, 1]."})
    references: torch.Tensor = field(metadata={"help": "(c, 3, h, w) references in [-1, 1]."})
    prompt: str = field(default="", metadata={"help": "Text prompt."})
    phrases: list[str] = field(default_factory=list, metadata={"help": "One subject phrase per reference."})
    meta: dict[str, Any] = field(default_factory=dict, metadata={"help": "Provenance, as in Sample."})

    @property
    def num_conditions(self) -> int:
        return int(self.references.shape[0])


@dataclass
class BatchTransform:
    """Resize and convert a :class:`Sample` to a :class:`TensorSample` (picklable, for workers)."""

    view_size: int = field(default=512, metadata={"help": "Target height and per-view width, in pixels."})
    condition_size: int = field(default=512, metadata={"help": "Side of the square reference images."})
    target_size: tuple[int, int] | None = field(
        default=None, metadata={"help": "Fixed (width, height) of every target; overrides view_size."}
    )

    def target_shape(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) the target is resized to."""
        if self.target_size is not None:
            return self.target_size
        views = max(1, round(image.width / image.height))
        return self.view_size * views, self.view_size

    def __call__(self, sample: Sample) -> TensorSample:
        if sample.target is None or not sample.references:
            raise ValueError("a training sample needs a target and at least one reference")
        size = (self.condition_size, self.condition_size)
        return TensorSample(
            target=to_tensor(sample.target, self.target_shape(sample.target)),
            references=torch.stack([to_tensor(r, size) for r in sample.references]),
            prompt=sample.prompt,
            phrases=list(sample.phrases),
            meta=sample.meta,
        )


@dataclass
class Batch:
    """What one training step consumes; every sample has ``num_conditions`` references."""

    target: torch.Tensor = field(metadata={"help": "(B, 3, H, W) targets in [-1, 1]."})
    references: torch.Tensor = field(metadata={"help": "(B, c, 3, h, w) references in [-1, 1]."})
    phrases: list[list[str]] = field(default_factory=list, metadata={"help": "B lists of c subject phrases."})
    prompts: list[str] = field(default_factory=list, metadata={"help": "B prompts."})
    num_conditions: int = field(default=1, metadata={"help": "c, the same for every sample."})
    meta: list[dict[str, Any]] = field(default_factory=list, metadata={"help": "Per-sample provenance."})

    def __len__(self) -> int:
        return int(self.target.shape[0])

    @property
    def next_position(self) -> int | None:
        """Stream position after this batch (for ``CurriculumStream.position``), if known."""
        idx = [m["batch_index"] for m in self.meta if "batch_index" in m]
        return max(idx) + 1 if idx else None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        return replace(
            self,
            target=self.target.to(device=device, dtype=dtype),
            references=self.references.to(device=device, dtype=dtype),
        )

    def pin_memory(self) -> Batch:  # DataLoader(pin_memory=True) calls this on custom batch types
        return replace(self, target=self.target.pin_memory(), references=self.references.pin_memory())


def collate(samples: Sequence[Sample | TensorSample], transform: BatchTransform | None = None) -> Batch:
    """Stack samples of one condition count and target size into a :class:`Batch`.

    PIL samples are converted with ``transform`` (default :class:`BatchTransform`).
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    transform = transform or BatchTransform()
    items = [s if isinstance(s, TensorSample) else transform(s) for s in samples]
    keys = {bucket_key(t) for t in items}
    if len(keys) > 1:
        raise ValueError(
            f"samples differ in (num_conditions, target shape): {sorted(keys)}; use BucketBatcher"
        )
    return Batch(
        target=torch.stack([t.target for t in items]),
        references=torch.stack([t.references for t in items]),
        phrases=[list(t.phrases) for t in items],
        prompts=[t.prompt for t in items],
        num_conditions=items[0].num_conditions,
        meta=[t.meta for t in items],
    )


def bucket_key(sample: TensorSample) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    return sample.num_conditions, tuple(sample.target.shape), tuple(sample.references.shape[1:])


class BucketBatcher:
    """Group a stream of samples into batches of equal ``(num_conditions, target size)``.

    A batch is emitted as soon as its bucket is full, so samples of a rare kind wait for their
    peers; at the end, partial buckets are emitted unless ``drop_last``.
    """

    def __init__(
        self,
        samples: Iterable[Sample | TensorSample],
        batch_size: int,
        *,
        transform: BatchTransform | None = None,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.samples = samples
        self.batch_size = batch_size
        self.transform = transform or BatchTransform()
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[Batch]:
        buckets: dict[tuple[Any, ...], list[TensorSample]] = {}
        for sample in self.samples:
            item = sample if isinstance(sample, TensorSample) else self.transform(sample)
            bucket = buckets.setdefault(bucket_key(item), [])
            bucket.append(item)
            if len(bucket) == self.batch_size:
                yield collate(bucket)
                bucket.clear()
        if not self.drop_last:
            for bucket in buckets.values():
                if bucket:
                    yield collate(bucket)


def make_loader(
    stream: Any,
    *,
    transform: Callable[[Sample], TensorSample] | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader of :class:`Batch` over a :class:`~musar.data.curriculum.CurriculumStream`.

    The transform runs in the workers; each loader batch is exactly one stream batch, in the same
    order for any ``num_workers``.
    """
    stream.transform = transform or BatchTransform()
    return torch.utils.data.DataLoader(
        stream,
        batch_size=stream.batch_size,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=False,
    )
