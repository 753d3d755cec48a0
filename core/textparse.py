"""TOML and JSON from untrusted or hand-written files, with one failure mode.

`tomllib` and `json` raise their own errors for bad syntax but `RecursionError` for
input nested thousands deep, and the JSON decoder accepts NaN and numbers thousands of
digits long. These wrappers turn every such case into a `ValueError` whose message is
one line, so each caller maps exactly one exception to its own error class.
`read_toml` reads a TOML file the same way for every hand-written file (the agent's
config, partition layouts): bounded, never blocking on a FIFO, UTF-8 or refused.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from core.fsutil import read_regular

MAX_DEPTH_MESSAGE = "nested too deeply"


def loads_toml(text: str) -> dict[str, Any]:
    """Parse TOML; ValueError (one line) for anything that is not valid TOML."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(" ".join(str(err).split())) from err
    except RecursionError:
        raise ValueError(MAX_DEPTH_MESSAGE) from None


def read_toml(path: Path, limit: int, what: str = "") -> dict[str, Any]:
    """The TOML document in the regular file `path`, of at most `limit` bytes.

    ValueError, one line, for each way that fails: "cannot read <what>: <why>" (the file
    is read with `fsutil.read_regular`: a FIFO, device or directory is refused without
    blocking, so is a larger file), "not UTF-8 text: <why> at byte N", "not valid TOML:
    <why>" - so a caller adds the file's name and maps one exception to its error."""
    try:
        raw = read_regular(path, limit)
    except OSError as err:
        reading = f"cannot read {what}" if what else "cannot read"
        raise ValueError(f"{reading}: {err.strerror or err}") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text: {err.reason} at byte {err.start}") from err
    try:
        return loads_toml(text)
    except ValueError as err:
        raise ValueError(f"not valid TOML: {err}") from err


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads_json(data: str | bytes) -> Any:
    """Parse strict JSON (no NaN/Infinity); ValueError (one line) for anything else,
    including bytes that are not UTF-8 and input nested too deeply."""
    try:
        return json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(MAX_DEPTH_MESSAGE) from None
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8: {err.reason}") from err
    except ValueError as err:  # JSONDecodeError, int digit limit, parse_constant
        raise ValueError(" ".join(str(err).split())) from err
