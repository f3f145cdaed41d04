"""Errors that are the user's to fix: the CLI prints them on one line and exits with code 2."""


class UserError(Exception):
    """A mistake in a config, dataset, model directory or command line.

    The message must name the file, field or line at fault; the CLI shows it without a traceback.
    """


class ConfigError(UserError):
    """A config file or `--set` override that does not validate against `JobConfig`."""


class DataError(UserError):
    """A dataset file that cannot be read as prompts with answers."""


class ModelLoadError(UserError):
    """A model directory that cannot be loaded safely (missing files, no safetensors, ...)."""
