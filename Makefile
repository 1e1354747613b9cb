# Two commands set everything up on a fresh machine with only Python 3.10+:
#   make demo   - the main job: `prunax compare` on the embedded digits data
#   make test   - the whole test suite (what CI runs)
# Each creates .venv and installs the exact versions pinned in constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PACKAGES := -e ./core[compare] -e ./integrations/fedjax -e ./integrations/dopamine \
            -e ./integrations/t5x -e ./integrations/scenic
DEV := pytest pytest-xdist ruff hypothesis
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): constraints.txt core/pyproject.toml $(wildcard integrations/*/pyproject.toml)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==26.3"
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(BIN)/python -m pip install --quiet \
	  $(PACKAGES) $(DEV)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/prunax compare $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run $(ARGS)

clean:
	rm -rf $(VENV)
