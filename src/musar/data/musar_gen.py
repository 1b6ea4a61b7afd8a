"""MUSAR-Gen reader: rows of two condition images, their subject phrases, a target and a prompt.

``guozinan/MUSAR-Gen`` (or a local parquet in the same schema, see :mod:`musar.data.schema`) holds
ready multi-subject examples: ``cond_img_0``/``cond_img_1`` are the references, ``cond_prompt_0``/
``cond_prompt_1`` their subject phrases, ``tgt_img`` the target showing both, ``prompt`` its text.
They become c = 2 :class:`~musar.data.samples.Sample` s, used alone or mixed into curriculum stages
2 and 3 (``CurriculumConfig.musar_gen_ratio``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import datasets
import numpy as np

from musar.data.defaults import MUSAR_GEN_HUB_ID
from musar.data.samples import Sample
from musar.data.schema import (
    MUSAR_GEN_IMAGE_COLUMNS,
    MUSAR_GEN_REQUIRED,
    MUSAR_GEN_TEXT_COLUMNS,
    column_table,
    load_source,
)
from musar.data.subjects200k import corrupt_line, decode_image, report_bad_rows
from musar.errors import MusarError


@dataclass
class MusarGenReport:
    """Row counts of a MUSAR-Gen source; ``corrupt_images`` grows as rows are decoded."""

    source: str = ""
    total: int = 0
    kept: int = 0
    missing_fields: list[int] = field(default_factory=list)
    corrupt_images: list[int] = field(default_factory=list)
    images_checked: bool = False  # every kept row decoded (``--check-images``)

    def lines(self) -> list[str]:
        return [
            f"source: {self.source}",
            f"rows: {self.total}",
            f"kept: {self.kept}",
            f"missing fields: {len(self.missing_fields)}",
            corrupt_line(self.corrupt_images, self.images_checked),
        ]


class MusarGen:
    """Random-access MUSAR-Gen source; rows with missing fields are dropped (and reported) up front."""

    def __init__(self, table: datasets.Dataset, *, name: str = "MUSAR-Gen", max_tries: int = 64) -> None:
        self.table = table
        self.max_tries = max_tries
        self.report = MusarGenReport(source=name, total=len(table))
        # Null checks on the image columns read only validity bitmaps, never the image bytes.
        images = column_table(table, MUSAR_GEN_IMAGE_COLUMNS)
        image_null = [images.column(c).is_null().to_pylist() for c in MUSAR_GEN_IMAGE_COLUMNS]
        texts = column_table(table, MUSAR_GEN_TEXT_COLUMNS).to_pylist()
        self.kept: list[int] = []
        for idx, row in enumerate(texts):
            if any(nulls[idx] for nulls in image_null) or any(not row[c] for c in MUSAR_GEN_TEXT_COLUMNS):
                self.report.missing_fields.append(idx)
            else:
                self.kept.append(idx)
        self.report.kept = len(self.kept)
        report_bad_rows(name, "missing fields", self.report.missing_fields)
        self._bad: set[int] = set()
        if not self.kept:
            raise MusarError(f"{name}: no usable rows")

    @classmethod
    def open(
        cls,
        source: str = MUSAR_GEN_HUB_ID,
        *,
        limit: int | None = None,
        split: str = "train",
        cache_dir: str | None = None,
    ) -> MusarGen:
        """Open a hub id or a local parquet file/folder; ``limit`` streams only the first rows."""
        table = load_source(
            source, MUSAR_GEN_REQUIRED, MUSAR_GEN_IMAGE_COLUMNS, split=split, cache_dir=cache_dir, limit=limit
        )
        return cls(table, name=source)

    def __len__(self) -> int:
        return len(self.kept)

    def sample(self, k: int) -> Sample | None:
        """Kept row ``k`` as a c = 2 sample; None (reported once) if an image does not decode."""
        idx = self.kept[k]
        if idx in self._bad:
            return None
        try:
            row = self.table[idx]
            refs = [decode_image(row[c]).convert("RGB") for c in MUSAR_GEN_IMAGE_COLUMNS[:2]]
            target = decode_image(row["tgt_img"]).convert("RGB")
        except Exception:  # any decoder failure is bad data, never a crash mid-epoch
            self._bad.add(idx)
            self.report.corrupt_images.append(idx)
            report_bad_rows(self.report.source, "an undecodable image", [idx])
            return None
        return Sample(
            prompt=row["prompt"].strip(),
            target=target,
            references=refs,
            phrases=[row["cond_prompt_0"].strip(), row["cond_prompt_1"].strip()],
            meta={"kind": "musar_gen", "row_id": idx},
        )

    def draw(self, rng: np.random.Generator) -> Sample:
        """A random usable row (corrupt ones are redrawn from the same rng)."""
        for _ in range(self.max_tries):
            sample = self.sample(int(rng.integers(len(self))))
            if sample is not None:
                return sample
        raise MusarError(f"{self.report.source}: {self.max_tries} unusable rows in a row")

    def iter_samples(self) -> Iterator[Sample]:
        """All usable rows in order, corrupt ones skipped."""
        for k in range(len(self)):
            sample = self.sample(k)
            if sample is not None:
                yield sample
