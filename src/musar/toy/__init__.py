"""MUSAR in miniature: a procedural world whose images can be read back exactly (issue 8).

:mod:`musar.toy.world` renders subjects, scenes, captions and Subjects200K-style pairs;
:mod:`musar.toy.analyser` reads any image of that world back and scores generations;
:mod:`musar.toy.codec` / :mod:`musar.toy.model` build the tiny FLUX base, :mod:`musar.toy.pretrain`
trains it, :mod:`musar.toy.variants` trains the Fig. 8 ablations with ``musar train``,
:mod:`musar.toy.report` scores them on held-out cases (:mod:`musar.toy.cases`) and
:mod:`musar.toy.demo` runs the shipped weights. ``musar toy --help`` drives it all; see docs/toy.md.
"""

from musar.toy.analyser import Analysis, DetectedObject, Verdict, analyse, evaluate, summarize
from musar.toy.world import (
    Identity,
    Placement,
    Scene,
    caption,
    identity_split,
    make_multi_scenes,
    make_pairs,
    render_scene,
    sample_identity,
    sample_scene,
    subject_phrase,
    write_pairs_parquet,
)

__all__ = [
    "Analysis",
    "DetectedObject",
    "Identity",
    "Placement",
    "Scene",
    "Verdict",
    "analyse",
    "caption",
    "evaluate",
    "identity_split",
    "make_multi_scenes",
    "make_pairs",
    "render_scene",
    "sample_identity",
    "sample_scene",
    "subject_phrase",
    "summarize",
    "write_pairs_parquet",
]
