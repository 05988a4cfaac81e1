# Entry points: `make quickstart`, `make test` and, on a CUDA machine, `make gpu-check`. Each creates .venv and installs on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install quickstart test soak gpu-check clean

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(INSTALLED)

install: $(INSTALLED)

quickstart: $(INSTALLED)
	$(VENV)/bin/ssmforge run configs/quickstart.yaml
	$(VENV)/bin/ssmforge generate runs/quickstart/export --prompt "The" --max-new-tokens 120 --temperature 0.7

# the SLURM tests start (and stop) a cluster of their own in a temporary folder, never the machine's
test: $(INSTALLED)
	$(PY) -m pytest -q -n 2 --maxschedchunk 1 --durations=40

# the fault soak, a nightly target: 3,000 steps on 2 ranks killed and requeued at random, against an uninterrupted run
soak: $(INSTALLED)
	$(PY) -m pytest -q -s -m nightly tests/pretrain/test_soak.py

# on a CUDA machine, under 8 minutes: kernels against their oracles, bandwidth, the 130M/370M steps, a resume;
# writes benchmarks/results/gpu/ (without a GPU it says so and does nothing)
gpu-check: $(INSTALLED)
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) runs .pytest_cache
