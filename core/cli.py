"""The command-line convention of the three console scripts (`updater`, `sign-release`,
`update-mirror`): one `--json`, one output shape, one error handler, and the options
more than one program takes - each defined here once.

Invariants:

* Every group and every command of a program takes `--json` (a `JsonGroup` adds the
  flag to each command it is given), before or after the command name, with the same
  meaning: `updater --json status` is `updater status --json`.
* With --json, each document is one line on stdout, compact with sorted keys
  (`echo_json`). A command's result is one object (`emit`); progress events come before
  it as `{"event": "progress", ...}` lines. Without it, `emit` prints the text.
* An expected failure (`core.errors.UpdaterError`) ends in exactly one line on stderr,
  `<program>: error: <message>`, and the exit code declared on its class - the only
  place a process is ended with an error's code. With --json it is also one object on
  stdout: `{"error": <message>, "kind": <class name>, "exit_code": <n>}` with the error's
  `details` merged in (they never replace those three keys). A click usage error raised
  once --json was read is such an object too, beside click's usual usage message.
  Unexpected exceptions are bugs and keep their traceback.
* Importing this module costs click and the standard library only: the agent's
  everyday commands start fast (docs/architecture.md), so nothing here imports a
  program's library.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click

from core import __version__
from core.errors import UpdaterError

F = TypeVar("F", bound=Callable[..., Any])

# Where the --json flag is kept: `Context.meta` is one dict shared by a context and all
# its children, so the flag given at the group is seen by the command and the other way
# round, and the error handler (in the root's context) sees both.
_JSON = "core.cli.json"
_HELP = {"help_option_names": ["-h", "--help"]}


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta[_JSON] = True
    return value


def _json_flag() -> click.Option:
    return click.Option(
        ["--json"],
        is_flag=True,
        expose_value=False,
        callback=_set_json,
        help="Print JSON on stdout, one compact document per line (also before the command).",
    )


def json_mode(ctx: click.Context | None = None) -> bool:
    """Whether --json was given anywhere on this command line (so far)."""
    ctx = ctx or click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(_JSON))


def echo_json(data: Any) -> None:
    """Print one JSON document as one line on stdout: compact, keys sorted (stable)."""
    click.echo(json.dumps(data, sort_keys=True, separators=(",", ":")))


def emit(result: Mapping[str, Any], text: str | Iterable[str]) -> None:
    """Print a command's result: the object with --json, else the text (lines)."""
    if json_mode():
        echo_json(dict(result))
    elif isinstance(text, str):
        click.echo(text)
    else:
        for line in text:
            click.echo(line)


def error_document(err: UpdaterError) -> dict[str, Any]:
    """The --json form of an error: its details, then the three keys every error has."""
    return {
        **err.details,
        "error": str(err),
        "kind": type(err).__name__,
        "exit_code": err.exit_code,
    }


class JsonGroup(click.Group):
    """A click group that gives itself and every command added to it the --json flag."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _add_json_flag(self)

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        _add_json_flag(cmd)
        super().add_command(cmd, name)


def _add_json_flag(command: click.Command) -> None:
    if not any(param.name == "json" for param in command.params):
        command.params.append(_json_flag())


class ProgramGroup(JsonGroup):
    """The group of a program: expected failures become one line and their class's
    exit code (and with --json one error object), for every command below it.

    The program's name in the line is this group's command path (`updater`, or
    `updater tuf-client` for a protocol with its own name). `lazy_commands` maps a
    command name to `"module:attribute"`, imported only when that command is asked for
    (or listed by --help), so a command line loads the module of its own command only.
    """

    def __init__(self, *args: Any, lazy_commands: Mapping[str, str] | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy_commands:
            module, _, attribute = self.lazy_commands[cmd_name].partition(":")
            command = getattr(importlib.import_module(module), attribute)
            assert isinstance(command, click.Command), self.lazy_commands[cmd_name]
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UpdaterError as err:
            if json_mode(ctx):
                echo_json(error_document(err))
            click.echo(f"{ctx.command_path}: error: {err}", err=True)
            raise click.exceptions.Exit(err.exit_code) from err
        except click.ClickException as err:
            # Reported once, by the outermost program (tuf-client sits inside updater).
            if json_mode(ctx) and ctx.parent is None:
                kind = type(err).__name__
                echo_json({"error": err.format_message(), "kind": kind, "exit_code": err.exit_code})
            raise  # click prints its usual message, with the usage when there is one


def program(
    name: str, lazy_commands: Mapping[str, str] | None = None
) -> Callable[[Callable[..., Any]], ProgramGroup]:
    """Decorator: the root group of the console script `name` (-h/--help, --version,
    --json, the error handler). `name` is also the program name in every error line."""

    def decorate(f: Callable[..., Any]) -> ProgramGroup:
        f = click.version_option(__version__, prog_name=name)(f)
        group = click.group(
            name, cls=ProgramGroup, context_settings=_HELP, lazy_commands=lazy_commands
        )(f)
        assert isinstance(group, ProgramGroup)
        return group

    return decorate


# --- options of more than one program -------------------------------------------------


def trusted_root_option(*, name: str = "trusted_root") -> Callable[[F], F]:
    """`--root ROOT.json`: the root a verifier trusts (sign-release verify, update-mirror)."""
    return click.option(
        "--root",
        name,
        required=True,
        type=click.Path(dir_okay=False, path_type=Path),
        help="The trusted root.json (the one the nodes ship).",
    )


def allow_example_keys_option(
    *, envvar: str | None = None, signs: bool = False
) -> Callable[[F], F]:
    """`--allow-example-keys`: the one way to trust (and, for the signing tools, sign
    with) the INSECURE, published keys of keys-example/; refused by the libraries
    otherwise."""
    what = "sign with and trust" if signs else "trust"
    also = f" Also ${envvar}=1." if envvar else ""
    return click.option(
        "--allow-example-keys",
        is_flag=True,
        envvar=envvar,
        help=f"This is a demo or test: {what} the INSECURE, published keys of keys-example/.{also}",
    )
