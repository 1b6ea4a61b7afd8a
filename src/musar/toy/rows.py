"""The rows and columns of the toy's Fig. 8 table: what each row generates, and how to redo it.

Kept apart from :mod:`musar.toy.report` (which imports the model stack) so ``musar toy --help``
can list the rows without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    subjects: int  # subjects per case (references per image)
    variant: str | None  # whose LoRA; None: no LoRA
    command: str
    stage1: bool = False  # the variant's checkpoint at the end of curriculum stage 1
    routes_from: str = "routing"  # "layout": boxes around each subject's true tokens (upper bound)
    every_seed: bool = True  # score every trained seed of the variant (False: its first one, to save report time)


ROWS: tuple[Row, ...] = (
    Row("codec", "codec round trip of the prompted scene (ceiling)", 2, None, "musar toy pretrain"),
    Row("base", "base, brief prompt only (no references)", 2, None, "musar toy pretrain"),
    Row("full", "MUSAR (full)", 2, "full", "musar toy train --variant full"),
    Row("given_routes", "MUSAR, routes given from the true layout (boxes)", 2, "full", "musar toy train --variant full", routes_from="layout", every_seed=False),
    Row("no_dynamic", "w/o dynamic routing", 2, "no_dynamic", "musar toy train --variant no_dynamic"),
    Row("no_debias", "w/o debiasing (no static routing, shared LoRA)", 2, "no_debias", "musar toy train --variant no_debias"),
    Row("no_diptych", "w/o diptych data (stage 1 only)", 2, "no_diptych", "musar toy train --variant no_diptych"),
    Row("single_stage1", "one subject, MUSAR after stage 1", 1, "full", "musar toy train --variant full", stage1=True, every_seed=False),
    Row("single_full", "one subject, MUSAR (full)", 1, "full", "musar toy train --variant full"),
    Row("three", "three subjects, MUSAR (full, trained at c <= 2)", 3, "full", "musar toy train --variant full"),
    Row("three_no_dynamic", "three subjects, w/o dynamic routing", 3, "no_dynamic", "musar toy train --variant no_dynamic"),
    Row("four", "four subjects, MUSAR (full, trained at c <= 2)", 4, "full", "musar toy train --variant full"),
    Row("four_no_dynamic", "four subjects, w/o dynamic routing", 4, "no_dynamic", "musar toy train --variant no_dynamic"),
)
COLUMNS: tuple[tuple[str, str], ...] = (
    ("all_present", "all present"), ("all_present_strict", "all present, strict"), ("fidelity", "attribute fidelity"), ("entanglement", "entanglement"),
    ("entanglement_same", "entanglement, same shape"), ("routing_all", "routing accuracy"),
    ("routing_all_same", "routing, same shape"), ("background", "background"), ("region", "region"),
    ("artefact", "diptych artefacts"),
)
