"""One MUSAR training step vs a plain FLUX LoRA step vs concatenation (moved to
``musar.bench.train_step``, which the GPU suite runs; this path keeps working).

    python bench/train_step.py                              # on a GPU (needs ~40 GB)
    python bench/train_step.py --preset tiny --device cpu   # smoke test, seconds
"""

import sys

from musar.bench.train_step import main

if __name__ == "__main__":
    sys.exit(main())
