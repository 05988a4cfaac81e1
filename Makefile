# Two entry points: `make quickstart` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install quickstart test clean

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
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
