"""Evaluation harness: DreamBench protocols, DINO / CLIP-I / CLIP-T metrics, resumable runner and
Table-1 style reports (docs/design.md sec. 8).

Names are imported lazily so that registering the ``musar eval`` command does not import torch.
"""

from __future__ import annotations

from musar.utils.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "Case": "musar.eval.protocols",
    "CaseSubject": "musar.eval.protocols",
    "PROTOCOLS": "musar.eval.protocols",
    "build_cases": "musar.eval.protocols",
    "ImageScores": "musar.eval.metrics",
    "Metrics": "musar.eval.metrics",
    "MetricsConfig": "musar.eval.metrics",
    "cosine": "musar.eval.metrics",
    "cosine_matrix": "musar.eval.metrics",
    "compare": "musar.eval.report",
    "EvalResult": "musar.eval.runner",
    "run_eval": "musar.eval.runner",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports("musar.eval", _EXPORTS)
