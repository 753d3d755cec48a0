"""The agent's configuration: /etc/updater/config.toml -> frozen, validated dataclasses.

Every key is documented in docs/configuration.md. Invariants kept here:

* a `Config` is fully validated: every URL has an allowed scheme, every number is in
  range, `slots.A` and `slots.B` name the same roles, `grubenv` is set iff the
  bootloader is `grub`, `boot_entries` (and `esp`) iff it is `systemd-boot`, `esp` is
  set when a role is a `file:` under it, the bootloader is a known backend;
* unknown keys and tables are errors - a typo must never silently become a default;
* every problem is one `ConfigError` line naming the file, the table and the key:
  ``config /etc/updater/config.toml: [device] bootloader: unknown bootloader 'foo' ...``;
* relative paths are resolved against the directory of the config file, so a config
  and the files it names can be moved together (demos, tests, image builds);
* hostile input is one `ConfigError` line too, never a traceback or a hang: the file is
  read with `textparse.read_toml` (a FIFO, device or directory is refused, the size is
  bounded, non-UTF-8 text and TOML nested thousands deep are refused), no string (path,
  URL, name, argv element) holds a NUL byte, every URL parses, and numbers of any size
  are compared exactly and shown shortened.

Loading does no I/O besides reading the file itself: whether the partitions the slots
name exist is checked where the disk is read (`blockdev.find_slot_partitions`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from core.errors import ConfigError
from core.release import check_name, check_role, check_target_path
from core.textparse import loads_toml, read_toml
from updater.boot.registry import known_bootloaders
from updater.config_fleet import CoordinationConfig as CoordinationConfig  # re-exported
from updater.config_fleet import MetricsConfig as MetricsConfig  # re-exported
from updater.config_fleet import coordination as _coordination
from updater.config_fleet import daemon_windows as _daemon_windows
from updater.config_fleet import metrics as _metrics
from updater.slots import SLOTS, file_path, is_file_role

REPOSITORY_SCHEMES = ("http", "https", "file")
PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")
MAX_CONFIG_BYTES = 1 << 20  # a config is a few KiB; anything near this is not one
_SHOWN = 40  # characters of a bad value quoted in a message


# --- the configuration, as data ----------------------------------------------------------


@dataclass(frozen=True)
class RepositoryConfig:
    metadata_url: str
    targets_url: str
    trusted_root: Path
    timeout: float = 30.0  # seconds, per HTTP connect / read
    retries: int = 3  # extra attempts after a failed download (with Range resume)
    proxy: str | None = None  # used for http and https; None: the environment's
    ca_bundle: Path | None = None  # PEM bundle; None: the system's trust store
    # Slow-retrieval limits: a metadata file must arrive within `metadata_deadline`
    # seconds; an image download must average `min_rate` bytes/s over any `rate_window`.
    metadata_deadline: float = 120.0
    min_rate: float = 1024.0
    rate_window: float = 60.0
    # Trust a root naming a key of keys-example/ (whose private half is public): demos
    # and tests only.
    allow_example_keys: bool = False


@dataclass(frozen=True)
class DeviceConfig:
    hardware: str
    disk: Path
    bootloader: str
    channel: str = "stable"
    grubenv: Path | None = None
    booted_slot: str = "auto"  # "auto", or "A" / "B" to override detection
    state_dir: Path = Path("/var/lib/updater")
    # os-release file of the running image; its IMAGE_VERSION= names the booted slot's
    # version when the journal does not know it yet (first boot of a factory image).
    os_release: Path = Path("/etc/os-release")
    # Mount point of the EFI system partition: systemd-boot's entries, and the files of
    # `file:` roles, are relative to it.
    esp: Path | None = None
    # systemd-boot: slot -> its boot entry, relative to `esp`, without boot counter.
    boot_entries: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # machine-id(5): the node's stable identity (rollout position, default lock node id).
    machine_id: Path = Path("/etc/machine-id")


@dataclass(frozen=True)
class HealthCheck:
    """One check: exactly one of `command` (exit 0 passes) or `http` (2xx passes)."""

    command: tuple[str, ...] | None
    http: str | None
    timeout: float  # seconds for one run of this check

    def describe(self) -> str:
        if self.command is not None:
            return "command " + " ".join(self.command)
        return f"http {self.http}"


@dataclass(frozen=True)
class HealthConfig:
    deadline: float = 600.0  # seconds after which failing checks mean a rollback
    interval: float = 10.0  # seconds between two rounds of checks
    timeout: float = 10.0  # default per-check timeout
    checks: tuple[HealthCheck, ...] = ()


@dataclass(frozen=True)
class DaemonConfig:
    interval: float = 3600.0  # seconds between two update checks
    jitter: float = 300.0  # up to this many seconds added at random, to spread a fleet
    # Maintenance windows the reboot into a new slot waits for (updater.windows);
    # (): any time. Checked by parse_windows when loaded.
    windows: tuple[str, ...] = ()
    timezone: str = "UTC"  # IANA name the windows are in


@dataclass(frozen=True)
class HooksConfig:
    pre_reboot: tuple[str, ...] = ()
    reboot: tuple[str, ...] = ("systemctl", "reboot")
    post_commit: tuple[str, ...] = ()
    timeout: float = 600.0  # seconds a hook may run before it counts as failed


@dataclass(frozen=True)
class Config:
    path: Path
    repository: RepositoryConfig
    device: DeviceConfig
    # slot -> role -> PARTLABEL; read-only views, same roles in both slots.
    slots: Mapping[str, Mapping[str, str]]
    health: HealthConfig = field(default_factory=HealthConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    coordination: CoordinationConfig = field(default_factory=CoordinationConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def roles(self) -> tuple[str, ...]:
        """The image roles of a slot (`root`, `boot`, ...), sorted."""
        return tuple(sorted(self.slots[SLOTS[0]]))


# --- validation helpers ----------------------------------------------------------------


class _Table:
    """One TOML table being read: typed getters that name the key, unknown-key check."""

    def __init__(self, file: Path, name: str, data: Mapping[str, Any], prefix: str = "") -> None:
        self.file = file
        self.name = name  # the table, as written in the file: "device", "slots.A"
        self.data = data
        self.prefix = prefix  # for inline tables: "checks[1]." in "[health] checks[1].http"
        self.seen: set[str] = set()

    def error(self, key: str, message: str) -> ConfigError:
        key = self.prefix + _shown_key(key)
        where = f"[{self.name}] {key}" if key else f"[{self.name}]"
        return ConfigError(f"config {self.file}: {where}: {message}")

    def value_error(self, key: str, value: object, why: str) -> ConfigError:
        """`error` quoting the bad `value` (shortened, control characters escaped)."""
        return self.error(key, f"{_shown(value)} {why}")

    def raw(self, key: str, required: bool) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if required:
                raise self.error(key, "missing (required)")
            return None
        return self.data[key]

    def string(self, key: str, *, required: bool = False) -> str | None:
        value = self.raw(key, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, not {_toml_type(value)}")
        if not value.strip():
            raise self.error(key, "must not be empty")
        if "\0" in value:
            raise self.error(key, f"{_shown(value)} contains a NUL byte")
        return value

    def required_string(self, key: str) -> str:
        value = self.string(key, required=True)
        assert value is not None  # required=True raised otherwise
        return value

    def path(self, key: str, *, required: bool = False) -> Path | None:
        value = self.string(key, required=required)
        if value is None:
            return None
        path = Path(value)
        return path if path.is_absolute() else self.file.parent / path

    def number(self, key: str, default: float, *, minimum: float, maximum: float) -> float:
        value = self.raw(key, False)
        if value is None:
            return default
        # bool is an int in Python; `deadline = true` is a typo, not 1 second.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number, not {_toml_type(value)}")
        # Compared before any float(): a TOML integer may be too large for a float.
        if (isinstance(value, float) and not math.isfinite(value)) or not (
            minimum <= value <= maximum
        ):
            raise self.error(key, f"{_shown(value)} is out of range ({minimum:g} to {maximum:g})")
        return float(value)

    def integer(self, key: str, default: int, *, minimum: int, maximum: int) -> int:
        value = self.raw(key, False)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, not {_toml_type(value)}")
        if not minimum <= value <= maximum:
            raise self.error(key, f"{_shown(value)} is out of range ({minimum} to {maximum})")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {_toml_type(value)}")
        return value

    def argv(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.raw(key, False)
        if value is None:
            return default
        return _argv(value, lambda msg: self.error(key, msg))

    def strings(self, key: str) -> tuple[str, ...]:
        """An array of non-empty strings without NUL bytes; () when absent."""
        value = self.raw(key, False)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.error(key, f"must be an array of strings, not {_toml_type(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(f"{key}[{index}]", f"must be a string, not {_toml_type(item)}")
            if not item.strip():
                raise self.error(f"{key}[{index}]", "must not be empty")
            if "\0" in item:
                raise self.value_error(f"{key}[{index}]", item, "contains a NUL byte")
        return tuple(value)

    def urls(self, key: str, schemes: Collection[str]) -> tuple[str, ...]:
        """An array of distinct URLs, each checked like `url`; () when absent."""
        values = self.strings(key)
        for index, value in enumerate(values):
            where = f"{key}[{index}]"
            # The lambda is called (if at all) before the loop moves on: B023 does not apply.
            _check_url(value, schemes, lambda msg: self.error(where, msg))  # noqa: B023
            if value in values[:index]:
                raise self.value_error(f"{key}[{index}]", value, "is listed twice")
        return values

    def url(self, key: str, schemes: Collection[str], *, required: bool = False) -> str | None:
        value = self.string(key, required=required)
        if value is None:
            return None
        _check_url(value, schemes, lambda msg: self.error(key, msg))
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            known = ", ".join(sorted(self.seen))
            raise self.error(unknown[0], f"unknown key (known: {known})")


def _shown(value: object) -> str:
    """`value` for a message: repr'd (control characters escaped), about _SHOWN chars.

    A huge integer is cut by arithmetic: str() of one over 4300 digits raises."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**_SHOWN:
        drop = int(abs(value).bit_length() * 0.30103) - _SHOWN  # log10(2): digits to cut
        lead = str(abs(value) // 10**drop)[:_SHOWN]
        return f"{'-' if value < 0 else ''}{lead}..."
    shown = repr(value) if isinstance(value, str) else str(value)
    return shown if len(shown) <= _SHOWN else shown[:_SHOWN] + "..."


def _shown_key(key: str) -> str:
    """A key from the file as written in a message: as is when printable, else repr'd."""
    return key if key.isprintable() and len(key) <= _SHOWN else _shown(key)


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return names.get(type(value), type(value).__name__)


def _argv(value: Any, error: Callable[[str], ConfigError]) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise error("must be a non-empty array of strings (a command and its arguments)")
    if not all(isinstance(arg, str) for arg in value):
        raise error("every element of the command must be a string")
    if not value[0]:
        raise error("the command name must not be empty")
    for index, arg in enumerate(value):
        if "\0" in arg:
            raise error(f"element {index} ({_shown(arg)}) contains a NUL byte")
    return tuple(value)


def _check_url(value: str, schemes: Collection[str], error: Callable[[str], ConfigError]) -> None:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - parsed on access: raises for "h:99999" or "h:x"
    except ValueError as err:
        raise error(f"{_shown(value)} is not a valid URL: {err}") from err
    if parts.scheme not in schemes:
        allowed = ", ".join(f"{s}://" for s in schemes)
        raise error(f"{value!r} is not a URL this tool can use (allowed: {allowed})")
    if parts.scheme != "file" and not parts.netloc:
        raise error(f"{value!r} has no host")
    if parts.scheme == "file" and not parts.path:
        raise error(f"{value!r} has no path")


# --- the tables ------------------------------------------------------------------------


def _sub_table(parent: _Table, key: str, *, required: bool) -> _Table:
    name = f"{parent.name}.{key}" if parent.name else key
    parent.seen.add(key)
    value = parent.data.get(key)
    if value is None:
        if required:
            raise ConfigError(f"config {parent.file}: [{name}]: missing (required)")
        value = {}
    if not isinstance(value, dict):
        what = _toml_type(value)
        raise ConfigError(f"config {parent.file}: [{name}]: must be a table, not {what}")
    return _Table(parent.file, name, value)


def _repository(t: _Table) -> RepositoryConfig:
    metadata_url = t.url("metadata_url", REPOSITORY_SCHEMES, required=True)
    targets_url = t.url("targets_url", REPOSITORY_SCHEMES, required=True)
    trusted_root = t.path("trusted_root", required=True)
    assert metadata_url is not None and targets_url is not None and trusted_root is not None
    repo = RepositoryConfig(
        metadata_url=metadata_url,
        targets_url=targets_url,
        trusted_root=trusted_root,
        timeout=t.number("timeout", 30.0, minimum=0.1, maximum=3600),
        retries=t.integer("retries", 3, minimum=0, maximum=100),
        proxy=t.url("proxy", PROXY_SCHEMES),
        ca_bundle=t.path("ca_bundle"),
        metadata_deadline=t.number("metadata_deadline", 120.0, minimum=0.1, maximum=24 * 3600),
        min_rate=t.number("min_rate", 1024.0, minimum=0, maximum=1 << 40),
        rate_window=t.number("rate_window", 60.0, minimum=0.1, maximum=24 * 3600),
        allow_example_keys=t.boolean("allow_example_keys", False),
    )
    t.finish()
    return repo


def _release_name(t: _Table, key: str, value: str) -> str:
    """`value` if releases can carry it (the rule signed `hardware`/`channel` obey):
    a name no release can have would make the node skip every release, silently."""
    try:
        return check_name(key, value)
    except ValueError as err:
        raise t.error(key, str(err)) from err


def _device(t: _Table) -> DeviceConfig:
    hardware = _release_name(t, "hardware", t.required_string("hardware"))
    disk = t.path("disk", required=True)
    assert disk is not None
    bootloader = t.required_string("bootloader")
    known = known_bootloaders()
    if bootloader not in known:
        names = ", ".join(known)
        raise t.error("bootloader", f"unknown bootloader {bootloader!r} (known: {names})")
    grubenv = t.path("grubenv")
    if bootloader == "grub" and grubenv is None:
        raise t.error("grubenv", 'missing (required when bootloader = "grub")')
    if bootloader != "grub" and grubenv is not None:
        raise t.error("grubenv", f'only used by bootloader = "grub", not {bootloader!r}')
    esp = t.path("esp")
    boot_entries = _boot_entries(t, bootloader)
    if bootloader == "systemd-boot" and esp is None:
        raise t.error("esp", 'missing (required when bootloader = "systemd-boot")')
    booted_slot = t.string("booted_slot") or "auto"
    if booted_slot not in ("auto", *SLOTS):
        allowed = ", ".join(("auto", *SLOTS))
        raise t.error("booted_slot", f"{booted_slot!r} is not one of {allowed}")
    device = DeviceConfig(
        hardware=hardware,
        disk=disk,
        bootloader=bootloader,
        channel=_release_name(t, "channel", t.string("channel") or "stable"),
        grubenv=grubenv,
        booted_slot=booted_slot,
        state_dir=t.path("state_dir") or DeviceConfig.state_dir,
        os_release=t.path("os_release") or DeviceConfig.os_release,
        machine_id=t.path("machine_id") or DeviceConfig.machine_id,
        esp=esp,
        boot_entries=boot_entries,
    )
    t.finish()
    return device


def _boot_entries(t: _Table, bootloader: str) -> Mapping[str, str]:
    """`boot_entries = { A = "EFI/Linux/ab-A.efi", B = "..." }`: systemd-boot only."""
    from updater.boot.sdboot import entry_path

    raw = t.raw("boot_entries", False)
    if bootloader != "systemd-boot":
        if raw is not None:
            raise t.error(
                "boot_entries", f'only used by bootloader = "systemd-boot", not {bootloader!r}'
            )
        return MappingProxyType({})
    if raw is None:
        raise t.error("boot_entries", 'missing (required when bootloader = "systemd-boot")')
    if not isinstance(raw, dict) or set(raw) != set(SLOTS):
        raise t.error(
            "boot_entries", f"must be a table naming the entry of each slot ({', '.join(SLOTS)})"
        )
    entries = _Table(t.file, t.name, raw, prefix="boot_entries.")
    found: dict[str, str] = {}
    for slot in SLOTS:
        value = entries.required_string(slot)
        try:
            entry_path(value)
            check_target_path(value)
        except (ConfigError, ValueError) as err:
            raise entries.error(slot, str(err)) from err
        found[slot] = value
    if found[SLOTS[0]].casefold() == found[SLOTS[1]].casefold():
        raise entries.error(SLOTS[1], "names the same entry as slot " + SLOTS[0])
    return MappingProxyType(found)


def _slots(root: _Table) -> Mapping[str, Mapping[str, str]]:
    table = _sub_table(root, "slots", required=True)
    result: dict[str, Mapping[str, str]] = {}
    for slot in SLOTS:
        sub = _sub_table(table, slot, required=True)
        if not sub.data:
            raise sub.error("", 'names no partition (expected e.g. root = "root_a")')
        roles: dict[str, str] = {}
        for role in sub.data:
            try:
                check_role(role)  # the rule signed releases' `role` fields obey
            except ValueError as err:
                raise sub.error(role, str(err)) from err
            roles[role] = sub.required_string(role)
            if is_file_role(roles[role]):
                try:
                    check_target_path(file_path(roles[role]))
                except ValueError as err:
                    raise sub.error(role, f"file: {err}") from err
        result[slot] = MappingProxyType(roles)
    table.finish()
    first, second = SLOTS
    if set(result[first]) != set(result[second]):
        missing = sorted(set(result[first]) ^ set(result[second]))[0]
        lacking = second if missing in result[first] else first
        raise ConfigError(
            f"config {root.file}: [slots.{lacking}] {missing}: missing "
            f"(slots.{first} and slots.{second} must name the same roles)"
        )
    # FAT (the ESP) compares names case-insensitively: so do `file:` roles here.
    labels = [
        label.casefold() if is_file_role(label) else label
        for roles in result.values()
        for label in roles.values()
    ]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ConfigError(
            f"config {root.file}: [slots]: partition {duplicates[0]!r} is named twice "
            "(each role of each slot needs its own partition or file)"
        )
    return MappingProxyType(result)


def _health(t: _Table) -> HealthConfig:
    default_timeout = t.number("timeout", 10.0, minimum=0.1, maximum=3600)
    raw_checks = t.raw("checks", False)
    if raw_checks is None:
        raw_checks = []
    if not isinstance(raw_checks, list):
        raise t.error("checks", f"must be an array of tables, not {_toml_type(raw_checks)}")
    checks: list[HealthCheck] = []
    for index, raw in enumerate(raw_checks):
        key = f"checks[{index}]"
        if not isinstance(raw, dict):
            raise t.error(key, f"must be a table, not {_toml_type(raw)}")
        check = _Table(t.file, t.name, raw, prefix=f"{key}.")
        has_command, has_http = "command" in raw, "http" in raw
        if has_command == has_http:
            raise t.error(key, 'needs exactly one of command = [...] or http = "..."')
        command = http = None
        if has_command:
            check.seen.add("command")
            command = check.argv("command", ())
        else:
            http = check.url("http", ("http", "https"), required=True)
        timeout = check.number("timeout", default_timeout, minimum=0.1, maximum=3600)
        check.seen.update(("command", "http"))  # name both in the unknown-key message
        check.finish()
        checks.append(HealthCheck(command=command, http=http, timeout=timeout))
    health = HealthConfig(
        deadline=t.number("deadline", 600.0, minimum=0, maximum=7 * 24 * 3600),
        interval=t.number("interval", 10.0, minimum=0, maximum=3600),
        timeout=default_timeout,
        checks=tuple(checks),
    )
    t.finish()
    return health


def _daemon(t: _Table) -> DaemonConfig:
    windows, timezone = _daemon_windows(t)
    daemon = DaemonConfig(
        interval=t.number("interval", 3600.0, minimum=1, maximum=30 * 24 * 3600),
        jitter=t.number("jitter", 300.0, minimum=0, maximum=30 * 24 * 3600),
        windows=windows,
        timezone=timezone,
    )
    t.finish()
    return daemon


def _hooks(t: _Table) -> HooksConfig:
    defaults = HooksConfig()
    hooks = HooksConfig(
        pre_reboot=t.argv("pre_reboot", defaults.pre_reboot),
        reboot=t.argv("reboot", defaults.reboot),
        post_commit=t.argv("post_commit", defaults.post_commit),
        timeout=t.number("timeout", defaults.timeout, minimum=1, maximum=24 * 3600),
    )
    t.finish()
    return hooks


# --- entry points ----------------------------------------------------------------------


def parse_config(text: str, path: Path) -> Config:
    """Validate the TOML `text` of the config file `path` (used for messages and paths)."""
    try:
        data = loads_toml(text)
    except ValueError as err:  # bad syntax, nesting thousands deep, an int of 5000 digits
        raise ConfigError(f"config {path}: not valid TOML: {err}") from err
    return _config(data, path)


def load_config(path: Path) -> Config:
    """Read and validate the config file at `path` (a regular file, at most 1 MiB)."""
    try:
        data = read_toml(path, MAX_CONFIG_BYTES)
    except ValueError as err:  # cannot read, not UTF-8, not TOML
        raise ConfigError(f"config {path}: {err}") from err
    return _config(data, path)


def _config(data: dict[str, Any], path: Path) -> Config:
    """The validated Config of the parsed TOML document `data` of the file `path`."""
    root = _Table(path, "", data)
    config = Config(
        path=path,
        repository=_repository(_sub_table(root, "repository", required=True)),
        device=_device(_sub_table(root, "device", required=True)),
        slots=_slots(root),
        health=_health(_sub_table(root, "health", required=False)),
        daemon=_daemon(_sub_table(root, "daemon", required=False)),
        hooks=_hooks(_sub_table(root, "hooks", required=False)),
        coordination=_coordination(_sub_table(root, "coordination", required=False)),
        metrics=_metrics(_sub_table(root, "metrics", required=False)),
    )
    files = [r for roles in config.slots.values() for r in roles.values() if is_file_role(r)]
    if files and config.device.esp is None:
        raise ConfigError(
            f"config {path}: [device] esp: missing (required by the file role {files[0]!r})"
        )
    unknown = sorted(set(data) - root.seen)
    if unknown:
        known = ", ".join(sorted(root.seen))
        name = _shown_key(unknown[0])
        raise ConfigError(f"config {path}: [{name}]: unknown table (known: {known})")
    return config
