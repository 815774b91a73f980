# medcae: `make demo` runs the main job on the built-in data; `make test` runs the tests.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch and torchvision are pinned exactly: a bare `torch` pulls gigabytes of CUDA wheels.
TORCH   := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast lint format typecheck bench bench-scale bench-predict serve evaluate clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH) -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medcae run --data demo --out runs/demo

# Three pytest-xdist workers, one test file each at a time: run serially, the suite leaves the
# cores idle while Ray starts and stops; three keep both busy (PYTEST_WORKERS=0: one process).
PYTEST_WORKERS ?= 3
test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The loop while editing: every test that starts no Ray and no server (about 2 minutes).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m "not ray and not serve and not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/extract.py

bench-scale: $(STAMP)
	$(BIN)/python bench/scale.py e2e
	$(BIN)/python bench/scale.py stream

# medcae predict on 20,000 PNG files against the Serve endpoint (needs a bundle: make demo)
bench-predict: $(STAMP)
	test -f $(BUNDLE)/bundle.json || $(MAKE) demo
	$(BIN)/python bench/predict_archive.py --bundle $(BUNDLE)

evaluate: $(STAMP)
	$(BIN)/medcae evaluate --data pneumoniamnist --out docs/results

BUNDLE ?= runs/demo/bundle
serve: $(STAMP)
	$(BIN)/medcae serve --bundle $(BUNDLE)

clean:
	rm -rf runs .pytest_cache .ruff_cache .mypy_cache
