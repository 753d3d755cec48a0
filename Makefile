# The README's two commands. Both set up what they need first (tools/setup.sh).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo setup-test setup-demo lint typecheck unit bench fuzz clean

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

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache build *.egg-info
