"""TOML and JSON from untrusted or hand-written files, with one failure mode.

`tomllib` and `json` raise their own errors for bad syntax but `RecursionError` for
input nested thousands deep, and the JSON decoder accepts NaN and numbers thousands of
digits long. These wrappers turn every such case into a `ValueError` whose message is
one line, so each caller maps exactly one exception to its own error class.
"""

from __future__ import annotations

import json
import tomllib
from typing import Any

MAX_DEPTH_MESSAGE = "nested too deeply"


def loads_toml(text: str) -> dict[str, Any]:
    """Parse TOML; ValueError (one line) for anything that is not valid TOML."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(" ".join(str(err).split())) from err
    except RecursionError:
        raise ValueError(MAX_DEPTH_MESSAGE) from None


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
