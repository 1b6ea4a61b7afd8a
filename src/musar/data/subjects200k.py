"""Subjects200K reader: hub id or local parquet, schema check, quality filter, view splitting.

Each row's ``image`` holds two views of one subject side by side. Geometry (OminiControl's
published layout, ``padding`` p and view size S = height - 2p)::

    x: [0, p) pad | [p, p+S) view 0 | [p+S, S+2p) pad | [S+2p, S+3p) pad | [S+2p, 2S+2p) view 1 | pad
    y: [0, p) pad | [p, p+S) both views | [p+S, S+2p) pad

i.e. each view sits centred in its own (S+2p)-square tile, so width = 2S + 4p and height = S + 2p.
For the released 1056x528 images with p = 8: S = 512, view 0 is x in [8, 520), view 1 is x in
[536, 1048), both y in [8, 520) (16 px of padding between the views, 8 px on the outer edges).

Metadata (scores, descriptions) is read once for the whole source, without decoding images, to
filter rows and build the category index; images are decoded lazily, and a row whose image does not
decode is skipped, counted and reported instead of crashing a training epoch.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
from PIL import Image

from musar.data.defaults import DEFAULT_PADDING, DEFAULT_QUALITY_THRESHOLD
from musar.data.schema import DESCRIPTION_KEYS, QUALITY_KEYS, SUBJECTS200K_REQUIRED, column_table, load_source
from musar.errors import MusarError

_META_COLUMNS = ("collection", "quality_assessment", "description")


class BadRowWarning(UserWarning):
    """Rows were skipped because they are broken (missing fields, undecodable image)."""


class ViewLayoutError(ValueError):
    """An image that is not two square views with the given padding."""


def report_bad_rows(source: str, what: str, row_ids: Sequence[int], limit: int = 20) -> None:
    """Warn once about skipped rows, naming their ids (the first ``limit`` of them)."""
    if not row_ids:
        return
    shown = ", ".join(str(i) for i in row_ids[:limit]) + (", ..." if len(row_ids) > limit else "")
    # warnings (not logging) so each distinct message shows once and tests can assert on it;
    # training can route them into its log with logging.captureWarnings(True).
    warnings.warn(
        f"{source}: skipped {len(row_ids)} row(s) with {what} (row ids: {shown})", BadRowWarning, stacklevel=3
    )


def auto_padding(height: int) -> int:
    """The published padding scaled to the image: 8 px at Subjects200K's 528 px height, at least 1
    (the toy world's 66 px pairs: 1). Width and height alone cannot tell the padding (width is
    always twice the height), so a fixed 8 px would silently crop smaller pairs."""
    return max(1, round(8 * height / 528))


def view_boxes(width: int, height: int, padding: int | None = DEFAULT_PADDING) -> tuple[tuple[int, ...], ...]:
    """PIL crop boxes ``(left, top, right, bottom)`` of the two views; see the module docstring.
    ``padding=None``: :func:`auto_padding`."""
    padding = auto_padding(height) if padding is None else padding
    size = height - 2 * padding
    if padding < 0 or size <= 0 or width != 2 * size + 4 * padding:
        raise ViewLayoutError(
            f"image {width}x{height} is not two square views with {padding} px padding "
            f"(expected width 2*(height-2p)+4p = {2 * size + 4 * padding})"
        )
    left = (padding, padding, padding + size, padding + size)
    right = (size + 3 * padding, padding, 2 * size + 3 * padding, padding + size)
    return left, right


def split_views(image: Image.Image, padding: int | None = DEFAULT_PADDING) -> tuple[Image.Image, Image.Image]:
    """Cut a Subjects200K pair image into its two RGB views (pixel-exact, no resampling)."""
    left, right = view_boxes(image.width, image.height, padding)
    rgb = image.convert("RGB")
    return rgb.crop(left), rgb.crop(right)


def decode_image(value: Any) -> Image.Image:
    """Decode a parquet image struct (``{"bytes", "path"}``) or bytes; raises on corrupt data."""
    if isinstance(value, Image.Image):
        return value
    data = value.get("bytes") if isinstance(value, dict) else value
    if data is None and isinstance(value, dict) and value.get("path"):
        with open(value["path"], "rb") as f:
            data = f.read()
    if not data:
        raise ValueError("no image data")
    img = Image.open(io.BytesIO(data))
    img.load()  # force the full decode here so truncated files fail now, not mid-transform
    return img


@dataclass(frozen=True)
class SubjectPair:
    """One Subjects200K row after decoding: two views of one subject and their descriptions."""

    row_id: int
    item: str
    category: str
    descriptions: tuple[str, str]
    views: tuple[Image.Image, Image.Image]
    collection: str = ""
    quality: dict[str, int] = field(default_factory=dict)


def corrupt_line(corrupt: list[int], checked: bool) -> str:
    """The report's corrupt-image line: a count is claimed only once every image was decoded."""
    if checked:
        return f"corrupt images: {len(corrupt)}"
    return f"corrupt images: not checked ({len(corrupt)} seen so far; --check-images decodes every image)"


