"""`python -m tools.powercut`: the power-cut campaign (`make powercut`), see docs/powercut.md."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from tools.node.cache import REPO
from tools.powercut.campaign import NoRecording, run


@click.command()
@click.option("--seed", type=int, default=None, help="Default: $AB_POWERCUT_SEED, else new.")
@click.option("--samples", default=22, show_default=True, help="Replayed disks to boot in QEMU.")
@click.option("--variant", "variants", multiple=True, default=("grub", "gptprio"),
              type=click.Choice(["grub", "gptprio", "small"]), show_default=True)  # fmt: skip
@click.option("--workdir", type=click.Path(path_type=Path), default=REPO / ".cache" / "powercut",
              show_default=True)  # fmt: skip
@click.option("--reuse", is_flag=True, help="Reuse the recordings in WORKDIR (no recording).")
def main(seed: int | None, samples: int, variants: tuple[str, ...], workdir: Path,
         reuse: bool) -> None:  # fmt: skip
    """Record update cycles with every disk write logged, replay power cuts at every
    flush and between flushes, judge every replayed disk and boot a sample with real
    GRUB. Exits 1 if any disk is a brick, any agent is stuck or any sample failed."""
    if seed is None:
        seed = int(os.environ.get("AB_POWERCUT_SEED") or time.time_ns() % 100_000)
    click.echo(f"power-cut campaign, seed {seed} (AB_POWERCUT_SEED={seed} repeats it), "
               f"in {workdir}")  # fmt: skip

    def say(message: str) -> None:
        click.echo(message)
        sys.stdout.flush()

    try:
        report = run(workdir, seed=seed, samples=samples, variants=variants, reuse=reuse, say=say)
    except NoRecording as err:
        raise click.ClickException(str(err)) from None
    for line in report.lines():
        click.echo(line)
    click.echo(f"report: {workdir / 'report.json'}")
    sys.exit(0 if report.ok else 1)


main()
