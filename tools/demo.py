"""`make demo`: the main job, narrated. Replaced step by step as the agent grows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main() -> int:
    out = subprocess.run([Path(sys.executable).parent / "updater", "--help"], check=False)
    return out.returncode


if __name__ == "__main__":
    sys.exit(main())