@dataclass
class FilterReport:
    """What the filter did to a source; ``corrupt_images`` grows as images are decoded."""

    source: str = ""
    total: int = 0
    kept: int = 0
    low_quality: int = 0
    other_collection: int = 0
    missing_fields: list[int] = field(default_factory=list)
    corrupt_images: list[int] = field(default_factory=list)
    per_category: Counter[str] = field(default_factory=Counter)
    images_checked: bool = False  # every kept image decoded (``--check-images``): the count is complete

    def lines(self) -> list[str]:
        out = [
            f"source: {self.source}",
            f"rows: {self.total}",
            f"kept: {self.kept}",
            f"low quality: {self.low_quality}",
            f"other collection: {self.other_collection}",
            f"missing fields: {len(self.missing_fields)}",
            corrupt_line(self.corrupt_images, self.images_checked),
            f"categories: {len(self.per_category)}",
        ]
        out += [
            f"  {cat}: {n}" for cat, n in sorted(self.per_category.items(), key=lambda kv: (-kv[1], kv[0]))
        ]
        return out


def row_problem(row: dict[str, Any], threshold: int, collections: Sequence[str] | None) -> str | None:
    """Why a row's metadata is rejected: ``"missing"``, ``"quality"``, ``"collection"`` or None."""
    quality, desc = row.get("quality_assessment"), row.get("description")
    if not isinstance(quality, dict) or not isinstance(desc, dict):
        return "missing"
    if any(quality.get(k) is None for k in QUALITY_KEYS) or any(not desc.get(k) for k in DESCRIPTION_KEYS):
        return "missing"
    if collections is not None and row.get("collection") not in collections:
        return "collection"
    if any(int(quality[k]) < threshold for k in QUALITY_KEYS):
        return "quality"
    return None


