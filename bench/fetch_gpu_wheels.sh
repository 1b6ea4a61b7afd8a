#!/usr/bin/env bash
# Wheels the GPU machine lacks, into .whl/ (git-ignored), for bench/gpu_check.sh to install there.
#
# That machine (Python 3.12, x86-64, CUDA 13) has PyTorch, transformers, accelerate and peft but no
# diffusers and no network. The versions are the ones this repository is tested with. bitsandbytes
# ships one library per CUDA version (43 MB); only the CUDA 13 and CPU ones are kept, so that the
# working tree plus .whl stays well under the 64 MiB a device run carries.
#
#   bash bench/fetch_gpu_wheels.sh            # or: make gpu-wheels
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
WHEELS=(
    diffusers==0.42.1
    torchao==0.18.0
    gguf==0.19.0
    bitsandbytes==0.50.2
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
)
BNB_KEEP=${BNB_KEEP:-'libbitsandbytes_(cpu|cuda13[0-9])\.so'}
rm -rf .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${WHEELS[@]}"
"$PY" - "$BNB_KEEP" .whl/bitsandbytes-*.whl <<'PYEOF'
"""Drop the CUDA libraries of other CUDA versions from the bitsandbytes wheel (and its RECORD)."""
import re
import sys
import zipfile
from pathlib import Path

keep = re.compile(sys.argv[1])
for wheel in map(Path, sys.argv[2:]):
    def dropped(name: str) -> bool:
        return "libbitsandbytes_" in name and name.endswith(".so") and not keep.search(name)

    tmp = wheel.with_name(wheel.name + ".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if dropped(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = [line for line in data.decode().splitlines() if not dropped(line.split(",")[0])]
                data = ("\n".join(lines) + "\n").encode()
            dst.writestr(item, data)
    tmp.replace(wheel)
PYEOF
du -ch .whl/*.whl | tail -1
echo "fetch_gpu_wheels: carry .whl with the run (run(..., carry=['.whl']))"
