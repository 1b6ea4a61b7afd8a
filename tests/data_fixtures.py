"""Tiny Subjects200K / MUSAR-Gen parquet fixtures in exactly the published schemas.

Views are small (``VIEW`` px) so tests stay fast, but the layout is the published one: two square
views, each centred in its own tile with ``PAD`` px of padding (width 2*VIEW + 4*PAD).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from musar.data.schema import write_musar_gen_parquet, write_subjects200k_parquet

VIEW = 48
PAD = 8
PAD_COLOR = (255, 255, 255)

# (item, category) of the good rows; several per category so same-category pairing has choices.
SUBJECTS: list[tuple[str, str]] = [
    ("a corgi", "dog"),
    ("a beagle", "dog"),
    ("the poodle", "dog"),
    ("a red mug", "cup"),
    ("an espresso cup", "cup"),
    ("a teacup", "cup"),
    ("a cactus", "plant"),
    ("a fern", "plant"),
]
N_GOOD = len(SUBJECTS)
LOW_QUALITY_ROWS = (8, 9)  # one score below 5
CORRUPT_ROW = 10  # image bytes that do not decode
MISSING_FIELD_ROW = 11  # description.category is null
MISSING_STRUCT_ROW = 12  # quality_assessment is null
N_ROWS = 13


def view_color(row: int, view: int) -> tuple[int, int, int]:
    """Background ("scene") colour of a view; the view's corner pixels have exactly this colour."""
    return (20 * row % 250, 100 + 120 * view, (37 * row + 90 * view) % 250)


def subject_color(row: int) -> tuple[int, int, int]:
    return (250 - 25 * row % 250, 40, 60 + 20 * row)


def _draw_subject(draw: ImageDraw.ImageDraw, x0: int, y0: int, view: int, row: int, category: str) -> None:
    # The same subject (shape + colour) in both views, at a different place: a "new scene".
    s = view // 2
    ox, oy = x0 + view // 8 + (view // 4 if row % 2 else 0), y0 + view // 4
    box = (ox, oy, ox + s, oy + s)
    if category == "dog":
        draw.ellipse(box, fill=subject_color(row))
    elif category == "plant":
        draw.polygon([(ox + s // 2, oy), (ox, oy + s), (ox + s, oy + s)], fill=subject_color(row))
    else:
        draw.rectangle(box, fill=subject_color(row))


def pair_image(row: int, view: int = VIEW, pad: int = PAD, category: str = "cup") -> Image.Image:
    """A pair image in the published layout: two views, each in its own tile with ``pad`` px border."""
    img = Image.new("RGB", (2 * view + 4 * pad, view + 2 * pad), PAD_COLOR)
    draw = ImageDraw.Draw(img)
    for v, x0 in enumerate((pad, view + 3 * pad)):
        draw.rectangle((x0, pad, x0 + view - 1, pad + view - 1), fill=view_color(row, v))
        _draw_subject(draw, x0, pad, view, row + v, category)
    return img


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def quality(score: int = 5, low: str | None = None) -> dict[str, int]:
    q = {"compositeStructure": score, "objectConsistency": score, "imageQuality": score}
    if low:
        q[low] = 4
    return q


def subjects_records() -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for row, (item, cat) in enumerate(SUBJECTS):
        records.append(
            {
                "image": encoded(pair_image(row, category=cat)),
                "collection": "collection_2",
                "quality_assessment": quality(),
                "description": {
                    "item": item,
                    "category": cat,
                    "description_0": f"{item} on a beach",
                    "description_1": f"{item} in a kitchen",
                },
            }
        )
    desc = {"item": "a vase", "category": "vase", "description_0": "a vase", "description_1": "a vase"}
    for row, low in zip(LOW_QUALITY_ROWS, ("imageQuality", "objectConsistency")):
        records.append(
            {
                "image": encoded(pair_image(row)),
                "collection": "collection_2",
                "quality_assessment": quality(5, low),
                "description": desc,
            }
        )
    records.append(
        {
            "image": b"\x89PNG not really",
            "collection": "collection_2",
            "quality_assessment": quality(),
            "description": desc,
        }
    )
    records.append(
        {
            "image": encoded(pair_image(MISSING_FIELD_ROW)),
            "collection": "collection_2",
            "quality_assessment": quality(),
            "description": {**desc, "category": None},
        }
    )
    records.append(
        {"image": encoded(pair_image(MISSING_STRUCT_ROW)), "collection": "collection_2", "description": desc}
    )
    assert len(records) == N_ROWS
    return records


def write_subjects(path: Path) -> Path:
    return write_subjects200k_parquet(subjects_records(), path)


def write_musar_gen(path: Path, n: int = 3) -> Path:
    records = [
        {
            "cond_img_0": Image.new("RGB", (24, 24), (200, 10 * i, 0)),
            "cond_img_1": Image.new("RGB", (24, 24), (0, 10 * i, 200)),
            "tgt_img": Image.new("RGB", (48, 48), (100, 100, 10 * i)),
            "cond_prompt_0": "a corgi",
            "cond_prompt_1": "a red mug",
            "prompt": f"a corgi next to a red mug, scene {i}",
        }
        for i in range(n)
    ]
    records.append({**records[0], "tgt_img": b"corrupt"})  # row n: undecodable target
    records.append({**records[0], "cond_prompt_1": None})  # row n + 1: missing field
    return write_musar_gen_parquet(records, path)
