"""`FieldError`, the one error of the signed release schema (`core.release`, its rollout
plan `core.rolloutplan`): a field of a target's `custom` breaks its rule.

Invariant: the message is one line naming the field, the refused value (as `repr`, cut
to 100 characters, so a newline or NUL in signed data cannot forge a line) and the rule.
"""

from __future__ import annotations

from typing import TypeVar

_SHOWN = 100  # characters of a refused value quoted in a message


class FieldError(ValueError):
    """A release field breaks its rule. `field` names it (`version`, `hardware`,
    `rollout.waves[1].share`, ...), `value` is what was given and `rule` says what is
    allowed (after the value)."""

    field: str = ""
    value: object = None
    rule: str = ""

    def named(self, name: str) -> str:
        """The message with the field called `name` (a command-line option, say)."""
        return f"{name} {show(self.value)} {self.rule}"


_E = TypeVar("_E", bound=FieldError)


def show(value: object) -> str:
    """`value` as a message quotes it: `repr`, at most 100 characters."""
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def refuse(cls: type[_E], field: str, value: object, rule: str, text: str | None = None) -> _E:
    """A `cls` (a FieldError) for `field`: `<field> <value> <rule>` unless `text`."""
    err = cls(text or f"{field} {show(value)} {rule}")
    err.field, err.value, err.rule = field, value, rule
    return err
