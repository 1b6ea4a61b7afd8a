"""Training data: Subjects200K, diptychs, the 3-stage curriculum, MUSAR-Gen (see DESIGN sec. 6).

Typical training use::

    source = Subjects200K.open("Yuanshi/Subjects200K")          # or a local parquet file/folder
    stream = CurriculumStream(source, CurriculumConfig(seed=0), batch_size=4,
                              rank=rank, world_size=world_size, start_step=step)
    for batch in make_loader(stream, transform=BatchTransform(), num_workers=4):
        ...  # batch.target (B,3,H,W), batch.references (B,c,3,h,w) in [-1, 1]
        stream.position = batch.next_position  # then stream.state_dict() is exact

The DreamBench reader lives in ``musar.data.dreambench``; nothing here imports it.
"""

from musar.data.batches import (
    Batch,
    BatchTransform,
    BucketBatcher,
    TensorSample,
    collate,
    make_loader,
    to_pil,
    to_tensor,
)
from musar.data.curriculum import CurriculumConfig, CurriculumStream, batch_kind, stage_for_step
from musar.data.musar_gen import MUSAR_GEN_HUB_ID, MusarGen
from musar.data.samples import (
    DIPTYCH_TEMPLATE,
    DiptychSampler,
    Sample,
    another_phrase,
    diptych_prompt,
    make_diptych,
    single_sample,
    single_samples,
)
from musar.data.schema import (
    MUSAR_GEN_FEATURES,
    SUBJECTS200K_FEATURES,
    load_source,
    write_musar_gen_parquet,
    write_subjects200k_parquet,
)
from musar.data.subjects200k import (
    SUBJECTS200K_HUB_ID,
    BadRowWarning,
    FilterReport,
    SubjectPair,
    Subjects200K,
    split_views,
    view_boxes,
)

__all__ = [
    "DIPTYCH_TEMPLATE",
    "MUSAR_GEN_FEATURES",
    "MUSAR_GEN_HUB_ID",
    "SUBJECTS200K_FEATURES",
    "SUBJECTS200K_HUB_ID",
    "BadRowWarning",
    "Batch",
    "BatchTransform",
    "BucketBatcher",
    "CurriculumConfig",
    "CurriculumStream",
    "DiptychSampler",
    "FilterReport",
    "MusarGen",
    "Sample",
    "SubjectPair",
    "Subjects200K",
    "TensorSample",
    "another_phrase",
    "batch_kind",
    "collate",
    "diptych_prompt",
    "load_source",
    "make_diptych",
    "make_loader",
    "single_sample",
    "single_samples",
    "split_views",
    "stage_for_step",
    "to_pil",
    "to_tensor",
    "view_boxes",
    "write_musar_gen_parquet",
    "write_subjects200k_parquet",
]
