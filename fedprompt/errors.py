"""Errors of fedprompt's boundaries, importable without torch (the Flower relay path needs them)."""


class UserError(Exception):
    """A mistake in what the user asked for (a configuration, a data file, a folder), not a bug.

    The message says what is wrong and how to fix it; the command line prints it as one
    ``error:`` line and exits with status 2 (a traceback only with ``--debug``).
    """


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names each bad field and what is allowed."""


class DataError(UserError, ValueError):
    """Data that cannot be loaded or split as configured; the message names the problem and the fix."""


class ExportError(UserError):
    """A run whose prompt cannot be exported as asked; the message says why and what would work."""


class RunFolderError(UserError, FileNotFoundError):
    """A folder given as a run's results folder (to resume, export, plot or report) that is not one."""


class NoClientTrainedError(UserError, RuntimeError):
    """Every client sampled in a round failed: usually a setting that no client can train with
    (the first reason says which); the checkpoint of the last complete round stays."""


class PayloadError(ValueError):
    """A payload that was rejected on arrival; the message says which part is wrong and how."""
