# The README's two commands. Both set up what they need first (tools/setup.sh).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo setup-test setup-demo lint typecheck unit bench fuzz powercut clean

test: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest

demo: setup-demo
	$(PY) tools/demo.py

setup-test:
	@sh tools/setup.sh test

setup-demo:
	@sh tools/setup.sh demo

lint: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup-test
	$(VENV)/bin/mypy

bench: setup-test
	$(PY) bench/install.py --size-mib 256

# The fuzz campaign of docs/fuzzing.md (about an hour on one core); `make test` replays
# the corpus it keeps. RUNS=N per target, or name targets: make fuzz TARGETS="gpt".
fuzz: setup-test
	$(PY) -m pip install -q --disable-pip-version-check -e '.[fuzz]'
	sh tests/fuzz/campaign.sh $(TARGETS)

# The power-cut campaign of docs/powercut.md (records two update cycles in QEMU, replays
# and judges every cut, boots a sample; ~30-45 min on 2 cores); `make test` runs a small
# seeded subset (tests/e2e/test_powercut.py). SEED=N repeats a run, SAMPLES=N boots N.
powercut: setup-test
	$(PY) -m tools.powercut $(if $(SEED),--seed $(SEED)) $(if $(SAMPLES),--samples $(SAMPLES))

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache build *.egg-info
