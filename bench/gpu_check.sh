#!/usr/bin/env bash
# The GPU suite in one command (bench/README.md, "GPU suite"):
#
#   bash bench/gpu_check.sh OUT [--dry-run] [--parts P ...] [--budget-s S]
#
# On a bare GPU machine (PyTorch, transformers, accelerate, peft; no diffusers, no network) it
# installs the wheels carried in .whl/ (made here by `make gpu-wheels`) and the project into
# /tmp/musar-site, then runs `python -m musar.bench.suite`: one JSON per part in OUT, plus
# summary.json and suite.log, within 8 minutes of this script's start. --dry-run runs the same
# parts at tiny sizes on the CPU with the Python at hand (no install).
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s.%N)
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
    echo "usage: bash bench/gpu_check.sh OUT [--dry-run] [--parts P ...] [--budget-s S]" >&2
    exit 2
fi
out=$1
shift
PY=${PYTHON:-python3}
dry=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry=1; done
mkdir -p "$out"
if [ "$dry" = 0 ]; then
    site=/tmp/musar-site
    if compgen -G ".whl/*.whl" >/dev/null; then
        # --no-deps: the machine's own torch, transformers, accelerate and peft stay as they are
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
            || { echo "gpu_check: installing the carried wheels failed" >&2; exit 3; }
    else
        echo "gpu_check: no .whl/ folder; run 'make gpu-wheels' on the build machine and carry .whl" >&2
    fi
    # The project itself (entry points included); src/ stays first on the path either way.
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$site" . \
        || echo "gpu_check: installing the project failed; running from src/ alone" >&2
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check: installed in $(awk "BEGIN {print $(date +%s.%N) - $started}") s" >&2
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m musar.bench.suite "$out" --started "$started" "$@"
