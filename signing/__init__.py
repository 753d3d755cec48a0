"""sign-release: offline TUF release tooling for release managers (python-tuf Metadata API)."""
