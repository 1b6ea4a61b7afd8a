"""Dataset ids and defaults (no imports), shared by the readers, the training config and the CLI."""

SUBJECTS200K_HUB_ID = "Yuanshi/Subjects200K"
MUSAR_GEN_HUB_ID = "guozinan/MUSAR-Gen"
DEFAULT_PADDING = 8  # px around each 512x512 view in a Subjects200K pair image (1056x528)
DEFAULT_QUALITY_THRESHOLD = 5  # the paper keeps rows whose three quality scores are all 5
