"""Developer tools: the demo, the virtual QEMU node and its update scenarios, signed
example repositories. Not shipped (pyproject packages only core, updater, signing and
mirror); imported by `make demo`, bench/ and tests/e2e - never by the programs, and
never from tests/ (tools and benchmarks import no test helpers)."""
