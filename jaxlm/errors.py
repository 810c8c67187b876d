"""Exceptions that end a run with a specific exit code and a one-line message (no traceback)."""


class UserError(Exception):
    """Bad flag, config value, data or workdir: launch.py prints the message on one line and exits 2."""

    exit_code = 2


class DivergedError(Exception):
    """Non-finite loss or gradients: launch.py prints the message and exits 3 (last good checkpoint kept)."""

    exit_code = 3


class Interrupted(Exception):
    """SIGINT/SIGTERM: the run saved a checkpoint and stops; launch.py exits 130."""

    exit_code = 130
