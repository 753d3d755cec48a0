"""Logging for the agent: stderr, one line per record, readable in journald and a terminal.

Under systemd (`JOURNAL_STREAM` set) each line starts with the sd-daemon priority prefix
(`<3>` error ... `<7>` debug), so journald keeps the level without timestamps doubled;
on a terminal lines read `updater: LEVEL: message`. Library modules only call
`logging.getLogger(__name__)`; only the CLI calls `setup_logging`.
"""

from __future__ import annotations

import logging
import os
import sys

_SD_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = _SD_PRIORITY.get(record.levelno, 6)
        return f"<{prio}>{super().format(record)}"


def setup_logging(verbose: bool = False, prog: str = "updater") -> None:
    """Send the `updater` and `signing` loggers to stderr, once."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter(f"{prog}: %(levelname)s: %(message)s"))
    for name in ("updater", "signing"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        logger.propagate = False
