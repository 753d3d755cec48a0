"""Errors of the release signing tools (`sign-release`).

Each is an `core.errors` class, so the CLI's ErrorHandlingGroup prints one line
(`sign-release: error: ...`) and exits with the class's code. Bad input (a key, an
option, an image, a repository that is not one) is a `SigningError` (exit 2); a
repository that does not verify as a node would see it is a `VerificationError`
(exit 3); a failed disk write is a `RepositoryIOError` (exit 4).
"""

from __future__ import annotations

from core.errors import ConfigError, UpdateFailed, UpdateRejected


class SigningError(ConfigError):
    """Bad input to a signing command: the repository was left as it was."""


class KeyFileError(SigningError):
    """A key file or key URI cannot be used: missing, wrong passphrase, wrong role."""


class ExampleKeyError(KeyFileError):
    """An INSECURE key of keys-example/ would sign, or be trusted, outside a demo or test."""


class RepositoryStateError(SigningError):
    """The repository is not one, or the requested change conflicts with its content."""


class ThresholdError(SigningError):
    """A role lacks signatures (or keys) to reach its threshold."""


class VerificationError(UpdateRejected):
    """The published repository does not verify as a node would verify it."""


class RepositoryIOError(UpdateFailed):
    """Reading or writing the repository failed (disk, permissions)."""
