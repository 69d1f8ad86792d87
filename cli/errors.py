"""Errors the CLI reports, and its exit codes.

Exit codes (every command):
  0  success
  1  error (bad state, failed operation, permission denied)
  2  not available: a map is not pinned / the agent cannot be reached (is the agent running on
     this node?), or malformed arguments (argparse's usage error)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_UNAVAILABLE = 2


class CliError(Exception):
    """A failure reported as one line on stderr; `code` is the exit code."""

    code = EXIT_ERROR

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class Unavailable(CliError):
    """What the command needs is not there (map not pinned, agent unreachable)."""

    code = EXIT_UNAVAILABLE
