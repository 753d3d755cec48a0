"""`sign-release`: the command line of the offline release tooling.

Thin commands over `signing.repository` / `signing.keys`: parse options, build the
passphrase and PIN sources (file, environment, terminal prompt - never an argument),
call the library, print the result with `core.cli.emit` (a short text, or with --json
before or after the command one JSON object). Errors from the library are
`UpdaterError`s that `core.cli.ProgramGroup` prints as one line with their exit code.

The group option `--allow-example-keys` (or `SIGN_RELEASE_ALLOW_EXAMPLE_KEYS=1`) is the
one way to sign with, or trust, the INSECURE keys of keys-example/: every command that
signs passes it to the library, which refuses them otherwise.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from core.cli import allow_example_keys_option, emit, program, trusted_root_option
from core.release import COMPRESSIONS, RolloutPlan
from signing import create
from signing import repository as repo_ops
from signing import rollout as rollout_ops
from signing.errors import KeyFileError, SigningError
from signing.keys import (
    KEY_TYPES,
    PASSPHRASE_ENV,
    PIN_ENV,
    Secrets,
    generate_key,
    hsm_public_key,
    load_public_key,
    write_public_key,
)
from signing.roles import ALLOW_EXAMPLE_KEYS_ENV
from signing.status import format_status, repository_status
from signing.store import ROLES

F = TypeVar("F", bound=Callable[..., Any])
PathArg = click.Path(path_type=Path)


def _read_passphrase_file(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"passphrase file {path}: cannot read: {e.strerror}") from e
    # One line; the trailing newline an editor adds is not part of the passphrase.
    return data.splitlines()[0] if data.strip() else b""


def _secrets(passphrase_file: Path | None) -> Secrets:
    def passphrase(what: str) -> bytes | None:
        if passphrase_file is not None:
            return _read_passphrase_file(passphrase_file)
        if (env := os.environ.get(PASSPHRASE_ENV)) is not None:
            return env.encode()
        if sys.stdin.isatty():
            return str(click.prompt(f"Passphrase for {what}", hide_input=True)).encode()
        return None

    def pin(what: str) -> str:
        if (env := os.environ.get(PIN_ENV)) is not None:
            return env
        if sys.stdin.isatty():
            return str(click.prompt(f"Token {what}", hide_input=True))
        raise KeyFileError(f"the token asks for its {what}: set {PIN_ENV} or use a terminal")

    return Secrets(passphrase, pin)


def passphrase_option(f: F) -> F:
    return click.option(
        "--passphrase-file",
        type=PathArg,
        help=f"File whose first line is the key passphrase (else ${PASSPHRASE_ENV}, "
        "else a prompt on a terminal).",
    )(f)


def sign_with_option(
    required: bool = True, help: str = "Private key file or URI."
) -> Callable[[F], F]:
    return click.option(
        "--sign-with",
        "sign_with",
        multiple=True,
        required=required,
        metavar="KEY",
        help=help + " Repeat for more signatures.",
    )


def waves_option(f: F) -> F:
    return click.option(
        "--waves",
        metavar="SPEC",
        help="Rollout plan: cumulative SHARE@WHEN waves, e.g. "
        "'0.05@2026-12-03T02:00Z,25%@+1d,1@+2d' (WHEN: UTC time, +N[mhd] from now, now).",
    )(f)


def _parse_expires(values: Sequence[str], allowed: Sequence[str]) -> dict[str, int]:
    result: dict[str, int] = {}
    for value in values:
        role, sep, days = value.partition("=")
        if not sep or role not in allowed or not days.strip().isdigit():
            raise SigningError(
                f"--expires {value!r}: expected ROLE=DAYS with ROLE one of {', '.join(allowed)}"
            )
        result[role] = int(days)
    return result


def _public_keys(paths: Sequence[Path]) -> list[Any]:
    return [load_public_key(p) for p in paths]


def _allow_example_keys() -> bool:
    obj = click.get_current_context().find_root().obj
    return bool(obj.get("allow_example_keys")) if isinstance(obj, dict) else False


def _key_json(path: Path, key: Any) -> dict[str, Any]:
    return {"path": str(path), "keytype": key.keytype, "scheme": key.scheme, "keyid": key.keyid}


def _threshold_json(t: Any) -> dict[str, Any]:
    return {"role": t.role, "signatures": len(t.signed), "threshold": t.threshold,
            "missing": t.missing}  # fmt: skip


@program("sign-release")
@allow_example_keys_option(envvar=ALLOW_EXAMPLE_KEYS_ENV, signs=True)
@click.pass_context
def cli(ctx: click.Context, allow_example_keys: bool) -> None:
    """Sign OS images into a TUF repository that every node verifies."""
    ctx.ensure_object(dict)["allow_example_keys"] = allow_example_keys


@cli.command()
@click.argument("path", type=PathArg)
@click.option(
    "--type", "key_type", type=click.Choice(KEY_TYPES), default="ed25519", show_default=True
)
@click.option("--no-passphrase", is_flag=True, help="Store the private key unencrypted.")
@passphrase_option
def keygen(path: Path, key_type: str, no_passphrase: bool, passphrase_file: Path | None) -> None:
    """Generate a key pair: PATH (private, PEM PKCS#8, 0600) and PATH.pub."""
    passphrase: bytes | None = None
    if no_passphrase and passphrase_file is not None:
        raise SigningError("--no-passphrase and --passphrase-file exclude each other")
    if passphrase_file is not None:
        passphrase = _read_passphrase_file(passphrase_file)
    elif no_passphrase:
        passphrase = None
    elif (env := os.environ.get(PASSPHRASE_ENV)) is not None:
        passphrase = env.encode()
    elif sys.stdin.isatty():
        passphrase = str(
            click.prompt(f"New passphrase for {path}", hide_input=True, confirmation_prompt=True)
        ).encode()
    else:
        raise SigningError(
            f"no passphrase for {path}: give --passphrase-file, set "
            f"{PASSPHRASE_ENV}, or --no-passphrase"
        )
    key = generate_key(path, key_type, passphrase)
    emit(_key_json(path, key), f"{path}: {key.keytype}/{key.scheme} keyid {key.keyid}")


@cli.command()
@click.argument("uri")
@click.argument("out", type=PathArg)
def pubkey(uri: str, out: Path) -> None:
    """Export the public key of a token key (URI like hsm:2?label=NAME) to OUT (.pub)."""
    if out.exists():
        raise KeyFileError(f"{out}: already exists; refusing to overwrite a key")
    key = hsm_public_key(uri, _secrets(None).pins)
    write_public_key(out, key)
    emit(_key_json(out, key), f"{out}: {key.keytype}/{key.scheme} keyid {key.keyid}")


@cli.command()
@click.argument("repo", type=PathArg)
@click.option(
    "--from-root",
    type=PathArg,
    metavar="ROOT.json",
    help="Use this signed root v1 instead of the key options below.",
)
@click.option("--root-key", multiple=True, type=PathArg, metavar="PUB")
@click.option("--root-threshold", type=int, default=1, show_default=True)
@click.option("--targets-key", multiple=True, type=PathArg, metavar="PUB")
@click.option("--targets-threshold", type=int, default=1, show_default=True)
@click.option("--snapshot-key", multiple=True, type=PathArg, metavar="PUB")
@click.option("--timestamp-key", multiple=True, type=PathArg, metavar="PUB")
@click.option(
    "--expires",
    multiple=True,
    metavar="ROLE=DAYS",
    help="Expiry in days (defaults: root 365, targets 90, snapshot 7, timestamp 1).",
)
@sign_with_option(required=False, help="Root private key file or URI.")
@passphrase_option
def init(
    repo: Path,
    from_root: Path | None,
    root_key: tuple[Path, ...],
    root_threshold: int,
    targets_key: tuple[Path, ...],
    targets_threshold: int,
    snapshot_key: tuple[Path, ...],
    timestamp_key: tuple[Path, ...],
    expires: tuple[str, ...],
    sign_with: tuple[str, ...],
    passphrase_file: Path | None,
) -> None:
    """Create a repository with staged root v1 and empty targets v1."""
    if from_root is not None:
        if root_key or targets_key or snapshot_key or timestamp_key or sign_with:
            raise SigningError("--from-root excludes the --*-key and --sign-with options")
        create.init_from_root(
            repo,
            from_root,
            expires=_parse_expires(expires, ROLES),
            allow_example_keys=_allow_example_keys(),
        )
        emit(
            {"repo": str(repo), "from_root": str(from_root)},
            f"{repo}: initialised from {from_root}; add releases, then publish",
        )
        return
    for name, given in (
        ("--root-key", root_key),
        ("--targets-key", targets_key),
        ("--snapshot-key", snapshot_key),
        ("--timestamp-key", timestamp_key),
    ):
        if not given:
            raise SigningError(f"init needs {name} (or --from-root)")
    create.init_repository(
        repo,
        root_keys=_public_keys(root_key),
        targets_keys=_public_keys(targets_key),
        snapshot_keys=_public_keys(snapshot_key),
        timestamp_keys=_public_keys(timestamp_key),
        sign_with=sign_with,
        root_threshold=root_threshold,
        targets_threshold=targets_threshold,
        expires=_parse_expires(expires, ROLES),
        secrets=_secrets(passphrase_file),
        allow_example_keys=_allow_example_keys(),
    )
    emit({"repo": str(repo), "from_root": None}, f"{repo}: initialised; add releases, then publish")


@cli.command()
@click.argument("repo", type=PathArg)
@click.argument("image", type=PathArg)
@click.option("--version", "version", required=True, help="Release version (semver).")
@click.option("--hardware", multiple=True, required=True, help="Hardware name; repeatable.")
@click.option("--role", default="root", show_default=True, help="Slot partition it goes to.")
@click.option("--channel", default="stable", show_default=True)
@click.option(
    "--compress", "compression", type=click.Choice(COMPRESSIONS), default="zstd", show_default=True
)
@waves_option
@click.option("--expires", "expires_days", type=int, help="Targets expiry in days (90).")
@sign_with_option(help="Targets private key file or URI.")
@passphrase_option
def add(
    repo: Path,
    image: Path,
    version: str,
    hardware: tuple[str, ...],
    role: str,
    channel: str,
    compression: str,
    waves: str | None,
    expires_days: int | None,
    sign_with: tuple[str, ...],
    passphrase_file: Path | None,
) -> None:
    """Compress IMAGE into REPO and stage it in targets, signed."""
    plan = None if waves is None else RolloutPlan(rollout_ops.waves_option(waves))
    release = repo_ops.Release(image, version, hardware, role, channel, compression, plan)
    files = repo_ops.add_release(
        repo,
        release,
        sign_with,
        expires_days=expires_days,
        secrets=_secrets(passphrase_file),
        allow_example_keys=_allow_example_keys(),
    )
    emit(
        {"staged": [{"path": tf.path, "length": tf.length, "hashes": tf.hashes} for tf in files]},
        [f"staged {tf.path} ({tf.length} bytes, sha256 {tf.hashes['sha256']})" for tf in files],
    )


@cli.command()
@click.argument("repo", type=PathArg)
@click.argument("hardware")
@click.argument("version")
@click.option("--pause", is_flag=True, help="Hold every node that does not have it yet.")
@click.option("--resume", is_flag=True, help="Go on with the waves after --pause/--withdraw.")
@click.option("--withdraw", is_flag=True, help="Offer it to no node (as if it were absent).")
@waves_option
@click.option("--expires", "expires_days", type=int, help="Targets expiry in days (90).")
@sign_with_option(help="Targets private key file or URI.")
@passphrase_option
def rollout(
    repo: Path,
    hardware: str,
    version: str,
    pause: bool,
    resume: bool,
    withdraw: bool,
    waves: str | None,
    expires_days: int | None,
    sign_with: tuple[str, ...],
    passphrase_file: Path | None,
) -> None:
    """Change the rollout plan of VERSION for HARDWARE in every target of it; stage
    targets (then `publish`). Image bytes, lengths and hashes are unchanged."""
    flags = {"pause": pause, "resume": resume, "withdraw": withdraw, "waves": waves is not None}
    given = [name for name, on in flags.items() if on]
    if len(given) != 1:
        raise SigningError("rollout needs one of --pause, --resume, --withdraw, --waves SPEC")
    spec = rollout_ops.waves_option(waves) if waves is not None else ()
    plan, files = rollout_ops.change_rollout(
        repo,
        hardware,
        version,
        rollout_ops.RolloutChange(given[0], spec),
        sign_with,
        expires_days=expires_days,
        secrets=_secrets(passphrase_file),
        allow_example_keys=_allow_example_keys(),
    )
    staged = [tf.path for tf in files]
    emit(
        {"hardware": hardware, "version": version, "rollout": plan.to_custom(), "staged": staged},
        [f"{version} for {hardware}: {plan.describe()}", *(f"staged {p}" for p in staged)],
    )


@cli.command()
@click.argument("repo", type=PathArg)
@click.argument("role", metavar="ROLE")
@click.option(
    "--expires",
    "expires_days",
    type=int,
    help="Start a new version with this expiry in days (drops signatures).",
)
@sign_with_option()
@passphrase_option
def sign(
    repo: Path,
    role: str,
    expires_days: int | None,
    sign_with: tuple[str, ...],
    passphrase_file: Path | None,
) -> None:
    """Add signatures to the staged ROLE (threshold signing)."""
    t = repo_ops.sign_role(
        repo,
        role,
        sign_with,
        expires_days=expires_days,
        secrets=_secrets(passphrase_file),
        allow_example_keys=_allow_example_keys(),
    )
    emit(
        _threshold_json(t),
        f"{role}: {len(t.signed)} of {t.threshold} signatures"
        + (f", {t.missing} more needed" if t.missing else ", ready to publish"),
    )


@cli.command()
@click.argument("repo", type=PathArg)
@click.option("--snapshot-key", multiple=True, required=True, metavar="KEY")
@click.option("--timestamp-key", multiple=True, required=True, metavar="KEY")
@click.option(
    "--expires", multiple=True, metavar="ROLE=DAYS", help="snapshot=DAYS, timestamp=DAYS."
)
@passphrase_option
def publish(
    repo: Path,
    snapshot_key: tuple[str, ...],
    timestamp_key: tuple[str, ...],
    expires: tuple[str, ...],
    passphrase_file: Path | None,
) -> None:
    """Publish staged roles with a new snapshot and timestamp."""
    result = repo_ops.publish(
        repo,
        snapshot_key,
        timestamp_key,
        expires=_parse_expires(expires, ("snapshot", "timestamp")),
        secrets=_secrets(passphrase_file),
        allow_example_keys=_allow_example_keys(),
    )
    emit(
        {"versions": result.versions},
        "published " + ", ".join(f"{r} v{v}" for r, v in result.versions.items()),
    )


@cli.command()
@click.argument("repo", type=PathArg)
@click.option("--timestamp-key", multiple=True, required=True, metavar="KEY")
@click.option("--expires", multiple=True, metavar="timestamp=DAYS")
@passphrase_option
def timestamp(
    repo: Path,
    timestamp_key: tuple[str, ...],
    expires: tuple[str, ...],
    passphrase_file: Path | None,
) -> None:
    """Re-sign timestamp.json (online key only), e.g. from cron."""
    version = repo_ops.refresh_timestamp(
        repo,
        timestamp_key,
        expires=_parse_expires(expires, ("timestamp",)),
        secrets=_secrets(passphrase_file),
        allow_example_keys=_allow_example_keys(),
    )
    emit({"versions": {"timestamp": version}}, f"published timestamp v{version}")


@cli.command()
@click.argument("repo", type=PathArg)
@click.argument("role", type=click.Choice(ROLES))
@click.option("--add-key", multiple=True, type=PathArg, metavar="PUB")
@click.option(
    "--remove-key",
    multiple=True,
    metavar="KEYID|PUB",
    help="Keyid (or unique prefix of 8+ characters) or .pub file.",
)
@click.option("--threshold", type=int)
@click.option("--expires", "expires_days", type=int, help="New root's expiry in days.")
@sign_with_option(required=False, help="Root private key file or URI (old or new root).")
@passphrase_option
def rotate(
    repo: Path,
    role: str,
    add_key: tuple[Path, ...],
    remove_key: tuple[str, ...],
    threshold: int | None,
    expires_days: int | None,
    sign_with: tuple[str, ...],
    passphrase_file: Path | None,
) -> None:
    """Stage a new root that changes ROLE's keys."""
    removed = [load_public_key(Path(k)).keyid if Path(k).is_file() else k for k in remove_key]
    t = repo_ops.rotate(
        repo,
        role,
        add_keys=_public_keys(add_key),
        remove_keyids=removed,
        threshold=threshold,
        sign_with=sign_with,
        expires_days=expires_days,
        secrets=_secrets(passphrase_file),
        allow_example_keys=_allow_example_keys(),
    )
    emit(
        {**_threshold_json(t), "targets_staged": role == "targets"},
        f"staged new root: {len(t.signed)} of {t.threshold} signatures from its keys"
        + ("; targets staged, re-sign it with its new keys" if role == "targets" else ""),
    )


@cli.command()
@click.argument("repo", type=PathArg)
@trusted_root_option(name="root_json")
def verify(repo: Path, root_json: Path) -> None:
    """Verify REPO as a node would (ngclient); exit 0 only if everything is valid."""
    from signing.verify import verify_repository  # ngclient is slow to import; only here

    report = verify_repository(repo, root_json)
    emit(
        {"ok": True, **report.__dict__, "targets": list(report.targets)},
        f"OK: root v{report.root_version}, targets v{report.targets_version}, "
        f"snapshot v{report.snapshot_version}, timestamp v{report.timestamp_version}; "
        f"{len(report.targets)} targets, {report.bytes_verified} bytes verified",
    )


@cli.command()
@click.argument("repo", type=PathArg)
def status(repo: Path) -> None:
    """Show each role's version, signatures vs threshold, keyids and expiry."""
    data = repository_status(repo)
    emit(data, format_status(data))


def main() -> None:
    cli(prog_name="sign-release")
