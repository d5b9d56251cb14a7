"""Errors that the CLI turns into one line, a hint and an exit code (the README lists the codes)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_MISSING_DEPENDENCY = 3
EXIT_INTERNAL = 4


class IdleExportError(Exception):
    """Base error: a one-line message, an optional hint and the exit code the CLI uses."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = " ".join(self.message.split())
        if self.hint:
            text += f" (hint: {' '.join(self.hint.split())})"
        return text


class BadInputError(IdleExportError):
    """The user gave something we cannot use: a wrong file, a bad option value."""

    exit_code = EXIT_BAD_INPUT


class CheckpointError(BadInputError):
    """The checkpoint cannot be read safely or does not fit the architecture."""


class MissingDependencyError(IdleExportError):
    """A library or a piece of hardware that the command needs is not there."""

    exit_code = EXIT_MISSING_DEPENDENCY


class CheckFailedError(IdleExportError):
    """A parity or tolerance check ran and failed."""

    exit_code = EXIT_CHECK_FAILED
