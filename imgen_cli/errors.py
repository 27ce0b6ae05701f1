"""Errors the command line turns into one clear sentence instead of a traceback.

`UserError` is something the user can fix (bad path, bad flag, wrong model): exit code 2.
`RunError` is a failure while doing the work (a NaN loss, a broken shard): exit code 1.
"""


class ImgenError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class UserError(ImgenError):
    exit_code = 2


class RunError(ImgenError):
    exit_code = 1


def require(ok: bool, message: str, hint: str | None = None) -> None:
    """Raise a UserError with `message` unless `ok`: the one-line checks of config validation."""
    if not ok:
        raise UserError(message, hint)
