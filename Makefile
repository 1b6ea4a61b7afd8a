# `make test` and `make demo` work on a fresh clone: both create .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On the project's build machines this takes a CPU wheel from the local disk; real users may
# install any torch in the range pyproject.toml allows before running make.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv test min-versions demo lint clean gpu-wheels gpu-check-dry

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,train,ui,quant]"
	touch $(STAMP)

venv: $(STAMP)

# One pytest worker per core, at most 4 (pytest-xdist): most tests run one CPU thread each, so two
# workers on CI's 2 cores take the suite from ~9 to ~5.5 minutes. Tests never share a folder or port.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n auto --maxprocesses 4

# Every dependency at its floor from pyproject.toml, in a throwaway venv (.venv-min/, reused while
# the pins are unchanged) that borrows this venv's torch: imports, tiny + toy generation, a stacked
# LoRA. Needs PyPI; ~1.5-3.5 min on 2 cores when the venv is (re)built, ~15 s when reused.
min-versions: $(STAMP)
	$(PY) .ci/min_versions.py

# The toy preset ships trained weights (a miniature world, docs/toy.md): a real two-subject
# composition on CPU with routing maps and the exact analyser's verdict. Then the random-weight
# tiny preset on the two example photos, writing image + sidecar + routing maps.
demo: $(STAMP)
	$(VENV)/bin/musar toy demo --out outputs/toy_demo
	$(VENV)/bin/musar generate --preset tiny \
		--prompt "a photo of a corgi and a red backpack on a beach" \
		--subject examples/dog.jpg "a corgi" \
		--subject examples/backpack.jpg "a red backpack" \
		--steps 4 --height 256 --width 256 --seed 0 \
		--out outputs/demo.png --routing-maps outputs/demo_routing

# The GPU suite (bench/README.md): the wheels a bare GPU machine lacks, into .whl/ (git-ignored,
# carried by the device run), and the suite's dry run at tiny sizes on this CPU.
gpu-wheels:
	bash bench/fetch_gpu_wheels.sh

gpu-check-dry: $(STAMP)
	PYTHON=$(PY) bash bench/gpu_check.sh outputs/gpu-check-dry --dry-run

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .venv-min outputs .pytest_cache
