# lce-tf: `make demo` and `make test` are the two set-up commands (README.md).
# Both create the virtual environment from the lock file when it is missing or stale.

VENV     ?= .venv
LOCK     := requirements/lock-py310.txt
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed-from-lock
DEMO_DIR ?= build/demo
PYTEST_ARGS ?=
# The suite runs on three pytest-xdist workers on the two cores (two left a quarter of the CPU idle while
# tests waited on subprocesses and servers), a test file per worker at a time, each executed document a
# unit of its own (docs/design.md, "Testing"); TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 3
PYTEST_XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

.PHONY: venv test test-fast demo demo-cli bench bench-quick bench-ann bench-scale bench-train bench-yours lock fonts clean

venv: $(STAMP)

# The stamp depends on the lock and setup.py: editing either reinstalls. uv installs the fully
# pinned lock in seconds; pip's resolver would backtrack for minutes (docs/design.md, "The pinned stack and why").
$(STAMP): $(LOCK) setup.py
	@set -e; py=$$(bash scripts/find_python310.sh); \
	if [ ! -x $(PY) ]; then echo "== creating $(VENV) with $$py"; "$$py" -m venv $(VENV); fi; \
	$(PY) -m pip install -q --disable-pip-version-check uv; \
	echo "== installing $(LOCK) into $(VENV)"; \
	$(VENV)/bin/uv pip install --python $(PY) -q -r $(LOCK); \
	$(VENV)/bin/uv pip install --python $(PY) -q --no-deps -e .; \
	touch $(STAMP)

# The glyph tests need the CJK fonts: they skip without them, and fail when CI=true (tests/test_glyphs.py).
# Every run prints its 25 slowest tests (pytest.ini: --durations=25); PYTEST_ARGS=--durations=0 prints all of
# them, and scripts/suite_times.py turns that output into the time-by-file table of docs/design.md.
test: venv fonts
	$(PY) -m pytest $(PYTEST_XDIST) $(PYTEST_ARGS)

test-fast: venv fonts
	$(PY) -m pytest $(PYTEST_XDIST) -m "not e2e and not slow" $(PYTEST_ARGS)

# The main job: the TFX pipeline for v1, then the LCE upgrade v2, locally (scripts/demo_pipeline.py).
demo: venv fonts
	$(PY) scripts/demo_pipeline.py --workdir $(DEMO_DIR)

# The same upgrade as a walk-through of `lce-tf` commands (no TFX).
demo-cli: venv fonts
	$(PY) scripts/demo.py --workdir build/demo-cli

# The CJK font packages of the glyph dataset (apt-get as root; otherwise it prints what to install,
# and the demo falls back to the synthetic stroke dataset).
fonts:
	-@bash scripts/install_fonts.sh

# Benchmarks (results under benchmarks/results/, with machine, date and command).
BENCH_ARGS ?=
bench: venv fonts
	$(PY) scripts/bench_compat.py $(BENCH_ARGS)

bench-quick: venv fonts
	$(PY) scripts/bench_compat.py --quick $(BENCH_ARGS)

bench-ann: venv
	$(PY) scripts/bench_ann.py $(BENCH_ARGS)

# Training images/s before/after the in-memory input path, per backbone and mode (train_speed.md).
bench-train: venv fonts
	$(PY) scripts/bench_train.py $(BENCH_ARGS)

# S6 "your model": a plain-Keras v1 imported with `lce-tf model import`, upgraded by lce-tf (yours.md; about
# 21 minutes on 2 shared cores; not part of `make bench`). BENCH_ARGS=--quick for a smoke run.
bench-yours: venv fonts
	$(PY) scripts/bench_yours.py $(BENCH_ARGS)

# Scale-out: Beam center extraction vs in-process, multi-worker training vs one worker (scale.md),
# then the slow scale test.
bench-scale: venv
	$(PY) scripts/bench_scale.py $(BENCH_ARGS)
	$(PY) -m pytest -m slow tests/test_scale.py

# Resolve requirements/lock.in into the lock (needs the network to PyPI).
lock:
	@py=$$(bash scripts/find_python310.sh); "$$py" -m pip install -q uv && \
	"$$py" -m uv pip compile --python-version 3.10 --python-platform x86_64-manylinux_2_36 \
	    requirements/lock.in -o $(LOCK)

clean:
	rm -rf build .pytest_cache
