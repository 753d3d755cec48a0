"""core.textparse.read_toml: one way to read a hand-written TOML file, so the agent's
config and a partition layout say the same thing about the same bad file."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError, LayoutError
from core.textparse import read_toml
from tests.bounded import fifo, within
from updater.config import load_config
from updater.disk.layout import load_layout

BAD = {
    "not utf-8": (b"name = 1\n\xff\xfe\n", "not UTF-8 text: invalid start byte at byte 9"),
    "not toml": (b"[[partition]\n", "not valid TOML: "),
    "too deep": (b"x = " + b"[" * 3000 + b"]" * 3000 + b"\n", "not valid TOML: nested too deeply"),
    "too large": (b"#" * (2 << 20), "cannot read: larger than 1048576 bytes"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_config_and_layout_say_the_same_about_a_bad_file(tmp_path: Path, case: str) -> None:
    data, why = BAD[case]
    path = tmp_path / "file.toml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as config:
        load_config(path)
    with pytest.raises(LayoutError) as layout:
        load_layout(path)
    config_why = str(config.value).removeprefix(f"config {path}: ")
    layout_why = str(layout.value).removeprefix(f"{path}: ").replace("read layout:", "read:")
    assert config_why.startswith(why) and layout_why == config_why


def test_read_toml_reads_a_document_and_refuses_a_fifo(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text('[layout]\nname = "x"\n')
    assert read_toml(path, 100) == {"layout": {"name": "x"}}
    with pytest.raises(ValueError, match=r"^cannot read: larger than 10 bytes$"):
        read_toml(path, 10)
    with fifo(tmp_path / "fifo.toml") as pipe, pytest.raises(ValueError) as info:
        within(lambda: read_toml(pipe, 100, "layout"))
    assert str(info.value) == "cannot read layout: not a regular file (a FIFO)"
