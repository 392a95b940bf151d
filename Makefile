# The README's two commands. Both create .venv if it is missing and install the package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install

$(BIN)/finegrain: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[all]"
	touch $(BIN)/finegrain

install: $(BIN)/finegrain

demo: install
	$(BIN)/finegrain demo

test: install
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/python -m pytest -q
