"""User-facing errors: one line, exit code 2, no traceback (see cli.main)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (config, paths, files). Printed as one line; exit code 2.

    The message must say what was wrong, where (file / key / value) and what to do.
    """

    exit_code = 2


class ConfigError(UserError):
    """A config file or override is invalid."""


class ModelFileError(UserError):
    """A model / adaptor directory or file is missing, incomplete or corrupt."""


class DataError(UserError):
    """A prompt set or dataset file is unreadable, empty or malformed."""
