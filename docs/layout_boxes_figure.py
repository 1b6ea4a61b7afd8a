"""Draw docs/layout_boxes.png: the toy preset's demo pair without and with layout boxes.

    PYTHONPATH=src python docs/layout_boxes_figure.py   # ~10 s on a CPU, shipped toy weights

Generation uses the toy's own settings (``musar.toy.cases.GEN_DEFAULTS``: 16 steps, 64x64,
8 phrase tokens, 64 prompt tokens) and seed 0. Each overlay colours every token by the route it
took most often at the last step (red: "diamond", green: "another diamond") and outlines the boxes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from musar.pipelines.presets import load_pipeline
from musar.pipelines.routing_maps import route_overlay
from musar.toy.cases import GEN_DEFAULTS
from musar.toy.demo import demo_case

ROOT = Path(__file__).resolve().parents[1]
BOXES = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
SIDE = 256  # 64 px images shown 4x, nearest neighbour


def main(out: Path = ROOT / "docs" / "layout_boxes.png") -> None:
    case = demo_case()
    refs = [Image.open(ROOT / "examples" / "toy" / f"ref_{x}.png").convert("RGB") for x in "ab"]
    pipe = load_pipeline(preset="toy", device="cpu")
    tiles: list[tuple[str, Image.Image]] = [(f"reference: {p}", r) for p, r in zip(case.phrases, refs)]
    for name, boxes in (("S* alone", None), ("boxes", BOXES)):
        result = pipe(
            case.prompt, list(zip(refs, case.phrases)), height=64, width=64, boxes=boxes, return_routing=True,
            generator=torch.Generator().manual_seed(0), progress=False, **GEN_DEFAULTS,  # type: ignore[arg-type]
        )
        rec = result.routing
        big = result.images[0].resize((SIDE, SIDE), Image.Resampling.NEAREST)
        share = rec.route_share()["subjects"]
        overlay = route_overlay(big, rec.routes(rec.steps[-1])[0], result.grid, boxes=boxes, num_conditions=2)
        tiles += [(f"{name}: image", big),
                  (f"{name}: routes {share[0][-1]:.0%} / {share[1][-1]:.0%}", overlay)]
    sheet = Image.new("RGB", (len(tiles) * (SIDE + 8), SIDE + 22), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (label, tile) in enumerate(tiles):
        sheet.paste(tile.resize((SIDE, SIDE), Image.Resampling.NEAREST), (i * (SIDE + 8), 20))
        draw.text((i * (SIDE + 8) + 2, 4), label, fill=(0, 0, 0))
    sheet.save(out)
    print(f"wrote {out}  prompt: {case.prompt!r}", file=sys.stderr)


if __name__ == "__main__":
    main()
