"""The shared core of ab-updater: what the agent, the signing tools and the mirror all use.

`core.errors` (the two error roots and exit codes), `core.fsutil` (crash-safe writes,
bounded reads), `core.textparse` (TOML/JSON with one failure mode), `core.release` (the
release metadata schema), `core.decompress` (streaming, bounded decompression),
`core.repository` / `core.fetcher` (TUF access through python-tuf's ngclient),
`core.examplekeys` and `core.cli` (the click plumbing of the three programs).

Invariant: the core imports none of the three programs' packages (`updater`,
`signing`, `mirror`); they import it.
"""

__version__ = "0.1.0"
