# Every target creates .venv when it is missing (pinned versions, CPU torch) and then runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv demo test lint check clean bench fuzz wheel-check

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) cli.py demo --out demo-out

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

check: test lint

clean:
	rm -rf demo-out .pytest_cache .mypy_cache .ruff_cache

bench: $(STAMP)
	$(PY) bench/bench.py
	$(PY) bench/bench.py --scaling
	$(PY) bench/transforms.py
	$(PY) bench/flax_layout.py
	$(PY) bench/legacy.py
	$(PY) bench/parallel.py
	$(PY) bench/scale.py
	$(PY) bench/dcp.py
	$(PY) bench/startup.py
	$(PY) bench/remote.py --size 256M

fuzz: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt atheris
	$(PY) fuzz/fuzz_readers.py -max_total_time=600 fuzz/corpus

# Build the wheel, check its files, install it in a fresh venv and run `sdconvert demo` from it.
wheel-check: $(STAMP)
	PYTHON="$(PYTHON)" bash .ci/wheel-check
