"""User-facing errors: the CLI prints their message (no traceback) and exits with `exit_code`."""


class UserError(Exception):
    """A problem the user can fix: bad config, missing file, malformed data."""

    exit_code = 2


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class ModelError(UserError):
    pass