class Subjects200K:
    """Random-access, filtered Subjects200K source with a category index built once.

    ``kept`` positions ``k`` in ``range(len(self))`` address the rows that passed the filter;
    :meth:`pair` decodes one (or returns None for a corrupt image, which is then reported).
    """

    def __init__(
        self,
        table: datasets.Dataset,
        *,
        name: str = "Subjects200K",
        quality_threshold: int = DEFAULT_QUALITY_THRESHOLD,
        padding: int | None = DEFAULT_PADDING,
        collections: Sequence[str] | None = None,
    ) -> None:
        self.table = table
        self.padding = padding
        self.quality_threshold = quality_threshold
        self.report = FilterReport(source=name, total=len(table))
        self.kept: list[int] = []
        self._meta: list[tuple[str, str]] = []  # (item, category) per kept position
        self._bad: set[int] = set()
        metas = column_table(table, _META_COLUMNS).to_pylist()
        for idx, row in enumerate(metas):
            problem = row_problem(row, quality_threshold, collections)
            if problem == "missing":
                self.report.missing_fields.append(idx)
            elif problem == "quality":
                self.report.low_quality += 1
            elif problem == "collection":
                self.report.other_collection += 1
            else:
                desc = row["description"]
                self.kept.append(idx)
                self._meta.append((desc["item"], desc["category"]))
                self.report.per_category[_category_key(desc["category"])] += 1
        self.report.kept = len(self.kept)
        report_bad_rows(name, "missing fields", self.report.missing_fields)
        self.categories: dict[str, list[int]] = {}
        for k, (_, cat) in enumerate(self._meta):
            self.categories.setdefault(_category_key(cat), []).append(k)
        if not self.kept:
            raise MusarError(f"{name}: no rows left after the quality filter (threshold {quality_threshold})")

    @classmethod
    def open(
        cls,
        source: str,
        *,
        quality_threshold: int = DEFAULT_QUALITY_THRESHOLD,
        padding: int | None = DEFAULT_PADDING,
        collections: Sequence[str] | None = None,
        limit: int | None = None,
        split: str = "train",
        cache_dir: str | None = None,
    ) -> Subjects200K:
        """Open a hub id (default ``Yuanshi/Subjects200K``) or a local parquet file/folder.

        With ``limit`` only the first ``limit`` rows are read, by streaming, so a preview of a hub
        dataset does not download all of it.
        """
        table = load_source(
            source, SUBJECTS200K_REQUIRED, ("image",), split=split, cache_dir=cache_dir, limit=limit
        )
        return cls(
            table,
            name=source,
            quality_threshold=quality_threshold,
            padding=padding,
            collections=collections,
        )

    def __len__(self) -> int:
        return len(self.kept)

    def row_id(self, k: int) -> int:
        """The row's index in the source (in file order for a folder of shards)."""
        return self.kept[k]

    def item(self, k: int) -> str:
        return self._meta[k][0]

    def category(self, k: int) -> str:
        return self._meta[k][1]

    def same_category(self, k1: int, k2: int) -> bool:
        return _category_key(self.category(k1)) == _category_key(self.category(k2))

    def category_members(self, k: int) -> list[int]:
        """Kept positions sharing ``k``'s category (``k`` included)."""
        return self.categories[_category_key(self.category(k))]

    def pair(self, k: int) -> SubjectPair | None:
        """Decode kept row ``k``; None (reported once) if its image is corrupt or mis-shaped."""
        idx = self.kept[k]
        if idx in self._bad:
            return None
        try:
            row = self.table[idx]  # inside the try: a table with decoding on fails right here
            views = split_views(decode_image(row["image"]), self.padding)
        except Exception as e:  # any decoder failure is bad data, never a crash mid-epoch
            self._bad.add(idx)
            self.report.corrupt_images.append(idx)
            why = f"a mis-shaped image ({e})" if isinstance(e, ViewLayoutError) else "an undecodable image"
            report_bad_rows(self.report.source, why, [idx])
            return None
        desc, quality = row["description"], row["quality_assessment"]
        return SubjectPair(
            row_id=idx,
            item=desc["item"],
            category=desc["category"],
            descriptions=(desc["description_0"], desc["description_1"]),
            views=views,
            collection=row.get("collection") or "",
            quality={k: int(quality[k]) for k in QUALITY_KEYS},
        )

    def iter_pairs(self, positions: Iterable[int] | None = None) -> Iterator[SubjectPair]:
        """Decoded pairs in order, corrupt ones skipped."""
        for k in range(len(self)) if positions is None else positions:
            pair = self.pair(k)
            if pair is not None:
                yield pair

    def check_images(self, progress: bool = True) -> FilterReport:
        """Decode every kept image once so the report counts corrupt ones (slow on the full set)."""
        from tqdm.auto import tqdm

        for k in tqdm(range(len(self)), desc="checking images", disable=not progress, leave=False):
            self.pair(k)
        return self.report


def _category_key(category: str) -> str:
    # Categories come from an LLM captioner; casing/whitespace differences are the same category.
    return " ".join(category.lower().split())
