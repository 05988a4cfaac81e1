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
	$(VENV)/bin/ssmforge pretrain configs/quickstart.yaml
	$(VENV)/bin/ssmforge export runs/quickstart runs/quickstart/export
	$(VENV)/bin/ssmforge generate runs/quickstart/export --prompt "The" --max-new-tokens 120 --temperature 0.7

test: $(INSTALLED)
	-bash slurm/start_local_cluster.sh
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
