"""`sign-release verify` checks a repository with the node's own parsing of
`custom.release` and the node's streaming, bounded decompression (`core.decompress`).

Repositories are laid out on disk by the repository simulator (consistent snapshots,
as `sign-release publish` writes them), so a target can be what `add` never writes:
several compressed frames or members, a decompression bomb, fields a node skips.
"""

from __future__ import annotations

import gzip
import lzma
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard

from signing.errors import VerificationError
from signing.verify import verify_repository
from tests.reposim import RepositorySimulator, release_custom

REPO_ROOT = Path(__file__).resolve().parents[2]
PATH = "x86_64-efi/1.0.0/root.img"
RAW = b"".join(i.to_bytes(4, "little") for i in range(50_000))  # 200 kB, compressible

COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "zstd": lambda b: zstandard.ZstdCompressor(level=3).compress(b),
    "xz": lzma.compress,
    "gzip": lambda b: gzip.compress(b, mtime=0),
}
SUFFIX = {"zstd": ".zst", "xz": ".xz", "gzip": ".gz", "none": ""}


def publish(directory: Path, stored: bytes, custom: dict[str, Any], path: str = PATH) -> Path:
    """A repository holding one target with `stored` bytes; returns its trusted root."""
    sim = RepositorySimulator()
    sim.add_target(path, stored, custom)
    sim.publish_targets()
    sim.write_to(directory)
    return directory / "metadata" / "1.root.json"


@pytest.mark.parametrize("kind", ["zstd", "xz", "gzip"])
def test_a_target_of_two_frames_verifies(tmp_path: Path, kind: str) -> None:
    # `zstd -T0`/`--long`, `pigz` and `xz -T0` write several frames; a node reads them all.
    half = len(RAW) // 2
    stored = COMPRESS[kind](RAW[:half]) + COMPRESS[kind](RAW[half:])
    path = PATH + SUFFIX[kind]
    root = publish(tmp_path, stored, release_custom("1.0.0", compression=kind, raw=RAW), path)
    report = verify_repository(tmp_path, root)
    assert report.targets == (path,)
    assert report.bytes_verified == len(stored)


def test_a_truncated_second_frame_is_refused(tmp_path: Path) -> None:
    stored = COMPRESS["zstd"](RAW[:1000]) + COMPRESS["zstd"](RAW[1000:])[:-20]
    root = publish(tmp_path, stored, release_custom("1.0.0", compression="zstd", raw=RAW))
    with pytest.raises(VerificationError, match=r"root\.img.*(truncated|ended after)"):
        verify_repository(tmp_path, root)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("version", "1.2.0+build.5", "invalid version '1.2.0+build.5'"),
        ("role", "Root", "role 'Root'"),
        ("hardware", ["x86_64-efi\n"], "hardware 'x86_64-efi\\n'"),
        ("channel", "stable\n", "channel 'stable\\n'"),
        ("raw_sha256", "A" * 64, "raw_sha256"),
    ],
)
def test_fields_a_node_skips_do_not_verify(
    tmp_path: Path, field: str, value: object, needle: str
) -> None:
    custom = release_custom("1.0.0", raw=RAW)
    custom["release"][field] = value
    root = publish(tmp_path, RAW, custom)
    with pytest.raises(VerificationError) as info:
        verify_repository(tmp_path, root)
    message = str(info.value)
    assert PATH in message and needle in message and "\n" not in message, message


def zstd_zero_bomb(size: int) -> bytes:
    """One zstd frame inflating to `size` zero bytes: RLE blocks of 128 KiB, 4 bytes each
    (RFC 8878: magic, frame header without content size, window 128 KiB)."""
    block = 128 << 10
    count = size // block
    out = bytearray(b"\x28\xb5\x2f\xfd\x00\x38")
    for i in range(count):
        last = 1 if i == count - 1 else 0
        out += (last | 1 << 1 | block << 3).to_bytes(3, "little") + b"\x00"
    return bytes(out)


def test_the_bomb_is_a_real_zstd_stream() -> None:
    bomb = zstd_zero_bomb(4 << 20)
    reader = zstandard.ZstdDecompressor().stream_reader(bomb)
    assert reader.read(8 << 20) == bytes(4 << 20)


# Run in a child process whose address space is capped a little above what it needs
# after its imports: decoding the bomb whole (8 GiB) cannot fit, a bounded decoder does.
CHILD = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    from signing.errors import VerificationError
    from signing.verify import verify_repository

    status = Path("/proc/self/status").read_text().splitlines()
    size = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    cap = size * 1024 + (768 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        verify_repository(Path(sys.argv[1]), Path(sys.argv[2]))
    except VerificationError as e:
        print(e)
        sys.exit(3)
    except MemoryError:
        print("MemoryError")
        sys.exit(99)
    print("verified")
    """
)


def test_a_decompression_bomb_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    bomb = zstd_zero_bomb(8 << 30)
    assert len(bomb) < 300_000
    raw = bytes(4096)  # what the custom announces: the first 4 KiB of the stream
    root = publish(tmp_path, bomb, release_custom("1.0.0", compression="zstd", raw=raw))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), str(root)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert PATH in proc.stdout and "more than raw_length=4096" in proc.stdout, proc.stdout
