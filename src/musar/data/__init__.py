"""Training data: Subjects200K, diptychs, the 3-stage curriculum, MUSAR-Gen (see docs/design.md sec. 6).

Typical training use::

    source = Subjects200K.open("Yuanshi/Subjects200K")          # or a local parquet file/folder
    stream = CurriculumStream(source, CurriculumConfig(), batch_size=4, seed=0,
                              rank=rank, world_size=world_size, start_step=step)
    for batch in make_loader(stream, transform=BatchTransform(), num_workers=4):
        ...  # batch.target (B,3,H,W), batch.references (B,c,3,h,w) in [-1, 1]
        stream.position = batch.next_position  # then stream.state_dict() is exact

The DreamBench reader lives in ``musar.data.dreambench``; nothing here imports it.
"""

from __future__ import annotations

from musar.utils.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "Batch": "musar.data.batches",
    "BatchTransform": "musar.data.batches",
    "BucketBatcher": "musar.data.batches",
    "TensorSample": "musar.data.batches",
    "collate": "musar.data.batches",
    "make_loader": "musar.data.batches",
    "to_pil": "musar.data.batches",
    "to_tensor": "musar.data.batches",
    "CurriculumConfig": "musar.data.curriculum_config",
    "CurriculumStream": "musar.data.curriculum",
    "batch_kind": "musar.data.curriculum",
    "stage_for_step": "musar.data.curriculum",
    "MUSAR_GEN_HUB_ID": "musar.data.musar_gen",
    "MusarGen": "musar.data.musar_gen",
    "DIPTYCH_TEMPLATE": "musar.data.samples",
    "DiptychSampler": "musar.data.samples",
    "Sample": "musar.data.samples",
    "another_phrase": "musar.data.samples",
    "diptych_prompt": "musar.data.samples",
    "make_diptych": "musar.data.samples",
    "single_sample": "musar.data.samples",
    "single_samples": "musar.data.samples",
    "MUSAR_GEN_FEATURES": "musar.data.schema",
    "SUBJECTS200K_FEATURES": "musar.data.schema",
    "load_source": "musar.data.schema",
    "write_musar_gen_parquet": "musar.data.schema",
    "write_subjects200k_parquet": "musar.data.schema",
    "SUBJECTS200K_HUB_ID": "musar.data.subjects200k",
    "BadRowWarning": "musar.data.subjects200k",
    "FilterReport": "musar.data.subjects200k",
    "SubjectPair": "musar.data.subjects200k",
    "Subjects200K": "musar.data.subjects200k",
    "split_views": "musar.data.subjects200k",
    "view_boxes": "musar.data.subjects200k",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports("musar.data", _EXPORTS)
