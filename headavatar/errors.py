"""User-facing errors.

A ``UserError`` is something the user can fix (bad path, wrong file, bad flag).
The CLI prints its message on one line and exits non-zero, without a traceback.
Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by input the user controls; the message says what to do."""

    exit_code = 2


class TrainingDiverged(UserError):
    """Training produced non-finite values (NaN/Inf)."""

    exit_code = 3
