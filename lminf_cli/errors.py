"""User-facing errors: each carries one line for stderr and an exit code.

Core modules raise these; only the CLI turns them into output.
"""

from __future__ import annotations


class LminfError(Exception):
    """An error the user can fix; the message is a single explanatory line."""

    exit_code = 2


class UsageError(LminfError):
    """A bad option value."""


class InputError(LminfError):
    """A document that cannot be read as text."""


class ModelError(LminfError):
    """A model that cannot be found, loaded or run."""


class SettingsError(UsageError):
    """A setting of the engine (LambdaSettings, SamplingParams) out of its range.

    `setting` is the field's name; the CLI shows it as the option that sets it.
    """

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting} {message}")
        self.setting = setting
        self.detail = message
