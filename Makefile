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
	$(VENV)/bin/ssmforge generate --random-init configs/quickstart.yaml \
		--prompt "The state space model" --max-new-tokens 64 --temperature 0.8 --top-k 40

test: $(INSTALLED)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
