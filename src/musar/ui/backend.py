"""The UI's engine: the pipeline loaded once, one generation at a time, results kept on disk.

Every result gets its own folder (copies of the references, the image, the routing maps and
``params.json``), so the "copy CLI command" points at files that outlive Gradio's upload cache
and reproduces the image exactly. No Gradio here: the tests drive it directly.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from PIL import Image

from musar.ui.logic import ModelSource, Record, Request, cli_command
from musar.utils.io import atomic_path, atomic_write_json, check_writable

NO_MAPS_NOTE = "No routing maps: dynamic routing only acts with 2+ subjects (or boxes) and dynamic routing on."


class Studio:
    """A loaded pipeline and the results generated since the app started."""

    def __init__(self, pipe: Any, source: ModelSource, out_dir: str | Path) -> None:
        self.pipe = pipe
        self.source = source
        self.out_dir = Path(out_dir)
        check_writable(self.out_dir / "params.json")  # fail at start-up, not after the first click
        self.records: list[Record] = []
        # Gradio's queue already serialises clicks; the lock also covers callers without a queue.
        self._lock = threading.Lock()

    def token_counts(self) -> dict[str, int]:
        """The phrase and prompt token counts ``musar generate`` uses for this model (the preset's
        own, else FLUX.1's), passed to the pipeline and printed in the command, so the two agree."""
        from musar.pipelines.presets import generation_defaults

        d = generation_defaults(self.source.preset)
        return {"phrase_tokens": int(d.phrase_tokens), "max_sequence_length": int(d.max_sequence_length)}  # type: ignore[arg-type]

    @property
    def token_px(self) -> int:
        """Pixels per side of one image token of the loaded model (16 for FLUX, 8 for the toy): the
        smallest box the pipeline accepts, so the form judges boxes as ``musar generate`` does."""
        from musar.pipelines.preload import ModelFacts

        return ModelFacts.of_pipeline(self.pipe, "the loaded model").token_px

    def _new_folder(self) -> Path:
        taken = [int(p.name) for p in self.out_dir.glob("[0-9]*") if p.name.isdigit()]
        n = max(taken, default=0) + 1
        while True:  # another app run may share the folder: never reuse a number
            folder = self.out_dir / f"{n:04d}"
            try:
                folder.mkdir(parents=True)
                return folder
            except FileExistsError:
                n += 1

    def generate(self, request: Request, status: Callable[[str], None] | None = None) -> Record:
        """Run ``request`` and record it; raises :class:`~musar.errors.MusarError` on bad input."""
        with self._lock:
            folder = self._new_folder()
            try:
                return self._generate(request, folder, status)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)  # no half-finished result folders
                raise

    def _generate(self, request: Request, folder: Path, status: Callable[[str], None] | None) -> Record:
        import torch

        from musar.pipelines.routing_maps import save_routing_maps

        refs = []
        for k, (image, phrase) in enumerate(request.subjects, 1):
            copy = folder / f"subject_{k}{Path(image).suffix.lower() or '.png'}"
            shutil.copyfile(image, copy)
            refs.append((str(copy), phrase))
        request = replace(request, subjects=tuple(refs))
        if status is not None:
            status("encoding the prompt and references")
        # A CPU generator, seeded as `musar generate` seeds it, so the CLI command gives the same noise.
        generator = torch.Generator(device="cpu").manual_seed(request.seed)
        tokens = self.token_counts()
        result = self.pipe(
            prompt=request.prompt,
            subjects=list(refs),
            height=request.height,
            width=request.width,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            generator=generator,
            condition_size=request.condition_size,
            condition_fit=request.condition_fit,
            dynamic_routing=request.dynamic_routing,
            attention=request.attention,
            boxes=None if request.boxes is None else list(request.boxes),
            outside_boxes=request.outside_boxes,
            return_routing=True,
            progress=True,
            **tokens,
        )
        image: Image.Image = result.images[0]
        image_path = folder / "image.png"
        with atomic_path(image_path) as tmp:
            image.save(tmp, format="PNG")
        grid_path, overlay_path = save_routing_maps(result, image, [p for _, p in refs], folder) or (None, None)
        command = cli_command(
            self.source, request, folder / "cli.png", folder / "cli_routing" if grid_path is not None else None,
            threads=torch.get_num_threads(), tokens=tokens,
        )
        record = Record(
            index=len(self.records) + 1,
            folder=str(folder),
            image=str(image_path),
            request=request,
            command=command,
            routing_grid=str(grid_path) if grid_path is not None else None,
            route_overlay=str(overlay_path) if overlay_path is not None else None,
            timings=dict(result.timings),
        )
        atomic_write_json(folder / "params.json", record.params() | {"source": asdict(self.source)})
        self.records.append(record)
        return record

    def gallery(self) -> list[tuple[str, str]]:
        """(image path, caption) of every result so far, newest first."""
        return [(r.image, r.caption()) for r in reversed(self.records)]

    def record(self, number: int) -> Record | None:
        """Result ``#number`` (1-based, as captions show it)."""
        return self.records[number - 1] if 1 <= number <= len(self.records) else None

    def record_at(self, gallery_index: int) -> Record | None:
        """The record behind the gallery's ``gallery_index``-th tile (the gallery is newest first)."""
        if not 0 <= gallery_index < len(self.records):
            return None
        return self.records[len(self.records) - 1 - gallery_index]
